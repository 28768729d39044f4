"""Two nodes on one machine: two torchrun agents, c10d rendezvous on 127.0.0.1, gloo, the smoke recipe.

Each agent is started as a node would start it (`torchrun --nnodes 2 --nproc-per-node 1` with the
same rendezvous endpoint); a test takes a whole node away by SIGKILLing the agent and its processes. The c10d rendezvous gives the ranks out itself (`--node-rank` is
only read by the static rendezvous), so which agent hosts rank 0 is not fixed; nothing below
depends on it. What is not covered here: NCCL, and FSDP2 on CUDA (docs/training.md, Multi-node).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from clip.checkpoint import find_latest
from clip.data.synthetic import write_train_shards
from tests.multiprocess import get_free_port
from tests.train_fixtures import assert_bitwise_equal_checkpoints, losses_by_step

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "train.py")
RECORDING_SCRIPT = str(ROOT / "tests" / "train_recording_keys.py")
TIMEOUT_S = 120
NUM_SAMPLES, GLOBAL_BATCH = 256, 32  # 8 steps per epoch, 2 epochs
STEPS = 2 * NUM_SAMPLES // GLOBAL_BATCH
# The smoke recipe on 256 samples instead of 20,000 and without its zero-shot set: 16 steps.
SMOKE = [
    "+experiment=smoke",
    "synthetic_data=",
    "eval.zero_shot=[]",
    f"global_batch_size={GLOBAL_BATCH}",
    "optim.warmup_steps=2",
    "checkpoint.every_steps=4",
    "checkpoint.export=false",
    "log.every_steps=1",
    "deterministic=true",
    "dist.timeout_s=30",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 shards of 32 captioned 32-pixel images: one reader per rank, 4 shards each."""
    return write_train_shards(
        str(tmp_path_factory.mktemp("shards")), num_samples=NUM_SAMPLES, samples_per_shard=32, image_size=32, seed=0
    )


def smoke_args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [*SMOKE, f"data.train_shards='{shards}'", f"output_dir={run_dir}", *extra]


def _environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONFAULTHANDLER": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }


def start_nodes(script_args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, one per "node", meeting at a fresh rendezvous; their output goes to log_dir."""
    port = get_free_port()
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"test-{port}",
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    nodes = []
    for node in range(2):
        with (log_dir / f"node-{node}.log").open("a") as log:  # the agent writes to its own copy
            nodes.append(
                subprocess.Popen([*launcher, *script_args], env=_environment(), stdout=log, stderr=subprocess.STDOUT)
            )
    return nodes


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL to everything of a node: the agent, its worker and the worker's data loaders. (torchrun
    starts each worker in a session of its own, so the agent's process group alone would leave it running.)"""
    for pid in [agent.pid, *descendants(agent.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait()


def wait_all(nodes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [node.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)


def logs(log_dir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(log_dir.glob("node-*.log")))


def run_two_nodes(script_args: list[str], log_dir: Path) -> None:
    codes = wait_all(start_nodes(script_args, log_dir))
    assert codes == [0, 0], logs(log_dir)


def recorded_keys(keys_dir: Path, rank: int) -> dict[int, list[str]]:
    """epoch -> the keys rank `rank` trained on, in order."""
    epochs: dict[int, list[str]] = {}
    for line in (keys_dir / f"rank-{rank}.txt").read_text().splitlines():
        epoch, *keys = line.split()
        epochs.setdefault(int(epoch), []).extend(keys)
    return epochs


@pytest.fixture(scope="module")
def two_nodes(shards, tmp_path_factory) -> Path:
    """The uninterrupted two-node run, recording which samples each rank trained on."""
    run_dir = tmp_path_factory.mktemp("two-nodes")
    run_two_nodes([RECORDING_SCRIPT, str(run_dir / "keys"), *smoke_args(shards, run_dir / "run")], run_dir)
    return run_dir


def test_two_nodes_learn_see_each_sample_once_per_epoch_and_equal_one_node(shards, two_nodes, tmp_path):
    all_keys = Counter(f"{i:09d}" for i in range(NUM_SAMPLES))
    per_rank = [recorded_keys(two_nodes / "keys", rank) for rank in range(2)]
    assert all(sorted(epochs) == [0, 1] for epochs in per_rank)
    for epoch in (0, 1):
        assert Counter(per_rank[0][epoch] + per_rank[1][epoch]) == all_keys, epoch  # every sample once
        assert not set(per_rank[0][epoch]) & set(per_rank[1][epoch])
    assert per_rank[0][0] != per_rank[0][1]  # a new order in the second epoch

    losses = losses_by_step(two_nodes / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    # It learns: from above chance (ln 32 for a global batch of 32) to below it.
    last = [losses[step] for step in range(STEPS - 3, STEPS + 1)]
    assert losses[1] > math.log(GLOBAL_BATCH) and sum(last) / len(last) < math.log(GLOBAL_BATCH) - 0.1, losses

    # The same job as one node with two processes: the same samples on the same ranks, the same bits.
    one_node = tmp_path / "one-node"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*launcher, RECORDING_SCRIPT, str(one_node / "keys"), *smoke_args(shards, one_node / "run")],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert [recorded_keys(one_node / "keys", rank) for rank in range(2)] == per_rank
    final = f"step-{STEPS}"
    assert_bitwise_equal_checkpoints(
        two_nodes / "run" / "checkpoints" / final, one_node / "run" / "checkpoints" / final
    )
    assert losses_by_step(one_node / "run") == losses


def test_a_node_lost_mid_run_then_both_relaunched_is_bitwise_equal(shards, two_nodes, tmp_path):
    """SIGKILL to one node's agent and worker during step 6; the other node must fail by itself, fast;
    the command again on both nodes (without the fault hook) resumes from step 4's checkpoint and ends
    as if nothing had happened."""
    run_dir = tmp_path / "run"
    nodes = start_nodes([SCRIPT, *smoke_args(shards, run_dir, "fault.sleep_at_step=6", "fault.sleep_s=1")], tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    while 5 not in (losses_by_step(run_dir) if (run_dir / "metrics.jsonl").exists() else {}):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), logs(tmp_path)
        time.sleep(0.1)
    kill_node(nodes[1])
    lost = time.monotonic()
    codes = wait_all(nodes, timeout=60)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, logs(tmp_path)
    print(f"the surviving node exited {time.monotonic() - lost:.1f} s after the other was killed")
    assert find_latest(run_dir / "checkpoints").name == "step-4"

    run_two_nodes([SCRIPT, *smoke_args(shards, run_dir)], tmp_path / "relaunch")
    assert "at step 4" in logs(tmp_path / "relaunch")
    final = f"step-{STEPS}"
    assert_bitwise_equal_checkpoints(two_nodes / "run" / "checkpoints" / final, run_dir / "checkpoints" / final)
    assert losses_by_step(run_dir) == losses_by_step(two_nodes / "run")
