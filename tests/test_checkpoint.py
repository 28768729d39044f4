"""Checkpoint commit protocol, retention, verification and RNG state."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import clip.checkpoint as ckpt
from clip.models.weights import UnsafeCheckpointError


def _save(directory, step, *, keep_last=3, fault_phase=""):
    state = {"model": {"w": torch.full((3,), float(step))}, "step": step}
    rank_state = {"rng": ckpt.get_rng_state(), "data": {"next_batch": step}}
    return ckpt.save_checkpoint(
        directory, step, state, rank_state, rank=0, keep_last=keep_last, manifest_extra={"run_id": "r"},
        fault_phase=fault_phase,
    )


def _committed_steps(directory):
    return [step for step, _ in ckpt.list_committed(directory)]


def _raise_at(monkeypatch, phase):
    def reach(name, fault_phase):
        if name == phase:
            raise RuntimeError(f"crash at {phase}")

    monkeypatch.setattr(ckpt, "_reach", reach)


def test_find_latest_ignores_uncommitted_and_foreign_entries(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (tmp_path / "step-30").mkdir()  # no manifest
    (tmp_path / "step-30" / "train_state.pt").write_bytes(b"partial")
    (tmp_path / "step-40.tmp").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "tmp.pt").write_bytes(b"x")  # OpenCLIP's hazards: a tmp file and a half-written one
    (tmp_path / "epoch_10.pt").write_bytes(b"half")
    (tmp_path / "step-50").mkdir()
    (tmp_path / "step-50" / "manifest.json").write_text("{not json")
    assert ckpt.find_latest(tmp_path) == tmp_path / "step-20"
    assert (tmp_path / "latest").read_text() == "step-20"


def test_save_writes_manifest_last_and_everything_loads_with_weights_only(tmp_path):
    path = _save(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["format_version"] == ckpt.FORMAT_VERSION and manifest["run_id"] == "r"
    assert set(manifest["files"]) == {"train_state.pt", "rank-0.pt"}
    for name in manifest["files"]:
        torch.load(path / name, weights_only=True)  # tensors and primitives only
    state, rank_state = ckpt.load_checkpoint(path, rank=0)
    assert torch.equal(state["model"]["w"], torch.full((3,), 7.0)) and rank_state["data"] == {"next_batch": 7}


@pytest.mark.parametrize(
    "phase, expected_latest",
    [("write", 20), ("before_rename", 20), ("before_latest", 30), ("retention", 30)],
)
def test_a_crash_at_any_save_phase_leaves_a_loadable_latest(tmp_path, monkeypatch, phase, expected_latest):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _raise_at(monkeypatch, phase)
    with pytest.raises(RuntimeError, match=f"crash at {phase}"):
        _save(tmp_path, 30, keep_last=2, fault_phase=phase)
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == f"step-{expected_latest}"
    state, _ = ckpt.load_checkpoint(latest, rank=0)
    assert state["step"] == expected_latest
    # A restart cleans the leftovers and saves again over them.
    monkeypatch.undo()
    ckpt.remove_stale(tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.deleting"))
    _save(tmp_path, 30, keep_last=2)
    assert _committed_steps(tmp_path) == [20, 30]


def test_a_write_killed_midway_leaves_a_stale_tmp_and_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 21)
    _raise_at(monkeypatch, "write")
    with pytest.raises(RuntimeError):
        _save(tmp_path, 28, fault_phase="write")
    tmp = tmp_path / "step-28.tmp"
    assert tmp.is_dir() and not (tmp / "manifest.json").exists()
    assert (tmp_path / "latest").read_text() == "step-21"
    assert ckpt.find_latest(tmp_path).name == "step-21"


def test_retention_keeps_the_newest_and_survives_failed_deletes(tmp_path, monkeypatch, caplog):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep_last=2)
    assert _committed_steps(tmp_path) == [20, 30]

    def failing_rmtree(path, *args, **kwargs):
        (path / "train_state.pt").unlink()  # a deletion that fails halfway
        raise OSError("permission denied")

    monkeypatch.setattr(ckpt.shutil, "rmtree", failing_rmtree)
    with caplog.at_level(logging.WARNING, logger="clip.checkpoint"):
        _save(tmp_path, 40, keep_last=2)
    assert "could not delete old checkpoint" in caplog.text
    assert _committed_steps(tmp_path) == [30, 40]  # the half-deleted step-20 is no checkpoint any more
    monkeypatch.undo()
    ckpt.remove_stale(tmp_path)  # the renamed leftover goes at the next startup
    _save(tmp_path, 50, keep_last=2)  # and the purge is retried at the next save
    assert _committed_steps(tmp_path) == [40, 50]


def test_save_follows_the_commit_protocol_order(tmp_path, monkeypatch):
    """Files fsynced, then the manifest, then the rename and a directory fsync; then `latest`; then deletions."""
    _save(tmp_path, 10, keep_last=2)
    _save(tmp_path, 20, keep_last=2)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.relpath(src, tmp_path), os.path.relpath(dst, tmp_path)))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    _save(tmp_path, 30, keep_last=2)
    assert events == [
        ("fsync", "step-30.tmp/train_state.pt"),
        ("fsync", "step-30.tmp/rank-0.pt"),
        ("fsync", "step-30.tmp/manifest.json"),
        ("replace", "step-30.tmp", "step-30"),
        ("fsync", "."),
        ("fsync", "latest.tmp"),
        ("replace", "latest.tmp", "latest"),
        ("fsync", "."),
        ("replace", "step-10", "step-10.deleting"),
    ]


def test_corrupt_checkpoint_fails_verification_and_resume_falls_back(tmp_path, caplog):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = bytearray((newest / "train_state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "train_state.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"step-20/train_state.pt sha256 mismatch \(expected"):
        ckpt.load_checkpoint(newest, rank=0)
    with caplog.at_level(logging.WARNING, logger="clip.checkpoint"):
        chosen = ckpt.find_resumable(tmp_path, rank=0, device=torch.device("cpu"))
    assert chosen.name == "step-10"
    assert "CHECKPOINT step-20 IS CORRUPT" in caplog.text


def test_missing_rank_file_is_reported(tmp_path):
    path = _save(tmp_path, 5)
    with pytest.raises(ckpt.CheckpointCorruptError, match="rank-1.pt is not in the manifest"):
        ckpt.load_checkpoint(path, rank=1)


def test_saving_an_already_committed_step_keeps_it(tmp_path):
    path = _save(tmp_path, 5)
    before = (path / "manifest.json").read_bytes()
    assert _save(tmp_path, 5) == path
    assert (path / "manifest.json").read_bytes() == before


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt.get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_remove_stale_leaves_foreign_directories_alone(tmp_path):
    (tmp_path / "step-3.tmp").mkdir()
    (tmp_path / "notes.tmp").mkdir()
    ckpt.remove_stale(tmp_path)
    assert not (tmp_path / "step-3.tmp").exists() and (tmp_path / "notes.tmp").exists()
    shutil.rmtree(tmp_path / "notes.tmp")


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'marker'}",))

    path = _save(tmp_path, 5)
    (path / "train_state.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = ckpt._file_digest(path / "train_state.pt")  # an attacker can rehash
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle non-tensor objects"):
        ckpt.load_checkpoint(path, rank=0)
    assert not (tmp_path / "marker").exists()
