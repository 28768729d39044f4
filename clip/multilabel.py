"""Zero-shot multilabel classification (Pascal VOC 2007): mean average precision over classes.

Each class's prompts make a classifier row as in single-label zero-shot; an image's score for a class
is its similarity to that row, and each class ranks all images. Two means over classes are reported:
`mean_average_precision`, the uninterpolated AP that CLIP_benchmark reports (equal to its
`average_precision_per_class`, tests/test_multilabel.py), and `mean_average_precision_11point`, the
VOC2007 devkit's 11-point interpolated AP that the CLIP paper reports for VOC2007.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from clip.eval_loop import autocast, device_of, map_images_in_order
from clip.zero_shot import Tokenize, build_zero_shot_classifier


def average_precisions(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the uninterpolated and the 11-point AP of scores [N, C] against 0/1 targets [N, C].
    A class without positives has AP 0 (as CLIP_benchmark counts it)."""
    order = scores.double().argsort(dim=0, descending=True, stable=True)
    truth = targets.gather(0, order).double()  # [N, C], each column in its class's ranking
    hits = truth.cumsum(0)
    precision = hits / torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    positives = truth.sum(0)
    uninterpolated = (precision * truth).sum(0) / positives.clamp(min=1)
    recall = hits / positives.clamp(min=1)
    eleven = torch.zeros(scores.shape[1], dtype=torch.float64)
    for threshold in torch.linspace(0, 1, 11, dtype=torch.float64):
        reached = recall >= threshold - 1e-12
        eleven += torch.where(reached, precision, torch.zeros_like(precision)).amax(0) / 11
    eleven[positives == 0] = 0.0
    return uninterpolated, eleven


@torch.no_grad()
def evaluate_multilabel(
    model: nn.Module,
    dataset: Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenize: Tokenize,
    *,
    name: str = "multilabel",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """`eval/<name>_mean_average_precision`, `_mean_average_precision_11point`, `_num_samples` of
    `dataset` of (image, 0/1 row over the classes). Call it on every rank (or in a single process)."""
    device = device_of(model, device)
    classifier = build_zero_shot_classifier(model, tokenize, classnames, templates, device=device,
                                            autocast_dtype=autocast_dtype, progress=progress)  # fmt: skip
    classes = len(classnames)

    def scores_of(images: torch.Tensor) -> torch.Tensor:  # [B, C]
        with autocast(device, autocast_dtype):
            features = model.encode_image(images, normalize=True)
        return 100.0 * features.float() @ classifier

    score, target = map_images_in_order(
        model, dataset, scores_of, empty=torch.zeros(0, classes), target_shape=(classes,), batch_size=batch_size,
        num_workers=num_workers, device=device, progress=progress, desc=name,
    )  # fmt: skip
    if len(target) == 0 or target.shape[1] != classes:
        raise ValueError(
            f"eval set {name!r}: {len(target)} samples with label rows of {target.shape[1]}, not {classes}"
        )
    uninterpolated, eleven = average_precisions(score.cpu(), target.cpu())
    metrics = {"mean_average_precision": uninterpolated.mean().item(),
               "mean_average_precision_11point": eleven.mean().item(), "num_samples": len(target)}  # fmt: skip
    return {f"eval/{name}_{metric}": value for metric, value in metrics.items()}
