"""Which samples of the pool a run trains on: `data.subset` (a uid list) or `data.balance` (MetaCLIP).

A selector decides per record, from its uid (and for balancing its caption), whether the run uses it.
Records it rejects are dropped as their shard is read, before the reader counts positions: a position
`(epoch, group, item)` counts selected records only, so a resume replays the same selection and
repeats and skips nothing, and a rejected record is never decoded and never counted as skipped.

Epoch mode needs each shard's number of selected samples up front (they fix the steps per epoch and
split the shards over readers). For a subset they come from `<subset stem>.sizes.json` beside it,
written with the subset by `scripts/curate.py` (reading every shard's uids at the start of each run
would cost a pass over the pool); for balancing from the balance file's match index and the run's seed;
for CSV sources from the rows, which are in memory. A shard that yields another number than its count
stops the run (the counts are stale), unless the shard is damaged (its truncation is counted as usual).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np

from clip.config import DataConfig
from clip.data.records import SHARD_REASONS, Item, Record
from clip.data.shard_reader import read_shard
from clip.data.sources import DataConfigError, DataError, Shard
from clip.data.subset import contains, read_subset

SIZES_SUFFIX = ".sizes.json"


def subset_sizes_path(subset_path: str | os.PathLike) -> str:
    """`keep.npy` -> `keep.sizes.json`: the per-shard kept counts of a subset file."""
    stem, _ = os.path.splitext(os.fspath(subset_path))
    return stem + SIZES_SUFFIX


def write_subset_sizes(subset_path: str | os.PathLike, num_uids: int, counts: dict[str, int]) -> str:
    """Write `<subset stem>.sizes.json` atomically: `{"subset_uids": N, "shards": {shard: kept, ...}}`."""
    path = subset_sizes_path(subset_path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"subset_uids": int(num_uids), "shards": {k: int(v) for k, v in sorted(counts.items())}}, f, indent=1)
    os.replace(tmp, path)
    return path


def _lookup(table: dict[str, int], url: str) -> Optional[int]:
    """A shard's entry by full URL, then by file name (the rule of sizes.json)."""
    found = table.get(url)
    return found if found is not None else table.get(os.path.basename(url.rstrip("/")))


def _shard_counts(table: dict[str, int], shards: list[Shard], resampled: bool, missing_message) -> dict:
    """{url: kept count or None}; in epoch mode every shard needs its count (`missing_message(urls)` else)."""
    counts = {shard.url: _lookup(table, shard.url) for shard in shards}
    missing = [url for url, n in counts.items() if n is None]
    if missing and not resampled:
        raise DataConfigError(missing_message(missing))
    return counts


