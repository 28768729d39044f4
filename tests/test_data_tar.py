"""The tar reader: exact truncation detection, member safety, sample grouping."""

from __future__ import annotations

import io
import os
import pickle
import resource
import tarfile

import pytest
from data_shards import add_member, member_offsets, tiny_jpeg, write_shard
from payloads import SystemCallPayload

from clip.data.records import Record, SkipEvent
from clip.data.tar_reader import iter_tar_samples, split_key

CAP = 64 * 1024 * 1024


def read(path, **kwargs):
    with open(path, "rb") as f:
        return list(iter_tar_samples(f, path, max_member_bytes=kwargs.pop("cap", CAP), size=os.path.getsize(path), **kwargs))


def split(items):
    records = [i for i in items if isinstance(i, Record)]
    events = [i for i in items if isinstance(i, SkipEvent)]
    return records, events


def test_reads_all_samples_of_a_webdataset_shard(tmp_path):
    path = str(tmp_path / "a.tar")
    keys = [f"{i:05d}" for i in range(7)]
    write_shard(path, keys)
    records, events = split(read(path, expected_samples=7))
    assert [r.key for r in records] == keys
    assert events == []
    assert records[0].caption == "caption of 00000"
    assert records[0].image == tiny_jpeg(__import__("zlib").crc32(b"00000"))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names_in_every_tar_format(tmp_path, fmt):
    path = str(tmp_path / "long.tar")
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: prefix field, <= 155
    keys = [f"{long_dir}/sample{i}" for i in range(3)]
    write_shard(path, keys, fmt=fmt)
    records, events = split(read(path))
    assert [r.key for r in records] == keys and events == []


