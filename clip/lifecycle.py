"""How a training process ends: stop requests, the watchdog, exit codes, and injected faults.

- SIGTERM / SIGUSR1 (a scheduler's preemption notice) set a flag; the loop agrees on it across
  ranks at the next step boundary, saves a checkpoint of that step on every rank and exits with
  `EXIT_PREEMPTED`, which schedulers read as "requeue me".
- The watchdog dumps every thread's stack and exits when a step (or a save, or an evaluation)
  takes longer than `dist.watchdog_s`: a hung rank fails the job with the place it hung.
- `Faults` injects the failures the tests need (kills at exact points, NaN losses, OOM, a hung
  rank, a preemption), configured by `fault.*`; all off by default, and then each hook is a compare.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import time
from typing import Any

import torch

from clip.config import FaultConfig

EXIT_CONFIG_ERROR = 2  # a config problem, reported before any side effect
EXIT_DIVERGED = 3  # too many non-finite steps (clip.step.NonFiniteLossError)
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job that stopped on request


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag (no I/O, no collectives in the handler); the loop acts on it at
    the next step boundary, on every rank at the same step. DataLoader workers forked from this
    process inherit the handler but ignore the signal (`os.getpid()` differs); for SIGTERM, torch
    replaces it in workers, and clip.data.worker_signals makes them ignore it again."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._main_pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self._main_pid:
            self.requested = True
            self.signum = signum

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class Watchdog:
    """If the next step (or save, or eval) does not finish within `timeout_s`, dump every thread's
    stack and exit the process (0: off). Re-armed before each unit of work."""

    def __init__(self, timeout_s: int):
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class Faults:
    """The `fault.*` settings of this rank (`fault.rank`: -1 for every rank), as hooks at the points
    the tests need to reach exactly: a wall-clock kill would be flaky."""

    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg = cfg
        self.active = cfg.rank in (-1, rank)

    def before_step(self, step: int) -> None:
        """Inside the step, before its forward: a hung rank (`sleep_at_step`), an OOM (`raise_at_step`)."""
        if not self.active:
            return
        if step == self.cfg.sleep_at_step:
            time.sleep(self.cfg.sleep_s)
        if step == self.cfg.raise_at_step:
            raise torch.OutOfMemoryError("injected by fault.raise_at_step")

    def after_backward(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """After the backward, before the skip verdict: a NaN loss (`nan_at_steps`), a preemption
        notice (`signal_at_step`, agreed at this step's boundary)."""
        if not self.active:
            return loss
        if step in self.cfg.nan_at_steps:
            loss = torch.full_like(loss, math.nan)
        if step == self.cfg.signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    def after_step(self, step: int) -> None:
        """After the step and whatever it logged, evaluated or saved: `kill_at_step`."""
        if self.active and step == self.cfg.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def save_phase(self, step: int) -> str:
        """The checkpoint-protocol point at which this step's save kills the process ('' = none)."""
        return self.cfg.kill_in_save_phase if self.active and step == self.cfg.kill_in_save_at_step else ""
