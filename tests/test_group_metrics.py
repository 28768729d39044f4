"""DataComp's metrics over per-sample metadata (clip/group_metrics.py): macro F1 against scikit-learn,
worst-group accuracies against hand-computed cases, and the datacomp suite on generated exports in
DataComp's layout, scored by an oracle whose top-5 is known, so that a wrong column, group or k fails."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

import clip
from clip.data.eval_shards import TarEvalDataset, read_sample_metadata
from clip.group_metrics import METADATA_TASKS, group_accuracies, macro_f1, metadata_metrics
from clip.transforms import image_transform_eval
from tests.benchmark_fixtures import OracleCLIP, decode_colour
from tests.eval_fixtures import one_thread, write_tar, zero_shot_script  # noqa: F401

NAMES = [f"class {i}" for i in range(182)]
TEMPLATE = "a photo of a {c}."


class RampOracle(OracleCLIP):
    """Ranks the image's colour class p first, then p+1, ..., p+4: its top-5 is p ... p+4."""

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        colour = decode_colour(images)
        features = torch.zeros(len(images), self.dim)
        for step in range(5):
            features[torch.arange(len(images)), colour + step] = 1.0 - 0.1 * step
        return nn.functional.normalize(features, dim=-1)


def test_macro_f1_is_sklearns_over_the_classes_present():
    rng = np.random.default_rng(0)
    for _ in range(20):
        target = rng.integers(0, 12, 300)
        predicted = np.where(rng.random(300) < 0.5, target, rng.integers(0, 15, 300))  # 12-14: never a label
        expected = f1_score(target, predicted, average="macro", labels=np.unique(target))
        assert macro_f1(predicted, target) == pytest.approx(expected, abs=1e-12)
    # Over every class predicted or labelled (sklearn's default), the never-labelled ones would count as F1 0.
    assert macro_f1(predicted, target) > f1_score(target, predicted, average="macro")


def test_worst_group_accuracy_by_hand():
    hits = np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool)
    groups = np.array([0, 0, 4, 4, 4, 2, 2])
    assert group_accuracies(hits, groups) == {0: (0.5, 2), 2: (0.5, 2), 4: (2 / 3, 3)}  # group 1, 3: absent
    rows = np.stack([groups, np.zeros(7), np.arange(7)], axis=1)  # geode: (region, country)... and one too many
    with pytest.raises(ValueError, match="metadata rows have 3 columns, but DataComp's geode export has 2"):
        metadata_metrics("geode", np.arange(7)[:, None], np.arange(7), np.arange(7), rows)
    topk = np.where(hits, 1, 0)[:, None]  # predicted class 1 where a hit, 0 elsewhere; every label 1
    target = np.ones(7, dtype=np.int64)
    metrics = metadata_metrics("geode", topk, target, target, rows[:, :2])
    assert metrics["worst_region_top1"] == 0.5 and metrics["top1_region4"] == 2 / 3 and metrics["num_region4"] == 3
    with pytest.raises(ValueError, match="does not line up with the 7 evaluated \\(first difference at sample 3"):
        metadata_metrics("geode", topk, target, np.array([1, 1, 1, 0, 1, 1, 1]), rows[:, :2])
    with pytest.raises(ValueError, match="'region' metadata column holds values that are not group numbers"):
        metadata_metrics("geode", topk, target, target, rows[:, :2] - 1)


# (colour = the oracle's top-1, label, metadata row) per sample; the comments give the hand-computed groups.
FMOW = [  # (region, year, y): region 0: 1/2, region 1: 2/3, region 3: 1/1 -> worst 0.5; by year it would be 0
    (1, 1, [0, 0, 1]), (2, 3, [0, 2, 3]), (5, 5, [1, 0, 5]), (6, 6, [1, 0, 6]), (7, 9, [1, 1, 9]), (10, 10, [3, 1, 10]),
]  # fmt: skip
GEODE = [  # (region, country): region 0: 1, region 5: 1/2, region 2: 2/3 -> worst 0.5; by country 0
    (3, 3, [0, 1]), (4, 4, [0, 1]), (8, 8, [5, 1]), (9, 12, [5, 2]), (11, 13, [5, 2]), (14, 14, [5, 1]),
    (20, 21, [2, 2]), (22, 22, [2, 3]), (23, 23, [2, 3]),
]  # fmt: skip
DOLLAR_STREET = [  # (income_ds, income_meta, region), top-5: income 0: 1/2, 1: 1, 3: 3/4 -> worst 0.5;
    # worst top-1 would be 0 (income 0), worst top-5 by region 0 (region 1 holds two misses)
    (0, 3, [0, 27, 0]), (10, 20, [0, 31, 1]), (30, 34, [1, 400, 0]), (31, 31, [1, 390, 0]),
    (40, 45, [3, 9000, 1]), (41, 42, [3, 8000, 0]), (50, 50, [3, 7000, 0]), (51, 51, [3, 9900, 0]),
]  # fmt: skip
IWILDCAM = [  # 9 columns, the last the label; class 7 is predicted but never the label
    (0, 0, [4, 1, 2020, 1, 1, 0, 0, 0, 0]), (0, 1, [4, 1, 2020, 1, 1, 0, 0, 1, 1]), (1, 1, [3, 2, 2020, 1, 1, 0, 0, 2, 1]),
    (2, 2, [3, 2, 2020, 1, 1, 0, 0, 3, 2]), (7, 2, [9, 3, 2021, 1, 1, 0, 0, 4, 2]), (5, 5, [9, 3, 2021, 1, 1, 0, 0, 5, 5]),
]  # fmt: skip
EXPORTS = {"fmow": ("wds_wilds-fmow_test", 62, FMOW), "geode": ("wds_geode_test", 40, GEODE),
           "dollar_street": ("wds_dollar_street_test", 58, DOLLAR_STREET),
           "iwildcam": ("wds_wilds-iwildcam_test", 182, IWILDCAM)}  # fmt: skip


