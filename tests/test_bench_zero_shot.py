"""scripts/bench_zero_shot.py runs the three classifiers and refuses to time ones that disagree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_zero_shot.py"
ARGS = ["--model", "tiny-vit", "--classes", "3", "--device", "cpu", "--clip-benchmark"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_zero_shot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_times_packed_padded_and_clip_benchmark_classifiers(bench, capsys):
    bench.main(ARGS)
    out = capsys.readouterr().out
    assert "3 classes x 80 templates" in out
    for label in ("ours (packed)", "ours padded", "CLIP_benchmark (a call per class)", "packed / padded:"):
        assert label in out, out


def test_a_classifier_that_disagrees_is_an_error_not_a_timing(bench, monkeypatch):
    encode_text = bench.PaddedTextTower.encode_text

    def negated(self, text, normalize=False):
        return -encode_text(self, text, normalize)

    monkeypatch.setattr(bench.PaddedTextTower, "encode_text", negated)
    with pytest.raises(SystemExit, match="disagrees with the padded one"):
        bench.main(ARGS)
