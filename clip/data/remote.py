"""Remote shards (`s3://`, `gs://`, `https://`, `hf://`), read through fsspec in blocks, never copied whole.

A shard is read as one seekable stream of ranged reads of `BLOCK_SIZE` bytes (a reader holds one
block), so oversized members are skipped without being fetched. When a read fails (a dropped
connection, a timeout, a server error) the object is opened again and the read goes on from the
byte the stream had reached, after a backoff of 1 s, 2 s, 4 s, ...: the tar reader above sees the
same bytes as from an uninterrupted read, so nothing is lost or repeated. After `data.open_retries`
failed attempts of one read, the shard fails like a corrupt one (clip.data.shard_reader).

Credentials never appear in a URL or a config: URLs with a user name, password or query (a signed
URL) are refused, and each SDK reads its own environment (s3fs: `AWS_*` variables or `~/.aws`;
gcsfs: `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's login; huggingface_hub: `HF_TOKEN` or
`huggingface-cli login`). Every message that quotes an SDK's error goes through `redact`, since
such errors may echo a request URL.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger("clip.data")

# The package each scheme needs besides fsspec (the `remote` extra installs them all).
REMOTE_SCHEMES = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "hf": "huggingface_hub",
}
INSTALL_HINT = "pip install 'clip-train[remote]'"
BLOCK_SIZE = 8 << 20  # one ranged read: large enough for object stores' first-byte latency to be small
RETRY_BACKOFF_S = 1.0  # then doubled per failed attempt of the same read

_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s?#@]*@)?(?P<rest>[^\s?#]*)(?P<query>\?[^\s#]*)?"
)
T = TypeVar("T")


class RemoteReadError(OSError):
    """A remote shard could not be read: every attempt failed, or the object changed while it was read."""


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_remote(url: str) -> bool:
    return scheme(url) in REMOTE_SCHEMES


def redact(text: str) -> str:
    """`text` with the user info and query of every URL in it replaced by `***`: they may be credentials."""

    def hide(match: re.Match) -> str:
        user = "***@" if match["user"] else ""
        return f"{match['scheme']}{user}{match['rest']}{'?***' if match['query'] else ''}"

    return _URL.sub(hide, text)


def url_problem(url: str) -> str | None:
    """Why the remote `url` cannot be used (credentials in it, its SDK not installed), or None; no I/O."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc or parts.query:
        return (
            f"{redact(url)} carries credentials (a user name, password or signed query); remove them and let the "
            f"{scheme(url)}:// SDK read them from its environment (docs/data.md, Remote shards)"
        )
    missing = [name for name in ("fsspec", REMOTE_SCHEMES[scheme(url)]) if importlib.util.find_spec(name) is None]
    if missing:
        return f"{scheme(url)}:// shards need the {' and '.join(missing)} package(s): {INSTALL_HINT}"
    return None


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def read_small_file(url: str) -> bytes | None:
    """The bytes of a small remote file (a sizes.json, a shard list), or None when it does not exist."""
    fs, path = _filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


class ResumingStream(io.RawIOBase):
    """One remote object as a seekable byte stream that survives read errors (see the module docstring).

    fsspec's files buffer a block themselves, so this needs no buffer on top: a read returns all the
    bytes asked for, short only at the end of the object.
    """

    def __init__(self, url: str, *, attempts: int):
        self.url = url
        self.attempts = max(1, attempts)
        self.fs, self.path = _filesystem(url)
        self.offset = 0
        self.size: int | None = None
        self.file = None
        self._attempt(lambda file: None)

    def _open(self):
        file = self.fs.open(self.path, "rb", block_size=BLOCK_SIZE, cache_type="readahead")
        if self.size is None:
            self.size = file.size
        elif file.size != self.size:
            file.close()
            raise RemoteReadError(f"{redact(self.url)} changed while it was read ({self.size} -> {file.size} bytes)")
        file.seek(self.offset)
        return file

    def _attempt(self, action: Callable[[object], T]) -> T:
        """`action(file)` on the open file, reopening it at `self.offset` after each failure."""
        failures = 0
        while True:
            try:
                if self.file is None:
                    self.file = self._open()
                return action(self.file)
            except (FileNotFoundError, PermissionError, RemoteReadError):
                raise  # retrying cannot help
            except Exception as error:  # SDKs raise their own types for dropped connections and timeouts
                self._close_file()
                failures += 1
                message = f"{type(error).__name__}: {redact(str(error))}"
                if failures == self.attempts:
                    raise RemoteReadError(
                        f"{redact(self.url)} failed at byte {self.offset} in {self.attempts} attempt(s): {message}"
                    ) from None
                delay = RETRY_BACKOFF_S * 2 ** (failures - 1)
                logger.warning("%s: read error at byte %d (%s); retrying in %.3g s", redact(self.url), self.offset,
                               message, delay)  # fmt: skip
                time.sleep(delay)

    def _close_file(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # a broken connection may fail to close too; it is dropped either way
                pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.offset, io.SEEK_END: self.size}[whence]
        self.offset = max(0, base + offset)
        if self.file is not None:
            self.file.seek(self.offset)  # fsspec only moves its position: the next read fetches
        return self.offset

    def readinto(self, buffer) -> int:
        if self.offset >= self.size:
            return 0
        data = self._attempt(lambda file: file.read(len(buffer)))
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._close_file()
        super().close()
