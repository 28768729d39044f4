"""The real entry point under process control: SIGKILL and relaunch, SIGTERM, failing and hanging ranks.

Every run is a subprocess (`python scripts/train.py ...` or `torchrun ...`) on small synthetic
WebDataset shards; a crashed run is relaunched with the same command, as SLURM or Kubernetes would
(docs/guarantees.md: bitwise resume, atomic checkpoints, preemption, non-finite steps, a failing rank fails fast). Fault hooks (`fault.*`) put each failure at an exact step or
checkpoint phase.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip.checkpoint import find_latest
from clip.data.synthetic import write_train_shards
from tests.train_fixtures import assert_bitwise_equal_checkpoints, losses_by_step

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "train.py")
BASE = [
    "model=tiny-vit",
    "model.text.context_length=16",
    "global_batch_size=16",
    "precision=fp32",
    "num_threads=1",
    "deterministic=true",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "log.every_steps=1",
    "checkpoint.export=false",
    "data.num_workers=1",
    "dist.timeout_s=30",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 shards of 40 captioned 32-pixel images: enough for 2 ranks x 1 worker, 20 steps per epoch."""
    return write_train_shards(str(tmp_path_factory.mktemp("shards")), num_samples=320, samples_per_shard=40,
                              image_size=32, seed=0)


def run(overrides: list[str], *, nproc: int = 0, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """scripts/train.py in a fresh process (under torchrun with `nproc` workers when nproc > 0)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([*launcher, SCRIPT, *overrides], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def train_args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.train_shards='{shards}'", f"output_dir={run_dir}", *extra]


# The run that interrupted runs are compared with: 30 steps, checkpoints every 7.
COMMON = ["max_steps=30", "checkpoint.every_steps=7"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run with a data worker. It must also shut its worker down and exit by itself
    (a worker that ignored its owner's SIGTERM would hang the exit): bounded by run()'s timeout."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(train_args(shards, run_dir, *COMMON))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_sigkill_anywhere_then_relaunch_is_bitwise_equal_to_an_uninterrupted_run(shards, reference, tmp_path):
    kill_step = random.Random().randint(8, 20)
    print(f"killing after step {kill_step}")  # reproducible: rerun with this value if it fails
    # (faults, the checkpoint a relaunch must resume from, a stale tmp directory it must remove)
    crashes = {
        "between_steps": ([f"fault.kill_at_step={kill_step}"], kill_step // 7 * 7, None),
        "writing_files": (["fault.kill_in_save_at_step=28"], 21, "step-28.tmp"),
        "before_rename": (["fault.kill_in_save_at_step=14", "fault.kill_in_save_phase=before_rename"], 7, "step-14.tmp"),
    }
    for name, (faults, resume_step, stale) in crashes.items():
        run_dir = tmp_path / name
        first = run(train_args(shards, run_dir, *COMMON, *faults))
        assert first.returncode == -signal.SIGKILL, (name, first.stderr)
        assert find_latest(run_dir / "checkpoints").name == f"step-{resume_step}", name
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{resume_step}"
        assert stale is None or (run_dir / "checkpoints" / stale).is_dir(), name
        resumed = run(train_args(shards, run_dir, *COMMON))
        assert resumed.returncode == 0, (name, resumed.stderr)
        assert f"at step {resume_step}" in resumed.stderr, name
        assert not list((run_dir / "checkpoints").glob("*.tmp")), name
        assert_bitwise_equal_checkpoints(reference / "checkpoints" / "step-30", run_dir / "checkpoints" / "step-30")
        assert losses_by_step(run_dir) == losses_by_step(reference), name


@pytest.mark.slow
def test_killing_one_torchrun_rank_then_relaunching_is_bitwise_equal(shards, tmp_path):
    common = ["max_steps=20", "checkpoint.every_steps=6"]
    reference = tmp_path / "reference"
    assert run(train_args(shards, reference, *common), nproc=2).returncode == 0
    killed = tmp_path / "killed"
    first = run(train_args(shards, killed, *common, "fault.kill_at_step=9", "fault.rank=1"), nproc=2)
    assert first.returncode != 0
    resumed = run(train_args(shards, killed, *common), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal_checkpoints(reference / "checkpoints" / "step-20", killed / "checkpoints" / "step-20")
    assert losses_by_step(killed) == losses_by_step(reference)


def start_run(overrides: list[str]) -> subprocess.Popen:
    """scripts/train.py as the leader of a new process group (its data workers join it), as a job step
    is under SLURM, so that the group can be signalled without signalling the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, SCRIPT, *overrides], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while step not in (losses_by_step(run_dir) if (run_dir / "metrics.jsonl").exists() else {}):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run did not reach step {step}: {process.communicate()[1]}")
        time.sleep(0.1)


