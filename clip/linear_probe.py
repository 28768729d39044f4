"""Linear probes and few-shot probes on a CLIP model's frozen image features.

The protocol of Radford et al. 2021 (arXiv:2103.00020, appendix A.3): multinomial logistic
regression by L-BFGS on the features before the projection to the shared embedding (for ViTs),
with the L2 strength chosen on a validation split carved from the training split, over 1e-6 ... 1e6:
first every 2 decades, then halving the step around the best point down to 8 steps per decade.
The chosen strength is refit on the whole training split (validation included) and scored once on
the test split, which must not share an image with the training split.

The objective, for features x_i, labels y_i (N of them) and strength `l2` (the paper's lambda,
read as scikit-learn's 1 / C: the paper fits scikit-learn and names no other parameterisation):

    sum_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2        (the bias is not penalised)

which is scikit-learn's `LogisticRegression(C=1 / l2)` (lbfgs, multinomial: it minimises
C * sum_i CE + ||W||^2 / 2 and leaves the intercept out of the penalty). With two classes
scikit-learn fits one weight vector, not two; the same classifier is then `C = 2 / l2`
(`sklearn_c`). It is minimised as its mean over the N samples (the same minimiser), in float64, over
chunks of rows so that memory stays bounded for ImageNet-size feature sets.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from clip.data import eval_cifar, eval_shards
from clip.eval_loop import autocast, device_of, map_images_in_order
from clip.zero_shot import classification_metrics

# Which image features the probe reads: the paper's (before the projection to the embedding), or
# the embedding itself (what zero-shot classification compares with the text).
FEATURES = ("pre-projection", "projected")
# The paper's search: 1e-6 ... 1e6 on a grid of 8 steps per decade (97 points), starting every
# 2 decades (16 grid steps) and halving the step around the best point.
L2_EXPONENTS = (-6, 6)
STEPS_PER_DECADE = 8
FIRST_STEP = 16
# Rows per chunk of the fit: a chunk's float64 copy and logits are chunk x (D + C) x 8 bytes
# (ImageNet, D = 1024, C = 1000: 1 GiB), whatever the number of rows.
CHUNK_ROWS = 65536
MAX_ITER = 1000  # the paper's L-BFGS iteration cap
# Largest gradient entry of the mean objective at which L-BFGS stops: 100x tighter than
# scikit-learn's default tol, so that predictions match a tightly converged reference.
TOLERANCE = 1e-6


# ---- Features


def _encode(model: nn.Module, images: torch.Tensor, features: str) -> torch.Tensor:
    if features == "projected":
        return model.encode_image(images)
    visual = getattr(model, "visual", None)
    if not hasattr(visual, "forward_features"):
        raise ValueError(
            f"{type(model).__name__} has no pre-projection image features (model.visual.forward_features); "
            f"use features='projected' (--probe-features projected)"
        )
    return visual.forward_features(images.to(model.dtype))


@torch.no_grad()
def extract_image_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    features: str = "pre-projection",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 image features [N, D] (not normalised) and labels [N] of `dataset`, in dataset order,
    on every rank. `features`: "pre-projection" (the vision tower's `forward_features`: a ViT's
    class token after ln_post, a ResNet's attention pool before its output projection, a timm
    trunk's pooled output) or "projected" (`encode_image`, the embedding)."""
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: expected one of {FEATURES}")
    device = device_of(model, device)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, autocast_dtype):
            return _encode(model, images, features).float()

    return map_images_in_order(
        model, dataset, encode, empty=torch.zeros(0, 0), batch_size=batch_size, num_workers=num_workers,
        device=device, progress=progress, desc=desc,
    )  # fmt: skip


# ---- The training split must not hold the images that are scored


def _image_sources(dataset: Dataset) -> set[str] | None:
    """Where each image of `dataset` comes from (files, shards, or the content of an in-memory
    split), or None for a dataset type this cannot tell."""
    if isinstance(dataset, Subset):
        inner = dataset.dataset
        if hasattr(inner, "samples"):
            return {str(Path(inner.samples[index][0]).resolve()) for index in dataset.indices}
        return _image_sources(inner)
    if hasattr(dataset, "samples"):  # torchvision's ImageFolder / DatasetFolder
        return {str(Path(path).resolve()) for path, _ in dataset.samples}
    if isinstance(dataset, eval_shards.TarEvalDataset):
        return {str(Path(shard).resolve()) for shard in dataset.shards}
    if isinstance(dataset, eval_cifar.CifarDataset):  # a split is one array; its hash names it
        return {f"{dataset.layout.name} split {hashlib.sha256(dataset.images.tobytes()).hexdigest()[:16]}"}
    return None


