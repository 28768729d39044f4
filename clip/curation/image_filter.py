"""DataComp's image-based filter: keep the pool's clusters that a target set's images fall into.

k-means over the pool's image embeddings (DataComp: 100k clusters of its ViT-L/14 embeddings); each
target image (DataComp: ImageNet-1k's training set) picks its nearest centre; a pool sample is kept
when its own nearest centre is one of those picked (`baselines/apply_filter.py:image_filter_helper`).
DataComp then intersects the result with a CLIP-score subset (`scripts/curate.py and`).
"""

from __future__ import annotations

import numpy as np

from clip.curation.clusters import assign


def target_clusters(centres: np.ndarray, target_embeddings: np.ndarray) -> np.ndarray:
    """The sorted indices of the centres nearest to at least one target embedding."""
    if target_embeddings.ndim != 2 or target_embeddings.shape[1] != centres.shape[1]:
        raise ValueError(
            f"target embeddings of shape {target_embeddings.shape} do not match the pool's "
            f"{centres.shape[1]}-wide embeddings: embed both with the same model"
        )
    return np.unique(assign(target_embeddings, centres))


def image_based_mask(pool_embeddings: np.ndarray, centres: np.ndarray, target_embeddings: np.ndarray) -> np.ndarray:
    """Which pool samples' nearest centre is nearest to some target embedding."""
    return np.isin(assign(pool_embeddings, centres), target_clusters(centres, target_embeddings))
