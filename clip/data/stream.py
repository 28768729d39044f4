"""One reader's stream: its shards -> interleaved, shuffled records -> decoded, tokenized batches.

A reader is one DataLoader worker (or the training process when `data.num_workers=0`). Its output is a
pure function of `(seed, epoch, reader, position)`: the shards of each group, the interleaving, the
shuffle buffer and each sample's random crop are all drawn from RNGs seeded by those numbers. That is
what makes resuming exact: a position `(epoch, group, item)` is restored by re-reading the group's
shards and dropping the first `item` records undecoded (at most `data.interleave_shards` shards).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from clip.data.decode import ImageDecodeError, decode_image
from clip.data.plan import ReaderPlan, seeded_rng
from clip.data.records import SAMPLE_REASONS, SHARD_REASONS, Item, Record, SkipEvent
from clip.data.selection import Selector, select_records
from clip.data.shard_reader import read_shard
from clip.data.sources import DataError, Shard

_EVENTS_PER_OUTPUT = 16  # details kept for logging; the counts are always exact
MAX_GROUPS_WITHOUT_RECORDS = 10

Position = tuple[int, int, int]  # (epoch, group, items consumed in the group)


@dataclass
class Batch:
    """A training batch. `skipped` counts what was skipped on this rank since the previous batch."""

    images: torch.Tensor  # [B, 3, H, W] uint8 pixels, made model inputs by TrainLoader.finish_images
    texts: torch.Tensor  # [B, L]
    keys: list[str]  # sample keys, for debugging and exactness checks
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (see records.SKIP_REASONS)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return replace(self, images=self.images.pin_memory(), texts=self.texts.pin_memory())


@dataclass
class ReaderOutput:
    """What a reader sends to the training process: a batch, or only counts (skips, end of epoch)."""

    reader: int
    position: Position  # where this reader continues after this output
    batch: Optional[Batch] = None
    skipped: Counter = field(default_factory=Counter)
    shard_losses: Counter = field(default_factory=Counter)  # shard url -> samples lost (SAMPLE_REASONS)
    events: list[SkipEvent] = field(default_factory=list)  # the first few, for logs
    end: bool = False  # the reader has nothing more this epoch
    dropped: int = 0  # samples left over at the end: fewer than a batch

    def pin_memory(self) -> "ReaderOutput":
        return self if self.batch is None else replace(self, batch=self.batch.pin_memory())


def iter_group(shards: list[Shard], rng, *, buffer_size: int, read: Callable[[Shard], Iterator[Item]]) -> Iterator[Item]:
    """Interleave the shards' records at random through a shuffle buffer, then drain the buffer.

    Skip events bypass the buffer. The output depends only on the shards' contents and `rng`.
    """
    readers = [read(shard) for shard in shards]
    buffer: list[Record] = []
    while readers:
        i = rng.randrange(len(readers))
        item = next(readers[i], None)
        if item is None:
            del readers[i]
        elif isinstance(item, SkipEvent):
            yield item
        elif len(buffer) < buffer_size:
            buffer.append(item)
        else:
            j = rng.randrange(buffer_size)
            yield buffer[j]
            buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class _SeededCrops:
    """Seeds torch's global RNG per sample so random crops replay exactly after a resume.

    In the training process (no workers) the trainer's RNG state is saved and restored around each sample.
    """

    def __init__(self):
        self.in_training_process = get_worker_info() is None

    def run(self, seed: int, fn: Callable, *args):
        generator = torch.default_generator
        saved = generator.get_state() if self.in_training_process else None
        generator.manual_seed(seed)
        try:
            return fn(*args)
        finally:
            if saved is not None:
                generator.set_state(saved)


def load_image(record: Record) -> Image.Image | SkipEvent:
    """A record's RGB image, or the reason it cannot be used (clip.data.decode)."""
    try:
        data = record.image
        if data is None:  # CSV rows: the file is read here, so that replaying a position costs no I/O
            with open(record.image_path, "rb") as f:
                data = f.read()
        return decode_image(data)
    except ImageDecodeError as e:
        return SkipEvent(e.reason, record.shard, record.key, str(e))
    except Exception as e:  # a CSV row's image path is missing, unreadable or not a valid path
        return SkipEvent("decode_error", record.shard, record.key, f"{type(e).__name__}: {e}")