def check_disjoint(train_dataset: Dataset, test_dataset: Dataset) -> None:
    """Raise ValueError when the probe would be fit on images it is scored on: the same dataset,
    a shared image file or shard, or the same in-memory split."""
    if train_dataset is test_dataset:
        raise ValueError("the training set is the test set: the probe would be scored on the images it was fit on")
    train_sources, test_sources = _image_sources(train_dataset), _image_sources(test_dataset)
    if train_sources is None or test_sources is None:
        return
    shared = sorted(train_sources & test_sources)
    if shared:
        raise ValueError(
            f"the training set holds {len(shared)} of the test set's {len(test_sources)} image sources "
            f"(e.g. {shared[0]}): the probe would be scored on images it was fit on"
        )


# ---- Logistic regression


def sklearn_c(l2: float, num_classes: int) -> float:
    """scikit-learn's `LogisticRegression` C for the same classifier as strength `l2` (module docstring)."""
    return (2.0 if num_classes == 2 else 1.0) / l2


def probe_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    l2: float,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean objective (module docstring) at (weight [C, D], bias [C]) and its gradients, in
    float64, summed chunk by chunk: only `chunk_rows` rows of features are ever copied to float64
    on the parameters' device. The gradient is written out (softmax minus one-hot, times x), which
    keeps no autograd graph of a chunk and costs one pass of the solver's per-evaluation overhead
    instead of one backward per chunk."""
    num_samples = len(labels)
    loss_sum = torch.zeros((), dtype=torch.float64, device=weight.device)
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    for start in range(0, num_samples, chunk_rows):
        x = features[start : start + chunk_rows].to(weight.device, torch.float64, non_blocking=True)  # [B, D]
        y = labels[start : start + chunk_rows].to(weight.device, non_blocking=True)  # [B]
        log_probs = (x @ weight.t() + bias).log_softmax(dim=1)  # [B, C]
        loss_sum -= log_probs.gather(1, y[:, None]).sum()
        residual = log_probs.exp()  # d CE / d logits = softmax - one-hot
        residual[torch.arange(len(y), device=y.device), y] -= 1.0
        grad_weight += residual.t() @ x
        grad_bias += residual.sum(dim=0)
    value = loss_sum / num_samples + 0.5 * l2 / num_samples * weight.square().sum()
    return value, grad_weight / num_samples + l2 / num_samples * weight, grad_bias / num_samples


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    device: torch.device | str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    max_iter: int = MAX_ITER,
    tolerance: float = TOLERANCE,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with L2 strength `l2` by full-batch L-BFGS in float64.

    `features` [N, D] may stay where they are (e.g. float32 on the CPU): each objective evaluation
    streams them to `device` (default: theirs) in chunks of `chunk_rows`. It starts from zero, as
    scikit-learn does (warm starts from a neighbouring strength were slower: a strong penalty makes
    the weights' curvature much larger than the bias's). The solver stops when no entry of the
    mean objective's gradient exceeds `tolerance` (scikit-learn's `tol`, 1e-4 by default, is the
    same test on the same mean objective), after `max_iter` iterations (warned), or when a step
    no longer changes the objective.
    Returns (weight [C, D], bias [C]) in float64 on `device`.
    """
    if len(labels) == 0:
        raise ValueError("no training samples")
    device = torch.device(device) if device is not None else features.device
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=device)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-15,  # an objective near 1 has no finer resolution in float64
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    bar = tqdm(desc=f"probe fit l2={l2:.3g}", unit="eval", leave=False, disable=not progress)

    def closure() -> torch.Tensor:
        loss, weight.grad, bias.grad = probe_objective(weight, bias, features, labels, l2, chunk_rows=chunk_rows)
        if progress:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.6g}")
        return loss

    with torch.no_grad():
        optimizer.step(closure)
    bar.close()
    if optimizer.state[weight]["n_iter"] >= max_iter:
        warnings.warn(f"linear probe: L-BFGS stopped at max_iter={max_iter} before converging (l2={l2:.3g})")
    return weight.detach(), bias.detach()


