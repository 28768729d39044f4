"""DataLoader workers that survive a SIGTERM sent to the whole job (preemption: docs/guarantees.md).

torch gives every DataLoader worker a SIGTERM handler (torch/csrc/DataLoader.cpp): a SIGTERM from
the worker's parent makes it exit quietly (that is how the loader and multiprocessing stop workers);
a SIGTERM from anyone else kills it, and the training process then fails with "DataLoader worker
... exited unexpectedly" at whatever point it has reached. Schedulers signal every process of a job
(SLURM's preemption and `scancel` send SIGTERM to the whole job step, workers included), where the
trainer should instead write a checkpoint at the next step boundary and exit 143.

So our workers keep torch's rule for their owner and ignore everyone else. SIGTERM is blocked in
every thread of the worker (workers are started with it blocked and inherit the mask), and one
thread takes each SIGTERM with sigwaitinfo, which names the sender: from the process that started
the worker, the worker exits at once, as with torch's handler; from anyone else it is dropped.
Ignoring SIGTERM outright is not an option: multiprocessing's exit handler terminates daemonic
workers and then joins them without a timeout, so such a worker would hang the trainer's exit.
A worker still exits by itself when its owner dies, even by SIGKILL (torch's workers poll their
parent), so nothing is left behind.

Platforms without sigwaitinfo (macOS, Windows) keep torch's behaviour.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SUPPORTED = hasattr(signal, "sigwaitinfo")


def ignore_outside_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: from now on only a SIGTERM from the loader's process stops this worker."""
    if not _SUPPORTED:
        return
    owner = multiprocessing.parent_process().pid  # the process that created the worker, whatever the start method
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any other thread of the worker exists
    threading.Thread(target=_take_sigterm, args=(owner,), name="sigterm", daemon=True).start()


def _take_sigterm(owner: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == owner:
            os._exit(0)  # what torch's handler does for its parent: a clean exit the loader expects


@contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Start DataLoader workers inside this block: they are born with SIGTERM blocked, so none reaches
    torch's handler before `ignore_outside_sigterm` runs. A SIGTERM for this process waits until the
    block ends (or is taken by another of its threads), so the trainer's stop request is not lost."""
    if not _SUPPORTED:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
