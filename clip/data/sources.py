"""Resolving `data.train_shards` into shards: expansion, safety rules, startup checks, sample counts.

Everything here runs in the training process before any worker starts, and every problem it finds is
a `DataConfigError` naming the `data.<key>` to fix, before any side effect. Remote shards
(clip.data.remote) are not opened here; only their `sizes.json` and shard lists are read.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from clip.config import ConfigError, DataConfig
from clip.data.remote import is_remote, read_small_file, redact, url_problem

LIST_SUFFIXES = (".txt",)
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
PIPE_PREFIX = "pipe:"
FILE_PREFIX = "file://"
MANIFEST_NAME = "sizes.json"  # OpenCLIP's name and format: {"00000.tar": 10000, ...}


class DataConfigError(ConfigError):
    """The data config cannot work (missing shard, forbidden URL, impossible split): fix `data.<key>`."""


class DataError(RuntimeError):
    """Training data failed at run time beyond the configured tolerance (unreadable shards, skip rate)."""


@dataclass(frozen=True, eq=False)
class Shard:
    """One unit of reading: a tar shard, or a chunk of CSV rows.

    `url` is a local path, a remote URL (clip.data.remote), a `pipe:` command, or for CSV chunks
    `<file>[<chunk>/<num_chunks>]`.
    `num_samples` comes from the manifest (or the CSV itself); None when unknown.
    """

    url: str
    source: int
    num_samples: Optional[int] = None
    rows: Optional[tuple[tuple[int, str, str], ...]] = None  # CSV chunk: (row index, image path, caption)


@dataclass
class Source:
    """One '::'-separated part of `data.train_shards`."""

    index: int
    spec: str
    weight: float
    shards: list[Shard] = field(default_factory=list)  # tar sources
    csv_rows: Optional[list[tuple[str, str]]] = None  # CSV sources: (image path, caption) rows


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def name_some(names: list[str], limit: int = 5) -> str:
    """The first `limit` names and how many more: error messages stay one readable line."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def local_path(url: str) -> str:
    return url[len(FILE_PREFIX) :] if url.startswith(FILE_PREFIX) else url


def expand_pattern(pattern: str) -> list[str]:
    """Shard names from a brace pattern: `/data/{000..099}.tar` -> 100 names, no I/O.

    The one expansion of the project (training specs and list files, manifests, eval shards), with
    webdataset's rules, as in OpenCLIP: `::` also separates patterns, `${NAME}` is `$WDS_NAME`.
    """
    from webdataset.shardlists import expand_urls

    try:
        return list(expand_urls(pattern))
    except AssertionError as error:  # webdataset asserts on an unset ${NAME}: say which and how to set it
        raise ValueError(f"cannot expand shard pattern {pattern!r}: {error} (set WDS_<NAME> for ${{NAME}})") from None


def _check_url(url: str, origin: str, cfg: DataConfig) -> None:
    """`pipe:` runs a shell command, so it needs an explicit opt-in and may come only from the config."""
    if is_pipe(url):
        if origin != "data.train_shards":
            raise DataConfigError(
                f"{origin}: shard list files may not contain pipe: commands ({url[:80]!r}); pipe: URLs run "
                "shell commands and are accepted only in data.train_shards itself, with data.allow_pipe_urls=true"
            )
        if not cfg.allow_pipe_urls:
            raise DataConfigError(
                f"data.train_shards: {url[:80]!r} is a pipe: URL, which runs a shell command; set "
                "data.allow_pipe_urls=true if you trust this config"
            )
        return
    if is_remote(url):
        problem = url_problem(url)
        if problem:
            raise DataConfigError(f"{origin}: {problem}")
        return
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme != "file":
        raise DataConfigError(
            f"{origin}: {redact(url)!r} uses the unsupported scheme {scheme}://; use a local path, s3://, gs://, "
            "https://, hf:// or a pipe: command"
        )


def _expand_config_pattern(pattern: str, origin: str) -> list[str]:
    try:
        return expand_pattern(pattern)
    except ValueError as error:
        raise DataConfigError(f"{origin}: {error}") from None