def _webp(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (colour % 256, colour // 256, 77)).save(buffer, format="webp", lossless=True)
    return buffer.getvalue()


def _npy(row: list[int]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(row, dtype=np.int64))
    return buffer.getvalue()


def _write_export(root, directory: str, num_classes: int, samples: list) -> None:
    """DataComp's layout: classnames.txt, zeroshot_classification_templates.txt, test/{0,1}.tar, nshards.txt."""
    export = root / directory
    (export / "test").mkdir(parents=True)
    (export / "classnames.txt").write_text("\n".join(NAMES[:num_classes]) + "\n")
    (export / "zeroshot_classification_templates.txt").write_text(TEMPLATE + "\n")
    half = len(samples) // 2
    for shard, part in enumerate([samples[:half], samples[half:]]):
        members = []
        for index, (colour, label, row) in enumerate(part, start=shard * half):
            key = f"s{index:07d}"
            members += [(f"{key}.webp", _webp(colour)), (f"{key}.cls", str(label).encode()), (f"{key}.npy", _npy(row))]
        write_tar(export / "test" / f"{shard}.tar", members)
    (export / "test" / "nshards.txt").write_text("2\n")


def test_datacomp_suite_scores_its_metadata_tasks_and_averages_them(tmp_path, monkeypatch):
    script = zero_shot_script()
    oracle = RampOracle(NAMES, [TEMPLATE])
    oracle.config = SimpleNamespace(text=SimpleNamespace(tokenizer="oracle", context_length=1))
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: (oracle, image_transform_eval(32)), raising=False)
    monkeypatch.setattr(script, "get_tokenizer", lambda config: oracle.tokenize)
    for directory, count, samples in EXPORTS.values():
        _write_export(tmp_path / "data", directory, count, samples)
    output = tmp_path / "out"
    script.main(["--model", "m", "--suite", "datacomp", "--data", str(tmp_path / "data"), "--workers", "0",
                 "--output", str(output)])  # fmt: skip
    written = json.loads((output / "results.json").read_text())
    sets = written["sets"]
    assert sorted(sets) == sorted(EXPORTS)
    fmow, geode, dollar = sets["fmow"]["metrics"], sets["geode"]["metrics"], sets["dollar_street"]["metrics"]
    assert sets["fmow"]["main_metric"] == "worst_region_top1" and fmow["worst_region_top1"] == 0.5
    assert fmow["top1_region1"] == pytest.approx(2 / 3) and fmow["num_region1"] == 3 and "num_region2" not in fmow
    assert fmow["top1"] == pytest.approx(4 / 6)
    assert geode["worst_region_top1"] == 0.5 and geode["num_region5"] == 4 and geode["top1_region2"] == 2 / 3
    assert sets["dollar_street"]["main_metric"] == "worst_income_group_top5"
    assert dollar["worst_income_group_top5"] == 0.5 and dollar["top5_income_group3"] == 0.75
    colour, label = np.array([s[0] for s in IWILDCAM]), np.array([s[1] for s in IWILDCAM])
    expected_f1 = f1_score(label, colour, average="macro", labels=np.unique(label))
    assert sets["iwildcam"]["main_metric"] == "macro_f1"
    assert sets["iwildcam"]["metrics"]["macro_f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert written["skipped"]["winogavil"].startswith("DataComp's jaccard_score_10-12 is not computed here")
    mains = [fmow["worst_region_top1"], geode["worst_region_top1"], dollar["worst_income_group_top5"], expected_f1]
    average = written["summaries"]["datacomp-average"]
    assert average["num_sets"] == 4 and average["num_tasks"] == 38
    assert average["mean"] == pytest.approx(sum(mains) / 4, abs=1e-12)
    with np.load(output / "predictions" / "fmow.npz") as saved:
        assert sorted(saved.files) == ["target", "top1"]


def test_metadata_rows_are_read_in_sample_order_and_must_be_complete(tmp_path):
    _write_export(tmp_path, "wds_geode_test", 40, GEODE)
    shards = sorted(str(path) for path in (tmp_path / "wds_geode_test" / "test").glob("*.tar"))
    labels, rows = read_sample_metadata(TarEvalDataset(shards, image_transform_eval(32), "cls"))
    assert labels.tolist() == [s[1] for s in GEODE] and rows.tolist() == [s[2] for s in GEODE]
    assert METADATA_TASKS["geode"].fields == ("region", "country")
    write_tar(tmp_path / "bad.tar", [("s0.webp", _webp(1)), ("s0.cls", b"1")])
    with pytest.raises(ValueError, match="bad.tar: sample 's0' has no npy member"):
        read_sample_metadata(TarEvalDataset([str(tmp_path / "bad.tar")], image_transform_eval(32), "cls"))
