"""Sample uids and DataComp's subset files: which samples of a pool a run trains on.

A uid names one image-text pair across a whole pool. In img2dataset/DataComp shards it is the `uid`
field of the sample's `.json` member: 32 hex digits (128 bits). Samples without one (CSV rows, shards
written without metadata) get the first 128 bits of the BLAKE2b hash of their key, so every sample has
a uid of the same form; such keys must be unique across the pool, as img2dataset's are.

A subset file is DataComp's format, read by its training code and written by its baselines: a `.npy`
array of the kept uids, sorted, as two unsigned 64-bit halves, dtype `[("uid0", "<u8"), ("uid1", "<u8")]`
(uid0 = the first 16 hex digits). Sorting makes membership a binary search (`contains`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

UID_DTYPE = np.dtype([("uid0", "<u8"), ("uid1", "<u8")])
_HEX_DIGITS = 32


def uid_from_key(key: str) -> str:
    """The uid of a sample with no `uid` of its own: 128 bits of BLAKE2b over its key, as hex."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


def sample_uid(key: str, metadata: bytes | None) -> str:
    """A sample's uid: the `uid` field of its `.json` member when it has a valid one, else `uid_from_key`."""
    if metadata:
        try:
            uid = json.loads(metadata).get("uid")
        except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
            uid = None
        if isinstance(uid, str) and _is_uid(uid):
            return uid.lower()
    return uid_from_key(key)


def _is_uid(text: str) -> bool:
    if len(text) != _HEX_DIGITS:
        return False
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def from_hex(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> a structured uid array in the same order (a subset file also sorts it: `to_array`)."""
    pairs = []
    for uid in uids:
        if not _is_uid(uid):
            raise ValueError(f"not a uid (32 hex digits): {uid!r}")
        pairs.append((int(uid[:16], 16), int(uid[16:], 16)))
    return np.array(pairs, dtype=UID_DTYPE)


def to_array(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> the sorted, duplicate-free structured array of a subset file."""
    return np.unique(from_hex(uids))  # sorts by (uid0, uid1)


def to_hex(array: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(array["uid0"], array["uid1"])]


def write_subset(path: str | os.PathLike, uids: np.ndarray | Iterable[str]) -> Path:
    """Write a subset file atomically (a temporary file renamed into place): a killed job leaves the old file or none."""
    array = uids if isinstance(uids, np.ndarray) else to_array(uids)
    array = np.unique(np.asarray(array, dtype=UID_DTYPE))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_subset(path: str | os.PathLike) -> np.ndarray:
    """A subset file's uids, checked to be DataComp's dtype and sorted (never unpickled)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a subset file (.npy of uids): {error}") from None
    if array.dtype != UID_DTYPE:
        raise ValueError(f"{path}: subset dtype is {array.dtype}, expected {UID_DTYPE} (DataComp's uid format)")
    if array.ndim != 1:
        raise ValueError(f"{path}: subset must be a 1-D array of uids, got shape {array.shape}")
    if not _strictly_increasing(array):
        raise ValueError(f"{path}: subset uids are not sorted and unique; rewrite it with clip.data.subset.write_subset")
    return array


def _strictly_increasing(array: np.ndarray) -> bool:
    # numpy orders structured arrays field by field for sort/searchsorted but has no `<` for them
    hi, lo = array["uid0"], array["uid1"]
    return bool(np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))))


def contains(subset: np.ndarray, uids: np.ndarray | Iterable[str]) -> np.ndarray:
    """Boolean mask: which of `uids` (hex strings, or a uid array in any order) are in the sorted `subset`."""
    if isinstance(uids, np.ndarray) and uids.dtype == UID_DTYPE:
        query = uids
    else:
        query = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], dtype=UID_DTYPE)
    if len(subset) == 0 or len(query) == 0:
        return np.zeros(len(query), dtype=bool)
    index = np.searchsorted(subset, query)
    found = index < len(subset)
    found[found] = subset[index[found]] == query[found]
    return found
