"""MetaCLIP balancing (arXiv:2309.16671, Algorithm 1): match captions to metadata entries, flatten the head.

Every caption is matched against a list of metadata entries (MetaCLIP's 500k WordNet synsets, Wikipedia
uni/bigrams and titles) as MetaCLIP does it: case-sensitive substring search of ` entry ` in the caption
padded with spaces, with `, . ; : ? ! `` set apart by spaces and tabs/newlines turned into spaces, so an
entry matches whole words only. Aho-Corasick (pyahocorasick) finds all entries in one pass.

`counts[e]` is the number of pool samples whose caption matches entry `e` (a caption counts an entry
once). With the threshold t (MetaCLIP: 20k for 400M pairs), entry `e` is sampled with probability
`min(1, t / counts[e])`, and a sample is kept when ANY of its matched entries is sampled; a sample that
matches no entry is never kept. MetaCLIP draws `random.random()` per (sample, entry); here the draw is a
hash of `(seed, uid, entry)`, so the kept set is a pure function of the seed and the pool: the same
however the pool is split over processes, after a resume, and offline (`scripts/curate.py metaclip`)
or online while training (`data.balance`).

A balance file (`.npz`, read without pickle) holds what both need: the entries, their counts, t, and the
match index (one row per matched (sample, entry): shard, uid, entry), from which any seed's kept set
and per-shard kept counts follow without reading a caption again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip.data.subset import UID_DTYPE

DEFAULT_THRESHOLD = 20_000  # MetaCLIP's t for its 400M-pair set
_SET_APART = ",.;:?!`"  # MetaCLIP pads these with spaces before matching
_TO_SPACE = "\t\n\r"


def load_metadata(path: str | os.PathLike) -> list[str]:
    """Entries from a text file (one per line) or a JSON list (MetaCLIP's metadata.json)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path}: a JSON metadata file must be a list of strings")
    else:
        entries = [line.rstrip("\n\r") for line in text.splitlines()]
    entries = [e for e in entries if e.strip()]
    if not entries:
        raise ValueError(f"{path}: no metadata entries")
    duplicates = len(entries) - len(set(entries))
    if duplicates:
        raise ValueError(f"{path}: {duplicates} duplicate entries (each entry needs its own count)")
    return entries


def spaced(text: str) -> str:
    """A caption prepared for matching: MetaCLIP's padding of punctuation and whitespace."""
    for char in _SET_APART:
        text = text.replace(char, f" {char} ")
    for char in _TO_SPACE:
        text = text.replace(char, " ")
    return f" {text} "


class EntryMatcher:
    """The metadata entries found in a caption (sorted unique entry indices), by Aho-Corasick."""

    def __init__(self, entries: list[str]):
        try:
            import ahocorasick
        except ImportError:
            raise ImportError("MetaCLIP matching needs pyahocorasick: pip install 'clip-train[curation]'") from None
        self.num_entries = len(entries)
        self.automaton = ahocorasick.Automaton()
        for index, entry in enumerate(entries):
            self.automaton.add_word(f" {entry} ", index)
        self.automaton.make_automaton()

    def __call__(self, caption: str) -> np.ndarray:
        found = {index for _, index in self.automaton.iter(spaced(caption))}
        return np.array(sorted(found), dtype=np.int64)


def entry_probabilities(counts: np.ndarray, threshold: float) -> np.ndarray:
    """MetaCLIP's `t / max(count, t)`: 1 for tail entries (fewer than t matches), t / count for head ones."""
    counts = np.asarray(counts, dtype=np.float64)
    return threshold / np.maximum(counts, threshold)


def _mix(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser: a bijection of uint64 whose output bits all depend on all input bits.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def entry_uniforms(seed: int, uid0: np.ndarray, uid1: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """The uniform draw in [0, 1) of each (sample, entry): a hash of (seed, uid, entry), 53 bits."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        h = _mix(np.full(len(entries), seed % 2**64, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        h = _mix(h ^ np.asarray(uid0, dtype=np.uint64))
        h = _mix(h ^ np.asarray(uid1, dtype=np.uint64))
        h = _mix(h ^ np.asarray(entries, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def uid_halves(uid: str) -> tuple[int, int]:
    return int(uid[:16], 16), int(uid[16:], 16)


def sample_kept(seed: int, uid: str, matched: np.ndarray, probabilities: np.ndarray) -> bool:
    """The decision for one sample from its matched entries (online balancing); `Balance.kept`'s, row by row."""
    if len(matched) == 0:
        return False
    hi, lo = uid_halves(uid)
    n = len(matched)
    draws = entry_uniforms(seed, np.full(n, hi, np.uint64), np.full(n, lo, np.uint64), matched)
    return bool(np.any(draws < probabilities[matched]))


@dataclass
class Balance:
    """Entries, their pool counts and t; with the match index, any seed's kept set (see the module doc)."""

    entries: np.ndarray  # [E] str
    counts: np.ndarray  # [E] uint64: pool samples matching each entry
    threshold: float  # t
    num_samples: int  # samples counted (matched or not)
    shards: np.ndarray  # [S] str: shard URLs as counted
    match_shard: np.ndarray  # [M] int32, index into `shards`; rows sorted by (shard, uid, entry)
    match_uid: np.ndarray  # [M] UID_DTYPE
    match_entry: np.ndarray  # [M] int32

    @property
    def probabilities(self) -> np.ndarray:
        return entry_probabilities(self.counts, self.threshold)

    def kept(self, seed: int) -> tuple[np.ndarray, dict[str, int]]:
        """The kept uids (sorted, UID_DTYPE) and the kept count of every counted shard (0 included)."""
        sampled = self.probabilities[self.match_entry] > entry_uniforms(
            seed, self.match_uid["uid0"], self.match_uid["uid1"], self.match_entry
        )
        # A kept sample is one (shard, uid) with at least one sampled row: count it once.
        rows = np.flatnonzero(sampled)
        samples = np.unique(
            np.rec.fromarrays([self.match_shard[rows], self.match_uid["uid0"][rows], self.match_uid["uid1"][rows]])
        )
        per_shard = np.bincount(samples["f0"], minlength=len(self.shards))
        uids = np.empty(len(samples), dtype=UID_DTYPE)
        uids["uid0"], uids["uid1"] = samples["f1"], samples["f2"]
        return np.unique(uids), {str(name): int(n) for name, n in zip(self.shards, per_shard)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a killed job leaves the old file or none)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            entries=self.entries,
            counts=self.counts,
            threshold=np.float64(self.threshold),
            num_samples=np.int64(self.num_samples),
            shards=self.shards,
            match_shard=self.match_shard,
            match_uid=self.match_uid,
            match_entry=self.match_entry,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Balance":
        try:
            with np.load(path, allow_pickle=False) as f:
                fields = {name: f[name] for name in f.files}
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a balance file (made by scripts/curate.py metaclip --count): {error}") from None
        expected = {"entries", "counts", "threshold", "num_samples", "shards", "match_shard", "match_uid", "match_entry"}
        if set(fields) != expected:
            raise ValueError(f"{path}: a balance file has the arrays {sorted(expected)}, this one {sorted(fields)}")
        return cls(
            entries=fields["entries"],
            counts=fields["counts"],
            threshold=float(fields["threshold"]),
            num_samples=int(fields["num_samples"]),
            shards=fields["shards"],
            match_shard=fields["match_shard"],
            match_uid=fields["match_uid"],
            match_entry=fields["match_entry"],
        )


def count_matches(
    entries: list[str], samples: Iterable[tuple[str, str, str]], *, threshold: float = DEFAULT_THRESHOLD
) -> Balance:
    """Match every `(shard, uid, caption)` of the pool; the counts and the match index of a balance file."""
    if not threshold > 0:
        raise ValueError(f"the MetaCLIP threshold t must be positive, got {threshold}")
    match = EntryMatcher(entries)
    shard_index: dict[str, int] = {}
    rows_shard, rows_uid0, rows_uid1, rows_entry = [], [], [], []
    num_samples = 0
    for shard, uid, caption in samples:
        num_samples += 1
        s = shard_index.setdefault(shard, len(shard_index))
        matched = match(caption)
        hi, lo = uid_halves(uid)
        rows_shard += [s] * len(matched)
        rows_uid0 += [hi] * len(matched)
        rows_uid1 += [lo] * len(matched)
        rows_entry += matched.tolist()
    table = np.rec.fromarrays(
        [np.array(rows_shard, np.int32), np.array(rows_uid0, np.uint64), np.array(rows_uid1, np.uint64), np.array(rows_entry, np.int32)],
        names="shard,uid0,uid1,entry",
    )
    table = np.unique(table)  # sorted by (shard, uid, entry); a uid seen twice in a shard counts once
    uid = np.empty(len(table), dtype=UID_DTYPE)
    uid["uid0"], uid["uid1"] = table["uid0"], table["uid1"]
    return Balance(
        entries=np.array(entries, dtype=str),
        counts=np.bincount(table["entry"], minlength=len(entries)).astype(np.uint64),
        threshold=float(threshold),
        num_samples=num_samples,
        shards=np.array(list(shard_index), dtype=str),
        match_shard=table["shard"].astype(np.int32),
        match_uid=uid,
        match_entry=table["entry"].astype(np.int32),
    )
