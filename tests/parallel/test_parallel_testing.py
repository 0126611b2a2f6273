"""run_distributed: return values in rank order, exceptions and timeouts reported."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from gnnmegatron.parallel.testing import DistributedTestError, run_distributed


def _rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank() + offset, t.item()


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever: the harness must stop it


def _sleeps():
    time.sleep(60)


def test_returns_values_in_rank_order():
    assert run_distributed(_rank_and_sum, 2, 10) == [(10, 1.0), (11, 1.0)]


def test_exception_on_one_rank_is_reported_and_others_stopped():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 1: ValueError: boom on rank one"):
        run_distributed(_rank_one_raises, 2, timeout=30)
    assert time.monotonic() - t0 < 15


def test_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out after 2 s"):
        run_distributed(_sleeps, 2, timeout=2)
    assert time.monotonic() - t0 < 12
