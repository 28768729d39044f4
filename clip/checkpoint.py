"""Training checkpoints: atomic, verified, retained; resumable bit for bit on CPU.

Layout of `<output_dir>/checkpoints/`:

    step-120/train_state.pt   model, optimizer, grad scaler, counters, config (rank 0 writes it)
    step-120/rank-0.pt ...    each rank's RNG states and data position
    step-120/manifest.json    {file: sha256, bytes}, step, hashes, versions: written LAST
    latest                    "step-120": a convenience pointer for people and tools

Commit protocol (docs/guarantees.md, atomic checkpoints): every rank writes into `step-N.tmp/` and fsyncs; rank 0 writes
the manifest, fsyncs it, renames the directory to `step-N` and fsyncs the parent; only then is the
`latest` pointer replaced, and only then are old checkpoints deleted. A directory without a readable
manifest is not a checkpoint, so a crash at any instant leaves the previous checkpoint in charge.
Files hold tensors and primitives only (the config as a JSON string) so that they load with
`torch.load(weights_only=True)`. The LR schedule is a pure function of the step, so "scheduler
state" is the step counter.

This is the trainer's state. The inference export that `clip.load` reads is clip.api's format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from clip.distributed import all_ranks_agree, barrier
from clip.models.weights import file_sha256, load_torch_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")
# Suffixes of directories that are being written or deleted: never checkpoints, removed at startup.
_STALE_SUFFIXES = (".tmp", ".deleting")


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint's file does not match its manifest (sha256 or size)."""


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


# -- finding checkpoints ------------------------------------------------------------------------------


def list_committed(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint (a `step-N` directory with a readable manifest), oldest first."""
    found = []
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and read_manifest(path) is not None:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(checkpoint_dir: str | Path) -> Path | None:
    """The newest committed checkpoint, or None."""
    committed = list_committed(checkpoint_dir)
    return committed[-1][1] if committed else None


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a checkpoint directory, or None if it has none or it is unreadable."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def remove_stale(checkpoint_dir: str | Path) -> None:
    """Delete leftovers of interrupted saves and deletions (`*.tmp`, `*.deleting`). Rank 0, at startup."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.endswith(_STALE_SUFFIXES) and _STEP_DIR.match(path.name):
            logger.info("removing %s, left by an interrupted checkpoint save or deletion", path)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# -- saving ---------------------------------------------------------------------------------------------


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    train_state: dict[str, Any] | None,
    rank_state: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    manifest_extra: dict[str, Any],
    fault_phase: str = "",
) -> Path:
    """Write and commit `step-<step>` on all ranks (a collective call); return its path.

    `train_state` is rank 0's (model, optimizer, ...); `rank_state` is this rank's (RNG, data
    position). `fault_phase` names the protocol point at which to SIGKILL this process (tests).
    """
    directory = Path(checkpoint_dir)
    final = directory / f"step-{step}"
    # Already committed (a resumed run that saves the step it resumed from): the same state.
    if read_manifest(final) is None:
        manifest = {"format_version": FORMAT_VERSION, "step": step, **manifest_extra}
        _write_and_commit(directory, final, manifest, train_state, rank_state, rank, fault_phase)
    if rank == 0:
        _reach("before_latest", fault_phase)
        _write_bytes(directory / LATEST, final.name.encode(), atomic=True)
        _apply_retention(directory, keep_last, fault_phase)
    barrier()  # no rank runs ahead (and possibly saves again) before the commit
    return final


def _write_and_commit(directory: Path, final: Path, manifest: dict, train_state, rank_state, rank: int, fault_phase: str) -> None:
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()

    files = {}
    if rank == 0:
        files[TRAIN_STATE] = _write_file(tmp / TRAIN_STATE, train_state, fault_phase)
    _write_file(tmp / rank_file(rank), rank_state, fault_phase)
    _reach("before_rename", fault_phase)
    barrier()  # every rank's file is on disk

    if rank == 0:
        for name in sorted(p.name for p in tmp.iterdir() if p.name.startswith("rank-")):
            files[name] = _file_digest(tmp / name)
        manifest = {**manifest, "files": files}
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        os.replace(tmp, final)
        _fsync_dir(directory)


