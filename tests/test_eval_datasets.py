"""Eval datasets: every supported format, the shipped lists against their references, safe tar reading."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clip.data.eval_assets import get_classnames, get_imagenet_wnids, get_templates
from clip.data.eval_cifar import CifarDataset
from clip.data.eval_datasets import load_classification_set, load_retrieval_set, read_caption_file
from clip.data.eval_shards import TarEvalDataset, collate_eval_batch, expand_shards
from clip.transforms import image_transform_eval
from clip.zero_shot import evaluate_zero_shot
from tests.data_shards import add_member
from tests.eval_fixtures import (  # noqa: F401
    classification_members,
    image_bytes,
    one_thread,
    tiny_model,
    write_caption_set,
    write_image_folder,
    write_tar,
)
from tests.payloads import SystemCallPayload

TRANSFORM = image_transform_eval(32)


def _labels(dataset) -> list[int]:
    return [label for _, label in dataset]


# ---------------------------------------------------------------------------------------------
# Shipped lists


def test_shipped_imagenet_lists_equal_openai_lists():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert get_classnames("imagenet1k") == list(IMAGENET_CLASSNAMES)
    assert get_templates("imagenet1k") == [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    wnids = get_imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    import timm.data

    timm_synsets = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    assert wnids == timm_synsets.read_text().split()


def test_shipped_cifar_lists_equal_clip_benchmark():
    import clip_benchmark.datasets as cb

    templates = json.loads((Path(cb.__file__).parent / "en_zeroshot_classification_templates.json").read_text())
    for name in ("cifar10", "cifar100"):
        assert get_templates(name) == [t.replace("{c}", "{}") for t in templates[name]]
    assert get_classnames("cifar10")[:3] == ["airplane", "automobile", "bird"]
    cifar100 = get_classnames("cifar100")
    # CIFAR-100's meta file lists the fine labels alphabetically, with '_' where ours have spaces.
    raw = [name.replace(" ", "_") for name in cifar100]
    assert len(set(raw)) == 100 and raw == sorted(raw) and "aquarium fish" in cifar100
    with pytest.raises(KeyError, match="known"):
        get_classnames("imagenet-21k")


# ---------------------------------------------------------------------------------------------
# Image folders


def test_synthetic_folder_with_classnames_and_templates(tmp_path):
    classnames = write_image_folder(tmp_path / "heldout", num_classes=4, per_class=2, templates=["a {} here."])
    eval_set = load_classification_set(tmp_path / "heldout", TRANSFORM)
    assert (eval_set.name, eval_set.classnames, eval_set.templates) == ("heldout", classnames, ["a {} here."])
    # label = position of the directory in sorted order
    assert _labels(eval_set.dataset) == [0, 0, 1, 1, 2, 2, 3, 3]
    image, _ = eval_set.dataset[0]
    assert image.shape == (3, 32, 32)

    (tmp_path / "heldout" / "templates.txt").unlink()
    assert load_classification_set(tmp_path / "heldout", TRANSFORM).templates == ["a photo of a {}."]
    (tmp_path / "heldout" / "classnames.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match="lists 3 class names but .* has 4 class directories"):
        load_classification_set(tmp_path / "heldout", TRANSFORM)


def test_imagenet_folder_maps_wordnet_ids_to_openai_names(tmp_path):
    rng = np.random.default_rng(0)
    # A class subset (as in ImageNet-R/A-style folders): names must follow the wnids, not positions.
    for wnid in ("n01443537", "n01440764", "n15075141"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "ILSVRC2012_val_1.JPEG").write_bytes(image_bytes(rng, "JPEG"))
    eval_set = load_classification_set(tmp_path / "val", TRANSFORM)
    # named by the path (a split directory by its parent): the class names are also ImageNet-R's, -A's, Sketch's
    assert eval_set.name == tmp_path.name
    assert eval_set.classnames == ["tench", "goldfish", "toilet paper"]
    assert len(eval_set.templates) == 80
    with pytest.raises(ValueError, match="pass its val/ directory"):
        load_classification_set(tmp_path, TRANSFORM)


# ---------------------------------------------------------------------------------------------
# CIFAR


def _write_cifar(root: Path, cifar100: bool, rng: np.random.Generator) -> None:
    if cifar100:
        folder, label_key, meta = root / "cifar-100-python", "fine_labels", ("meta", "fine_label_names")
        files, names = ["train", "test"], [n.replace(" ", "_") for n in get_classnames("cifar100")]
    else:
        folder, label_key, meta = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names")
        files, names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], get_classnames("cifar10")
    folder.mkdir(parents=True)
    for filename in files:
        pixels, labels = rng.integers(0, 256, (6, 3072), dtype=np.uint8), rng.integers(0, len(names), 6).tolist()
        entry = {"data": pixels, label_key: labels}
        (folder / filename).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: names}, protocol=2))


@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_reads_torchvision_local_format_like_torchvision(tmp_path, monkeypatch, cifar100):
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path, cifar100, np.random.default_rng(0))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # our files have other md5s
    reference_class = tv_cifar.CIFAR100 if cifar100 else tv_cifar.CIFAR10
    for split in ("train", "test"):
        eval_set = load_classification_set(tmp_path, TRANSFORM, split=split)
        reference = reference_class(str(tmp_path), train=split == "train", transform=TRANSFORM)
        assert eval_set.name == ("cifar100" if cifar100 else "cifar10") and len(eval_set.dataset) == len(reference)
        assert eval_set.classnames == [name.replace("_", " ") for name in reference.classes]
        for index in (0, len(reference) - 1):
            image, label = eval_set.dataset[index]
            reference_image, reference_label = reference[index]
            assert label == reference_label and torch.equal(image, reference_image)
    assert len(eval_set.templates) == 18


def test_cifar_refuses_pickled_code(tmp_path):
    _write_cifar(tmp_path, False, np.random.default_rng(0))
    marker = tmp_path / "marker"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": SystemCallPayload(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle posix.system"):
        CifarDataset(tmp_path, TRANSFORM)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# WebDataset eval shards


def _write_clip_benchmark_layout(root: Path, labels_per_shard: list[list[int]], classnames: list[str]) -> None:
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    start = 0
    for index, labels in enumerate(labels_per_shard):
        write_tar(root / "test" / f"{index}.tar", classification_members(rng, labels, start))
        start += len(labels)
    (root / "test" / "nshards.txt").write_text(str(len(labels_per_shard)))
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")


def test_shards_in_clip_benchmark_layout_split_over_workers(tmp_path):
    labels = [[0, 1, 2], [2, 1], [0], [1, 1, 2, 0]]
    _write_clip_benchmark_layout(tmp_path / "wds_synth", labels, ["cat", "dog", "tree"])
    eval_set = load_classification_set(tmp_path / "wds_synth", TRANSFORM)
    assert (eval_set.name, eval_set.classnames) == ("wds_synth", ["cat", "dog", "tree"])
    assert eval_set.templates == ["a photo of a {c}.", "art of the {c}."]
    assert _labels(eval_set.dataset) == [label for shard in labels for label in shard]
    # Two DataLoader workers read disjoint shards: every sample exactly once.
    loader = DataLoader(eval_set.dataset, batch_size=2, num_workers=2, collate_fn=collate_eval_batch)
    seen = sorted(label for _, batch in loader for label in batch.tolist())
    assert seen == sorted(label for shard in labels for label in shard)
    # The same set named by a shard pattern.
    pattern = load_classification_set(tmp_path / "wds_synth" / "test" / "{0..3}.tar", TRANSFORM)
    assert _labels(pattern.dataset) == _labels(eval_set.dataset) and pattern.name == "wds_synth"


def test_shards_and_image_folder_give_the_same_zero_shot_metrics(tmp_path):
    classnames = write_image_folder(tmp_path / "folder", num_classes=6, per_class=3)
    members = []
    for label, directory in enumerate(sorted(p for p in (tmp_path / "folder").iterdir() if p.is_dir())):
        for image in sorted(directory.iterdir()):
            key = f"{label}_{image.stem}"
            members += [(f"{key}.png", image.read_bytes()), (f"{key}.cls", f"{label}\n".encode())]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "000.tar", members)
    (tmp_path / "shards" / "classnames.txt").write_text("\n".join(classnames))
    model = tiny_model()
    results = []
    for path in (tmp_path / "folder", tmp_path / "shards" / "000.tar"):
        eval_set = load_classification_set(path, TRANSFORM, name="set")
        metrics = evaluate_zero_shot(model, eval_set.dataset, classnames, ["a {}."], open_clip.tokenize, name="set")
        results.append(metrics)
    assert results[0] == results[1] and results[0]["eval/set_num_samples"] == 18


def test_tar_reader_skips_unsafe_and_broken_members(tmp_path, caplog):
    rng = np.random.default_rng(0)
    marker = tmp_path / "marker"
    good = classification_members(rng, [3], start=0)
    with_pickle = classification_members(rng, [4], start=1) + [("000001.pyd", pickle.dumps(SystemCallPayload(marker)))]
    oversize = [("000003.png", b"\x89PNG" + bytes(20_000)), ("000003.cls", b"1")]
    corrupt = [("000004.jpg", os.urandom(500)), ("000004.cls", b"1")]
    last = classification_members(rng, [5], start=5)
    shard = write_tar(tmp_path / "shard.tar", good + with_pickle + oversize + corrupt)
    with tarfile.open(shard, "a") as tar:
        add_member(tar, "000002.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        for name, data in [("000002.cls", b"2"), ("../../evil.cls", b"7"), ("/abs/000006.cls", b"7")] + last:
            add_member(tar, name, data)
    before = sorted(tmp_path.rglob("*"))

    dataset = TarEvalDataset(str(shard), TRANSFORM, "cls", max_member_bytes=16_000)
    assert _labels(dataset) == [3, 4, 5]
    assert not marker.exists() and sorted(tmp_path.rglob("*")) == before
    log = caplog.text
    assert "'000002.jpg' (not a regular file" in log and "'../../evil.cls' (not a regular file" in log
    assert "'000003.png' of 20004 bytes" in log and "sample '000004' is unreadable" in log


def test_tar_images_are_decoded_as_jpeg_png_or_webp_only(tmp_path, caplog):
    """The training decoder's rule (clip.data.decode): PIL alone would decode this GIF from a `.jpg` member."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    members = [("000001.jpg", gif.getvalue()), ("000001.cls", b"1")]
    shard = write_tar(tmp_path / "shard.tar", classification_members(np.random.default_rng(0), [2]) + members)
    assert _labels(TarEvalDataset(str(shard), TRANSFORM, "cls")) == [2]
    assert "sample '000001' is unreadable (UnidentifiedImageError: cannot identify image file" in caplog.text