def _logits(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    parts = [
        features[start : start + chunk_rows].to(weight.device, torch.float64) @ weight.t() + bias
        for start in range(0, len(features), chunk_rows)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, len(bias), dtype=torch.float64, device=weight.device)


def _accuracy(weight, bias, features, labels, chunk_rows: int) -> float:
    predictions = _logits(weight, bias, features, chunk_rows).argmax(dim=1)
    return (predictions == labels.to(predictions.device)).double().mean().item()


# ---- The search over the L2 strength


@dataclass
class L2Search:
    """The pick of `search_l2` and every strength tried with its validation accuracy."""

    l2: float
    val_top1: float
    tried: dict[float, float]
    at_edge: bool


def search_l2(
    fit_features: torch.Tensor,
    fit_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    exponents: tuple[int, int] = L2_EXPONENTS,
    progress: bool = False,
    **fit_options: Any,
) -> L2Search:
    """The L2 strength in 10**exponents[0] ... 10**exponents[1] with the best validation accuracy
    (ties: the stronger), by the paper's coarse-to-fine search on its 8-steps-per-decade grid: 15
    fits over the default 12 decades. Warns when the pick is at an end of the range: the best
    strength may then lie outside it. `fit_options` go to `fit_logistic_regression`."""
    low, high = exponents
    if not low < high:
        raise ValueError(f"exponents={exponents}: the range must span at least one decade")
    last = (high - low) * STEPS_PER_DECADE
    chunk_rows = fit_options.get("chunk_rows", CHUNK_ROWS)
    tried: dict[int, float] = {}
    bar = tqdm(desc="probe l2 search", unit="fit", disable=not progress)

    def try_index(index: int) -> None:
        if index in tried or not 0 <= index <= last:
            return
        l2 = 10.0 ** (low + index / STEPS_PER_DECADE)
        weight, bias = fit_logistic_regression(
            fit_features, fit_labels, num_classes, l2, progress=progress, **fit_options
        )
        tried[index] = _accuracy(weight, bias, val_features, val_labels, chunk_rows)
        bar.update(1)
        bar.set_postfix(l2=f"{l2:.3g}", val_top1=f"{tried[index]:.4f}")

    def best() -> int:
        return max(tried, key=lambda index: (tried[index], index))  # ties: the larger strength

    for index in [*range(0, last, FIRST_STEP), last]:
        try_index(index)
    step = FIRST_STEP
    while step > 1:
        step //= 2
        center = best()
        try_index(center - step)
        try_index(center + step)
    bar.close()
    pick = best()
    l2 = 10.0 ** (low + pick / STEPS_PER_DECADE)
    at_edge = pick in (0, last)
    if at_edge:
        warnings.warn(
            f"linear probe: the chosen L2 strength {l2:.3g} is at the {'weak' if pick == 0 else 'strong'} end "
            f"of the searched range 1e{low}..1e{high}; the best strength may lie beyond it"
        )
    return L2Search(l2, tried[pick], {10.0 ** (low + i / STEPS_PER_DECADE): tried[i] for i in sorted(tried)}, at_edge)


# ---- Probes


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(part.max()) for part in labels if len(part))) + 1


def _check_not_the_same(train_features: torch.Tensor, test_features: torch.Tensor) -> None:
    # The datasets' check (check_disjoint) cannot see features passed in directly.
    if train_features.shape == test_features.shape and torch.equal(train_features, test_features.to(train_features)):
        raise ValueError("the training features are the test features: the probe would be scored on its own images")