def _apply_retention(directory: Path, keep_last: int, fault_phase: str) -> None:
    """Delete committed checkpoints beyond the newest `keep_last`; failures are logged, never raised."""
    committed = list_committed(directory)
    for _, path in committed[:-keep_last]:
        _reach("retention", fault_phase)
        try:
            # Renaming first makes a half-deleted directory invisible to find_latest().
            doomed = path.with_name(path.name + ".deleting")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
        except OSError as error:
            logger.warning("could not delete old checkpoint %s (%s); will retry after the next save", path, error)


class _HashingWriter:
    """A write-through file wrapper that hashes what torch.save writes (no second read of the file)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_file(path: Path, obj: Any, fault_phase: str) -> dict[str, Any]:
    with open(path, "wb") as file:
        writer = _HashingWriter(file)
        torch.save(obj, writer)
        if fault_phase == "write":
            # Simulate a crash in the middle of the write: half the bytes reached the disk.
            file.flush()
            file.truncate(writer.num_bytes // 2)
            _reach("write", fault_phase)
        file.flush()
        os.fsync(file.fileno())
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.num_bytes}


def _write_bytes(path: Path, data: bytes, atomic: bool = False) -> None:
    target = path.with_name(path.name + ".tmp") if atomic else path
    with open(target, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    if atomic:
        os.replace(target, path)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _reach(phase: str, fault_phase: str) -> None:
    """A named point of the save protocol; fault injection kills the process here."""
    if phase == fault_phase:
        os.kill(os.getpid(), signal.SIGKILL)


# -- loading --------------------------------------------------------------------------------------------


def verify_files(path: str | Path, names: list[str]) -> None:
    """Check `names` in checkpoint `path` against its manifest; raise CheckpointCorruptError."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointCorruptError(f"{path} has no readable {MANIFEST}: not a committed checkpoint")
    for name in names:
        expected = manifest["files"].get(name)
        if expected is None:
            raise CheckpointCorruptError(
                f"{path / name} is not in the manifest (saved with {len(manifest['files']) - 1} ranks?)"
            )
        if not (path / name).exists():
            raise CheckpointCorruptError(f"{path / name} is missing")
        actual = _file_digest(path / name)
        if actual != expected:
            raise CheckpointCorruptError(
                f"{path / name} sha256 mismatch (expected {expected['sha256']} / {expected['bytes']} bytes, "
                f"got {actual['sha256']} / {actual['bytes']} bytes)"
            )


def load_file(path: str | Path) -> Any:
    """A checkpoint file, tensors and primitives only: `torch.load(weights_only=True)`, never a fallback;
    anything else raises UnsafeCheckpointError."""
    return load_torch_file(path)


def load_checkpoint(path: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train_state, this rank's state) of a committed checkpoint, verified against its manifest."""
    path = Path(path)
    names = [TRAIN_STATE, rank_file(rank)]
    verify_files(path, names)
    return load_file(path / TRAIN_STATE), load_file(path / rank_file(rank))


def find_resumable(checkpoint_dir: str | Path, rank: int, device: torch.device) -> Path | None:
    """The newest committed checkpoint that verifies on every rank (a collective call).

    A corrupt checkpoint is skipped with a loud warning and the previous one is tried.
    """
    for step, path in reversed(list_committed(checkpoint_dir)):
        try:
            verify_files(path, [TRAIN_STATE, rank_file(rank)])
            ok = True
        except CheckpointCorruptError as error:
            logger.warning("CHECKPOINT step-%d IS CORRUPT, falling back to an older one: %s", step, error)
            ok = False
        if all_ranks_agree(ok, device):
            return path
    return None


# -- RNG state ------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from, as tensors and primitives (numpy's key array as a tensor)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
