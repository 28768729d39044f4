"""The linear probe (clip/linear_probe.py) against scikit-learn, and the protocol's guarantees:
it never scores the images it was fit on, its search covers the paper's range, few-shot draws are
exact and reproducible, and the chunked fit is the unchunked one."""

from __future__ import annotations

import functools
import importlib.util
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.data.eval_datasets import load_classification_set
from clip.linear_probe import (
    check_disjoint,
    evaluate_linear_probe,
    extract_image_features,
    few_shot_probe,
    fit_logistic_regression,
    linear_probe,
    probe_objective,
    sample_per_class,
    search_l2,
    sklearn_c,
)
from clip.models import CLIP, get_model_config
from clip.transforms import image_transform_eval
from tests.eval_fixtures import image_bytes, one_thread, tiny_model, write_image_folder  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zero_shot.py"
EPS = torch.finfo(torch.float64).eps


def _blobs(seed: int, num_per_class: int, centers: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centers)).repeat_interleave(num_per_class)
    return centers[labels] + noise * torch.randn(len(labels), centers.shape[1], generator=generator), labels


def _centers(num_classes: int, dim: int) -> torch.Tensor:
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))


def _anisotropic(num_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes told apart only by x1 - x2: both carry one large shared noise, x1 a small class
    offset. The class means point along x1 (drowned by the noise), so a strongly regularised
    probe is near chance; separating them needs weights ~1/0.01, hence a weak strength (< 1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(num_per_class)
    shared = torch.randn(len(labels), generator=generator, dtype=torch.float64)
    x1 = 0.01 * labels + shared + 0.001 * torch.randn(len(labels), generator=generator, dtype=torch.float64)
    x2 = shared + 0.001 * torch.randn(len(labels), generator=generator, dtype=torch.float64)
    return torch.stack([x1, x2], dim=1).float(), labels


# ---------------------------------------------------------------------------------------------
# Never scored on its training images


def _write_shards(directory: Path, labels: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    with tarfile.open(directory / "0.tar", "w") as tar:
        for index, label in enumerate(labels):
            for ext, payload in (("png", image_bytes(rng)), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{index:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (directory.parent / "classnames.txt").write_text("a\nb\n")


def test_the_probe_refuses_to_score_its_training_images(tmp_path):
    transform = image_transform_eval(32)
    write_image_folder(tmp_path / "folder", num_classes=2, per_class=2)
    # An image folder has no splits: read with split "train" it is the test images again.
    train = load_classification_set(tmp_path / "folder", transform, split="train")
    test = load_classification_set(tmp_path / "folder", transform, split="test")
    with pytest.raises(ValueError, match="holds 4 of the test set's 4 image sources"):
        check_disjoint(train.dataset, test.dataset)
    with pytest.raises(ValueError, match="the training set is the test set"):
        evaluate_linear_probe(tiny_model(), test.dataset, test.dataset)
    # Shards without train/ and test/ subdirectories: both splits read the same shard.
    _write_shards(tmp_path / "shards" / "flat", [0, 1], seed=0)
    flat = [load_classification_set(tmp_path / "shards" / "flat", transform, split=s).dataset
            for s in ("train", "test")]
    with pytest.raises(ValueError, match="0.tar"):
        check_disjoint(*flat)
    # Features passed in directly: the same features twice are refused too.
    features, labels = _blobs(0, 5, _centers(2, 4), 0.5)
    with pytest.raises(ValueError, match="training features are the test features"):
        linear_probe(features, labels, features.clone(), labels)

    # Disjoint splits pass: separate folders, CLIP_benchmark's train/ and test/ shard directories.
    write_image_folder(tmp_path / "other", num_classes=2, per_class=2, seed=1)
    check_disjoint(load_classification_set(tmp_path / "other", transform).dataset, test.dataset)
    _write_shards(tmp_path / "split" / "train", [0, 1], seed=1)
    _write_shards(tmp_path / "split" / "test", [1, 0], seed=2)
    split = [load_classification_set(tmp_path / "split", transform, split=s).dataset for s in ("train", "test")]
    check_disjoint(*split)


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("zero_shot_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = tiny_model()
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: (model, image_transform_eval(32)), raising=False)
    # The flags' plumbing is under test here; short fits keep it fast (convergence: the tests below).
    monkeypatch.setattr(module, "evaluate_linear_probe", functools.partial(evaluate_linear_probe, max_iter=30))
    return module


def test_the_script_refuses_a_probe_without_a_train_split_naming_the_flag(tmp_path, script):
    """On a class folder without --train-data the probe used to fit on the test images."""
    write_image_folder(tmp_path / "test", num_classes=3, per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--task", "linear-probe", "--model", "tiny-vit", "--data", str(tmp_path / "test"),
                     "--workers", "0", "--output", str(tmp_path / "r.json")])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: --task linear-probe: --data {tmp_path / 'test'} has no separate 'train' split")
    assert "--train-data" in message and not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--task", "linear-probe", "--model", "tiny-vit", "--data", str(tmp_path / "test"),
                     "--train-data", str(tmp_path / "test"), "--workers", "0", "--output", str(tmp_path / "r.json")])
    assert "--train-data" in str(exit_info.value.code) and "overlap" in str(exit_info.value.code)


@pytest.mark.filterwarnings("ignore:linear probe")
def test_the_script_runs_few_shot_probes_over_seeds(tmp_path, script):
    write_image_folder(tmp_path / "train", num_classes=3, per_class=4)
    write_image_folder(tmp_path / "test", num_classes=3, per_class=2, seed=1)
    results = script.main(["--task", "linear-probe", "--fewshot-k", "2", "--seeds", "2", "--model", "tiny-vit",
                           "--data", str(tmp_path / "test"), "--train-data", str(tmp_path / "train"),
                           "--probe-features", "projected", "--workers", "0", "--output", str(tmp_path / "r.json")])
    metrics = results[tmp_path.name]  # test/ is a split directory: the set is named by its parent
    assert metrics["fewshot2_k"] == 2 and metrics["fewshot2_num_seeds"] == 2 and metrics["fewshot2_num_samples"] == 6
    assert metrics["fewshot2_top1_min"] <= metrics["fewshot2_top1"] <= metrics["fewshot2_top1_max"]
    assert "fewshot2_top1_std" in metrics


# ---------------------------------------------------------------------------------------------
# Equal to scikit-learn


def test_probe_accuracy_equals_sklearn_with_the_chosen_c():
    """Overlapping blobs, so that the regularisation matters and accuracy is not trivially 1;
    1000 test samples, so that 1e-3 is one prediction."""
    from sklearn.linear_model import LogisticRegression

    centers = _centers(4, 8)
    train_features, train_labels = _blobs(0, 50, centers, 1.2)
    test_features, test_labels = _blobs(1, 250, centers, 1.2)
    metrics = linear_probe(train_features, train_labels, test_features, test_labels)
    assert 0.5 < metrics["top1"] < 0.99 and metrics["sklearn_c"] == 1 / metrics["l2"]
    reference = LogisticRegression(C=metrics["sklearn_c"], tol=1e-10, max_iter=10_000)
    reference.fit(train_features.double().numpy(), train_labels.numpy())
    sklearn_top1 = (reference.predict(test_features.double().numpy()) == test_labels.numpy()).mean()
    assert abs(metrics["top1"] - sklearn_top1) <= 1e-3


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_fit_is_sklearns_minimiser(num_classes):
    """Our objective is sklearn's with C = sklearn_c(l2): sklearn's solution (two classes: its one
    vector is the difference of our two, split evenly) is a stationary point of ours, and our fit
    is within the solvers' tolerances of it (the intercepts are the loosest: where the classes
    are far apart, the objective is flat in them)."""
    from sklearn.linear_model import LogisticRegression

    features, labels = _blobs(0, 30, _centers(num_classes, 8), 0.8)
    l2 = 0.3
    weight, bias = fit_logistic_regression(features, labels, num_classes, l2, tolerance=1e-10)
    reference = LogisticRegression(C=sklearn_c(l2, num_classes), tol=1e-12, max_iter=10_000)
    reference.fit(features.double().numpy(), labels.numpy())
    sklearn_weight = torch.from_numpy(reference.coef_)
    sklearn_bias = torch.from_numpy(reference.intercept_)
    if num_classes == 2:
        weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
        sklearn_weight = torch.cat([-sklearn_weight, sklearn_weight]) / 2
        sklearn_bias = torch.cat([-sklearn_bias, sklearn_bias]) / 2
    _, grad_weight, grad_bias = probe_objective(sklearn_weight, sklearn_bias, features, labels, l2)
    assert grad_weight.abs().max() <= 1e-7 and grad_bias.abs().max() <= 1e-7  # sklearn stops at its own tol
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-6)
    np.testing.assert_allclose(bias.numpy(), reference.intercept_, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The search


def test_the_whole_range_search_finds_a_strength_a_one_decade_grid_misses():
    fit_features, fit_labels = _anisotropic(40, seed=0)
    val_features, val_labels = _anisotropic(40, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole range's pick is inside it: no warning
        whole = search_l2(fit_features, fit_labels, val_features, val_labels, 3)
    # The paper's schedule: 7 points 2 decades apart, then 2 per halving of the step (16 -> 1).
    assert len(whole.tried) == 7 + 2 * 4 and min(whole.tried) == 1e-6 and max(whole.tried) == 1e6
    with pytest.warns(UserWarning, match="at the weak end of the searched range"):
        one_decade = search_l2(fit_features, fit_labels, val_features, val_labels, 3, exponents=(-1, 0))
    assert whole.l2 < 1e-3 and not whole.at_edge and one_decade.at_edge
    assert whole.val_top1 == 1.0 and one_decade.val_top1 < 0.6
    # Fit again at the pick, scored on fresh samples: the picked strength generalises.
    test_features, test_labels = _anisotropic(40, seed=2)
    weight, bias = fit_logistic_regression(fit_features, fit_labels, 3, whole.l2)
    predictions = (test_features.double() @ weight.t() + bias).argmax(dim=1)
    assert (predictions == test_labels).double().mean() > 0.95


# ---------------------------------------------------------------------------------------------
# Few-shot


def test_few_shot_draws_exactly_k_per_class_reproducibly():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)
    draws = [sample_per_class(labels, 3, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    for draw in draws:
        assert torch.bincount(labels[draw]).tolist() == [3, 3, 3] and len(set(draw.tolist())) == 9
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    generator = torch.Generator().manual_seed(0)
    fit = sample_per_class(labels, 2, generator)
    val = sample_per_class(labels, 1, generator, exclude=fit)
    assert not set(fit.tolist()) & set(val.tolist()) and torch.bincount(labels[val]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="class 1 has 1 training sample"):
        sample_per_class(labels, 2, generator, exclude=fit)


@pytest.mark.filterwarnings("ignore:linear probe")
def test_few_shot_probe_reports_mean_and_spread_over_seeds():
    centers = _centers(3, 4)
    train_features, train_labels = _blobs(0, 20, centers, 1.5)
    test_features, test_labels = _blobs(1, 20, centers, 1.5)
    # A few iterations suffice to check the arithmetic over seeds (convergence: the tests above).
    fit = {"max_iter": 20}
    metrics = few_shot_probe(train_features, train_labels, test_features, test_labels, k=10, seeds=[0, 1], **fit)
    per_seed = []
    for seed in (0, 1):  # what each seed's probe scores on its own
        one = few_shot_probe(train_features, train_labels, test_features, test_labels, k=10, seeds=[seed], **fit)
        per_seed.append(one["top1"])
        assert "top1_std" not in one
    assert metrics["top1"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert metrics["top1_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert metrics["num_seeds"] == 2 and metrics["k"] == 10 and metrics["num_samples"] == 60


# ---------------------------------------------------------------------------------------------
# Chunks


def test_the_chunked_fit_equals_the_unchunked_one():
    """Chunking reorders the sums of the objective and its gradient, and may round each row's
    logits differently (other matrix shapes). In float64: a sum of n terms in any order is within
    (n - 1) eps sum|term| of the exact one; a logit (a dot product of D terms) within D eps
    sum_j |x_j w_j|; a row's loss moves by at most 2 max|logit change| (its gradient in the logits
    has l1 norm <= 2), each softmax residual by at most 2 max|logit change| too."""
    features, labels = _blobs(0, 40, _centers(3, 6), 1.0)  # 120 rows, float32 as extracted
    (num_samples, dim), l2 = features.shape, 0.1
    generator = torch.Generator().manual_seed(5)
    point = (torch.randn(3, dim, generator=generator, dtype=torch.float64),
             torch.randn(3, generator=generator, dtype=torch.float64))
    (value_a, weight_a, bias_a), (value_b, weight_b, bias_b) = (
        probe_objective(*point, features, labels, l2, chunk_rows=chunk_rows) for chunk_rows in (num_samples, 7)
    )
    # The written-out gradient is autograd's.
    weight, bias = (tensor.clone().requires_grad_(True) for tensor in point)
    logits = features.double() @ weight.t() + bias
    loss = F.cross_entropy(logits, labels) + 0.5 * l2 / num_samples * weight.square().sum()
    loss.backward()
    expected = (loss.detach(), weight.grad, bias.grad)
    torch.testing.assert_close((value_a, weight_a, bias_a), expected, rtol=1e-12, atol=1e-14)

    x = features.double()
    logits = x @ point[0].t() + point[1]
    losses = F.cross_entropy(logits, labels, reduction="none")  # [N]
    residual = (logits.softmax(dim=1) - F.one_hot(labels, 3)).abs()  # [N, C]
    logit_error = 2 * (dim + 1) * EPS * (x.abs() @ point[0].abs().t() + point[1].abs()).amax(dim=1)  # [N], both sides
    row_error = 2 * logit_error  # bound on each row's loss change and on each of its residuals' change
    reorder = 2 * num_samples * EPS  # two summation orders
    value_bound = (reorder * losses.sum() + row_error.sum()) / num_samples + 2 * EPS * value_a.abs()
    weight_bound = (reorder * residual.t() @ x.abs() + row_error @ x.abs()) / num_samples + 2 * EPS * weight_a.abs()
    bias_bound = (reorder * residual.sum(dim=0) + row_error.sum()) / num_samples + 2 * EPS * bias_a.abs()
    assert value_a != 0 and abs(value_a - value_b) <= value_bound
    assert ((weight_a - weight_b).abs() <= weight_bound).all()
    assert ((bias_a - bias_b).abs() <= bias_bound).all()

    # Both fits stop where the largest gradient entry is <= 1e-9 (the solver's tolerance); the
    # objective is (l2 / N)-strongly convex in the weights, so each is within sqrt(#weights) *
    # 1e-9 / (l2 / N) of the minimiser in the weights' norm.
    whole = fit_logistic_regression(features, labels, 3, l2, chunk_rows=num_samples)
    chunked = fit_logistic_regression(features, labels, 3, l2, chunk_rows=7)
    weight_tolerance = 2 * (3 * dim) ** 0.5 * 1e-9 / (l2 / num_samples)
    assert (whole[0] - chunked[0]).norm() <= weight_tolerance
    predictions = [(x @ weight.t() + bias).argmax(dim=1) for weight, bias in (whole, chunked)]
    assert torch.equal(*predictions)


# ---------------------------------------------------------------------------------------------
# Features of the model


def test_pre_projection_features_are_what_the_tower_projects(tmp_path):
    write_image_folder(tmp_path / "images", num_classes=2, per_class=2)
    dataset = load_classification_set(tmp_path / "images", image_transform_eval(32)).dataset
    model = tiny_model()
    pre, labels = extract_image_features(model, dataset, batch_size=3)
    projected, same_labels = extract_image_features(model, dataset, features="projected", batch_size=3)
    assert pre.shape == (4, model.config.vision.width) and torch.equal(labels, same_labels)
    torch.testing.assert_close(model.visual.project(pre), projected, rtol=1e-5, atol=1e-6)
    resnet = CLIP(get_model_config("tiny-resnet")).eval()
    image = torch.randn(2, 3, resnet.config.vision.image_size, resnet.config.vision.image_size)
    with torch.no_grad():
        assert torch.equal(resnet.visual.project(resnet.visual.forward_features(image)), resnet.visual(image))
    with pytest.raises(ValueError, match="one of"):
        extract_image_features(model, dataset, features="penultimate")


@pytest.mark.filterwarnings("ignore:linear probe")
def test_linear_probe_on_model_features(tmp_path):
    write_image_folder(tmp_path / "train", num_classes=3, per_class=6, seed=1)
    write_image_folder(tmp_path / "test", num_classes=3, per_class=3, seed=2)
    transform = image_transform_eval(32)
    metrics = evaluate_linear_probe(
        tiny_model(),
        load_classification_set(tmp_path / "train", transform).dataset,
        load_classification_set(tmp_path / "test", transform).dataset,
        name="synth",
        max_iter=30,  # the plumbing is under test here; convergence is tested on generated features
    )
    assert metrics["eval/synth_linear_probe_num_samples"] == 9 and metrics["eval/synth_linear_probe_num_train"] == 18
    assert 0.0 <= metrics["eval/synth_linear_probe_top1"] <= 1.0
    assert 1e-6 <= metrics["eval/synth_linear_probe_l2"] <= 1e6
