"""The training loader: the rank's readers merged in a fixed order, with a checkpointable position.

Each reader (one DataLoader worker) sends batches tagged with its position. This process takes them
round-robin, so the sequence of batches is a pure function of the data and the seed, and records a
reader's position only when the trainer receives its batch: `state_dict()` is the position after the
last batch handed out, never what workers have prefetched, so a resume repeats and skips nothing. Skip counts and shard-level errors ride
on the batches; too many of them stop the run with an error naming the worst shards.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from clip.config import DataConfig
from clip.data.plan import DataPlan, build_plan
from clip.data.records import SAMPLE_REASONS, SHARD_REASONS
from clip.data.selection import build_selector, selected_counts
from clip.data.sources import DataError, resolve_sources
from clip.data.stream import Batch, Position, ReaderOutput, ReaderStream
from clip.data.worker_signals import ignore_outside_sigterm, sigterm_blocked

logger = logging.getLogger("clip.data")

STATE_FORMAT = 1
# The skip rate is judged over the last this-many samples (and over each whole epoch at its end).
SKIP_WINDOW_SAMPLES = 10_000
_LOGGED_PER_REASON = 10  # then only every power of ten


@dataclass
class _Cursor:
    """The rank's position: per reader where it continues, plus the round-robin pointer."""

    epoch: int
    positions: list[Position]
    ended: list[bool]
    next_reader: int = 0
    batches: int = 0  # batches handed out in this epoch

    @classmethod
    def fresh(cls, epoch: int, num_readers: int) -> "_Cursor":
        return cls(epoch, [(epoch, 0, 0)] * num_readers, [False] * num_readers)

    def copy(self) -> "_Cursor":
        return replace(self, positions=list(self.positions), ended=list(self.ended))


class _SkipMonitor:
    """Logs skips (rate-limited) and raises DataError when too many samples or shards are lost."""

    def __init__(self, rank: int, max_skip_fraction: float, max_unreadable_shards: int):
        self.rank = rank
        self.max_skip_fraction = max_skip_fraction
        self.max_unreadable_shards = max_unreadable_shards
        self.totals: Counter = Counter()
        self.logged_shard_events: set[tuple[str, str]] = set()
        self.unreadable: dict[str, str] = {}
        self.window: deque[tuple[int, int, Counter]] = deque()  # (samples, lost, shard losses)
        self.window_samples = self.window_lost = 0
        self.epoch_samples = self.epoch_lost = 0
        self.epoch_shard_losses: Counter = Counter()

    def _log(self, output: ReaderOutput) -> None:
        for event in output.events:
            if event.reason in SHARD_REASONS:
                if (event.reason, event.shard) not in self.logged_shard_events:
                    self.logged_shard_events.add((event.reason, event.shard))
                    logger.warning("rank %d: %s: %s", self.rank, event.reason, event.detail)
        for reason, count in output.skipped.items():
            before = self.totals[reason]
            self.totals[reason] += count
            if reason in SHARD_REASONS:
                continue
            shown = [e for e in output.events if e.reason == reason]
            for n in range(before + 1, before + count + 1):
                if n <= _LOGGED_PER_REASON or str(n).rstrip("0") == "1":
                    detail = f"{shown[0].shard} key {shown[0].key!r}: {shown[0].detail}" if shown else ""
                    logger.warning("rank %d: skipped sample #%d for %s (%s)", self.rank, n, reason, detail)
                    shown = shown[1:]

    def observe(self, output: ReaderOutput) -> None:
        self._log(output)
        for event in output.events:
            if event.reason == "unreadable_shard":
                self.unreadable.setdefault(event.shard, event.detail)
        if len(self.unreadable) > self.max_unreadable_shards:
            listed = "\n  ".join(self.unreadable.values())
            raise DataError(
                f"rank {self.rank}: {len(self.unreadable)} shard(s) could not be read (data.max_unreadable_shards="
                f"{self.max_unreadable_shards}):\n  {listed}"
            )
        samples = len(output.batch) if output.batch is not None else 0
        lost = sum(output.skipped[r] for r in SAMPLE_REASONS)
        self.window.append((samples + lost, lost, output.shard_losses))
        self.window_samples += samples + lost
        self.window_lost += lost
        while self.window and self.window_samples - self.window[0][0] >= SKIP_WINDOW_SAMPLES:
            old_samples, old_lost, _ = self.window.popleft()
            self.window_samples -= old_samples
            self.window_lost -= old_lost
        self.epoch_samples += samples + lost
        self.epoch_lost += lost
        self.epoch_shard_losses.update(output.shard_losses)
        if self.window_samples >= SKIP_WINDOW_SAMPLES:
            losses = [entry[2] for entry in self.window]
            self._check(self.window_lost, self.window_samples, losses, f"the last {self.window_samples} samples")

    def end_epoch(self, epoch: int) -> None:
        self._check(self.epoch_lost, self.epoch_samples, [self.epoch_shard_losses], f"epoch {epoch}")
        self.epoch_samples = self.epoch_lost = 0
        self.epoch_shard_losses = Counter()

    def _check(self, lost: int, samples: int, shard_losses: list[Counter], where: str) -> None:
        if samples and lost / samples > self.max_skip_fraction:
            worst = ", ".join(f"{url} ({n})" for url, n in sum(shard_losses, Counter()).most_common(5))
            raise DataError(
                f"rank {self.rank}: {lost} of {samples} samples in {where} were skipped ({lost / samples:.1%}), "
                f"more than data.max_skip_fraction={self.max_skip_fraction}; worst shards: {worst}"
            )