class SubsetSelector:
    """Keeps the samples whose uid is in a DataComp subset file (memory-mapped: shared by all readers)."""

    def __init__(self, path: str):
        try:
            self.num_uids = len(read_subset(path))  # checked once here, in the training process
        except (OSError, ValueError) as error:
            raise DataConfigError(f"data.subset: {error}") from None
        self.path = path
        self._uids: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_uids": None}  # each process maps the file itself

    def keeps(self, record: Record) -> bool:
        if self._uids is None:
            self._uids = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return bool(contains(self._uids, [record.uid])[0])

    def shard_counts(self, shards: list[Shard], resampled: bool) -> dict[str, Optional[int]]:
        path = subset_sizes_path(self.path)
        if not os.path.isfile(path):
            if resampled:
                return {}
            raise DataConfigError(
                f"data.subset: epoch mode needs the kept count of every shard, and {path} does not exist; write it "
                f"with: python scripts/curate.py sizes --subset {self.path} --shards '<data.train_shards>' "
                "(or use data.resampled=true)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                sizes = json.load(f)
            num_uids, table = sizes["subset_uids"], sizes["shards"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataConfigError(f"data.subset: cannot read the kept counts {path}: {error}") from None
        if num_uids != self.num_uids:
            raise DataConfigError(
                f"data.subset: {path} was written for a subset of {num_uids} uids, {self.path} has {self.num_uids}; "
                f"rewrite it with: python scripts/curate.py sizes --subset {self.path} --shards '<data.train_shards>'"
            )
        return _shard_counts(
            table, shards, resampled,
            lambda missing: f"data.subset: {path} has no kept count for {len(missing)} shard(s) (first: {missing[0]}); "
            f"rewrite it with: python scripts/curate.py sizes --subset {self.path} --shards '<data.train_shards>'",
        )  # fmt: skip


class BalanceSelector:
    """MetaCLIP balancing as records stream: a record is kept by the rule of clip.curation.metaclip."""

    def __init__(self, path: str, seed: int):
        from clip.curation.metaclip import Balance

        try:
            self.balance = Balance.load(path)
        except ValueError as error:
            raise DataConfigError(f"data.balance: {error}") from None
        self.path = path
        self.seed = seed
        self.entries = self.balance.entries.tolist()
        self.probabilities = self.balance.probabilities
        self._match = None

    def __getstate__(self) -> dict:
        # Readers need the entries and probabilities; the match index stays in the training process.
        return {**self.__dict__, "balance": None, "_match": None}

    def keeps(self, record: Record) -> bool:
        from clip.curation.metaclip import EntryMatcher, sample_kept

        if self._match is None:
            self._match = EntryMatcher(self.entries)  # built in each reader: an automaton is not cheap to pickle
        return sample_kept(self.seed, record.uid, self._match(record.caption), self.probabilities)

    def shard_counts(self, shards: list[Shard], resampled: bool) -> dict[str, Optional[int]]:
        _, table = self.balance.kept(self.seed)
        return _shard_counts(
            table, shards, resampled,
            lambda missing: f"data.balance: {self.path} counted other shards; {len(missing)} of data.train_shards are "
            f"not in it (first: {missing[0]}); count them with scripts/curate.py metaclip --count",
        )  # fmt: skip


Selector = SubsetSelector | BalanceSelector


def build_selector(cfg: DataConfig, seed: int) -> Optional[Selector]:
    if cfg.subset and cfg.balance:
        raise DataConfigError(
            "data.subset and data.balance are both set; balance offline (scripts/curate.py metaclip) and combine "
            "the subsets with scripts/curate.py and, or train on one"
        )
    if cfg.subset:
        return SubsetSelector(cfg.subset)
    if cfg.balance:
        return BalanceSelector(cfg.balance, seed)
    return None


def selected_counts(selector: Selector, shards: list[Shard], resampled: bool) -> dict[str, int]:
    """Selected samples per shard URL, where known: for CSV chunks counted from their rows (in memory),
    for tar shards from the selector's files (required in epoch mode, see the module doc)."""
    counts = selector.shard_counts([s for s in shards if s.rows is None], resampled)
    for chunk in (s for s in shards if s.rows is not None):
        items = read_shard(chunk, max_member_bytes=1, open_retries=1)  # CSV rows: no I/O
        counts[chunk.url] = sum(1 for item in items if isinstance(item, Record) and selector.keeps(item))
    return {url: n for url, n in counts.items() if n is not None}


def select_records(items: Iterator[Item], selector: Selector, shard: Shard, expected: Optional[int]) -> Iterator[Item]:
    """The shard's items with only the selected records; checks the count against `expected`."""
    kept, damaged = 0, False
    for item in items:
        if isinstance(item, Record):
            if selector.keeps(item):
                kept += 1
                yield item
        elif item.reason in SHARD_REASONS:
            damaged = True
            yield item
        # A sample the reader cannot form (no caption, oversized member) has no uid here and is in no
        # subset, which is made from readable samples: it is not a loss of this run.
    if expected is not None and not damaged and kept != expected:
        raise DataError(
            f"{shard.url}: {kept} samples selected, but the selection's counts say {expected} (the counts were "
            "made for other shards or another subset: rewrite them, docs/curation.md)"
        )


def pool_records(urls: list[str], *, max_member_bytes: int = DataConfig.max_member_bytes) -> Iterator[Record]:
    """Every readable record of local shards, shard by shard, in file order (no image is decoded).

    Raises DataError for a shard that cannot be read to its end: counts made from part of it would be wrong.
    """
    for url in urls:
        for item in read_shard(Shard(url=url, source=0), max_member_bytes=max_member_bytes, open_retries=1):
            if isinstance(item, Record):
                yield item
            elif item.reason in SHARD_REASONS:
                raise DataError(f"{url}: {item.detail}")


def count_subset_in_shards(subset: np.ndarray, urls: list[str]) -> dict[str, int]:
    """How many samples of each shard are in `subset` (the counts of `<subset stem>.sizes.json`)."""
    counts = dict.fromkeys(urls, 0)
    for record in pool_records(urls):
        counts[record.shard] += int(contains(subset, [record.uid])[0])
    return counts
