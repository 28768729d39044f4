"""WebDataset eval shards, read with the training pipeline's tar reader (`clip.data.tar_reader`), not
webdataset: only image, `cls`, `npy` (without pickles) and `txt` members of regular files under a
size cap are read, nothing is unpickled, unsafe members are skipped, images are decoded by
`clip.data.decode`, and a shard without its end-of-archive marker is an error (a cut at a member
boundary is otherwise silent). `read_sample_metadata` reads the per-sample `npy` rows that DataComp's
exports of its WILDS and fairness tasks carry beside the `cls` label."""

from __future__ import annotations

import copy
import glob
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from clip.config import DataConfig
from clip.data.decode import decode_image
from clip.data.records import IMAGE_EXTENSIONS, SkipEvent
from clip.data.sources import expand_pattern, is_pipe
from clip.data.tar_reader import MemberGroup, iter_member_groups

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


def collate_eval_batch(samples: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; class indices become a tensor, caption lists stay a list (one list per image)."""
    images = torch.stack([image for image, _ in samples])
    targets = [target for _, target in samples]
    if isinstance(targets[0], (list, tuple, str)):
        return images, targets
    return images, default_collate(targets)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Local shard paths from a path, a glob, a brace pattern (`eval-{000..009}.tar`) or a list.

    Eval data is local: URLs and `pipe:` commands are refused."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    shards: list[str] = []
    for item in map(str, specs):
        if "://" in item or is_pipe(item):
            raise ValueError(f"eval shards must be local files; got {item!r}")
        for pattern in expand_pattern(item):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            shards.extend(matches)
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"eval shards {spec!r}: no such file(s): {missing[:5] or 'no match'}")
    return shards


class TarEvalDataset(IterableDataset):
    """Samples of WebDataset eval shards: an image (`jpg/jpeg/png/webp`) and a `cls` label, an `npy`
    multilabel row (0/1 per class, read with `allow_pickle=False`) or `txt` captions (one per line).
    Only regular members no larger than `max_member_bytes` are read; every other member is skipped
    with a warning and nothing is unpickled or written to disk.

    Each DataLoader worker reads its own subset of the shards; `for_rank` gives a rank its share
    (the evaluations in `clip.zero_shot` call it).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Transform,
        target: str,
        *,
        max_member_bytes: int = DataConfig.max_member_bytes,
    ):
        if target not in ("cls", "txt", "npy"):
            raise ValueError(
                f"target must be 'cls' (labels), 'npy' (multilabel rows) or 'txt' (captions), not {target!r}"
            )
        self.shards = expand_shards(shards)
        self.transform = transform
        self.target = target
        self.max_member_bytes = max_member_bytes

    def for_rank(self, rank: int, world_size: int) -> TarEvalDataset:
        """The same dataset reading only shards rank, rank + world_size, ... (none if too few)."""
        share = copy.copy(self)
        share.shards = self.shards[rank::world_size]
        return share

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        worker = get_worker_info()
        shards = self.shards[worker.id :: worker.num_workers] if worker else self.shards
        for shard in shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: str) -> Iterator[tuple[torch.Tensor, Any]]:
        fields = (*IMAGE_EXTENSIONS, self.target)
        try:
            with open(shard, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                groups = iter_member_groups(
                    file, shard, extensions=fields, max_member_bytes=self.max_member_bytes, size=size
                )
                for item in groups:
                    if isinstance(item, SkipEvent):
                        self._check(shard, item)
                    elif not item.cut and (sample := self._decode(shard, item)) is not None:
                        yield sample
        except OSError as error:
            raise RuntimeError(f"cannot read eval shard {shard}: {error}") from error

    def _check(self, shard: str, event: SkipEvent) -> None:
        # A truncated eval set would give wrong metrics without a word: it is an error.
        if event.reason == "truncated_shard":
            raise RuntimeError(f"cannot read eval shard {shard}: {event.detail}")
        if event.reason == "unsafe_member":
            log.warning("eval shard %s: skipped member %r (not a regular file at a relative path)", shard, event.key)
        # ignored_member (neither an image nor the target, e.g. .json): never decoded, not worth a warning

    def _decode(self, shard: str, group: MemberGroup) -> tuple[torch.Tensor, Any] | None:
        for member in group.members.values():
            if member.data is None:
                log.warning(
                    "eval shard %s: skipped member %r of %d bytes (limit %d)",
                    shard,
                    member.name,
                    member.size,
                    self.max_member_bytes,
                )
        members = {ext: member.data for ext, member in group.members.items() if member.data is not None}
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None or self.target not in members:
            log.warning("eval shard %s: sample %r has no image or no %s member; skipped", shard, group.key, self.target)
            return None
        try:
            image = decode_image(members[image_ext])
            target = self._target(members[self.target])
        except ValueError as error:  # ImageDecodeError, a label that is not an int, UnicodeDecodeError
            log.warning("eval shard %s: sample %r is unreadable (%s); skipped", shard, group.key, error)
            return None
        return self.transform(image), target

    def _target(self, data: bytes) -> Any:
        if self.target == "npy":  # a multilabel row: an array, never a pickle
            row = np.load(io.BytesIO(data), allow_pickle=False)
            if row.ndim != 1:
                raise ValueError(f"a multilabel .npy must be one row, not shape {row.shape}")
            return torch.from_numpy(row.astype(np.int64))
        text = data.decode("utf-8")
        if self.target == "cls":
            return int(text.strip())
        captions = [line for line in text.split("\n") if line]
        if not captions:
            raise ValueError("no captions")
        return captions


def read_sample_metadata(dataset: TarEvalDataset) -> tuple[np.ndarray, np.ndarray]:
    """The `cls` label [N] and `npy` metadata row [N, F] of every sample of `dataset`'s shards, in the
    order the dataset yields its samples (shard by shard, member order), without reading the images.

    A sample without both members, a row that is not 1-D or rows of different lengths are errors
    naming the shard and sample: a group metric over incomplete metadata would be silently wrong."""
    labels: list[int] = []
    rows: list[np.ndarray] = []
    for shard in dataset.shards:
        with open(shard, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            groups = iter_member_groups(
                file, shard, extensions=("cls", "npy"), max_member_bytes=dataset.max_member_bytes, size=size
            )
            for item in groups:
                if isinstance(item, SkipEvent):
                    if item.reason == "truncated_shard":
                        raise RuntimeError(f"cannot read eval shard {shard}: {item.detail}")
                    continue
                members = {ext: member.data for ext, member in item.members.items() if member.data is not None}
                if "cls" not in members or "npy" not in members:
                    raise ValueError(
                        f"eval shard {shard}: sample {item.key!r} has no {'cls' if 'cls' not in members else 'npy'} "
                        f"member (each sample's label and metadata row are needed for its group metrics)"
                    )
                row = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
                if row.ndim != 1 or (rows and len(row) != len(rows[0])):
                    raise ValueError(
                        f"eval shard {shard}: sample {item.key!r} has a metadata row of shape {row.shape}, "
                        f"not ({len(rows[0]) if rows else 'F'},)"
                    )
                labels.append(int(members["cls"].decode("utf-8").strip()))
                rows.append(row)
    if not rows:
        raise ValueError(f"eval shards {dataset.shards[:3]}: no samples with metadata")
    return np.asarray(labels, dtype=np.int64), np.stack(rows)