class TrainLoader:
    """Iterate for batches (one epoch per `iter()` in epoch mode; endless when resampled)."""

    def __init__(
        self,
        plan: DataPlan,
        streams: list[ReaderStream],
        *,
        rank: int,
        seed: int,
        num_workers: int,
        prefetch_factor: int,
        pin_memory: bool,
        monitor: _SkipMonitor,
    ):
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.streams = streams
        # One single-worker DataLoader per reader: this process decides the order, not torch's queue.
        # Workers ignore a SIGTERM sent to the whole job (clip.data.worker_signals).
        workers = dict(num_workers=1, persistent_workers=True, prefetch_factor=prefetch_factor,
                       worker_init_fn=ignore_outside_sigterm) if num_workers else {}
        # A private generator: DataLoader draws worker base seeds from it, not from the trainer's RNG.
        self.loaders = [
            DataLoader(s, batch_size=None, pin_memory=pin_memory, generator=torch.Generator(), **workers)
            for s in streams
        ]
        self.monitor = monitor
        self.cursor = _Cursor.fresh(0, len(streams))
        self.next_epoch = 0

    @property
    def steps_per_epoch(self) -> Optional[int]:
        """Batches per epoch, the same on every rank (epoch mode); None when resampled."""
        return self.plan.steps_per_epoch

    def finish_images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's uint8 images, already on the model's device, as the transform returns them
        (float32, normalised): the loader defers that last step to the device (ImageBatcher)."""
        return self.streams[0].images.finish(images)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next `iter()` yields; continues it mid-way if the loaded state is inside it."""
        self.next_epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.plan.resampled:
            start = self.cursor
        else:
            epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
            start = self.cursor if self.cursor.epoch == epoch else _Cursor.fresh(epoch, len(self.streams))
        return self._batches(start.copy())

    def _batches(self, merged: _Cursor) -> Iterator[Batch]:
        self.cursor = merged.copy()
        iterators = []
        with sigterm_blocked():  # the first iter() starts the workers
            for stream, loader, position, ended in zip(self.streams, self.loaders, merged.positions, merged.ended):
                if not ended:
                    stream.set_start(position)
                iterators.append(None if ended else iter(loader))
        steps = self.plan.steps_per_epoch
        held: Optional[Batch] = None
        pending: Counter = Counter()
        while not all(merged.ended) and (steps is None or merged.batches < steps):
            reader = merged.next_reader
            output = next(iterators[reader], None)
            if output is None:  # a reader always ends with an `end` output; this is a worker gone wrong
                raise DataError(f"rank {self.rank}: reader {reader} stopped without finishing its epoch")
            self.monitor.observe(output)
            if output.batch is not None and held is not None:
                self.cursor = merged.copy()
                yield replace(held, skipped=dict(pending))
                pending, held = Counter(), None
            merged.positions[reader] = output.position
            merged.ended[reader] = output.end
            if output.dropped:
                logger.info("rank %d reader %d: %d samples left over at the end of the epoch", self.rank, reader, output.dropped)
            merged.next_reader = self._next_active(merged, reader)
            pending.update(output.skipped)
            if output.batch is not None:
                merged.batches += 1
                held = output.batch
                if steps is not None and merged.batches == steps:
                    break  # the last batch of the epoch goes out at once: nothing after it is consumed
        if not self.plan.resampled:
            if not all(merged.ended):
                left = sum(1 for ended in merged.ended if not ended)
                logger.info("rank %d: epoch %d ends after %d batches; %d reader(s) had data left", self.rank, merged.epoch, merged.batches, left)
            merged = _Cursor.fresh(merged.epoch + 1, len(self.streams))
            self.monitor.end_epoch(merged.epoch - 1)
        self.cursor = merged
        if held is not None:
            yield replace(held, skipped=dict(pending))
        elif pending:
            logger.warning("rank %d: skips after the last batch of epoch %d: %s", self.rank, merged.epoch - 1, dict(pending))

    @staticmethod
    def _next_active(cursor: _Cursor, reader: int) -> int:
        n = len(cursor.ended)
        for step in range(1, n + 1):
            candidate = (reader + step) % n
            if not cursor.ended[candidate]:
                return candidate
        return reader

    def state_dict(self) -> dict:
        """The position after the last batch handed out: ints and lists only (fits a weights_only checkpoint)."""
        c = self.cursor
        return {
            "format": STATE_FORMAT,
            "resampled": self.plan.resampled,
            "seed": self.seed,
            "world_size": self.plan.world_size,
            "rank": self.rank,
            "readers_per_rank": self.plan.readers_per_rank,
            "batch_size": self.plan.batch_size,
            "epoch": c.epoch,
            "batches_in_epoch": c.batches,
            "next_reader": c.next_reader,
            "positions": [list(p) for p in c.positions],
            "ended": list(c.ended),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of this rank); call before iterating."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown data loader state format {state.get('format')!r}")
        same = {
            "resampled": self.plan.resampled,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.plan.world_size,
            "batch_size": self.plan.batch_size,
            "readers_per_rank": self.plan.readers_per_rank,
        }
        changed = {k: (state[k], v) for k, v in same.items() if state[k] != v}
        if self.plan.resampled and changed and set(changed) <= {"readers_per_rank", "world_size", "rank"}:
            # Positions belong to readers that no longer exist: start the new readers on groups that no
            # reader has drawn yet, so the stream goes on without replaying what was seen.
            group = 1 + max(p[1] for p in state["positions"])
            logger.warning("data loader state was saved with %s; starting fresh resampled streams at group %d", changed, group)
            self.cursor = _Cursor(0, [(0, group, 0)] * len(self.streams), [False] * len(self.streams))
            return
        if self.plan.resampled:
            changed.pop("batch_size", None)  # positions count samples, not batches
        if changed:
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume the data position exactly: the loader state differs ({shown})")
        self.cursor = _Cursor(
            epoch=state["epoch"],
            positions=[tuple(p) for p in state["positions"]],
            ended=list(state["ended"]),
            next_reader=state["next_reader"],
            batches=state["batches_in_epoch"],
        )
        self.next_epoch = state["epoch"]


