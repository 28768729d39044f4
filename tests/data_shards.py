"""Test helpers for the data tests: tiny WebDataset shards with injectable faults, a stand-in tokenizer."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import zlib
from collections import Counter

import torch
from PIL import Image

from clip.config import DataConfig
from clip.transforms import image_transform_train

IMAGE_SIZE = 16


def tiny_jpeg(seed: int, size: int = IMAGE_SIZE) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((rng.randrange(size), rng.randrange(size)), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mtime = 1_700_000_000
    for key, value in info.items():
        setattr(member, key, value)
    tar.addfile(member, io.BytesIO(data))


def write_shard(path: str, keys: list[str], *, corrupt: frozenset = frozenset(), fmt=tarfile.PAX_FORMAT) -> None:
    """key.jpg + key.txt per key; keys in `corrupt` get random bytes instead of a JPEG."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in keys:
            image = random.Random(key).randbytes(600) if key in corrupt else tiny_jpeg(zlib.crc32(key.encode()))
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.txt", f"caption of {key}".encode())


def make_shards(directory: str, num_shards: int, per_shard, *, name: str = "shard", sizes: bool = True) -> list[str]:
    """Shards `<name>-<i>.tar` with unique keys `<name>-<i>-<j>`, plus sizes.json; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    counts = per_shard if isinstance(per_shard, (list, tuple)) else [per_shard] * num_shards
    paths = []
    for i, count in enumerate(counts):
        path = os.path.join(directory, f"{name}-{i:03d}.tar")
        write_shard(path, [f"{name}-{i:03d}-{j:04d}" for j in range(count)])
        paths.append(path)
    if sizes:
        write_sizes(directory, {os.path.basename(p): c for p, c in zip(paths, counts)})
    return paths


def write_sizes(directory: str, sizes: dict[str, int]) -> None:
    path = os.path.join(directory, "sizes.json")
    existing = json.load(open(path)) if os.path.exists(path) else {}
    existing.update(sizes)
    with open(path, "w") as f:
        json.dump(existing, f)


def member_offsets(path: str) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of each member."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def truncate(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(offset)


def tokenize(texts: list[str]) -> torch.Tensor:
    """Stand-in tokenizer: deterministic ids from the characters, [N, 8]."""
    return torch.tensor([[ord(c) % 97 for c in (t + " " * 8)[:8]] for t in texts], dtype=torch.long)


def loader_kwargs(**overrides) -> dict:
    kwargs = dict(
        batch_size=4, image_transform=image_transform_train(8), tokenize=tokenize, rank=0, world_size=1, seed=0
    )
    kwargs.update(overrides)
    return kwargs


def data_config(shards: str, **overrides) -> DataConfig:
    fields = dict(train_shards=shards, num_workers=0, shuffle_buffer=16, interleave_shards=2)
    fields.update(overrides)
    return DataConfig(**fields)


def collect(loader, limit=None):
    """(keys per batch, images per batch, summed skip counts)."""
    keys, images, skipped = [], [], Counter()
    for i, batch in enumerate(loader):
        keys.append(list(batch.keys))
        images.append(batch.images.clone())
        skipped.update(batch.skipped)
        if limit is not None and i + 1 == limit:
            break
    return keys, images, skipped
