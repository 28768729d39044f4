"""CLIP-score filtering (DataComp's CLIP-score baseline): keep samples scoring at least a threshold."""

from __future__ import annotations

import numpy as np


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's threshold for keeping the top `fraction`: the score at index floor(N x fraction) of the
    scores in descending order (`baselines/apply_filter.py:get_threshold`). Keeping scores >= it keeps
    floor(N x fraction) + 1 samples (more with ties), as DataComp's subsets do."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--top must be a fraction in (0, 1], got {fraction}")
    if len(scores) == 0:
        raise ValueError("no CLIP scores to take a fraction of: the embeddings are empty")
    index = int(len(scores) * fraction)
    if index >= len(scores):
        return float(np.min(scores))
    return float(-np.sort(-scores)[index])


def clip_score_mask(
    scores: np.ndarray, *, threshold: float | None = None, top_fraction: float | None = None
) -> np.ndarray:
    """Which samples to keep: scores >= `threshold`, or >= the threshold of `top_fraction` (exactly one of them)."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of a threshold (--threshold) or a top fraction (--top)")
    if threshold is None:
        threshold = top_fraction_threshold(scores, top_fraction)
    return scores >= threshold