def build_train_loader(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    image_transform: Callable,
    tokenize: Callable[[list[str]], torch.Tensor],
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: Optional[bool] = None,
) -> TrainLoader:
    """The training loader of `rank` (per-rank `batch_size`); `tokenize` must be safe in forked workers."""
    sources = resolve_sources(data_cfg)
    selector = build_selector(data_cfg, seed)
    plan = build_plan(
        sources,
        world_size=world_size,
        num_workers=data_cfg.num_workers,
        batch_size=batch_size,
        seed=seed,
        resampled=data_cfg.resampled,
        count_selected=None if selector is None else partial(selected_counts, selector, resampled=data_cfg.resampled),
    )
    streams = [
        ReaderStream(
            reader,
            seed=seed,
            resampled=data_cfg.resampled,
            batch_size=batch_size,
            image_transform=image_transform,
            tokenize=tokenize,
            interleave_shards=data_cfg.interleave_shards,
            shuffle_buffer=data_cfg.shuffle_buffer,
            max_member_bytes=data_cfg.max_member_bytes,
            open_retries=data_cfg.open_retries,
            selector=selector,
        )
        for reader in plan.rank_readers(rank)
    ]
    return TrainLoader(
        plan,
        streams,
        rank=rank,
        seed=seed,
        num_workers=data_cfg.num_workers,
        prefetch_factor=data_cfg.prefetch_factor,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        monitor=_SkipMonitor(rank, data_cfg.max_skip_fraction, data_cfg.max_unreadable_shards),
    )