def data_workers(process: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_signals_to_data_workers_leave_training_unaffected(shards, reference, tmp_path):
    # Preemption, a signal to the data workers. The run sleeps in step 4, so the signals surely arrive while it is training.
    process = start_run(train_args(shards, tmp_path, *COMMON, "fault.sleep_at_step=4", "fault.sleep_s=2"))
    wait_for_step(process, tmp_path, 3)
    workers = data_workers(process)
    assert workers
    for worker in workers:
        os.kill(worker, signal.SIGTERM)  # torch's own worker handler would die of this one
        os.kill(worker, signal.SIGUSR1)
    time.sleep(0.5)
    assert all(is_running(worker) for worker in workers)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr
    assert_bitwise_equal_checkpoints(reference / "checkpoints" / "step-30", tmp_path / "checkpoints" / "step-30")
    assert losses_by_step(tmp_path) == losses_by_step(reference)


def test_sigterm_to_the_whole_process_group_checkpoints_exits_143_and_resumes_bitwise(shards, reference, tmp_path):
    # Preemption of one process, with the signal delivered as SLURM delivers it: to the trainer and its data workers.
    # The run sleeps in step 5, so the stop request arrives during that step, wherever the workers are.
    process = start_run(train_args(shards, tmp_path, *COMMON, "fault.sleep_at_step=5", "fault.sleep_s=2"))
    wait_for_step(process, tmp_path, 4)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)  # no hang in the checkpoint or at exit
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert time.monotonic() - sent < 10
    assert "exited unexpectedly" not in stderr and "killed by signal" not in stderr
    assert find_latest(tmp_path / "checkpoints").name == "step-5"
    assert max(losses_by_step(tmp_path)) == 5
    resumed = run(train_args(shards, tmp_path, *COMMON))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 5" in resumed.stderr
    assert_bitwise_equal_checkpoints(reference / "checkpoints" / "step-30", tmp_path / "checkpoints" / "step-30")
    assert losses_by_step(tmp_path) == losses_by_step(reference)


def _fake_slurm_bin(directory: Path) -> Path:
    """`scontrol` naming this host, an `srun` that runs its command once (one node, one task) and
    `torchrun` as this interpreter's: enough to run scripts/slurm/train.sbatch as one job step."""
    directory.mkdir()
    scripts = {
        "scontrol": "echo 127.0.0.1",
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "torchrun": f'exec {sys.executable} -m torch.distributed.run "$@"',
    }
    for name, body in scripts.items():
        (directory / name).write_text(f"#!/bin/bash\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


def test_sbatch_script_turns_slurm_sigusr1_into_a_checkpoint(shards, tmp_path):
    # Preemption under scripts/slurm/train.sbatch: SLURM's --signal=USR1@90 reaches the job step's task, the
    # torchrun agent, which must forward it to its worker (an agent that does not handle SIGUSR1 dies
    # of it, and the step's processes with it, before any checkpoint).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{_fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_GPUS_PER_NODE": "1", "SLURM_JOB_ID": "7",
           "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    args = train_args(shards, run_dir, *COMMON, "fault.sleep_at_step=5", "fault.sleep_s=2")
    job = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), *args], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(job, run_dir, 4)
        (agent,) = data_workers(job)  # the batch shell's one child: torchrun, as srun would start it
        os.kill(agent, signal.SIGUSR1)
        _, stderr = job.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # whatever is left of the step
    assert "stop requested (signal 10): checkpoint of step 5 written" in stderr, stderr
    assert find_latest(run_dir / "checkpoints").name == "step-5" and max(losses_by_step(run_dir)) == 5


def test_sigterm_to_one_torchrun_rank_stops_all_ranks_at_the_same_step(shards, tmp_path):
    start = time.monotonic()
    result = run(train_args(shards, tmp_path, "max_steps=100", "fault.signal_at_step=4", "fault.rank=1"), nproc=2)
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert result.stderr.count("exitcode  : 143") >= 1 or "143" in result.stderr
    latest = find_latest(tmp_path / "checkpoints")
    assert latest.name == "step-4" and {p.name for p in latest.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    assert "Timeout" not in result.stderr  # no rank waited for a collective


def test_a_non_finite_loss_on_one_rank_is_skipped_on_all(shards, tmp_path):
    # The run ends at step 5, so that step is checkpointed (a skipped step is not, periodically).
    result = run(train_args(shards, tmp_path, "max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                            "fault.nan_at_steps=[5]", "fault.rank=1"), nproc=2)
    assert result.returncode == 0, result.stderr
    states = [torch.load(tmp_path / "checkpoints" / f"step-{s}" / "train_state.pt", weights_only=True) for s in (4, 5)]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    assert states[1]["counters"]["nonfinite_steps"] == 1
    assert "non-finite loss or gradient on rank(s) [1]" in result.stderr

    stopped = tmp_path / "stopped"
    start = time.monotonic()
    result = run(train_args(shards, stopped, "max_steps=20", "checkpoint.every_steps=2",
                            "fault.nan_at_steps=[5,6,7]", "fault.rank=1"), nproc=2)
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "steps 5-7 on rank(s) [1]" in result.stderr and "exitcode  : 3" in result.stderr
    latest = find_latest(stopped / "checkpoints")
    assert latest.name == "step-4"
    state = torch.load(latest / "train_state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_failing_rank_fails_the_job_fast_with_the_root_cause(shards, tmp_path):
    start = time.monotonic()
    result = run(train_args(shards, tmp_path, "max_steps=100", "fault.raise_at_step=3", "fault.rank=1"), nproc=2)
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "Root Cause" in result.stderr and "rank      : 1" in result.stderr
    assert "out of memory on rank 1 at step 3" in result.stderr and "grad_checkpointing=true" in result.stderr


@pytest.mark.slow
def test_a_hung_rank_is_detected_by_the_watchdog(shards, tmp_path):
    sleep_line = next(number for number, line in enumerate((ROOT / "clip" / "train.py").read_text().splitlines(), 1)
                      if "time.sleep(cfg.fault.sleep_s)" in line)
    start = time.monotonic()
    result = run(train_args(shards, tmp_path, "max_steps=100", "fault.sleep_at_step=3", "fault.rank=1",
                            "fault.sleep_s=120", "dist.watchdog_s=10"), nproc=2)
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "Timeout (0:00:10)!" in result.stderr and f'train.py", line {sleep_line} in train' in result.stderr
