"""The multi-rank harness itself: results in rank order, failures reported fast, hangs bounded."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiprocess import run_on_ranks


def _rank_info() -> dict:
    tensor = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(tensor)
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": tensor,
            "marker": os.environ.get("CLIP_TEST_MARKER")}


def _rank_one_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here for the 60 s process-group timeout


def _rank_one_hangs() -> None:
    if dist.get_rank() == 1:
        time.sleep(600)


def test_results_come_back_in_rank_order(monkeypatch):
    monkeypatch.setenv("CLIP_TEST_MARKER", "from-the-test")  # the test's environment reaches the ranks
    results = run_on_ranks(_rank_info, world_size=3)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world_size"] == 3 and r["sum"].item() == 3.0 for r in results)
    assert all(r["marker"] == "from-the-test" for r in results)


def test_a_failing_rank_fails_the_test_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 raised:.*ValueError: boom on rank 1"):
        run_on_ranks(_rank_one_raises, world_size=2)
    assert time.monotonic() - start < 30


def test_a_hanging_rank_is_stopped_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[1\]"):
        run_on_ranks(_rank_one_hangs, world_size=2, timeout_s=8)
    assert time.monotonic() - start < 20