def test_every_cut_point_is_detected_and_complete_samples_survive(tmp_path):
    """Python's streaming tarfile ends silently at many cut points; this reader never does."""
    full = str(tmp_path / "full.tar")
    keys = [f"k{i}" for i in range(4)]
    write_shard(full, keys)
    members = member_offsets(full)
    data = open(full, "rb").read()
    end_of_members = members[-1][2] + members[-1][3]
    # every header boundary, and points inside headers and data
    cuts = sorted({m[1] for m in members} | {m[1] + 100 for m in members} | {m[2] + 1 for m in members})
    cuts.append(end_of_members + 10)  # inside the last member's padding
    cuts.append(-(-end_of_members // 512) * 512 + 512)  # between the two zero blocks of the end-of-archive marker
    silent_in_tarfile = 0
    for cut in cuts:
        path = str(tmp_path / f"cut{cut}.tar")
        open(path, "wb").write(data[:cut])
        records, events = split(read(path))
        # a sample is complete when both of its members end before the cut
        complete = [k for k in keys if all(m[2] + m[3] <= cut for m in members if m[0].startswith(k + "."))]
        assert [r.key for r in records] == complete, cut
        assert [e.reason for e in events] == ["truncated_shard"], cut
        assert path in events[0].detail
        try:
            with tarfile.open(path, "r|") as tar:
                for _ in tar:
                    pass
            silent_in_tarfile += 1
        except tarfile.TarError:
            pass
    assert silent_in_tarfile > 0  # the failure mode this reader exists for


def test_a_zeroed_stretch_is_not_taken_for_the_end_of_the_archive(tmp_path):
    """Two zero blocks mid-file look like the end-of-archive marker; the data after them says otherwise."""
    path = str(tmp_path / "a.tar")
    keys = [f"k{i}" for i in range(4)]
    write_shard(path, keys)
    members = member_offsets(path)
    k1 = [m for m in members if m[0].startswith("k1.")]
    start, end = k1[0][1], k1[-1][2] + k1[-1][3]  # k1's first header .. the end of its last member's data
    end += -end % 512
    with open(path, "r+b") as f:  # a damaged disk block: k1 zeroed in place, k2 and k3 intact after it
        f.seek(start)
        f.write(bytes(end - start))
    records, events = split(read(path))
    assert [r.key for r in records] == ["k0"]
    assert [e.reason for e in events] == ["truncated_shard"]
    assert f"after an end-of-archive marker at byte {start}" in events[0].detail
    # the intact file, padded by tarfile to a whole record after its marker, reads whole
    write_shard(path, keys)
    assert os.path.getsize(path) % 10240 == 0
    records, events = split(read(path))
    assert [r.key for r in records] == keys and events == []


def test_corrupt_header_and_manifest_mismatch_count_as_truncated(tmp_path):
    path = str(tmp_path / "a.tar")
    write_shard(path, ["a", "b", "c"])
    records, events = split(read(path, expected_samples=5))
    assert len(records) == 3 and [(e.reason, "holds 3 samples but its manifest says 5" in e.detail) for e in events] == [
        ("truncated_shard", True)
    ]
    _, header_offset, _, _ = member_offsets(path)[2]  # the header of b.jpg
    with open(path, "r+b") as f:
        f.seek(header_offset + 10)
        f.write(b"garbage")
    records, events = split(read(path, expected_samples=3))
    assert [r.key for r in records] == ["a"]
    assert [e.reason for e in events] == ["truncated_shard"] and "corrupt header" in events[0].detail


def test_missing_and_empty_fields(tmp_path):
    path = str(tmp_path / "a.tar")
    with tarfile.open(path, "w") as tar:
        add_member(tar, "noimage.txt", b"text only")
        add_member(tar, "nocaption.jpg", tiny_jpeg(1))
        add_member(tar, "empty.jpg", tiny_jpeg(2))
        add_member(tar, "empty.txt", b"  \n")
        add_member(tar, "good.jpg", tiny_jpeg(3))
        add_member(tar, "good.json", b"{}")
        add_member(tar, "good.txt", b"a caption")
    records, events = split(read(path, expected_samples=4))
    assert [r.key for r in records] == ["good"]
    assert [(e.reason, e.key) for e in events] == [
        ("missing_field", "noimage"),
        ("missing_field", "nocaption"),
        ("missing_field", "empty"),
    ]


def test_pickle_members_are_never_decoded(tmp_path):
    """Webdataset's default .decode() would unpickle these; here they are counted and dropped."""
    marker = tmp_path / "marker"
    payload = pickle.dumps(SystemCallPayload(marker))
    path = str(tmp_path / "evil.tar")
    with tarfile.open(path, "w") as tar:
        add_member(tar, "000.jpg", tiny_jpeg(1))
        add_member(tar, "000.pyd", payload)
        add_member(tar, "000.txt", b"a caption")
        add_member(tar, "001.pth", payload)
        add_member(tar, "002.pickle", payload)
        add_member(tar, "003.jpg", tiny_jpeg(2))
        add_member(tar, "003.txt", b"another")
    records, events = split(read(path))
    assert [r.key for r in records] == ["000", "003"]
    assert [e.reason for e in events] == ["ignored_member"] * 3
    assert not marker.exists()


def test_unsafe_members_are_skipped_without_touching_the_filesystem(tmp_path):
    """`..` and absolute names, links and a 200 MB member: skipped, counted, nothing written, little memory."""
    path = str(tmp_path / "hostile.tar")
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        add_member(tar, "000.jpg", tiny_jpeg(1))
        add_member(tar, "000.txt", b"fine")
        add_member(tar, "../../evil.txt", b"escape")
        add_member(tar, "002/../../evil.jpg", tiny_jpeg(4))
        add_member(tar, "/etc/x.jpg", tiny_jpeg(2))
        add_member(tar, "a.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "h.jpg", b"", type=tarfile.LNKTYPE, linkname="000.jpg")
        big = tarfile.TarInfo("big.jpg")
        big.size = 200 * 1024 * 1024
        tar.addfile(big)  # header only; the data is a sparse hole written below
        f.seek(big.size, 1)
        tar.offset += big.size
        add_member(tar, "big.txt", b"big caption")
        add_member(tar, "001.jpg", tiny_jpeg(3))
        add_member(tar, "001.txt", b"also fine")
    before = sorted(p for p in tmp_path.rglob("*"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records, events = split(read(path))
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert [r.key for r in records] == ["000", "001"]
    assert sorted(e.reason for e in events) == ["too_large"] + ["unsafe_member"] * 5
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert rss_growth_mb < 100


def test_oversized_members_are_skipped_on_unseekable_streams(tmp_path):
    path = str(tmp_path / "a.tar")
    write_shard(path, ["a", "b"])
    stream = io.BufferedReader(io.BytesIO(open(path, "rb").read()))  # a pipe: no size, skips by reading
    items = list(iter_tar_samples(stream, "pipe", max_member_bytes=100))
    assert [(i.reason, i.key) for i in items] == [("too_large", "a"), ("too_large", "b")]


def test_split_key_follows_webdataset():
    assert split_key("dir/000123.seg.png") == ("dir/000123", "seg.png")
    assert split_key("000123.JPG") == ("000123", "jpg")
    assert split_key("noext") == ("noext", "")
