"""Spherical k-means over unit embeddings, and nearest-centre assignment: faiss when installed, else torch.

Both the image-based filter (DataComp) and semantic deduplication (SemDeDup) cluster embeddings this
way: centres are renormalised to unit length after each update and "nearest" means the largest dot
product, which for unit vectors is the largest cosine (faiss's `spherical=True`, what DataComp used).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_ASSIGN_BATCH = 65536  # rows per similarity matrix: bounds memory at batch x k floats


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def kmeans(
    embeddings: np.ndarray, num_clusters: int, *, iterations: int = 20, seed: int = 0, backend: str = "auto"
) -> np.ndarray:
    """Unit cluster centres [K, D] (float32) of unit `embeddings` [N, D].

    `backend`: "faiss", "torch", or "auto" (faiss if it can be imported). The torch backend is Lloyd's
    algorithm from K distinct samples drawn with `seed`; a cluster that empties is restarted at the
    sample farthest from its centre, so K centres always come back.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < num_clusters:
        raise ValueError(
            f"k-means with {num_clusters} clusters needs at least that many embeddings, got shape {x.shape}"
        )
    if num_clusters < 1:
        raise ValueError(f"the number of clusters must be positive, got {num_clusters}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"k-means backend must be auto, faiss or torch, got {backend!r}")
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ImportError("k-means backend 'faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)")
    if faiss is not None:
        model = faiss.Kmeans(x.shape[1], num_clusters, niter=iterations, seed=seed, spherical=True, verbose=False)
        model.train(x)
        return np.ascontiguousarray(model.centroids, dtype=np.float32)
    return _torch_kmeans(torch.from_numpy(x), num_clusters, iterations, seed).numpy()


def _torch_kmeans(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()  # [K, D]
    for _ in range(iterations):
        labels, similarity = _nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            farthest = int(torch.argmin(similarity))
            sums[empty] = x[farthest]
            similarity[farthest] = float("inf")  # not chosen twice
        centres = F.normalize(sums, dim=-1)
    return centres


def _nearest(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.empty(len(x), dtype=torch.long)
    similarity = torch.empty(len(x), dtype=torch.float32)
    for start in range(0, len(x), _ASSIGN_BATCH):
        scores = x[start : start + _ASSIGN_BATCH].float() @ centres.float().T  # [B, K]
        similarity[start : start + _ASSIGN_BATCH], labels[start : start + _ASSIGN_BATCH] = scores.max(dim=1)
    return labels, similarity


def assign(embeddings: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of each embedding's nearest centre (largest dot product), [N] int64."""
    labels, _ = _nearest(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), torch.from_numpy(centres))
    return labels.numpy()