class ImageBatcher:
    """Applies the image transform and stacks a batch; `finish` completes it where the model runs.

    When the transform is a torchvision Compose ending in a conversion to float + Normalize (as
    clip.transforms' are: v1 ToTensor + Normalize for eval, v2 ToDtype + Normalize for training),
    the workers stop before those two and ship uint8 pixels: a quarter of the bytes to pass between
    processes, pin and copy to the GPU, and no float work on the loader's cores. `finish` then runs
    the two on the whole batch, on its device: the same float32 operations in the same order, so the
    result is bitwise equal to applying the transform per image (tested).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        from torchvision import transforms as T
        from torchvision.transforms import v2

        # Only the plain classes: a subclass may do more in __call__ than run its steps.
        steps = transform.transforms if type(transform) in (T.Compose, v2.Compose) else None
        convert, normalize = steps[-2:] if steps and len(steps) >= 2 else (None, None)
        to_tensor = isinstance(convert, T.ToTensor) and isinstance(normalize, T.Normalize)
        to_dtype = isinstance(convert, v2.ToDtype) and isinstance(normalize, v2.Normalize)
        to_dtype = to_dtype and convert.dtype == torch.float32 and convert.scale
        self.per_image, self.pil_output, self.convert, self.normalize = transform, False, None, None
        if to_tensor or to_dtype:
            self.per_image, self.pil_output = type(transform)(steps[:-2]), to_tensor
            self.convert = None if to_tensor else convert  # v2's scale depends on the input dtype: let it decide
            # Channel statistics kept as Python floats, never as host tensors: on a GPU batch a host
            # tensor would need a copy that waits for the device (`finish` subtracts the floats and
            # divides by device-filled scalars). Normalize takes a list, a tuple, a tensor or (v1) a
            # number; one value stands for every channel.
            statistics = (normalize.mean, normalize.std)
            self.normalize = tuple(torch.as_tensor(s, dtype=torch.float64).flatten().tolist() for s in statistics)

    def __call__(self, image: Image.Image):
        out = self.per_image(image)
        if self.pil_output:
            return np.asarray(out if out.mode == "RGB" else out.convert("RGB"))  # [H, W, 3] uint8
        return out

    def stack(self, images: list) -> torch.Tensor:
        """[B, 3, H, W]: uint8 when `finish` has work left, else the transform's output."""
        if self.pil_output:
            return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return torch.stack(images)

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """The stacked batch, on any device and in any memory format (kept), as the transform would
        have returned it."""
        if self.normalize is None:
            return batch

        def divisor(value: float) -> torch.Tensor:
            # On CUDA, dividing by a Python number multiplies by its reciprocal (BinaryDivTrueKernel.cu),
            # a bit off the CPU transform's division in about half the pixels; a 0-dim tensor filled
            # on the batch's device is divided by, and filling it copies nothing from the host.
            return torch.full((), value, dtype=torch.float32, device=batch.device)

        # ToTensor divides by 255, v2's ToDtype multiplies by 1/255: the last bits differ.
        images = batch.to(torch.float32).div_(divisor(255)) if self.pil_output else self.convert(batch)
        images = images.clone() if images is batch else images  # ToDtype passes float32 through: keep the caller's
        num_channels = images.shape[1]
        means, stds = (values * num_channels if len(values) == 1 else values for values in self.normalize)
        if not len(means) == len(stds) == num_channels:
            raise ValueError(
                f"the image transform's Normalize has {len(means)} means and {len(stds)} stds "
                f"for {num_channels}-channel images"
            )
        for channel, (mean, std) in enumerate(zip(means, stds)):
            images[:, channel].sub_(mean).div_(divisor(std))  # Normalize's float32 arithmetic, channel by channel
        return images