def _read_text(path: str, key: str, what: str) -> Optional[str]:
    """A small local or remote file's text (a shard list, a manifest), or None when it does not exist."""
    if not is_remote(path):
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, ValueError) as e:  # no permission, not UTF-8
            raise DataConfigError(f"{key}: cannot read the {what} {path}: {e}") from e
    problem = url_problem(path)
    if problem:
        raise DataConfigError(f"{key}: {problem}")
    try:
        data = read_small_file(path)
    except Exception as e:  # the SDK's own error types: a network error, missing credentials
        raise DataConfigError(f"{key}: cannot read the {what} {redact(path)}: {redact(str(e))}") from None
    try:
        return None if data is None else data.decode("utf-8")
    except ValueError as e:
        raise DataConfigError(f"{key}: cannot read the {what} {redact(path)}: {e}") from e


def _directory(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(os.path.abspath(local_path(url)))


def _beside(url: str, name: str) -> str:
    """`name` (a relative path) in the directory of `url`, a local path or a remote URL."""
    return f"{_directory(url)}/{name}" if is_remote(url) else os.path.join(_directory(url), name)


def _tar_urls(spec: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """(url, origin) pairs of one source: brace patterns, and `.txt` list files expanded in place."""
    result = []
    for pattern in _expand_config_pattern(spec, "data.train_shards"):
        path = local_path(pattern)
        if not is_pipe(pattern) and path.endswith(LIST_SUFFIXES):
            text = _read_text(path, "data.train_shards", "shard list file")
            if text is None:
                raise DataConfigError(f"data.train_shards: shard list file {redact(path)} does not exist")
            for line in (line.strip() for line in text.splitlines()):
                if not line or line.startswith("#"):
                    continue
                for url in _expand_config_pattern(line, f"data.train_shards ({path})"):
                    _check_url(url, f"data.train_shards ({path})", cfg)
                    if "://" not in url and not os.path.isabs(url):  # relative to the list file
                        url = _beside(path, url)
                    result.append((url, path))
        else:
            _check_url(pattern, "data.train_shards", cfg)
            result.append((pattern, "data.train_shards"))
    return result


def _load_manifest(path: str, key: str) -> Optional[dict[str, int]]:
    """The counts in a manifest, or None when it does not exist."""
    text = _read_text(path, key, "shard manifest")
    if text is None:
        return None
    try:
        counts = json.loads(text)
    except ValueError as e:
        raise DataConfigError(f"{key}: cannot read the shard manifest {redact(path)}: {e}") from e
    if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise DataConfigError(
            f"{key}: {redact(path)} must map shard names to sample counts, like OpenCLIP's sizes.json"
        )
    return counts


def _sample_counts(urls: list[str], cfg: DataConfig) -> list[Optional[int]]:
    """Per-shard counts from `data.train_manifest` (by full URL, then basename) or a sizes.json beside each shard."""
    explicit = None
    if cfg.train_manifest:
        explicit = _load_manifest(cfg.train_manifest, "data.train_manifest")
        if explicit is None:
            raise DataConfigError(f"data.train_manifest: {redact(cfg.train_manifest)} does not exist")
    beside: dict[str, Optional[dict[str, int]]] = {}
    counts = []
    for url in urls:
        name = os.path.basename(local_path(url).rstrip("/"))
        if explicit is not None:
            counts.append(explicit.get(url, explicit.get(name)))
            continue
        if is_pipe(url):
            counts.append(None)
            continue
        directory = _directory(url)
        if directory not in beside:  # one read per directory, remote ones included
            beside[directory] = _load_manifest(_beside(url, MANIFEST_NAME), "data.train_manifest")
        found = beside[directory]
        counts.append(found.get(name) if found is not None else None)
    return counts


def _read_csv(path: str, cfg: DataConfig, *, header_only: bool) -> list[tuple[str, str]]:
    """(image path, caption) rows; relative image paths are relative to the CSV file."""
    delimiter = CSV_DELIMITERS[os.path.splitext(path)[1].lower()]
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for key, column in (("data.csv_image_key", cfg.csv_image_key), ("data.csv_caption_key", cfg.csv_caption_key)):
            if column not in columns:
                raise DataConfigError(f"{key}={column!r} is not a column of {path} (columns: {columns})")
        if header_only:
            return []
        return [(os.path.join(base, row[cfg.csv_image_key] or ""), row[cfg.csv_caption_key] or "") for row in reader]


def _check_fields(cfg: DataConfig) -> None:
    problems = [
        f"data.{name}={getattr(cfg, name)} must be {rule}"
        for name, ok, rule in (
            ("num_workers", cfg.num_workers >= 0, ">= 0"),
            ("prefetch_factor", cfg.prefetch_factor >= 1, ">= 1"),
            ("shuffle_buffer", cfg.shuffle_buffer >= 1, ">= 1"),
            ("interleave_shards", cfg.interleave_shards >= 1, ">= 1"),
            ("max_skip_fraction", 0.0 <= cfg.max_skip_fraction <= 1.0, "in [0, 1]"),
            ("max_unreadable_shards", cfg.max_unreadable_shards >= 0, ">= 0"),
            ("max_member_bytes", cfg.max_member_bytes >= 1, ">= 1"),
            ("open_retries", cfg.open_retries >= 1, ">= 1"),
        )
        if not ok
    ]
    if problems:
        raise DataConfigError("; ".join(problems))


def resolve_sources(cfg: DataConfig, *, read_csv: bool = True) -> list[Source]:
    """Expand `data.train_shards` into sources and check everything that can be checked before training.

    Raises DataConfigError for: an unset spec, bad weights, forbidden or unsupported URLs, missing local
    files, missing sample counts in epoch mode. `read_csv=False` checks CSV headers without reading rows.
    """
    _check_fields(cfg)
    spec = (cfg.train_shards or "").strip()
    if not spec or spec == "???":
        raise DataConfigError("data.train_shards is not set: give shard paths like /data/{00000..00099}.tar")
    parts = [part.strip() for part in spec.split("::")]
    if not all(parts):
        raise DataConfigError(f"data.train_shards={spec!r} has an empty source between '::'")
    weights = list(cfg.train_weights) or [1.0] * len(parts)
    if len(weights) != len(parts):
        raise DataConfigError(
            f"data.train_weights has {len(weights)} entries but data.train_shards has {len(parts)} '::'-separated sources"
        )
    if any(not (w > 0) for w in weights):
        raise DataConfigError(f"data.train_weights={weights} must all be positive")
    if not cfg.resampled and any(w != 1.0 for w in weights):
        raise DataConfigError(
            "data.train_weights only applies with data.resampled=true (epoch mode reads every shard exactly once)"
        )

    sources = []
    for index, (part, weight) in enumerate(zip(parts, weights)):
        source = Source(index=index, spec=part, weight=float(weight))
        csv_path = local_path(part)
        if not is_pipe(part) and os.path.splitext(csv_path)[1].lower() in CSV_DELIMITERS:
            if is_remote(part):  # its rows name image files, which are read as local paths
                raise DataConfigError(f"data.train_shards: CSV sources must be local files, not {redact(part)}")
            if not os.path.isfile(csv_path):
                raise DataConfigError(f"data.train_shards: CSV file {csv_path} does not exist")
            source.csv_rows = _read_csv(csv_path, cfg, header_only=not read_csv)
            sources.append(source)
            continue
        urls_with_origin = _tar_urls(part, cfg)
        if not urls_with_origin:
            raise DataConfigError(f"data.train_shards: source {part!r} expands to no shards")
        # Remote shards are not looked up here (one request per shard); a missing one is an unreadable shard.
        missing = [
            u for u, _ in urls_with_origin if not is_pipe(u) and not is_remote(u) and not os.path.isfile(local_path(u))
        ]
        if missing:
            raise DataConfigError(f"data.train_shards: {len(missing)} shard(s) do not exist: {name_some(missing)}")
        urls = [u for u, _ in urls_with_origin]
        counts = _sample_counts(urls, cfg)
        if not cfg.resampled and any(c is None for c in counts):
            unknown = [u for u, c in zip(urls, counts) if c is None]
            raise DataConfigError(
                f"data.train_shards: epoch mode needs per-shard sample counts, and {len(unknown)} shard(s) have none "
                f"(first: {redact(unknown[0])}); put a {MANIFEST_NAME} beside the shards (python -m clip.data.manifest "
                "SHARDS...), set data.train_manifest, or use data.resampled=true"
            )
        source.shards = [Shard(url=u, source=index, num_samples=c) for u, c in zip(urls, counts)]
        sources.append(source)
    return sources