@pytest.mark.parametrize("cut", ["inside_a_member", "at_a_member_boundary", "before_a_label", "inside_the_end_marker"])
def test_truncated_shard_is_an_error_naming_it(tmp_path, caplog, cut):
    shard = write_tar(tmp_path / "cut.tar", classification_members(np.random.default_rng(0), [0, 1, 2]))
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    end_of_members = members[-1].offset_data + -(-members[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    end = {
        "inside_a_member": members[2].offset_data + 10,
        "at_a_member_boundary": members[2].offset,
        "before_a_label": members[3].offset_data,  # sample 000001 lost its label: no warning, just the error
        "inside_the_end_marker": end_of_members + tarfile.BLOCKSIZE,  # one of its two zero blocks
    }[cut]
    shard.write_bytes(shard.read_bytes()[:end])
    if cut == "at_a_member_boundary":  # why the reader checks: tarfile itself ends without a word
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) == 2
    with pytest.raises(RuntimeError, match="cannot read eval shard .*cut.tar"):
        list(TarEvalDataset(str(shard), TRANSFORM, "cls"))
    assert "skipped" not in caplog.text


def test_expand_shards(tmp_path):
    for index in range(3):
        write_tar(tmp_path / f"s-{index:03d}.tar", [])
    assert expand_shards(str(tmp_path / "s-{000..002}.tar")) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    for remote in ("pipe:cat /tmp/x.tar", "s3://bucket/x.tar"):
        with pytest.raises(ValueError, match="must be local files"):
            expand_shards(remote)
    with pytest.raises(FileNotFoundError, match="s-009.tar"):
        expand_shards(str(tmp_path / "s-{008..009}.tar"))


def test_unknown_directory_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_classification_set(tmp_path, TRANSFORM)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_classification_set(tmp_path / "missing", TRANSFORM)


# ---------------------------------------------------------------------------------------------
# Retrieval sets


@pytest.mark.parametrize("karpathy", [True, False])
def test_caption_files_in_both_karpathy_layouts(tmp_path, karpathy):
    path = write_caption_set(tmp_path, num_images=5, karpathy=karpathy)
    items = read_caption_file(path, tmp_path)
    assert len(items) == 5 and all(1 <= len(captions) <= 4 for _, captions in items)
    eval_set = load_retrieval_set(path, TRANSFORM, images=tmp_path)
    image, captions = eval_set.dataset[0]
    assert image.shape == (3, 32, 32) and captions == items[0][1]
    with pytest.raises(FileNotFoundError, match="5 image\\(s\\) not found"):
        read_caption_file(path, tmp_path / "elsewhere")


def test_caption_file_errors(tmp_path):
    path = write_caption_set(tmp_path, num_images=2)
    with pytest.raises(ValueError, match="no images in split 'val'"):
        read_caption_file(path, tmp_path, split="val")
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not a Karpathy caption file"):
        read_caption_file(tmp_path / "bad.json")


def test_retrieval_shards_with_multi_caption_txt(tmp_path):
    rng = np.random.default_rng(0)
    members = []
    for index, captions in enumerate(["a dog\nthe dog runs\n", "a red car", "\n"]):
        members += [(f"{index:04d}.jpg", image_bytes(rng, "JPEG")), (f"{index:04d}.txt", captions.encode())]
    (tmp_path / "coco_wds" / "test").mkdir(parents=True)
    write_tar(tmp_path / "coco_wds" / "test" / "0.tar", members)
    eval_set = load_retrieval_set(tmp_path / "coco_wds", TRANSFORM)
    assert eval_set.name == "coco_wds"
    # The sample without any caption is skipped with a warning.
    assert [captions for _, captions in eval_set.dataset] == [["a dog", "the dog runs"], ["a red car"]]
