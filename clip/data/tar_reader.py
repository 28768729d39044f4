"""A small streaming tar reader that notices truncation and never trusts member names, types or sizes.

The one tar reader of the project: training shards (`iter_tar_samples`), their manifests and the eval
shards (`clip.data.eval_shards`, through `iter_member_groups`) all read tars with it.

Why not `tarfile` or webdataset's reader: a streaming tar that is cut at a header boundary simply ends,
without an error, in both (519 of 1,368 cut points were silent when we measured it), and webdataset reads
every member fully into memory whatever its header claims. This reader requires the end-of-archive
marker (two zero blocks) and valid header checksums, reports a cut as a `truncated_shard` event, skips
oversized members without reading them, drops links, devices and absolute or `..` names, and hands out
member bytes only, never paths. It parses ustar, GNU long names and pax `path`/`size` records,
which covers tars written by Python's tarfile, GNU tar and webdataset's TarWriter.
"""

from __future__ import annotations

import posixpath
from typing import BinaryIO, Iterator, NamedTuple, Optional, Union

from clip.data.records import (
    CAPTION_EXTENSION,
    IMAGE_EXTENSIONS,
    KNOWN_UNUSED_EXTENSIONS,
    METADATA_EXTENSION,
    Item,
    Record,
    SkipEvent,
)
from clip.data.subset import sample_uid

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_DIRECTORY = b"5"
_PAX = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_META_MAX_BYTES = 1 << 20  # pax and long-name records are tiny; larger ones are corrupt or hostile
_SKIP_CHUNK = 1 << 20


class _Truncated(Exception):
    """The archive ended (or broke) before its end-of-archive block."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _parse_pax(data: bytes) -> dict[str, str]:
    """pax extended header records: '<length> <key>=<value>\\n'."""
    fields = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return fields


class _TarStream:
    """Reads blocks from a file object, tracking the offset; seeks over data when the file allows it."""

    def __init__(self, fileobj: BinaryIO, size: Optional[int]):
        self.f = fileobj
        self.size = size  # known for local files: lets skips seek instead of read
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.offset += len(data)
        if len(data) < n:
            raise _Truncated(f"ends at byte {self.offset}, inside a member")
        return data

    def skip(self, n: int) -> None:
        if self.size is not None:
            if self.offset + n > self.size:
                raise _Truncated(f"ends at byte {self.size}, inside a member")
            self.f.seek(n, 1)
            self.offset += n
            return
        while n:
            got = len(self.f.read(min(n, _SKIP_CHUNK)))
            if not got:
                raise _Truncated(f"ends at byte {self.offset}, inside a member")
            self.offset += got
            n -= got

    def read_padded(self, size: int) -> bytes:
        data = self.read(size)
        self.skip(-size % BLOCK)
        return data

    def skip_padded(self, size: int) -> None:
        self.skip(size + (-size % BLOCK))


class Member(NamedTuple):
    """A regular tar member at a relative path. `data` is None when it is over the size cap (not read)."""

    name: str
    size: int  # from the header
    data: Optional[bytes]


class MemberGroup(NamedTuple):
    """Consecutive members sharing a key (webdataset's sample), by extension."""

    key: str
    members: dict[str, Member]
    cut: bool  # the shard is truncated right after this group: it may be incomplete


def iter_members(
    fileobj: BinaryIO, url: str, *, max_member_bytes: int, size: Optional[int] = None
) -> Iterator[Union[Member, SkipEvent]]:
    """Yield the regular members, and SkipEvents for links, devices and unsafe names.

    A cut or corrupt archive ends the iteration with a `truncated_shard` event.
    """
    stream = _TarStream(fileobj, size)
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    try:
        while True:
            header = fileobj.read(BLOCK)
            stream.offset += len(header)
            if len(header) < BLOCK:
                raise _Truncated(f"ends at byte {stream.offset} without the end-of-archive marker")
            if header == _ZERO_BLOCK:
                # The end-of-archive marker is two zero blocks: one alone is a cut inside the marker, or
                # a zeroed block of a damaged file.
                if fileobj.read(BLOCK) != _ZERO_BLOCK:
                    raise _Truncated(f"has a zero block at byte {stream.offset - BLOCK} without the second "
                                     "zero block of an end-of-archive marker")
                _check_only_padding_follows(fileobj, stream.offset + BLOCK)
                return
            if not _checksum_ok(header):
                raise _Truncated(f"has a corrupt header at byte {stream.offset - BLOCK}")
            kind = header[156:157]
            member_size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
            if kind in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                if member_size > _META_MAX_BYTES:
                    raise _Truncated(f"has an implausible {member_size}-byte metadata record")
                data = stream.read_padded(member_size)
                if kind == _PAX:
                    pax = _parse_pax(data)
                elif kind == _GNU_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                continue
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX ustar prefix field
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            name = pax.get("path", long_name or name)
            long_name, pax = None, {}
            if kind not in _REGULAR:
                stream.skip_padded(member_size)
                if kind != _DIRECTORY:
                    yield SkipEvent("unsafe_member", url, name, f"tar member type {kind!r} (link or device) skipped")
                continue
            if name.startswith("/") or ".." in name.split("/"):
                stream.skip_padded(member_size)
                yield SkipEvent("unsafe_member", url, name, "absolute or parent-relative member name skipped")
                continue
            if member_size > max_member_bytes:
                stream.skip_padded(member_size)
                yield Member(name, member_size, None)
                continue
            yield Member(name, member_size, stream.read(member_size))
            stream.skip(-member_size % BLOCK)  # a cut in the padding still loses no data; it is reported after
    except _Truncated as e:
        yield SkipEvent("truncated_shard", url, "", f"{url} {e}")
    except ValueError as e:  # unparsable size or pax field
        yield SkipEvent("truncated_shard", url, "", f"{url} has a corrupt header near byte {stream.offset}: {e}")


def _check_only_padding_follows(fileobj: BinaryIO, marker_end: int) -> None:
    """After the end-of-archive marker a tar file holds only zeros (writers pad it to a whole record,
    10 KiB for tar and Python's tarfile). Anything else means the marker was not the end: a zeroed
    stretch of a damaged file looks exactly like one and would hide every member after it."""
    offset = marker_end
    while chunk := fileobj.read(_SKIP_CHUNK):
        if chunk.count(0) != len(chunk):
            first = offset + next(i for i, byte in enumerate(chunk) if byte)
            raise _Truncated(f"has data at byte {first} after an end-of-archive marker at byte {marker_end - 2 * BLOCK}: "
                             "a zeroed stretch inside the file, the members after it are lost")
        offset += len(chunk)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's sample grouping rule: 'dir/000123.seg.png' -> ('dir/000123', 'seg.png')."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def iter_member_groups(
    fileobj: BinaryIO,
    url: str,
    *,
    extensions: tuple[str, ...],
    max_member_bytes: int,
    size: Optional[int] = None,
) -> Iterator[Union[MemberGroup, SkipEvent]]:
    """Group consecutive members with the same key (a repeated extension starts a new group).

    Only members with one of `extensions` are kept; the others become `ignored_member` events and are
    never decoded, whatever they claim to be (webdataset would unpickle `.pyd`/`.pth` members).
    A truncated shard ends with its `truncated_shard` event, right after the group it cut (`cut=True`).
    """
    key: Optional[str] = None
    members: dict[str, Member] = {}
    for item in iter_members(fileobj, url, max_member_bytes=max_member_bytes, size=size):
        if isinstance(item, SkipEvent):
            if item.reason == "truncated_shard" and key is not None:
                yield MemberGroup(key, members, cut=True)
                key = None
            yield item
            continue
        member_key, ext = split_key(item.name)
        if ext not in extensions:
            if ext not in KNOWN_UNUSED_EXTENSIONS:
                detail = f"member {item.name!r} is not read (only {'/'.join(extensions)})"
                yield SkipEvent("ignored_member", url, member_key, detail)
            continue
        if member_key != key or ext in members:
            if key is not None:
                yield MemberGroup(key, members, cut=False)
            key, members = member_key, {}
        members[ext] = item
    if key is not None:
        yield MemberGroup(key, members, cut=False)


