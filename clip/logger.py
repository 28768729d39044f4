"""Metrics and console output on rank 0; a no-op on every other rank.

Every metric event goes to `<output_dir>/metrics.jsonl` (one JSON object per line with `step`), and
optionally to wandb. A tracker can never kill or stall training (docs/guarantees.md): it runs in a
background thread behind a bounded queue; an `init` that fails falls back to no tracker, a `log`
that raises is counted and warned about, a `log` that hangs only fills the queue, after which
events are dropped (and counted), and `close` waits a bounded time. The JSONL file is the record.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clip.config import LogConfig

_QUEUE_SIZE = 1000
_CLOSE_TIMEOUT_S = 30.0


def setup_console_logging(is_main: bool) -> None:
    """Library log records (`clip.*`) to stderr on rank 0; warnings and errors only elsewhere."""
    log = logging.getLogger("clip")
    if not any(getattr(handler, "_clip_console", False) for handler in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._clip_console = True
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False


class MetricsLogger:
    """Rank 0's metrics sink: JSONL always, a tracker (wandb) when configured."""

    def __init__(
        self,
        output_dir: str | Path,
        cfg: LogConfig,
        *,
        is_main: bool,
        run_config: dict[str, Any],
        run_id: str,
        tracker_factory: Callable[..., Any] | None = None,
    ):
        self.is_main = is_main
        self.run_id = run_id
        self._file = None
        self._tracker: _TrackerThread | None = None
        if not is_main:
            return
        self._file = open(Path(output_dir) / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb != "disabled":
            factory = tracker_factory or _wandb_factory
            self._tracker = _TrackerThread(
                lambda: factory(mode=cfg.wandb, project=cfg.wandb_project, name=cfg.run_name or None,
                                run_id=run_id, config=run_config, output_dir=str(output_dir))
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one event (a log interval or an eval) at `step`."""
        if not self.is_main:
            return
        record = {"step": step, **{key: _jsonable(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tracker is not None:
            self._tracker.submit(step, metrics)

    def print(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, str)) else value
    # JSON has no NaN/Infinity literals; keep the line parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _TrackerThread:
    """Runs a tracker's init/log/finish off the training thread; failures are warned about, not raised."""

    def __init__(self, make_tracker: Callable[[], Any]):
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self._log = logging.getLogger(__name__)
        self.num_failures = 0
        self.num_dropped = 0
        self._thread = threading.Thread(target=self._run, args=(make_tracker,), name="metrics-tracker", daemon=True)
        self._thread.start()

    def submit(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self._queue.put_nowait((step, dict(metrics)))
        except queue.Full:
            self.num_dropped += 1
            if self.num_dropped == 1 or self.num_dropped % 1000 == 0:
                self._log.warning("tracker is not keeping up (stalled?): %d metric events dropped", self.num_dropped)

    def close(self) -> None:
        try:
            self._queue.put((None, None), timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout=_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            self._log.warning("tracker did not finish within %.0f s; abandoning it", _CLOSE_TIMEOUT_S)

    def _run(self, make_tracker: Callable[[], Any]) -> None:
        try:
            tracker = make_tracker()
        except Exception as error:  # a tracker must never stop training
            self._log.warning("tracker init failed (%s: %s); metrics go to metrics.jsonl only", type(error).__name__, error)
            tracker = None
        while True:
            step, metrics = self._queue.get()
            if step is None:
                break
            if tracker is None:
                continue
            try:
                tracker.log(metrics, step=step)
            except Exception as error:
                self.num_failures += 1
                if self.num_failures == 1 or self.num_failures % 100 == 0:
                    self._log.warning("tracker log failed %d time(s): %s: %s", self.num_failures, type(error).__name__, error)
        if tracker is not None:
            try:
                tracker.finish()
            except Exception as error:
                self._log.warning("tracker finish failed: %s: %s", type(error).__name__, error)


def _wandb_factory(*, mode: str, project: str, name: str | None, run_id: str, config: dict, output_dir: str):
    """A wandb run; resumes the same run id after a restart. `offline` needs no account or network."""
    import wandb

    # WANDB_MODE in the environment (e.g. "disabled" in CI) wins over the config.
    mode = os.environ.get("WANDB_MODE", mode)
    return wandb.init(
        project=project, name=name, id=run_id, resume="allow", config=config, dir=output_dir, mode=mode,
        settings=wandb.Settings(init_timeout=90),
    )
