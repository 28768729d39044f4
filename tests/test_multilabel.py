"""Multilabel zero-shot (VOC2007) and CLIP_benchmark's exports of each task type (clip/multilabel.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from clip.benchmarks import load_benchmark
from clip.data.eval_datasets import RetrievalSet, load_export
from clip.multilabel import average_precisions, evaluate_multilabel
from clip.transforms import image_transform_eval
from tests.benchmark_fixtures import OracleCLIP, colour_png
from tests.eval_fixtures import one_thread, write_tar  # noqa: F401

TRANSFORM = image_transform_eval(32)


def test_average_precision_equals_clip_benchmarks_and_the_11_point_rule():
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 6, generator=generator)
    targets = (torch.rand(60, 6, generator=generator) < 0.3).long()
    targets[:, 5] = 0  # a class without positives: AP 0 in both
    ours, _ = average_precisions(scores, targets)
    torch.testing.assert_close(ours.float(), average_precision_per_class(scores, targets), rtol=0, atol=1e-6)
    # Ranked truth 1, 0, 1, 0, 0: precision 1 up to recall 0.5, then 2/3 up to recall 1 (the VOC2007
    # devkit's rule: the mean over recall 0, 0.1, ..., 1 of the best precision at that recall or more).
    _, eleven = average_precisions(
        torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]]), torch.tensor([[1], [0], [1], [0], [0]])
    )
    assert eleven.item() == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11, abs=1e-12)


def _npy(row: list[int]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(row, dtype=np.int64))
    return buffer.getvalue()


def test_a_multilabel_export_scores_each_class_ranking(tmp_path):
    export = tmp_path / "wds_voc2007_multilabel"
    (export / "test").mkdir(parents=True)
    names = ["aeroplane", "bicycle", "bird", "boat"]
    # Each image shows (by its colour) its first class; the second positive of image 3 is unseen.
    rows = {0: [1, 0, 0, 0], 1: [0, 1, 0, 0], 2: [0, 0, 1, 0], 3: [1, 0, 0, 1], 4: [0, 0, 0, 1]}
    colours = {0: 0, 1: 1, 2: 2, 3: 0, 4: 3}
    members = []
    for key, row in rows.items():
        members += [(f"{key:04d}.png", colour_png(colours[key])), (f"{key:04d}.npy", _npy(row))]
    write_tar(export / "test" / "0.tar", members)
    (export / "classnames.txt").write_text("\n".join(names) + "\n")
    (export / "dataset_type.txt").write_text("multilabel\n")
    eval_set = load_benchmark("voc2007_multilabel", export, TRANSFORM)
    assert eval_set.multilabel and eval_set.main_metric == "mean_average_precision_11point"
    assert eval_set.templates == ["a photo of a {}."]  # OpenAI's VOC2007 template: the export ships none
    oracle = OracleCLIP(names, eval_set.templates)
    metrics = evaluate_multilabel(oracle, eval_set.dataset, names, eval_set.templates, oracle.tokenize, name="voc")
    assert metrics["eval/voc_num_samples"] == 5
    # Classes 0-2 rank their positives first (AP 1). Class 3 (boat): image 4 scores 100, the others tie at
    # 0 and keep dataset order (a stable sort), so image 3's unseen positive comes last: AP (1 + 2/5) / 2.
    assert metrics["eval/voc_mean_average_precision"] == pytest.approx((3 + 0.7) / 4, abs=1e-12)
    # 11-point: precision 1 up to recall 0.5, then 2/5 (image 4 and image 3 among five) up to recall 1.
    assert metrics["eval/voc_mean_average_precision_11point"] == pytest.approx((3 + (6 + 5 * 0.4) / 11) / 4, abs=1e-12)


def test_a_retrieval_export_is_read_as_retrieval(tmp_path):
    export = tmp_path / "wds_flickr30k"
    (export / "test").mkdir(parents=True)
    write_tar(export / "test" / "0.tar", [("0.png", colour_png(1)), ("0.txt", b"a dog\na brown dog\n")])
    (export / "dataset_type.txt").write_text("retrieval\n")
    eval_set = load_export(export, TRANSFORM)
    assert isinstance(eval_set, RetrievalSet) and eval_set.name == "wds_flickr30k"
    assert [captions for _, captions in eval_set.dataset] == [["a dog", "a brown dog"]]
    assert load_benchmark("flickr30k", export, TRANSFORM).main_metric == "image_retrieval_recall@5"
    (export / "dataset_type.txt").write_text("segmentation\n")
    with pytest.raises(ValueError, match="unknown dataset type 'segmentation'"):
        load_export(export, TRANSFORM)


def test_the_script_reads_an_export_as_its_dataset_type_says(tmp_path, monkeypatch):
    import clip
    from tests.eval_fixtures import tiny_model, zero_shot_script

    model = tiny_model()
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: (model, TRANSFORM), raising=False)
    export = tmp_path / "voc"
    (export / "test").mkdir(parents=True)
    members = [(f"{k}.png", colour_png(k)) for k in range(3)]
    write_tar(export / "test" / "0.tar", [m for k in range(3) for m in (members[k], (f"{k}.npy", _npy([1, k % 2])))])
    (export / "classnames.txt").write_text("cat\ndog\n")
    (export / "dataset_type.txt").write_text("multilabel\n")
    results = zero_shot_script().main(["--model", "m", "--data", str(export), "--workers", "0",
                                       "--output", str(tmp_path / "out")])  # fmt: skip
    assert results["voc"]["num_samples"] == 3 and "mean_average_precision_11point" in results["voc"]
    assert results["voc"]["mean_average_precision"] >= 0.5  # class 0 is positive everywhere: AP 1
