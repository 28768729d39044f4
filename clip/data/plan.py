"""Who reads what: shards split over every reader (rank x worker) and the fixed steps per epoch.

The plan is a pure function of the resolved sources, world size, workers, batch size and seed, so all
ranks compute the same one without talking to each other.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

from clip.data.sources import DataConfigError, Shard, Source

# CSV files are cut into chunks of at most this many rows so that they spread over readers like shards.
CSV_CHUNK_ROWS = 1000


def seeded_rng(*parts: object) -> random.Random:
    """A Random seeded from its arguments; string seeds hash with SHA-512, the same in every process."""
    return random.Random("clip.data/" + "/".join(map(str, parts)))


@dataclass
class ReaderPlan:
    """The shards of one reader. Epoch mode: its share, each read once per epoch. Resampled: all shards."""

    reader: int  # global index: rank * readers_per_rank + worker
    shards: list[Shard]
    weights: Optional[list[float]] = None  # resampled mode: draw weight of each shard
    # With data.subset/data.balance: samples each shard yields (url -> count, where known).
    selected: Optional[dict[str, int]] = None

    def samples_in(self, shard: Shard) -> int:
        return _samples_in(shard, self.selected)

    @property
    def num_samples(self) -> int:
        return sum(self.samples_in(s) for s in self.shards)


@dataclass
class DataPlan:
    world_size: int
    readers_per_rank: int
    batch_size: int
    resampled: bool
    readers: list[ReaderPlan]
    # Epoch mode: batches every rank yields per epoch (None when resampled).
    steps_per_epoch: Optional[int]

    def rank_readers(self, rank: int) -> list[ReaderPlan]:
        return self.readers[rank * self.readers_per_rank : (rank + 1) * self.readers_per_rank]


def readers_per_rank(num_workers: int) -> int:
    """Each DataLoader worker is one reader; with no workers the training process is the only one."""
    return max(1, num_workers)


def check_reader_count(num_shards: int, world_size: int, num_workers: int) -> None:
    """In epoch mode every reader needs at least one shard, or some rank would wait for data forever."""
    readers = world_size * readers_per_rank(num_workers)
    if num_shards < readers:
        raise DataConfigError(
            f"{num_shards} shards cannot feed {world_size} ranks x {readers_per_rank(num_workers)} workers = "
            f"{readers} readers; use fewer workers (data.num_workers), more shards (data.train_shards), or "
            "data.resampled=true"
        )


def _csv_chunks(source: Source, num_readers: int, seed: int) -> list[Shard]:
    rows = [(i, path, caption) for i, (path, caption) in enumerate(source.csv_rows or [])]
    seeded_rng(seed, "csv", source.index).shuffle(rows)  # chunks are random subsets, not file ranges
    num_chunks = max(num_readers, math.ceil(len(rows) / CSV_CHUNK_ROWS))
    return [
        Shard(url=f"{source.spec}[{c}/{num_chunks}]", source=source.index, num_samples=len(chunk), rows=tuple(chunk))
        for c in range(num_chunks)
        if (chunk := rows[c::num_chunks])
    ]


def _samples_in(shard: Shard, selected: Optional[dict[str, int]]) -> int:
    if selected is not None and shard.url in selected:
        return selected[shard.url]
    return shard.num_samples or 0


def _balanced_split(shards: list[Shard], num_readers: int, seed: int, selected) -> list[list[Shard]]:
    """Largest shard first to the reader with the fewest samples (LPT), so readers finish together."""
    rng = seeded_rng(seed, "split")
    order = sorted(shards, key=lambda s: (-_samples_in(s, selected), rng.random()))
    heap = [(0, reader) for reader in range(num_readers)]
    split: list[list[Shard]] = [[] for _ in range(num_readers)]
    for shard in order:
        total, reader = heapq.heappop(heap)
        split[reader].append(shard)
        heapq.heappush(heap, (total + _samples_in(shard, selected), reader))
    return split


def build_plan(
    sources: list[Source],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    resampled: bool,
    count_selected: Optional[Callable[[list[Shard]], dict[str, int]]] = None,
) -> DataPlan:
    """`count_selected`: with data.subset/data.balance, the samples each shard yields (clip.data.selection);
    shards known to yield none are left out."""
    per_rank = readers_per_rank(num_workers)
    num_readers = world_size * per_rank
    shards = [
        shard
        for source in sources
        for shard in (source.shards if source.csv_rows is None else _csv_chunks(source, num_readers, seed))
    ]
    selected = None
    if count_selected is not None:
        selected = count_selected(shards)
        shards = [s for s in shards if selected.get(s.url) != 0]
        if not shards:
            raise DataConfigError("data.subset/data.balance selects no sample of data.train_shards")
    if resampled:
        weight_of = {source.index: source.weight for source in sources}
        weights = [weight_of[s.source] for s in shards]
        readers = [ReaderPlan(reader, shards, weights, selected) for reader in range(num_readers)]
        return DataPlan(world_size, per_rank, batch_size, True, readers, None)

    check_reader_count(len(shards), world_size, num_workers)
    split = _balanced_split(shards, num_readers, seed, selected)
    readers = [ReaderPlan(i, part, selected=selected) for i, part in enumerate(split)]
    # Workers batch on their own, so a rank's batches are the sum of its readers' full batches.
    rank_batches = [
        sum(r.num_samples // batch_size for r in readers[rank * per_rank : (rank + 1) * per_rank])
        for rank in range(world_size)
    ]
    steps = min(rank_batches)
    if steps == 0:
        poorest = min(readers, key=lambda r: r.num_samples)
        raise DataConfigError(
            f"data.train_shards: a reader gets {poorest.num_samples} samples, not one batch of {batch_size}; "
            f"use a smaller batch, fewer workers (data.num_workers), or more data"
        )
    return DataPlan(world_size, per_rank, batch_size, False, readers, steps)
