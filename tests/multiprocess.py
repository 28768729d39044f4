"""Run a function on N CPU ranks (gloo) and hand each rank's result back to the test.

    from tests.multiprocess import run_on_ranks

    def _check(seed):                  # module level, so that the workers can import it
        ...                            # torch.distributed is initialised (gloo); RANK etc. are set
        return {"grad": tensor}        # tensors, numbers, strings, lists/tuples/dicts of them

    results = run_on_ranks(_check, world_size=2, args=(0,))   # [rank 0's result, rank 1's result]

Workers are forked from a forkserver that has imported torch once per test session (and
torch._dynamo, which the first activation-checkpointed call would import, 3 s): each worker is a
copy of a process that has computed nothing yet (unlike a fork of the test process), started in a
fraction of a second (a spawned worker re-imports torch: seconds each on a loaded machine). Each
worker gets the test process's current environment variables; what a process reads only at its
start (LD_PRELOAD, MALLOC_* tunables) comes from the forkserver's start instead.

Hygiene learned the hard way (docs/guarantees.md, last section): a fresh free port per run,
GLOO_SOCKET_IFNAME=lo, a 60 s process-group timeout, faulthandler in every worker (a hung
collective prints every thread's stack and exits), a deadline for the whole run, and fail-fast:
the first rank that raises has its traceback re-raised in the test and the other ranks are
killed instead of waiting on a collective that will never complete.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def get_free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    init_process_group: bool = True,
    num_threads: int = 1,
) -> list[Any]:
    """Call `fn(*args)` on `world_size` worker processes (ranks); return their results in rank order.

    With `init_process_group=False` the workers only get the torchrun-style environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), for testing code that initialises the
    process group itself. Raises AssertionError with the failing rank's traceback, or on timeout.
    """
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the forkserver starts (the first call in a session): later calls reuse it.
    context.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo"])
    results = context.Queue()
    port = get_free_port()
    # Workers dump their stacks and exit a little before the deadline, so the dump reaches stderr.
    worker_timeout_s = max(timeout_s - 10.0, timeout_s * 0.8)
    workers = [
        context.Process(
            target=_worker,
            args=(fn, tuple(args), dict(os.environ), rank, world_size, port, worker_timeout_s, init_process_group,
                  num_threads, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    payloads: dict[int, bytes] = {}
    failure: str | None = "interrupted"
    try:
        failure = _collect(results, workers, payloads, deadline=time.monotonic() + timeout_s)
    finally:
        for worker in workers:
            if failure is None:
                worker.join(timeout=10.0)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10.0)
    if failure is not None:
        raise AssertionError(failure)
    return [torch.load(io.BytesIO(payloads[rank]), weights_only=True) for rank in range(world_size)]


def _collect(results, workers, payloads: dict[int, bytes], deadline: float) -> str | None:
    """Fill `payloads` from the queue; return a failure message, or None when every rank reported."""
    world_size = len(workers)
    while len(payloads) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(payloads))
            return f"ranks {missing} gave no result within the deadline (their stacks are in the captured stderr)"
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, w in enumerate(workers) if r not in payloads and w.exitcode is not None]
            if dead:
                # Its last message may still be in flight: one more look before declaring it lost.
                try:
                    rank, ok, payload = results.get(timeout=2.0)
                except queue.Empty:
                    codes = {r: workers[r].exitcode for r in dead}
                    return f"ranks {dead} exited without a result (exit codes {codes}; see the captured stderr)"
            else:
                continue
        if not ok:
            return f"rank {rank} of {world_size} raised:\n{payload}"
        payloads[rank] = payload
    return None


def _worker(fn, args, environ, rank, world_size, port, timeout_s, init_process_group, num_threads, results) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    # Ranks share the machine's cores: one thread each avoids oversubscription.
    torch.set_num_threads(num_threads)
    try:
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(*args)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
