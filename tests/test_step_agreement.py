"""How the ranks agree at each step boundary (preemption, uneven data, non-finite steps), on 2 gloo ranks.

Host flags: every rank has its next batch (else all start the next epoch), some rank must stop.
Step outcome: a non-finite loss or gradient norm on any rank skips the update on every rank, decided
on the device; the host's report names the rank.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from clip.config import DistConfig
from clip.distributed import (
    HostFlags,
    destroy_distributed,
    exchange_host_flags,
    init_distributed,
    read_launch_env,
)
from clip.step import StepOutcome
from tests.multiprocess import run_on_ranks


def _flags(per_rank: list[tuple[bool, bool]]) -> list[tuple[bool, bool]]:
    has_batch, stop = per_rank[dist.get_rank()]
    flags = [exchange_host_flags(has_batch, stop) for _ in range(2)]  # the host group is reused
    assert flags[0] == flags[1]
    return [flags[0].has_batch, flags[0].stop]


def test_host_flags_need_a_batch_on_every_rank_and_a_stop_on_any():
    assert run_on_ranks(_flags, 2, args=([(True, False), (True, False)],)) == [[True, False]] * 2
    assert run_on_ranks(_flags, 2, args=([(True, False), (False, True)],)) == [[False, True]] * 2
    assert run_on_ranks(_flags, 2, args=([(False, True), (True, False)],)) == [[False, True]] * 2


def _outcome(losses: list[float], grad_norms: list[float]) -> dict:
    rank = dist.get_rank()
    outcome = StepOutcome(torch.tensor(losses[rank]), torch.tensor(grad_norms[rank]))
    report = outcome.report()
    return {"skip": outcome.skip, "finite": report.finite, "ranks": list(report.nonfinite_ranks),
            "losses": list(report.losses), "grad_norm": report.grad_norm}


def test_a_non_finite_value_on_one_rank_skips_the_step_on_every_rank_and_is_named():
    finite = run_on_ranks(_outcome, 2, args=([1.5, 2.5], [0.25, 0.25]))
    nan_loss = run_on_ranks(_outcome, 2, args=([1.5, math.nan], [0.25, 0.25]))
    inf_norm = run_on_ranks(_outcome, 2, args=([1.5, 2.5], [math.inf, 0.25]))
    assert finite[0] == finite[1] == {"skip": torch.tensor(0.0), "finite": True, "ranks": [], "losses": [1.5, 2.5],
                                      "grad_norm": 0.25}  # fmt: skip
    for result in nan_loss:
        assert result["skip"] == torch.tensor(1.0) and not result["finite"] and result["ranks"] == [1]
        assert result["losses"][0] == 1.5 and math.isnan(result["losses"][1])
    for result in inf_norm:
        assert result["skip"] == torch.tensor(1.0) and result["ranks"] == [0] and result["grad_norm"] == math.inf


def test_one_process_needs_no_process_group():
    assert exchange_host_flags(False, True) == HostFlags(has_batch=False, stop=True)
    assert exchange_host_flags(True, False) == HostFlags(has_batch=True, stop=False)
    outcome = StepOutcome(torch.tensor(math.nan), torch.tensor(1.0))
    assert outcome.skip.dtype == torch.float32 and outcome.skip.item() == 1.0
    assert outcome.report().nonfinite_ranks == (0,)


def _wait_for_a_late_rank(timeout_s: int, late_by_s: float) -> str:
    init_distributed(DistConfig(timeout_s=timeout_s), read_launch_env(), torch.device("cpu"))
    try:
        if dist.get_rank() == 1:
            time.sleep(late_by_s)  # e.g. stuck reading its next batch
            return "late"
        start = time.monotonic()
        try:
            exchange_host_flags(True, False)
        except RuntimeError as error:
            return f"gave up after {time.monotonic() - start:.0f} s: {type(error).__name__}"
        return "did not time out"
    finally:
        destroy_distributed()


def test_the_host_flag_exchange_times_out_after_dist_timeout_s():
    # new_group's own default would be gloo's 30 minutes, not the job's timeout.
    waited = run_on_ranks(_wait_for_a_late_rank, 2, args=(2, 8.0), init_process_group=False)[0]
    assert waited.startswith("gave up after") and int(waited.split()[3]) < 6, waited
