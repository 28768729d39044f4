"""Set operations on subset files, and how many samples a subset keeps from each shard."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clip.curation.embeddings import EmbeddingShard
from clip.data.subset import UID_DTYPE, contains

OPERATIONS = ("and", "or", "minus")


def combine(operation: str, subsets: Sequence[np.ndarray]) -> np.ndarray:
    """`and` (in every subset), `or` (in any), `minus` (in the first and in none of the others); sorted uids."""
    if operation not in OPERATIONS:
        raise ValueError(f"set operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    if len(subsets) < 2:
        raise ValueError(f"'{operation}' needs at least two subset files, got {len(subsets)}")
    result = np.asarray(subsets[0], dtype=UID_DTYPE)
    for other in subsets[1:]:
        other = np.asarray(other, dtype=UID_DTYPE)
        if operation == "and":
            result = np.intersect1d(result, other)
        elif operation == "or":
            result = np.union1d(result, other)
        else:
            result = np.setdiff1d(result, other)
    return np.unique(result)


@dataclass
class ShardCount:
    shard: str
    kept: int
    total: int


def summarize(subset: np.ndarray, embeddings: EmbeddingShard) -> tuple[list[ShardCount], int]:
    """Kept and total samples per shard of an embedded pool, and how many uids of the subset are in no shard."""
    kept = contains(subset, embeddings.uid)
    counts = []
    for shard in dict.fromkeys(embeddings.shard.tolist()):
        in_shard = embeddings.shard == shard
        counts.append(ShardCount(shard, int(kept[in_shard].sum()), int(in_shard.sum())))
    return counts, len(subset) - int(kept.sum())
