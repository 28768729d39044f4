"""Effective robustness (clip/robustness.py): the logit-linear fit and the values against a direct
numpy/scipy computation, the baseline files, and --suite imagenet-shifts --baseline end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import expit
from scipy.special import logit as scipy_logit
from scipy.stats import linregress

import clip
import clip.benchmarks
from clip.robustness import effective_robustness, fit_logit_linear, read_baselines
from clip.transforms import image_transform_eval
from tests.benchmark_fixtures import OracleCLIP, write_colour_image
from tests.eval_fixtures import one_thread, zero_shot_script  # noqa: F401

# Five baseline models (as the testbed's linear fits take them): ImageNet, -R, -Sketch top-1;
# the last has no Sketch accuracy, so the mean's line is fit to the first four only.
BASELINE_CSV = """model,imagenet1k,imagenet-r,imagenet-sketch
resnet18,0.6976,0.3304,0.2016
resnet50,0.7613,0.3614,0.2414
densenet121,0.7443,0.3622,0.2408
efficientnet-b7,0.8431,0.4705,0.3357
vgg16,0.7159,0.2705,
"""


def _direct(x: np.ndarray, y: np.ndarray, model_x: float, model_y: float) -> tuple[float, float, float]:
    fit = linregress(scipy_logit(x), scipy_logit(y))
    return fit.slope, fit.intercept, model_y - expit(fit.slope * scipy_logit(model_x) + fit.intercept)


def test_the_fit_and_the_effective_robustness_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    imagenet = rng.uniform(0.55, 0.85, 40)
    shift = expit(0.9 * scipy_logit(imagenet) - 0.7 + rng.normal(0, 0.1, 40))
    slope, intercept = fit_logit_linear(imagenet, shift)
    expected_slope, expected_intercept, _ = _direct(imagenet, shift, 0.7, 0.5)
    assert slope == pytest.approx(expected_slope, abs=1e-12) and intercept == pytest.approx(
        expected_intercept, abs=1e-12
    )
    with pytest.raises(ValueError, match="2 or more baseline models with different ImageNet accuracies"):
        fit_logit_linear([0.7, 0.7], [0.3, 0.4])

    baselines = [{"imagenet1k": a, "imagenet-r": b} for a, b in zip(imagenet, shift)]
    values, skipped = effective_robustness({"imagenet1k": 0.76, "imagenet-r": 0.72}, baselines)
    assert skipped == {} and values["fit_imagenet-r_num_models"] == 40
    assert values["effective_robustness_imagenet-r"] == pytest.approx(
        _direct(imagenet, shift, 0.76, 0.72)[2], abs=1e-12
    )
    assert "effective_robustness_shift_mean" not in values  # one shift: its mean is itself
    with pytest.raises(ValueError, match="needs baseline models' accuracies \\(--baseline\\): none given"):
        effective_robustness({"imagenet1k": 0.76, "imagenet-r": 0.72}, [])
    assert effective_robustness({"imagenet1k": 1.0, "imagenet-r": 0.5}, baselines) == (
        {}, {"all": "the model's imagenet1k top-1 is 1.0: no logit"}
    )  # fmt: skip


def test_baseline_files_are_read_and_bad_ones_named(tmp_path):
    (tmp_path / "testbed.csv").write_text(BASELINE_CSV)
    baselines = read_baselines([tmp_path / "testbed.csv"])
    assert len(baselines) == 5 and baselines[4] == {"imagenet1k": 0.7159, "imagenet-r": 0.2705}
    (tmp_path / "percent.csv").write_text("model,imagenet1k,imagenet-r\nresnet50,76.13,36.14\n")
    with pytest.raises(ValueError, match="percent.csv line 2 \\(resnet50\\), imagenet1k: accuracy 76.13 .*divide"):
        read_baselines([tmp_path / "percent.csv"])
    (tmp_path / "typo.csv").write_text("model,imagenet1k,imagenetv2\nresnet50,0.76,0.63\n")
    with pytest.raises(ValueError, match="unknown column\\(s\\) \\['imagenetv2'\\]; the columns are model"):
        read_baselines([tmp_path / "typo.csv"])
    with pytest.raises(FileNotFoundError, match="neither a results directory nor a CSV file"):
        read_baselines([tmp_path / "missing"])


def test_imagenet_shifts_suite_with_a_baseline_gives_effective_robustness(tmp_path, monkeypatch, capsys):
    script = zero_shot_script()
    names = clip.benchmarks.get_classnames("imagenet1k")
    wnids = clip.benchmarks.get_imagenet_wnids()
    oracle = OracleCLIP(names, ["a photo of a {}."])
    oracle.config = SimpleNamespace(text=SimpleNamespace(tokenizer="oracle", context_length=1))
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: (oracle, image_transform_eval(32)), raising=False)
    monkeypatch.setattr(script, "get_tokenizer", lambda config: oracle.tokenize)
    monkeypatch.setattr(clip.benchmarks, "get_templates", lambda name: ["a photo of a {}."])
    root = tmp_path / "data"
    # (folder class, colour class): the oracle predicts the colour. ImageNet 3/4, -R 1/2, -Sketch 1/4.
    subset = [wnids.index(w) for w in clip.benchmarks.get_imagenet_subset("imagenet-r")]
    for directory, images in (
        ("imagenet/val", [(0, 0), (1, 1), (2, 2), (3, 7)]),
        ("imagenet-r", [(subset[0], subset[0]), (subset[1], subset[2])]),
        ("sketch", [(5, 5), (6, 9), (7, 9), (8, 9)]),
    ):
        for index, (folder, colour) in enumerate(images):
            write_colour_image(root / directory / wnids[folder] / f"{index}.png", colour)
    (tmp_path / "testbed.csv").write_text(BASELINE_CSV)
    arguments = ["--model", "m", "--suite", "imagenet-shifts", "--data", str(root), "--workers", "0"]
    script.main([*arguments, "--output", str(tmp_path / "out"), "--baseline", str(tmp_path / "testbed.csv")])
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    robustness = written["summaries"]["effective-robustness"]
    table = np.array([[float(v) if v else np.nan for v in line.split(",")[1:]] for line in BASELINE_CSV.split()[1:]])
    for column, name, accuracy in ((1, "imagenet-r", 0.5), (2, "imagenet-sketch", 0.25)):
        rows = ~np.isnan(table[:, column])
        slope, intercept, expected = _direct(table[rows, 0], table[rows, column], 0.75, accuracy)
        assert robustness[f"effective_robustness_{name}"] == pytest.approx(expected, abs=1e-12)
        assert robustness[f"fit_{name}_slope"] == pytest.approx(slope, abs=1e-12)
        assert robustness[f"fit_{name}_intercept"] == pytest.approx(intercept, abs=1e-12)
        assert robustness[f"fit_{name}_num_models"] == rows.sum()
    complete = table[:4]
    _, _, expected_mean = _direct(complete[:, 0], complete[:, 1:].mean(axis=1), 0.75, (0.5 + 0.25) / 2)
    assert robustness["effective_robustness_shift_mean"] == pytest.approx(expected_mean, abs=1e-12)
    assert robustness["fit_shift_mean_num_models"] == 4 and written["baseline"] == [str(tmp_path / "testbed.csv")]
    # Without a baseline: no numbers, and a line that says why.
    script.main([*arguments, "--output", str(tmp_path / "plain")])
    assert "effective robustness not computed: it needs baseline models' accuracies" in capsys.readouterr().out
    assert "effective-robustness" not in json.loads((tmp_path / "plain" / "results.json").read_text())["summaries"]
    with pytest.raises(SystemExit):
        script.main(["--model", "m", "--data", str(root), "--baseline", str(tmp_path / "testbed.csv")])
    assert "--baseline (effective robustness) goes with --suite imagenet-shifts" in capsys.readouterr().err
