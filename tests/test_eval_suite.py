"""Suites (absent sets skipped, a failing set never stops the others) and --compare's paired bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import clip
import clip.benchmarks
from clip.eval_results import ResultsDirectory, _metric_from_predictions, compare, paired_bootstrap
from clip.eval_suite import datacomp_tasks, plan_suite, summarise
from clip.transforms import image_transform_eval
from tests.benchmark_fixtures import write_colour_image
from tests.eval_fixtures import one_thread, tiny_model, zero_shot_script  # noqa: F401

WNIDS = clip.benchmarks.get_imagenet_wnids()


@pytest.fixture
def script():
    return zero_shot_script()


@pytest.fixture
def loaded(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: (model, image_transform_eval(32)), raising=False)
    # One template instead of ImageNet's 80: the tiny text tower encodes 1000 prompts per set, not 80,000.
    monkeypatch.setattr(clip.benchmarks, "get_templates", lambda name: ["a photo of a {}."])
    return model


def test_imagenet_shifts_suite_skips_absent_sets_and_survives_a_failing_one(tmp_path, script, loaded, capsys):
    root = tmp_path / "data"
    for index in (0, 7):
        write_colour_image(root / "imagenet" / "val" / WNIDS[index] / "a.JPEG", index)
    subset = clip.benchmarks.get_imagenet_subset("imagenet-r")
    write_colour_image(root / "imagenet-r" / subset[3] / "a.jpg", 3)
    (root / "imagenet-v2" / "n01440764").mkdir(parents=True)  # not V2's layout: this set fails to open
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", "m", "--suite", "imagenet-shifts", "--data", str(root), "--workers", "0",
                     "--output", str(output)])  # fmt: skip
    assert "1 set(s) failed (imagenet-v2)" in str(exit_info.value.code)
    out = capsys.readouterr().out
    assert "skipped imagenet-a: not found under" in out and "FAILED imagenet-v2" in out
    written = json.loads((output / "results.json").read_text())
    assert list(written["sets"]) == ["imagenet1k", "imagenet-r"]
    assert set(written["skipped"]) == {"imagenet-a", "imagenet-sketch", "objectnet"}
    assert "folders that are not class numbers" in written["failed"]["imagenet-v2"]
    summary = written["summaries"]["imagenet-shifts"]
    top1 = {name: entry["metrics"]["top1"] for name, entry in written["sets"].items()}
    assert summary["num_shifts"] == 1 and summary["shift_mean"] == top1["imagenet-r"]
    assert summary["shift_mean_minus_imagenet"] == pytest.approx(top1["imagenet-r"] - top1["imagenet1k"])
    assert written["sets"]["imagenet-r"]["fingerprint"]["num_classes"] == 200
    assert (output / "results.png").stat().st_size > 0 and (output / "predictions" / "imagenet-r.npz").is_file()


def test_datacomp_suite_finds_its_downloads_and_names_what_it_cannot_compute(tmp_path):
    tasks = datacomp_tasks()
    assert len(tasks) == 38 and tasks["vtab/caltech101"]["main_metric"] == "mean_per_class_recall"
    (tmp_path / "wds_vtab-caltech101_test").mkdir()
    opened = []
    planned = {p.name: p for p in plan_suite("datacomp", tmp_path, lambda name, path: opened.append((name, path)))}
    assert len(planned) == 38
    caltech = planned["caltech101"]
    assert caltech.open is not None and caltech.main_metric == "mean_per_class_recall"
    caltech.open()
    assert opened == [("caltech101", tmp_path / "wds_vtab-caltech101_test")]
    assert planned["imagenet-sketch"].reason == f"not found under {tmp_path} (looked for wds_imagenet_sketch_test/)"
    assert planned["iwildcam"].reason.endswith("(looked for wds_wilds-iwildcam_test/)")
    assert planned["winogavil"].open is None and "no WebDataset export of it" in planned["winogavil"].reason
    # Every other task has one of our metrics, its benchmark's where it is one (tests/test_group_metrics.py).
    (tmp_path / "wds_dollar_street_test").mkdir()
    dollar = plan_suite("datacomp", tmp_path, lambda name, path: None)
    assert next(p for p in dollar if p.name == "dollar_street").main_metric == "worst_income_group_top5"
    assert planned["mscoco_captions"].reason.endswith("(looked for wds_mscoco_captions/)")
    # DataComp's averages: each over the tasks evaluated, saying how many of how many
    entry = {"main_metric": "top1", "metrics": {"top1": 0.5}}
    sets = {"imagenet1k": entry, "imagenet-r": {**entry, "metrics": {"top1": 0.2}}, "pets": entry}
    summaries = summarise("datacomp", sets)
    assert summaries["datacomp-imagenet_dist_shifts"] == {"mean": 0.2, "num_sets": 1, "num_tasks": 6}
    assert summaries["datacomp-vtab"] == {"mean": 0.5, "num_sets": 1, "num_tasks": 13}
    assert summaries["datacomp-average"] == {"mean": pytest.approx(1.2 / 3), "num_sets": 3, "num_tasks": 38}
    assert "datacomp-retrieval" not in summaries


def _results(directory, top1: np.ndarray, target: np.ndarray, fingerprint: str = "f") -> None:
    results = ResultsDirectory(directory, {"model": str(directory), "precision": "fp32", "batch_size": 64})
    metrics = {"top1": float((top1 == target).mean()), "num_samples": len(target)}
    record = {"path": "p", "main_metric": "top1", "fingerprint": {"files_sha256": fingerprint}, "templates": None}
    results.add_set("set", metrics, record, {"top1": torch.from_numpy(top1), "target": torch.from_numpy(target)})


def test_compare_gives_the_difference_and_a_paired_bootstrap_interval(tmp_path, script, capsys):
    rng = np.random.default_rng(0)
    target = rng.integers(0, 10, 400)
    first = np.where(rng.random(400) < 0.6, target, (target + 1) % 10)
    second = first.copy()
    wrong = np.flatnonzero(first != target)[:40]  # the second run fixes 40 of the first's errors, breaks none
    second[wrong] = target[wrong]
    _results(tmp_path / "a", first, target)
    _results(tmp_path / "b", second, target)
    _results(tmp_path / "c", second, target, fingerprint="other data")
    script.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    row = capsys.readouterr().out.splitlines()[2]
    low, high = paired_bootstrap("top1", {"top1": first, "target": target}, {"top1": second, "target": target})
    assert row.startswith("| set | top1 |") and f"+0.1000 [{low:+.4f}, {high:+.4f}]" in row
    assert "+0.1000 (different data)" in row
    # Paired: every resample's difference is (fixed errors drawn) / 400 >= 0, and the interval is
    # that of a binomial count around 40: far narrower than unpaired resampling of two 60-70 % accuracies.
    assert 0.0 < low < 0.1 < high < 0.14
    same = paired_bootstrap("top1", {"top1": first, "target": target}, {"top1": first, "target": target})
    assert same == (0.0, 0.0)
    # The resampled metric is the reported one: mean per-class recall is sklearn's balanced accuracy.
    recall = paired_bootstrap(
        "mean_per_class_recall", {"top1": first, "target": target}, {"top1": first, "target": target}
    )
    assert recall == (0.0, 0.0)
    assert _metric_from_predictions("mean_per_class_recall", first, target) == pytest.approx(
        balanced_accuracy_score(target, first), abs=1e-12
    )
    with pytest.raises(FileNotFoundError, match="is not a results directory"):
        compare([tmp_path / "a", tmp_path / "missing"])