def _training_sample(group: MemberGroup, url: str, max_member_bytes: int) -> Optional[Item]:
    """A Record when the group has an image and a non-empty caption, else why not (None: cut short)."""
    oversized = [ext for ext, member in group.members.items() if member.data is None]
    if oversized:
        detail = f"{oversized[0]} member over data.max_member_bytes={max_member_bytes}"
        return SkipEvent("too_large", url, group.key, detail)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in group.members), None)
    if image_ext is not None and CAPTION_EXTENSION in group.members:
        caption = group.members[CAPTION_EXTENSION].data.decode("utf-8", "replace").strip()
        if caption:
            metadata = group.members.get(METADATA_EXTENSION)
            uid = sample_uid(group.key, metadata.data if metadata is not None else None)
            return Record(url, group.key, group.members[image_ext].data, None, caption, uid)
        return None if group.cut else SkipEvent("missing_field", url, group.key, "empty caption")
    missing = "image" if image_ext is None else "caption"
    return None if group.cut else SkipEvent("missing_field", url, group.key, f"no {missing} member")


def iter_tar_samples(
    fileobj: BinaryIO,
    url: str,
    *,
    max_member_bytes: int,
    size: Optional[int] = None,
    expected_samples: Optional[int] = None,
) -> Iterator[Item]:
    """The training samples of a shard as Records; everything else becomes a SkipEvent.

    A sample needs an image (jpg/jpeg/png/webp) and a `.txt` caption. When the shard is truncated the
    incomplete last sample is dropped silently (the truncation event accounts for it). With
    `expected_samples` (from the manifest), a different number of samples is a `truncated_shard` too.
    """
    num_samples = 0
    truncated = False
    groups = iter_member_groups(
        fileobj, url, extensions=(*IMAGE_EXTENSIONS, CAPTION_EXTENSION, METADATA_EXTENSION), max_member_bytes=max_member_bytes, size=size
    )
    for item in groups:
        if isinstance(item, SkipEvent):
            truncated = truncated or item.reason == "truncated_shard"
            yield item
            continue
        num_samples += 1
        sample = _training_sample(item, url, max_member_bytes)
        if sample is not None:
            yield sample
    if not truncated and expected_samples is not None and num_samples != expected_samples:
        yield SkipEvent(
            "truncated_shard", url, "", f"{url} holds {num_samples} samples but its manifest says {expected_samples}"
        )
