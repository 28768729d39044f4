"""Benchmarks by name, in their real on-disk layouts, scored by an oracle whose predictions are known:
a wrong label mapping, class order or class subset fails (clip/benchmarks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip.benchmarks import BENCHMARKS, load_benchmark
from clip.data.eval_assets import get_classnames, get_imagenet_subset, get_imagenet_wnids, get_templates
from clip.data.eval_datasets import load_classification_set
from clip.transforms import image_transform_eval
from clip.zero_shot import evaluate_zero_shot
from tests.benchmark_fixtures import OracleCLIP, colour_png, write_colour_image
from tests.eval_fixtures import one_thread, write_tar  # noqa: F401

TRANSFORM = image_transform_eval(32)
WNIDS = get_imagenet_wnids()
IMAGENET_NAMES = get_classnames("imagenet1k")
# Spread over the label range, so that positions among the folders present are not the labels.
CLASSES = [0, 1, 2, 10, 100, 500, 998]


def _imagenet_oracle(distractor: int | None = None) -> OracleCLIP:
    return OracleCLIP(IMAGENET_NAMES, get_templates("imagenet1k"), distractor)


def _score(oracle: OracleCLIP, eval_set, predictions: dict | None = None) -> dict[str, float]:
    metrics = evaluate_zero_shot(oracle, eval_set.dataset, eval_set.classnames, eval_set.templates, oracle.tokenize,
                                 name=eval_set.name, batch_size=8, predictions=predictions)  # fmt: skip
    return {key.removeprefix(f"eval/{eval_set.name}_"): value for key, value in metrics.items()}


def _write_wnid_folder(root: Path, classes: list[int], per_class: int = 2) -> None:
    for index in classes:
        for sample in range(per_class):
            write_colour_image(root / WNIDS[index] / f"ILSVRC2012_val_{index:05d}_{sample}.JPEG", index)


@pytest.mark.parametrize("name", ["imagenet1k", "imagenet-sketch"])
def test_imagenet_and_sketch_read_wnid_folders_with_imagenet_labels(tmp_path, name):
    _write_wnid_folder(tmp_path / "val", CLASSES)
    eval_set = load_benchmark(name, tmp_path / "val", TRANSFORM)
    assert eval_set.name == name and len(eval_set.classnames) == 1000 and len(eval_set.templates) == 80
    assert sorted({label for _, label in eval_set.dataset.samples}) == CLASSES  # labels, not folder positions
    predictions = {}
    metrics = _score(_imagenet_oracle(), eval_set, predictions)
    assert metrics["top1"] == 1.0 and metrics["num_samples"] == 2 * len(CLASSES)
    assert predictions["top1"].tolist() == predictions["target"].tolist()


def test_imagenet_class_order_is_checked_by_the_oracle(tmp_path):
    """The oracle test can fail: with the class names in another order it scores 0."""
    _write_wnid_folder(tmp_path / "val", CLASSES)
    eval_set = load_benchmark("imagenet1k", tmp_path / "val", TRANSFORM)
    eval_set.classnames = eval_set.classnames[1:] + eval_set.classnames[:1]
    assert _score(_imagenet_oracle(), eval_set)["top1"] == 0.0


def test_imagenet_v2_numeric_folders_are_labelled_by_their_number(tmp_path):
    # String order (10, 100, 2, 998) is not numeric order: ImageFolder's labels would be wrong.
    for index in (2, 10, 100, 998):
        for sample in range(2):
            write_colour_image(
                tmp_path / "imagenetv2-matched-frequency-format-val" / str(index) / f"{sample}.jpeg", index
            )
    eval_set = load_benchmark("imagenet-v2", tmp_path / "imagenetv2-matched-frequency-format-val", TRANSFORM)
    assert eval_set.name == "imagenet-v2" and len(eval_set.classnames) == 1000
    assert _score(_imagenet_oracle(), eval_set) | {"top5": None} == {
        "top1": 1.0, "top5": None, "mean_per_class_recall": 1.0, "num_samples": 8
    }  # fmt: skip
    # Read as a plain folder, the numeric folders are refused (with the way to read them), not mislabelled.
    with pytest.raises(ValueError, match="read it with --benchmark imagenet-v2"):
        load_classification_set(tmp_path / "imagenetv2-matched-frequency-format-val", TRANSFORM)
    (tmp_path / "imagenetv2-matched-frequency-format-val" / "n01440764").mkdir()
    with pytest.raises(ValueError, match="folders that are not class numbers 0-999, e.g. \\['n01440764'\\]"):
        load_benchmark("imagenet-v2", tmp_path / "imagenetv2-matched-frequency-format-val", TRANSFORM)


@pytest.mark.parametrize("name", ["imagenet-r", "imagenet-a", "imagenet-o"])
def test_200_class_subsets_restrict_the_logits_to_the_subset(tmp_path, name):
    subset = get_imagenet_subset(name)
    assert len(subset) == 200 and subset == sorted(subset) and set(subset) <= set(WNIDS)
    inside = [WNIDS.index(wnid) for wnid in (subset[0], subset[1], subset[57], subset[199])]
    distractor = next(index for index, wnid in enumerate(WNIDS) if wnid not in subset)
    _write_wnid_folder(tmp_path / name, inside)
    eval_set = load_benchmark(name, tmp_path / name, TRANSFORM)
    assert eval_set.name == name and eval_set.classnames == [IMAGENET_NAMES[WNIDS.index(w)] for w in subset]
    # The distractor outscores the true class on every image; outside the subset, it cannot be predicted.
    oracle = _imagenet_oracle(distractor)
    assert _score(oracle, eval_set)["top1"] == 1.0
    # The same images against all 1000 classes: the distractor wins every time.
    full = load_benchmark("imagenet1k", tmp_path / name, TRANSFORM)
    assert _score(oracle, full)["top1"] == 0.0
    # A folder outside the subset is not the benchmark.
    _write_wnid_folder(tmp_path / name, [distractor], per_class=1)
    with pytest.raises(ValueError, match=f"{name} at .*: 1 class folder\\(s\\) outside its 200 classes"):
        load_benchmark(name, tmp_path / name, TRANSFORM)


def _write_objectnet(root: Path, images_per_class: dict[int, int]) -> list[str]:
    """The release's layout: images/<folder>/ and mappings/. 113 classes map to ImageNet, 2 do not.
    Folder order (f000, f001, ...) is the reverse of label order, so sorting by label would be wrong."""
    release = root / "objectnet-1.0"
    labels = {f"f{i:03d}": f"Class {114 - i:03d}" for i in range(115)}
    mapped = {label: f"imagenet name {i}" for i, label in enumerate(list(labels.values())[:113])}
    (release / "mappings").mkdir(parents=True)
    (release / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(labels))
    (release / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(mapped))
    for position, count in images_per_class.items():
        for sample in range(count):
            write_colour_image(release / "images" / f"f{position:03d}" / f"{sample}.png", position)
    return [labels[f"f{i:03d}"].lower() for i in range(113)]


def test_objectnet_is_its_113_imagenet_classes_in_folder_order(tmp_path):
    names = _write_objectnet(tmp_path, {0: 2, 5: 1, 112: 2, 113: 3, 114: 1})  # 113 and 114: not ImageNet's
    eval_set = load_benchmark("objectnet", tmp_path, TRANSFORM)
    assert eval_set.name == "objectnet" and eval_set.classnames == names and len(eval_set.templates) == 80
    oracle = OracleCLIP(names, get_templates("imagenet1k"))
    assert _score(oracle, eval_set) | {"top5": None} == {"top1": 1.0, "top5": None, "mean_per_class_recall": 1.0,
                                                          "num_samples": 5}  # fmt: skip
    (tmp_path / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(FileNotFoundError, match="objectnet_to_imagenet_1k.json"):
        load_benchmark("objectnet", tmp_path, TRANSFORM)


def _members(labels: list[int]) -> list[tuple[str, bytes]]:
    members = []
    for index, label in enumerate(labels):
        members += [(f"{index:06d}.png", colour_png(label)), (f"{index:06d}.cls", str(label).encode())]
    return members


def test_a_clip_benchmark_export_is_read_with_its_own_lists_and_checked(tmp_path):
    export = tmp_path / "wds_imagenet-r"
    (export / "test").mkdir(parents=True)
    write_tar(export / "test" / "0.tar", _members([0, 3, 199, 3]))
    names = [f"rendition {i}" for i in range(200)]
    (export / "classnames.txt").write_text("\n".join(names) + "\n")
    (export / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    eval_set = load_benchmark("imagenet-r", export, TRANSFORM)
    assert eval_set.name == "imagenet-r" and eval_set.classnames == names and eval_set.templates == ["a {c}."]
    assert _score(OracleCLIP(names, ["a {c}."]), eval_set)["top1"] == 1.0
    (export / "classnames.txt").write_text("\n".join(names[:150]) + "\n")
    with pytest.raises(ValueError, match="imagenet-r at .*: 150 classes, but imagenet-r has 200"):
        load_benchmark("imagenet-r", export, TRANSFORM)


def test_a_clip_paper_export_without_templates_gets_openai_templates_and_its_metric(tmp_path):
    export = tmp_path / "wds_pets"
    (export / "test").mkdir(parents=True)
    write_tar(export / "test" / "0.tar", _members([0, 36]))
    (export / "classnames.txt").write_text("\n".join(get_classnames("pets")) + "\n")
    eval_set = load_benchmark("pets", export, TRANSFORM)
    assert eval_set.templates == get_templates("pets") == ["a photo of a {}, a type of pet."]
    assert eval_set.main_metric == "mean_per_class_recall" == BENCHMARKS["pets"].main_metric
    with pytest.raises(FileNotFoundError, match="no CLIP_benchmark export there"):
        load_benchmark("pets", tmp_path, TRANSFORM)


def test_shipped_clip_paper_lists_match_clip_benchmark_where_it_has_them():
    import clip_benchmark.datasets as cb

    root = Path(cb.__file__).parent
    classnames = json.loads((root / "en_classnames.json").read_text())
    templates = json.loads((root / "en_zeroshot_classification_templates.json").read_text())
    for name in ("flowers", "gtsrb", "eurosat", "mnist", "pets", "country211", "pcam", "fer2013"):
        assert len(get_classnames(name)) == len(classnames[name]), name
    # (CLIP_benchmark's RESISC45 templates are its own, not OpenAI's.)
    for name in ("cars", "dtd", "stl10", "eurosat", "gtsrb", "fer2013"):
        assert get_templates(name) == [t.replace("{c}", "{}") for t in templates[name]], name


def test_cifar_by_name_from_torchvision_files(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = [3, 0, 9, 3, 7]
    # flat colour images, 32 x 32, channel-major rows as CIFAR stores them
    pixels = np.stack([np.concatenate([np.full(1024, label), np.zeros(1024), np.full(1024, 77)]) for label in labels])
    for filename in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": pixels.astype(np.uint8), "labels": labels}
        (folder / filename).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": get_classnames("cifar10")}, protocol=2))
    eval_set = load_benchmark("cifar10", tmp_path, TRANSFORM)
    assert eval_set.name == "cifar10" and len(eval_set.templates) == 18
    assert _score(OracleCLIP(get_classnames("cifar10"), eval_set.templates), eval_set)["top1"] == 1.0
    with pytest.raises(ValueError, match="the CIFAR files there are not cifar100's"):
        load_benchmark("cifar100", tmp_path, TRANSFORM)


@pytest.mark.parametrize("name", ["imagenet-r", "imagenet-a", "imagenet-o"])
def test_subsets_equal_clip_benchmarks_on_a_complete_release_folder(tmp_path, name):
    from clip_benchmark.datasets.builder import build_dataset

    subset = get_imagenet_subset(name)
    png = colour_png(0, size=4)
    for wnid in subset:
        (tmp_path / wnid).mkdir()
        (tmp_path / wnid / "0.png").write_bytes(png)
    theirs = build_dataset(name, root=str(tmp_path), transform=TRANSFORM, download=False)
    ours = load_benchmark(name, tmp_path, TRANSFORM)
    assert ours.classnames == theirs.classes
    assert [label for _, label in ours.dataset.samples] == [label for _, label in theirs.samples]
