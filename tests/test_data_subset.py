"""Sample uids and DataComp's subset file format (clip.data.subset)."""

import io
import json
import tarfile

import numpy as np
import pytest

from clip.data.records import Record
from clip.data.subset import (
    UID_DTYPE,
    contains,
    read_subset,
    sample_uid,
    to_array,
    to_hex,
    uid_from_key,
    write_subset,
)
from clip.data.tar_reader import iter_tar_samples

DATACOMP_UID = "0f3ab2c14e5d6a7b8c9d0e1f2a3b4c5d"


def test_uid_halves_are_datacomps_uint64_pair(tmp_path):
    array = to_array([DATACOMP_UID])
    assert array.dtype == UID_DTYPE
    assert int(array["uid0"][0]) == 0x0F3AB2C14E5D6A7B and int(array["uid1"][0]) == 0x8C9D0E1F2A3B4C5D
    assert to_hex(array) == [DATACOMP_UID]


def test_subset_file_round_trip_sorted_unique_and_membership(tmp_path):
    uids = [uid_from_key(f"{i:09d}") for i in range(50)]
    path = write_subset(tmp_path / "keep.npy", uids[::-1] + uids[:5])  # unsorted, with duplicates
    array = read_subset(path)
    assert sorted(to_hex(array)) == sorted(uids) and len(array) == 50
    assert to_hex(array) == sorted(uids)  # numpy's field-by-field order is the hex order
    assert not (tmp_path / "keep.npy.tmp").exists()
    other = [uid_from_key(f"x{i}") for i in range(5)]
    np.testing.assert_array_equal(contains(array, uids[:3] + other), [True] * 3 + [False] * 5)


def test_read_subset_refuses_wrong_dtype_and_unsorted(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(4))
    with pytest.raises(ValueError, match="ints.npy: subset dtype"):
        read_subset(tmp_path / "ints.npy")
    unsorted = np.array([(2, 0), (1, 0)], dtype=UID_DTYPE)
    np.save(tmp_path / "unsorted.npy", unsorted)
    with pytest.raises(ValueError, match="not sorted"):
        read_subset(tmp_path / "unsorted.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy: not a subset file"):
        read_subset(tmp_path / "junk.npy")


def test_sample_uid_reads_json_uid_else_hashes_the_key():
    assert sample_uid("000001", json.dumps({"uid": DATACOMP_UID.upper()}).encode()) == DATACOMP_UID
    assert sample_uid("000001", None) == uid_from_key("000001")
    for bad in (b"{not json", b"[1, 2]", json.dumps({"uid": "abc"}).encode()):
        assert sample_uid("000001", bad) == uid_from_key("000001")
    assert uid_from_key("000001") != uid_from_key("000002") and len(uid_from_key("k")) == 32


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_records_carry_the_json_uid():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _member(tar, "a.jpg", b"jpeg bytes")
        _member(tar, "a.txt", b"a caption")
        _member(tar, "a.json", json.dumps({"uid": DATACOMP_UID, "url": "http://x"}).encode())
        _member(tar, "b.jpg", b"jpeg bytes")
        _member(tar, "b.txt", b"another caption")
    buffer.seek(0)
    records = [r for r in iter_tar_samples(buffer, "shard.tar", max_member_bytes=1 << 20) if isinstance(r, Record)]
    assert [(r.key, r.uid) for r in records] == [("a", DATACOMP_UID), ("b", uid_from_key("b"))]
