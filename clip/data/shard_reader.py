"""Opening one shard (local or remote tar, `pipe:` command, CSV chunk) and turning it into records and skip events."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

from clip.data.records import Item, Record, SkipEvent
from clip.data.remote import ResumingStream, is_remote, redact
from clip.data.sources import Shard, is_pipe, local_path
from clip.data.subset import uid_from_key
from clip.data.tar_reader import iter_tar_samples

_READ_BUFFER = 1 << 16


def _read_csv_chunk(shard: Shard) -> Iterator[Item]:
    for row_index, image_path, caption in shard.rows:
        key = str(row_index)
        if not caption.strip():
            yield SkipEvent("missing_field", shard.url, key, "empty caption")
        elif not image_path or image_path.endswith(("/", os.sep)):
            yield SkipEvent("missing_field", shard.url, key, "empty image path")
        else:
            yield Record(shard.url, key, None, image_path, caption.strip(), uid_from_key(image_path))  # a path names its image across CSVs


def _read_local(shard: Shard, max_member_bytes: int) -> Iterator[Item]:
    path = local_path(shard.url)
    try:
        f = open(path, "rb", buffering=_READ_BUFFER)
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        yield SkipEvent("unreadable_shard", shard.url, "", f"cannot open {shard.url}: {e}")
        return
    with f:
        try:
            yield from iter_tar_samples(
                f, shard.url, max_member_bytes=max_member_bytes, size=size, expected_samples=shard.num_samples
            )
        except OSError as e:  # I/O error in the middle of the file (disk, network file system)
            yield SkipEvent("truncated_shard", shard.url, "", f"read error in {shard.url}: {e}")


def _read_remote(shard: Shard, max_member_bytes: int, open_retries: int) -> Iterator[Item]:
    # The stream retries failed reads itself (clip.data.remote); what reaches here has used its attempts.
    name = redact(shard.url)
    try:
        f = ResumingStream(shard.url, attempts=open_retries)
    except Exception as e:  # FileNotFoundError, PermissionError, or the SDK's error after the retries
        yield SkipEvent("unreadable_shard", name, "", f"cannot open {name}: {redact(str(e))}")
        return
    with f:
        try:
            yield from iter_tar_samples(
                f, name, max_member_bytes=max_member_bytes, size=f.size, expected_samples=shard.num_samples
            )
        except OSError as e:
            yield SkipEvent("truncated_shard", name, "", f"read error in {name}: {redact(str(e))}")


def _read_pipe(shard: Shard, max_member_bytes: int, open_retries: int) -> Iterator[Item]:
    # The command was allowed by data.allow_pipe_urls (sources.py); it runs in a shell by definition.
    command = shard.url[len("pipe:") :]
    for attempt in range(max(1, open_retries)):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if proc.stdout.peek(1):  # blocks until the first byte or the end of the output
            break
        proc.stdout.close()
        returncode = proc.wait()
    else:
        yield SkipEvent(
            "unreadable_shard",
            shard.url,
            "",
            f"{shard.url[:200]} produced no data in {max(1, open_retries)} attempt(s) (exit status {returncode})",
        )
        return
    try:
        yield from iter_tar_samples(
            proc.stdout, shard.url, max_member_bytes=max_member_bytes, expected_samples=shard.num_samples
        )
    finally:
        if proc.poll() is None:
            proc.kill()  # stopped early (end of epoch, error): don't leave the command running
        proc.stdout.close()
        proc.wait()


def read_shard(shard: Shard, *, max_member_bytes: int, open_retries: int) -> Iterator[Item]:
    """All records and skip events of one shard, in file order. Never raises for bad data."""
    if shard.rows is not None:
        return _read_csv_chunk(shard)
    if is_pipe(shard.url):
        return _read_pipe(shard, max_member_bytes, open_retries)
    if is_remote(shard.url):
        return _read_remote(shard, max_member_bytes, open_retries)
    return _read_local(shard, max_member_bytes)
