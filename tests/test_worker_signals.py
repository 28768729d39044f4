"""DataLoader workers ignore a SIGTERM from outside and still stop when their loader stops them
(clip/data/worker_signals.py; the trainer-level tests are in tests/test_train_launch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from torch.utils.data import DataLoader, IterableDataset

from clip.data.worker_signals import ignore_outside_sigterm, sigterm_blocked

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers keep torch's behaviour here")


class Counting(IterableDataset):
    def __iter__(self):
        return iter(range(1_000_000))


def start_worker() -> tuple[object, object]:
    loader = DataLoader(Counting(), batch_size=None, num_workers=1, persistent_workers=True, prefetch_factor=1,
                        worker_init_fn=ignore_outside_sigterm)
    with sigterm_blocked():
        batches = iter(loader)
    return batches, batches._workers[0]


def test_a_worker_ignores_sigterm_from_another_process_and_exits_on_its_owners():
    batches, worker = start_worker()
    try:
        assert next(batches) == 0
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # as a scheduler would
        time.sleep(0.5)
        assert worker.is_alive()
        assert [next(batches) for _ in range(3)] == [1, 2, 3]
        # From the loader's own process (multiprocessing's exit handler, torch's shutdown): a clean exit.
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=30)
        assert worker.exitcode == 0
    finally:
        batches._shutdown_workers()


def test_the_trainers_own_sigterm_is_kept_while_workers_start():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with sigterm_blocked():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert received == []
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
