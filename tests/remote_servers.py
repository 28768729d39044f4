"""Object storage on loopback for the remote-shard tests: an HTTP file server that can drop connections,
and moto's S3 server. Nothing leaves 127.0.0.1.

    with FileServer(directory) as server:            # https:// stand-in, with Range requests
        server.drop("000001.tar", at=5000)           # the next response crossing byte 5000 stops there
        url = server.url("000001.tar")

    with S3Server() as s3:                           # sets AWS_* for s3fs; s3.upload(directory, "bucket")
"""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # keep the test output quiet
        pass

    def _file(self) -> Path | None:
        path = (self.server.root / self.path.lstrip("/").split("?", 1)[0]).resolve()
        return path if path.is_file() and self.server.root in path.parents else None

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        match = _RANGE.match(self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = min(len(data), int(match[2]) + 1) if match[2] else len(data)
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        cut = self.server.take_drop(path.name, start, end)
        self.server.record(path.name, start, cut)
        if cut is None:
            self.wfile.write(data[start:end])
            return
        self.wfile.write(data[start:cut])  # then the connection goes away, short of Content-Length
        self.wfile.flush()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.lock = threading.Lock()
        self.drops: dict[str, list[float]] = {}  # name -> [offset, drops left]
        self.requests: list[tuple[str, int, int | None]] = []  # (name, first byte, byte it was cut at)

    def take_drop(self, name: str, start: int, end: int) -> int | None:
        with self.lock:
            drop = self.drops.get(name)
            if drop is None or drop[1] <= 0 or not start <= drop[0] < end:
                return None
            drop[1] -= 1
            return int(drop[0])

    def record(self, name: str, start: int, cut: int | None) -> None:
        with self.lock:
            self.requests.append((name, start, cut))


class FileServer:
    """Serves `directory` over HTTP on 127.0.0.1 with Range support (what fsspec's HTTP file system needs)."""

    def __init__(self, directory: str | os.PathLike):
        self._server = _Server(Path(directory))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, name: str = "") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def drop(self, name: str, *, at: int, times: float = 1) -> None:
        """Cut the next `times` responses for `name` that reach byte `at` there (math.inf: every one)."""
        self._server.drops[name] = [at, times]

    def requests(self, name: str) -> list[tuple[int, int | None]]:
        """(first byte, byte it was cut at or None) of each GET of `name`, in order."""
        return [(start, cut) for n, start, cut in self._server.requests if n == name]


class S3Server:
    """moto's S3 server on 127.0.0.1, with the AWS_* environment s3fs reads pointing at it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> S3Server:
        import s3fs

        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        for name, value in {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            self._patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            self._patch.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another server would be reused
        return self

    def __exit__(self, *exc) -> None:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        self._patch.undo()
        self._server.stop()

    def upload(self, directory: str | os.PathLike, bucket: str, prefix: str = "") -> str:
        """Every file of `directory` into s3://bucket/prefix/; returns that URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(directory).iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}{path.name}")
        return f"s3://{bucket}/{prefix}"