class ReaderStream(IterableDataset):
    """The batches of one reader, from the position in `start` (shared with the training process)."""

    def __init__(
        self,
        plan: ReaderPlan,
        *,
        seed: int,
        resampled: bool,
        batch_size: int,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        interleave_shards: int,
        shuffle_buffer: int,
        max_member_bytes: int,
        open_retries: int,
        selector: Optional[Selector] = None,
    ):
        self.plan = plan
        self.seed = seed
        self.resampled = resampled
        self.batch_size = batch_size
        self.images = ImageBatcher(image_transform)
        self.tokenize = tokenize
        self.interleave_shards = max(1, interleave_shards)
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.max_member_bytes = max_member_bytes
        self.open_retries = open_retries
        self.selector = selector  # data.subset / data.balance (clip.data.selection)
        # Written by the training process before each iter(): persistent workers read it on reset.
        self.start = multiprocessing.get_context().Array("q", 3, lock=False)

    def set_start(self, position: Position) -> None:
        self.start[:] = list(position)

    def num_groups(self) -> Optional[int]:
        return None if self.resampled else math.ceil(len(self.plan.shards) / self.interleave_shards)

    def group_shards(self, epoch: int, group: int) -> list[Shard]:
        k = self.interleave_shards
        if self.resampled:
            return seeded_rng(self.seed, "draw", self.plan.reader, group).choices(
                self.plan.shards, weights=self.plan.weights, k=k
            )
        order = list(self.plan.shards)
        seeded_rng(self.seed, "order", epoch, self.plan.reader).shuffle(order)
        return order[group * k : (group + 1) * k]

    def _read(self, shard: Shard) -> Iterator[Item]:
        items = read_shard(shard, max_member_bytes=self.max_member_bytes, open_retries=self.open_retries)
        if self.selector is None:
            return items
        # Before positions are counted: they count selected records only (clip.data.selection).
        expected = self.plan.selected.get(shard.url) if self.plan.selected is not None else None
        return select_records(items, self.selector, shard, expected)

    def iter_items(self, position: Position) -> Iterator[tuple[Position, Item]]:
        """Every record and event from `position` on, each with the position just after it."""
        epoch, group, skip = position
        num_groups = self.num_groups()
        last_group_with_records = group
        while num_groups is None or group < num_groups:
            if group - last_group_with_records > MAX_GROUPS_WITHOUT_RECORDS:
                # Resampled mode never runs out of shards to try: stop when none of them has data.
                raise DataError(
                    f"reader {self.plan.reader} found no readable sample in {MAX_GROUPS_WITHOUT_RECORDS} groups of "
                    f"{self.interleave_shards} shards in a row; see the skip warnings above"
                )
            rng = seeded_rng(self.seed, "mix", epoch, self.plan.reader, group)
            items = iter_group(self.group_shards(epoch, group), rng, buffer_size=self.shuffle_buffer, read=self._read)
            for _ in itertools.islice(items, skip):  # replay up to the resume point without decoding
                pass
            for index, item in enumerate(items, start=skip + 1):
                if isinstance(item, Record):
                    last_group_with_records = group
                yield (epoch, group, index), item
            group, skip = group + 1, 0

    def crop_seed(self, position: Position) -> int:
        epoch, group, index = position
        return seeded_rng(self.seed, "crop", epoch, self.plan.reader, group).getrandbits(62) + index

    def __iter__(self) -> Iterator[ReaderOutput]:
        start: Position = tuple(self.start[:])
        crops = _SeededCrops()
        images, captions, keys = [], [], []
        output = ReaderOutput(self.plan.reader, start)
        num_decoded = 0
        for position, item in self.iter_items(start):
            output.position = position
            if isinstance(item, Record):
                image = load_image(item)
                if isinstance(image, SkipEvent):
                    item = image
                else:
                    images.append(crops.run(self.crop_seed(position), self.images, image))
                    captions.append(item.caption)
                    keys.append(item.key)
                    num_decoded += 1
            if isinstance(item, SkipEvent):
                output.skipped[item.reason] += 1
                if item.reason in SAMPLE_REASONS:
                    output.shard_losses[item.shard] += 1
                if len(output.events) < _EVENTS_PER_OUTPUT:
                    output.events.append(item)
            if len(images) == self.batch_size:
                output.batch = Batch(self.images.stack(images), self.tokenize(captions), keys)
                images, captions, keys = [], [], []
            # Counts travel with batches; a run of skips (or a broken shard) is sent on its own so the
            # training process can stop a run whose data is all bad instead of waiting forever.
            if (
                output.batch is not None
                or sum(output.skipped.values()) >= self.batch_size
                or (isinstance(item, SkipEvent) and item.reason in SHARD_REASONS)
            ):
                yield output
                output = ReaderOutput(self.plan.reader, position)
        epoch = start[0]
        if num_decoded == 0 and start[1:] == (0, 0) and self.plan.num_samples > 0:
            raise DataError(
                f"reader {self.plan.reader} decoded no sample from its {len(self.plan.shards)} shard(s) in epoch "
                f"{epoch} (first: {self.plan.shards[0].url}); see the skip warnings above"
            )
        output.end, output.dropped = True, len(images)
        output.position = (epoch + 1, 0, 0)
        yield output