def _score(weight, bias, test_features, test_labels, chunk_rows: int) -> dict[str, float]:
    logits = _logits(weight, bias, test_features, chunk_rows)
    return classification_metrics(logits, test_labels.to(logits.device))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    exponents: tuple[int, int] = L2_EXPONENTS,
    progress: bool = False,
    **fit_options: Any,
) -> dict[str, float]:
    """The paper's probe: the L2 strength is chosen on a seeded `val_fraction` of the training
    features (fit on the rest), refit on all of them, and scored on the test features.

    Returns top1, top5, mean_per_class_recall, num_samples (of the test set), l2, sklearn_c,
    val_top1, num_train, num_val.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    _check_not_the_same(train_features, test_features)
    num_classes = _num_classes(train_labels, test_labels)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    num_val = max(1, int(len(order) * val_fraction))
    if num_val >= len(order):
        raise ValueError(f"{len(order)} training samples leave none to fit after a {val_fraction} validation split")
    val, fit = order[:num_val].to(train_labels.device), order[num_val:].to(train_labels.device)
    search = search_l2(
        train_features[fit], train_labels[fit], train_features[val], train_labels[val], num_classes,
        exponents=exponents, progress=progress, **fit_options,
    )
    weight, bias = fit_logistic_regression(
        train_features, train_labels, num_classes, search.l2, progress=progress, **fit_options
    )
    metrics = _score(weight, bias, test_features, test_labels, fit_options.get("chunk_rows", CHUNK_ROWS))
    metrics.update(l2=search.l2, sklearn_c=sklearn_c(search.l2, num_classes), val_top1=search.val_top1,
                   num_train=len(train_labels), num_val=num_val)
    return metrics


def sample_per_class(
    labels: torch.Tensor, k: int, generator: torch.Generator, *, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of exactly `k` samples of each class present in `labels`, drawn without replacement
    by `generator` from those not in `exclude`; sorted. A class with fewer than k is an error."""
    if k < 1:
        raise ValueError(f"k={k}: need at least one sample per class")
    labels = labels.cpu()
    available = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        available[exclude.cpu()] = False
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero((labels == label) & available).flatten()
        if len(members) < k:
            raise ValueError(f"class {label} has {len(members)} training sample(s) left, fewer than k={k}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


def few_shot_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int,
    seeds: Sequence[int] = (0, 1, 2),
    exponents: tuple[int, int] = L2_EXPONENTS,
    progress: bool = False,
    **fit_options: Any,
) -> dict[str, float]:
    """k-shot probes: with each seed, k training samples per class to fit and another k per class
    (also from the training split) to choose the L2 strength; the classifier fit on the k is
    scored (not refit on the 2k: that would be a 2k-shot probe). CLIP_benchmark's few-shot probe
    likewise fits on the k only.

    Returns, over the seeds, the mean of top1, top5 and mean_per_class_recall, their standard
    deviation (`_std`, with two seeds or more), min and max of top1, num_samples, k, num_seeds.
    """
    if not seeds:
        raise ValueError("need at least one seed")
    _check_not_the_same(train_features, test_features)
    num_classes = _num_classes(train_labels, test_labels)
    chunk_rows = fit_options.get("chunk_rows", CHUNK_ROWS)
    per_seed: list[dict[str, float]] = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        fit = sample_per_class(train_labels, k, generator).to(train_labels.device)
        val = sample_per_class(train_labels, k, generator, exclude=fit).to(train_labels.device)
        search = search_l2(
            train_features[fit], train_labels[fit], train_features[val], train_labels[val], num_classes,
            exponents=exponents, progress=progress, **fit_options,
        )
        weight, bias = fit_logistic_regression(
            train_features[fit], train_labels[fit], num_classes, search.l2, progress=progress, **fit_options
        )
        per_seed.append(_score(weight, bias, test_features, test_labels, chunk_rows))
    metrics: dict[str, float] = {}
    for name in ("top1", "top5", "mean_per_class_recall"):
        if name not in per_seed[0]:
            continue  # top5 of fewer than 5 classes
        values = torch.tensor([result[name] for result in per_seed], dtype=torch.float64)
        metrics[name] = values.mean().item()
        if len(values) > 1:
            metrics[f"{name}_std"] = values.std().item()  # sample standard deviation over seeds
    top1 = [result["top1"] for result in per_seed]
    metrics.update(top1_min=min(top1), top1_max=max(top1), num_samples=per_seed[0]["num_samples"],
                   k=k, num_seeds=len(seeds))
    return metrics


def evaluate_linear_probe(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    *,
    name: str = "linear_probe",
    features: str = "pre-projection",
    fewshot_k: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    val_fraction: float = 0.2,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    **fit_options: Any,
) -> dict[str, float]:
    """`linear_probe` (or `few_shot_probe` with `fewshot_k`) on the model's image features of two
    (image, class index) datasets, which must not share an image (`check_disjoint`, before any
    encoding). The features are encoded under `autocast_dtype`; the fit is float64 on `device`.
    `fit_options` go to `fit_logistic_regression` (chunk_rows, max_iter, tolerance).

    Returns `eval/<name>_linear_probe_<metric>`, or `eval/<name>_fewshot<k>_<metric>`.
    """
    check_disjoint(train_dataset, test_dataset)
    encode = dict(features=features, batch_size=batch_size, num_workers=num_workers, device=device,
                  autocast_dtype=autocast_dtype, progress=progress)
    train_features, train_labels = extract_image_features(model, train_dataset, desc=f"{name} train", **encode)
    test_features, test_labels = extract_image_features(model, test_dataset, desc=f"{name} test", **encode)
    if fewshot_k is None:
        metrics = linear_probe(train_features, train_labels, test_features, test_labels,
                               val_fraction=val_fraction, progress=progress, **fit_options)
        prefix = f"eval/{name}_linear_probe_"
    else:
        metrics = few_shot_probe(train_features, train_labels, test_features, test_labels,
                                 k=fewshot_k, seeds=seeds, progress=progress, **fit_options)
        prefix = f"eval/{name}_fewshot{fewshot_k}_"
    return {f"{prefix}{metric}": value for metric, value in metrics.items()}
