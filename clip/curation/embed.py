"""Embedding a pool: every sample's image and text embedding and its CLIP score, one file per shard.

Shards are read with the training stream's reader and decoder (clip.data.shard_reader, clip.data.decode),
so a corrupt sample is skipped and counted under the same reason as in training, and a sample's uid is
the one training sees. Each shard is one unit of work: rank r of W takes shards r, r + W, ... of the
list, DataLoader workers split those again, and a shard whose file exists is not read again, which is
how a killed job resumes (the files are written atomically: clip.curation.embeddings).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clip.config import DataConfig
from clip.curation.embeddings import EmbeddingShard, output_names, write_embedding_shard
from clip.data.records import Record, SkipEvent
from clip.data.shard_reader import read_shard
from clip.data.sources import Shard
from clip.data.stream import load_image
from clip.data.subset import from_hex

# A shard that cannot be opened at all gets no file, so that a rerun tries it again; a shard cut short
# keeps the samples before the cut (the cut is counted in its file).
SHARD_FAILURES = ("unreadable_shard",)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """DataComp's CLIP score: 100 x the cosine similarity of each image with its own caption, in float32."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return 100.0 * (image * text).sum(dim=-1)


@dataclass
class EmbedReport:
    """What one rank did: shards written now, shards already done, shards that could not be read."""

    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    num_samples: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass
class _Chunk:
    """Up to `batch_size` decoded samples of one shard; `last` closes the shard."""

    shard_index: int
    images: torch.Tensor | None  # [B, 3, H, W], None when the chunk holds no sample
    captions: list[str]
    uids: list[str]
    keys: list[str]
    skipped: Counter
    last: bool


class _ShardChunks(IterableDataset):
    """Reads and decodes whole shards (each DataLoader worker its own), in chunks of `batch_size`."""

    def __init__(self, shards: list[tuple[int, str]], preprocess: Callable, batch_size: int, data: DataConfig):
        self.shards = shards
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.max_member_bytes = data.max_member_bytes
        self.open_retries = data.open_retries

    def __iter__(self) -> Iterator[_Chunk]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for index, url in mine:
            yield from self._read(index, url)

    def _read(self, index: int, url: str) -> Iterator[_Chunk]:
        images, captions, uids, keys, skipped = [], [], [], [], Counter()
        items = read_shard(Shard(url, source=0), max_member_bytes=self.max_member_bytes, open_retries=self.open_retries)
        for item in items:
            if isinstance(item, Record):
                image = load_image(item)
                if isinstance(image, SkipEvent):
                    item = image
                else:
                    images.append(self.preprocess(image))
                    captions.append(item.caption)
                    uids.append(item.uid)
                    keys.append(item.key)
            if isinstance(item, SkipEvent):
                skipped[item.reason] += 1
            if len(images) == self.batch_size:
                yield _Chunk(index, torch.stack(images), captions, uids, keys, skipped, last=False)
                images, captions, uids, keys, skipped = [], [], [], [], Counter()
        stacked = torch.stack(images) if images else None
        yield _Chunk(index, stacked, captions, uids, keys, skipped, last=True)


@dataclass
class _Pending:
    """The chunks of one shard embedded so far."""

    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    score: list[np.ndarray] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def embed_shards(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenize: Callable[[list[str]], torch.Tensor],
    shard_urls: list[str],
    out_dir: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    data: DataConfig | None = None,
    progress: bool = True,
) -> EmbedReport:
    """Embed this rank's share of `shard_urls` into `out_dir`, skipping shards whose file exists.

    `model` is a `clip.CLIP` (from `clip.load`), `preprocess` its eval transform, `tokenize` its
    tokenizer. `data` supplies the reader's limits (`max_member_bytes`, `open_retries`; defaults as in
    training).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    names = output_names(shard_urls)
    report = EmbedReport()
    todo = []
    for index in range(rank, len(shard_urls), world_size):
        if (out_dir / names[index]).exists():
            report.already_done.append(shard_urls[index])
        else:
            todo.append((index, shard_urls[index]))
    if not todo:
        return report

    dataset = _ShardChunks(todo, preprocess, batch_size, data or DataConfig())
    # batch_size=None: the dataset's chunks are the batches; a worker per shard at most.
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(todo)), collate_fn=lambda c: c)
    pending: dict[int, _Pending] = {}
    bar = tqdm(total=len(todo), unit="shard", desc=f"embed (rank {rank})", disable=not progress)
    with torch.no_grad():
        for chunk in loader:
            part = pending.setdefault(chunk.shard_index, _Pending())
            part.skipped.update(chunk.skipped)
            if chunk.images is not None:
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    image_features = model.encode_image(chunk.images.to(device))
                    text_features = model.encode_text(tokenize(chunk.captions).to(device))
                part.score.append(clip_score(image_features, text_features).cpu().numpy())
                part.image.append(F.normalize(image_features.float(), dim=-1).half().cpu().numpy())
                part.text.append(F.normalize(text_features.float(), dim=-1).half().cpu().numpy())
                part.captions += chunk.captions
                part.uids += chunk.uids
                part.keys += chunk.keys
                report.num_samples += len(chunk.captions)
            if chunk.last:
                _finish_shard(
                    pending.pop(chunk.shard_index),
                    shard_urls[chunk.shard_index],
                    out_dir / names[chunk.shard_index],
                    report,
                )
                bar.update(1)
                bar.set_postfix(samples=report.num_samples, skipped=sum(report.skipped.values()))
    bar.close()
    return report


def _finish_shard(part: _Pending, url: str, path: Path, report: EmbedReport) -> None:
    report.skipped.update(part.skipped)
    if any(part.skipped[reason] for reason in SHARD_FAILURES):
        report.failed.append(url)
        return
    width = part.image[0].shape[1] if part.image else 0
    embeddings = EmbeddingShard(
        uid=from_hex(part.uids),
        key=np.array(part.keys, dtype=str),
        caption=part.captions,
        image_embedding=np.concatenate(part.image) if part.image else np.zeros((0, width), np.float16),
        text_embedding=np.concatenate(part.text) if part.text else np.zeros((0, width), np.float16),
        clip_score=np.concatenate(part.score) if part.score else np.zeros(0, np.float32),
        shard=np.full(len(part.uids), url),
        skipped=dict(part.skipped),
    )
    write_embedding_shard(path, embeddings)
    report.written.append(url)
