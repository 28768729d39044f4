"""Semantic deduplication (SemDeDup, Abbas et al. 2023): drop near-duplicates found within clusters.

Embeddings are clustered with k-means; inside each cluster the samples are put in a keep-first order
and a sample is dropped when its cosine similarity to any sample before it is above the threshold
(SemDeDup's 1 - eps). As in SemDeDup, "before it" includes samples that were themselves dropped, so a
chain a~b~c with a and c not similar still keeps only a. Near-duplicates in different clusters are not
compared: the clusters are what makes this linear in the pool instead of quadratic.

Keep-first orders: `far-from-centre` (SemDeDup's default, which keeps the least typical sample of a
group) or `clip-score` (the best-aligned caption of a group is kept).
"""

from __future__ import annotations

import numpy as np
import torch

from clip.curation.clusters import assign

KEEP_ORDERS = ("far-from-centre", "clip-score")
_ROWS = 4096  # rows of a cluster's similarity matrix computed at once


def _duplicate_of_earlier(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """[n] bool: row j has cosine > threshold with some row i < j of the unit rows `x` [n, D]."""
    duplicate = torch.zeros(len(x), dtype=torch.bool)
    for start in range(0, len(x), _ROWS):
        similarity = x[start : start + _ROWS] @ x.T  # [R, n]: rows i, columns j
        rows = torch.arange(start, start + len(similarity)).unsqueeze(1)
        later = torch.arange(len(x)).unsqueeze(0) > rows  # only pairs i < j
        duplicate |= ((similarity > threshold) & later).any(dim=0)
    return duplicate


def semantic_dedup_mask(
    embeddings: np.ndarray,
    centres: np.ndarray,
    *,
    threshold: float,
    keep: str = "far-from-centre",
    clip_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Which samples to keep: one of each group of near-duplicates (cosine > `threshold`) in a cluster."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the dedup threshold is a cosine similarity in [-1, 1], got {threshold}")
    if keep not in KEEP_ORDERS:
        raise ValueError(f"keep order must be one of {', '.join(KEEP_ORDERS)}, got {keep!r}")
    if keep == "clip-score" and clip_scores is None:
        raise ValueError("keep='clip-score' needs the samples' CLIP scores")
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    labels = assign(embeddings, centres)
    keep_mask = np.ones(len(x), dtype=bool)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if keep == "far-from-centre":
            first = (x[members] @ torch.from_numpy(centres[cluster]).float()).numpy()  # ascending similarity
        else:
            first = -clip_scores[members]
        members = members[np.argsort(first, kind="stable")]
        keep_mask[members[_duplicate_of_earlier(x[members], threshold).numpy()]] = False
    return keep_mask
