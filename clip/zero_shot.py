"""Zero-shot classification and image-text retrieval of a CLIP model (linear probes: clip.linear_probe).

Every evaluation runs on all ranks when torch.distributed is initialised and returns the same
metrics on every rank, equal to a single-process run (clip.eval_loop).

On the same model, data and tokenizer the metrics equal CLIP_benchmark's `zeroshot_classification`
and `zeroshot_retrieval` (tests/test_zero_shot.py). Metric keys are `eval/<set>_<metric>`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from clip.data.eval_datasets import ClassificationSet, RetrievalSet
from clip.distributed import all_gather_rows, get_rank, get_world_size
from clip.eval_loop import (
    autocast,
    batches_in_lockstep,
    cat_or_empty,
    device_of,
    eval_mode,
    gather_in_order,
    map_images_in_order,
)
from clip.models.clip import CLIP
from clip.models.text_packing import pack_text

Tokenize = Callable[[list[str]], torch.Tensor]

TOPK = (1, 5)
RECALL_KS = (1, 5, 10)
# Our CLIP's text tower skips the padding after each caption (clip.models.text_packing; exact up to
# rounding). Prompts and captions are short, so this cuts most of the text tower's work.
TEXT_PACKING_GROUPS = 8


def format_prompt(template: str, classname: str) -> str:
    """Fill a template's `{}` (OpenAI's lists) or `{c}` (CLIP_benchmark's files) with a class name."""
    for placeholder in ("{c}", "{}"):
        if placeholder in template:
            return template.replace(placeholder, classname)
    raise ValueError(f"prompt template {template!r} has no '{{}}' or '{{c}}' placeholder")


# ---------------------------------------------------------------------------------------------
# Zero-shot classification


def _encode_text(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalised float32 features [N, E] of token rows [N, L] held on the host."""
    if isinstance(model, CLIP):
        tokens = pack_text(tokens, model.eot_token_id, TEXT_PACKING_GROUPS)
    return model.encode_text(tokens.to(device), normalize=True).float()


@torch.no_grad()
def build_zero_shot_classifier(
    model: nn.Module,
    tokenize: Tokenize,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    prompts_per_call: int = 1024,
    progress: bool = False,
) -> torch.Tensor:
    """Class weights [E, C]: per class, the mean of its prompts' L2-normalised text embeddings,
    renormalised (prompt ensembling, Radford et al. 2021, arXiv:2103.00020 §3.1.4).

    Each text-encoder call takes the prompts of as many whole classes as fit in `prompts_per_call`
    (at least one class): ImageNet's 1000 classes x 80 templates take 84 calls, not 1000.
    With torch.distributed initialised, ranks encode disjoint blocks of classes and share them.
    """
    if not classnames or not templates:
        raise ValueError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
    for template in templates:
        format_prompt(template, "")  # a bad template fails here, before any encoding
    device = device_of(model, device)
    rank, world = get_rank(), get_world_size()
    per_rank = math.ceil(len(classnames) / world)
    # Past the last class a rank encodes it again and drops it: equal encoder calls per rank.
    indices = [min(index, len(classnames) - 1) for index in range(rank * per_rank, (rank + 1) * per_rank)]
    classes_per_call = max(1, prompts_per_call // len(templates))
    rows = []
    with eval_mode(model), autocast(device, autocast_dtype):
        starts = range(0, per_rank, classes_per_call)
        for start in tqdm(starts, desc="classifier", unit="call", disable=not progress or rank != 0):
            block = [classnames[index] for index in indices[start : start + classes_per_call]]
            prompts = [format_prompt(template, classname) for classname in block for template in templates]
            embeddings = _encode_text(model, tokenize(prompts), device)  # [classes x templates, E]
            rows.append(F.normalize(embeddings.view(len(block), len(templates), -1).mean(dim=1), dim=-1))
    weights = all_gather_rows(torch.cat(rows))[: len(classnames)]  # [C, E]
    return weights.t()


def _topk_metrics(top: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Metrics from the top-k class indices [N, k] (best first) and the true classes [N]."""
    num_samples = len(targets)
    if num_samples == 0:
        raise ValueError("no samples to evaluate")
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        low, high = int(targets.min()), int(targets.max())
        raise ValueError(
            f"labels span [{low}, {high}], but there are {num_classes} classes: "
            f"labels must be class indices 0 to {num_classes - 1}"
        )
    hits = top == targets[:, None]  # [N, k]
    # top-5 of fewer than 5 classes is meaningless (CLIP_benchmark reports NaN): leave it out.
    metrics = {f"top{k}": int(hits[:, :k].any(dim=1).sum()) / num_samples for k in TOPK if k <= num_classes}
    # Mean over the classes present of each class's top-1 recall (sklearn's balanced accuracy).
    total = torch.bincount(targets, minlength=num_classes)
    correct = torch.bincount(targets[hits[:, 0]], minlength=num_classes)
    present = total > 0
    metrics["mean_per_class_recall"] = (correct[present].double() / total[present]).mean().item()
    metrics["num_samples"] = num_samples
    return metrics


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """top1, top5 (with at least 5 classes), mean_per_class_recall and num_samples of logits [N, C]."""
    num_classes = logits.shape[1]
    top = logits.topk(min(max(TOPK), num_classes), dim=1).indices
    return _topk_metrics(top, targets, num_classes)


@torch.no_grad()
def evaluate_zero_shot(
    model: nn.Module,
    dataset: Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenize: Tokenize,
    *,
    name: str = "zero_shot",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    classifier: torch.Tensor | None = None,
    predictions: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy of `model` on `dataset` of (image, class index).

    Call it on every rank (or in a single process). Returns `eval/<name>_top1`, `_top5`,
    `_mean_per_class_recall`, `_num_samples`, the same on every rank. `classifier` [E, C] skips
    the text encoding (e.g. from a previous call with the same text tower). A `predictions` dict
    receives the per-sample `top1` class, `topk` classes [N, min(5, C)] (best first) and `target`
    (CPU, dataset order), e.g. for paired comparisons and group metrics.
    """
    device = device_of(model, device)
    if classifier is None:
        classifier = build_zero_shot_classifier(
            model, tokenize, classnames, templates, device=device, autocast_dtype=autocast_dtype, progress=progress
        )
    k = min(max(TOPK), len(classnames))

    def top_classes(images: torch.Tensor) -> torch.Tensor:  # [B, k], best first
        with autocast(device, autocast_dtype):
            features = model.encode_image(images, normalize=True)
        # OpenAI's notebook and CLIP_benchmark scale by 100; a scale cannot change the ranking
        # except through rounding, which this keeps identical to theirs.
        return (100.0 * features.float() @ classifier).topk(k, dim=1).indices

    top, target = map_images_in_order(
        model, dataset, top_classes, empty=torch.zeros(0, k, dtype=torch.long), batch_size=batch_size,
        num_workers=num_workers, device=device, progress=progress, desc=name,
    )  # fmt: skip
    if predictions is not None:
        predictions.update(top1=top[:, 0].cpu(), topk=top.cpu(), target=target.cpu())
    try:
        metrics = _topk_metrics(top, target, len(classnames))
    except ValueError as error:  # which set: the trainer and the script evaluate several
        raise ValueError(f"eval set {name!r}: {error}") from error
    return {f"eval/{name}_{metric}": value for metric, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Image-text retrieval


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image_index: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways as CLIP papers and CLIP_benchmark report it: a query scores 1 when any of
    its positives is among its k most similar items.

    `image_retrieval_recall@k`: each caption retrieves among the images [I, E];
    `text_retrieval_recall@k`: each image retrieves among the captions [T, E], any of its own
    counting. `text_image_index` [T] is the image of each caption. Features are L2-normalised.
    """
    scores = text_features @ image_features.t()  # [T, I]
    image_ids = torch.arange(len(image_features), device=scores.device)
    metrics = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [T, k]
        image_hits = (top_images == text_image_index[:, None]).any(dim=1)
        metrics[f"image_retrieval_recall@{k}"] = image_hits.float().mean().item()
    for k in ks:
        top_texts = scores.t().topk(min(k, scores.shape[0]), dim=1).indices  # [I, k]
        text_hits = (text_image_index[top_texts] == image_ids[:, None]).any(dim=1)
        metrics[f"text_retrieval_recall@{k}"] = text_hits.float().mean().item()
    return metrics


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    dataset: Dataset,
    tokenize: Tokenize,
    *,
    name: str = "retrieval",
    ks: Sequence[int] = RECALL_KS,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Image<->text recall@k on `dataset` of (image, caption or list of captions).

    Call it on every rank (or in a single process). Returns `eval/<name>_image_retrieval_recall@k`,
    `eval/<name>_text_retrieval_recall@k`, `_num_images`, `_num_texts`, the same on every rank.
    The score matrix is [texts, images] floats on every rank (COCO 5k: 25k x 5k, 0.5 GB).
    """
    device = device_of(model, device)
    image_parts, image_keys, text_parts, text_keys = [], [], [], []
    with eval_mode(model):
        for images, captions, batch_keys in batches_in_lockstep(
            dataset, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress, desc=name
        ):
            captions = [[""]] if batch_keys is None else [[c] if isinstance(c, str) else list(c) for c in captions]
            tokens = tokenize([caption for per_image in captions for caption in per_image])
            with autocast(device, autocast_dtype):
                image_features = model.encode_image(images, normalize=True).float()  # [B, E]
                text_features = _encode_text(model, tokens, device)  # [sum of captions, E]
            if batch_keys is None:
                continue
            counts = torch.tensor([len(per_image) for per_image in captions], device=device)
            image_parts.append(image_features)
            image_keys.append(batch_keys)
            text_parts.append(text_features)
            text_keys.append(batch_keys.repeat_interleave(counts))
    empty_keys = torch.zeros(0, dtype=torch.long, device=device)
    empty_features = torch.zeros(0, _embed_dim(model), device=device)
    image_keys_sorted, images_sorted = gather_in_order(
        cat_or_empty(image_keys, empty_keys), cat_or_empty(image_parts, empty_features)
    )
    text_keys_sorted, texts_sorted = gather_in_order(
        cat_or_empty(text_keys, empty_keys), cat_or_empty(text_parts, empty_features)
    )
    if len(images_sorted) == 0:
        raise ValueError(f"retrieval set {name!r} has no samples")
    text_image_index = torch.searchsorted(image_keys_sorted, text_keys_sorted)
    metrics = retrieval_metrics(images_sorted, texts_sorted, text_image_index, ks)
    metrics["num_images"], metrics["num_texts"] = len(images_sorted), len(texts_sorted)
    return {f"eval/{name}_{metric}": value for metric, value in metrics.items()}


def _embed_dim(model: nn.Module) -> int:
    return int(model.config.embed_dim) if hasattr(model, "config") else int(model.text_projection.shape[1])


def evaluate(
    model: nn.Module, eval_set: ClassificationSet | RetrievalSet, tokenize: Tokenize, **options: Any
) -> dict[str, float]:
    """Zero-shot classification or retrieval, whichever `eval_set` is (the trainer's eval hook)."""
    if isinstance(eval_set, ClassificationSet):
        return evaluate_zero_shot(
            model, eval_set.dataset, eval_set.classnames, eval_set.templates, tokenize, name=eval_set.name, **options
        )
    return evaluate_retrieval(model, eval_set.dataset, tokenize, name=eval_set.name, **options)
