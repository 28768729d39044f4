"""A 2-process gloo run equals a 1-process run with the same global batch (weights, to float tolerance).

The data source is world-size invariant (tests/train_fixtures.py), so both runs see the same global
batch at every step; only the split over processes differs. That the weights agree proves that the
loss, its gradients, the DDP reduction, clipping, the optimizer and the schedule do not depend on
the number of processes.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import clip.train as train_module
from clip.config import to_model_config
from clip.models import CLIP
from tests.train_fixtures import (
    load_model_state,
    read_metrics,
    tiny_train_config,
    use_memory_data,
)

TIMEOUT_S = 120
# Captions of 2 to 32 tokens, so that text packing (on by default) really cuts: the ranks' smaller
# micro-batches are grouped differently from the 1-process run's, and the results must still agree.
CAPTIONS = dict(context_length=32, varied_captions=True)
CONTEXT = f"model.text.context_length={CAPTIONS['context_length']}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    use_memory_data(pytest.MonkeyPatch(), **CAPTIONS)  # a fresh process: nothing to undo
    train_module.train(tiny_train_config(*overrides))


def run_processes(world_size: int, overrides: list[str]) -> None:
    context = mp.start_processes(_worker, args=(world_size, _free_port(), overrides), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size}-process run did not finish in {TIMEOUT_S} s")


@pytest.mark.parametrize(
    "parallel, micro_batch_size",
    # DDP with GradCache micro-batches covers plain DDP's path too (its last micro-batch is a DDP step).
    [pytest.param("ddp", 0, marks=pytest.mark.slow), ("ddp", 4), ("fsdp", 4)],
)
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, parallel, micro_batch_size):
    overrides = ["max_steps=4", "checkpoint.every_steps=0", f"micro_batch_size={micro_batch_size}",
                 "optim.grad_clip_norm=0.5", f"dist.parallel={parallel}", CONTEXT]
    one, two = tmp_path / "one", tmp_path / "two"
    with pytest.MonkeyPatch.context() as patch:
        use_memory_data(patch, **CAPTIONS)
        train_module.train(tiny_train_config(one, *overrides, "micro_batch_size=0"))
    run_processes(2, [str(two), *overrides])
    reference = load_model_state(one / "checkpoints" / "step-4")
    distributed = load_model_state(two / "checkpoints" / "step-4")
    initial = CLIP(to_model_config(tiny_train_config(one).model)).state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The comparison has teeth: training moved the weights far more than the tolerance.
    assert (reference["visual.proj"] - initial["visual.proj"]).abs().max() > 1e-3
    # And the gradients themselves: AdamW's update barely changes when a gradient is scaled (say,
    # summed instead of averaged over ranks), but the gradient norm does.
    norms = [[e["train/grad_norm"] for e in read_metrics(run) if "train/grad_norm" in e] for run in (one, two)]
    assert len(norms[0]) == 4
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-4, atol=0)
    computed = [e["train/text_positions_computed"] for run in (one, two) for e in read_metrics(run) if "train/loss" in e]
    assert all(fraction < 0.9 for fraction in computed), computed  # packing did cut


@pytest.mark.slow
def test_fsdp_resumes_exactly_from_its_full_state_dict_checkpoint(tmp_path):
    overrides = ["max_steps=4", "checkpoint.every_steps=0", "dist.parallel=fsdp", CONTEXT]
    run_processes(2, [str(tmp_path / "straight"), *overrides])
    run_processes(2, [str(tmp_path / "resumed"), *overrides, "fault.signal_at_step=2"])
    run_processes(2, [str(tmp_path / "resumed"), *overrides])
    straight = load_model_state(tmp_path / "straight" / "checkpoints" / "step-4")
    resumed = load_model_state(tmp_path / "resumed" / "checkpoints" / "step-4")
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
