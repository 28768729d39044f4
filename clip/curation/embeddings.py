"""Embedding files: one `.npz` per source shard, holding every sample's embeddings and CLIP score by uid.

Why numpy's `.npz` and not parquet: numpy is already a dependency (pyarrow would add ~100 MB), the
arrays load without any pickle (`allow_pickle=False`), and the structured uid array is the very dtype
of DataComp's subset files, so filters go from an embedding file to a subset file without conversion.

Arrays of one file (N samples, in shard order; D the model's embedding width):

    uid              [N] DataComp's uid dtype (clip.data.subset.UID_DTYPE), not sorted
    key              [N] unicode, the sample's key in its shard
    caption_utf8     [total bytes] uint8, the captions' UTF-8 bytes one after the other, and
    caption_offsets  [N + 1] int64, where each caption starts (fixed-width unicode would pad every
                     caption to the longest one, four bytes per character)
    image_embedding  [N, D] float16, L2-normalised
    text_embedding   [N, D] float16, L2-normalised
    clip_score       [N] float32, 100 x the cosine of the two embeddings computed in float32 before
                     rounding (DataComp's definition)
    shard            [] unicode, the shard's URL
    skipped_reason, skipped_count   [K] why samples or parts of the shard were skipped, and how often
                     (the reasons of clip.data.records: decode_error, truncated_shard, ...)
    format_version   [] int64

A file appears atomically (`<name>.tmp`, fsync, rename), so its presence means the shard is done.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip.data.subset import UID_DTYPE, to_hex

FORMAT_VERSION = 1
SUFFIX = ".npz"
_SHARD_NAME = re.compile(r"([^/\s]+)\.tar\b")


@dataclass
class EmbeddingShard:
    """The embeddings of one shard's samples (or of many shards', concatenated by `read_embedding_dir`)."""

    uid: np.ndarray  # [N] UID_DTYPE
    key: np.ndarray  # [N] unicode
    caption: list[str]
    image_embedding: np.ndarray  # [N, D] float16
    text_embedding: np.ndarray  # [N, D] float16
    clip_score: np.ndarray  # [N] float32
    shard: np.ndarray  # [N] unicode: each sample's shard URL
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uid)


def output_name(shard_url: str) -> str:
    """The embedding file of a shard: its name without `.tar`, plus `.npz` (`/data/00042.tar` -> `00042.npz`)."""
    names = _SHARD_NAME.findall(shard_url)
    if not names:
        raise ValueError(f"cannot name the embedding file of {shard_url!r}: no '<name>.tar' in it")
    return names[-1] + SUFFIX


def output_names(shard_urls: list[str]) -> list[str]:
    """`output_name` of each shard; two shards that would share a file are an error naming both."""
    names = [output_name(url) for url in shard_urls]
    first: dict[str, str] = {}
    for url, name in zip(shard_urls, names):
        if name in first:
            raise ValueError(
                f"shards {first[name]!r} and {url!r} would both write {name}; "
                "embed them into different --out directories"
            )
        first[name] = url
    return names


def write_embedding_shard(path: str | os.PathLike, embeddings: EmbeddingShard) -> Path:
    """Write one shard's file atomically: a killed job leaves either the finished file or none."""
    path = Path(path)
    captions = [c.encode("utf-8") for c in embeddings.caption]
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in captions], out=offsets[1:])
    shard_urls = set(embeddings.shard.tolist())
    if len(shard_urls) != 1 and len(embeddings):
        raise ValueError(f"one embedding file holds one shard's samples, got {len(shard_urls)} shards")
    arrays = {
        "uid": np.asarray(embeddings.uid, dtype=UID_DTYPE),
        "key": np.asarray(embeddings.key, dtype=str),
        "caption_utf8": np.frombuffer(b"".join(captions), dtype=np.uint8),
        "caption_offsets": offsets,
        "image_embedding": np.asarray(embeddings.image_embedding, dtype=np.float16),
        "text_embedding": np.asarray(embeddings.text_embedding, dtype=np.float16),
        "clip_score": np.asarray(embeddings.clip_score, dtype=np.float32),
        "shard": np.array(embeddings.shard[0] if len(embeddings) else "", dtype=str),
        "skipped_reason": np.array(sorted(embeddings.skipped), dtype=str),
        "skipped_count": np.array([embeddings.skipped[r] for r in sorted(embeddings.skipped)], dtype=np.int64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_embedding_shard(path: str | os.PathLike) -> EmbeddingShard:
    """One embedding file, checked to be this format (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not an embedding file: {error}") from None
    version = int(arrays.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: embedding file format version {version}, expected {FORMAT_VERSION}")
    blob, offsets = arrays["caption_utf8"].tobytes(), arrays["caption_offsets"]
    captions = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
    num_samples = len(arrays["uid"])
    return EmbeddingShard(
        uid=arrays["uid"],
        key=arrays["key"],
        caption=captions,
        image_embedding=arrays["image_embedding"],
        text_embedding=arrays["text_embedding"],
        clip_score=arrays["clip_score"],
        shard=np.full(num_samples, str(arrays["shard"])),
        skipped=dict(zip(arrays["skipped_reason"].tolist(), arrays["skipped_count"].tolist())),
    )


def embedding_files(directory: str | os.PathLike) -> list[Path]:
    """The finished embedding files of a directory, sorted by name (unfinished `.tmp` files excluded)."""
    files = sorted(Path(directory).glob("*" + SUFFIX))
    if not files:
        raise FileNotFoundError(f"{directory}: no embedding files (*{SUFFIX}); run scripts/embed.py first")
    return files


def concatenate(parts: Iterable[EmbeddingShard]) -> EmbeddingShard:
    """Many shards' embeddings as one table; skip counts are summed over all of them."""
    parts = list(parts)
    skipped: Counter = Counter()
    for part in parts:
        skipped.update(part.skipped)
    # A shard without a readable sample holds [0, 0] embeddings: left out, it needs no width.
    arrays = [p for p in parts if len(p)] or parts[:1]
    return EmbeddingShard(
        uid=np.concatenate([p.uid for p in arrays]),
        key=np.concatenate([p.key for p in arrays]),
        caption=[c for p in arrays for c in p.caption],
        image_embedding=np.concatenate([p.image_embedding for p in arrays]),
        text_embedding=np.concatenate([p.text_embedding for p in arrays]),
        clip_score=np.concatenate([p.clip_score for p in arrays]),
        shard=np.concatenate([p.shard for p in arrays]),
        skipped=dict(skipped),
    )


def _widths_agree(parts: list[EmbeddingShard], directory) -> None:
    widths = {p.image_embedding.shape[1] for p in parts if len(p)}
    if len(widths) > 1:
        raise ValueError(
            f"{directory}: embedding files of different widths {sorted(widths)}: "
            "they were made by different models; embed the pool with one model"
        )


def read_embedding_dir(directory: str | os.PathLike) -> EmbeddingShard:
    """Every embedding file of a directory as one table (files in name order, samples in shard order).

    A uid seen twice is an error: a subset file could not tell the two samples apart.
    """
    parts = [read_embedding_shard(path) for path in embedding_files(directory)]
    _widths_agree(parts, directory)
    table = concatenate(parts)
    unique, counts = np.unique(table.uid, return_counts=True)
    if len(unique) != len(table):
        duplicated = to_hex(unique[counts > 1][:3])
        raise ValueError(
            f"{directory}: {int((counts > 1).sum())} uids occur in more than one sample "
            f"(e.g. {', '.join(duplicated)}); a subset file cannot tell such samples apart"
        )
    return table
