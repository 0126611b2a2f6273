"""Failure handling of distributed runs: lost ranks, collective timeouts, non-finite steps.

A lost rank: every rank records a heartbeat (its step and the time) in the rendezvous store
(``torch.distributed``'s default store: the launcher's TCP store under torchrun) at most once a
second. When a collective fails (gloo: the peer's connection closes; NCCL or a hung peer: the
collective timeout, ``train.collective_timeout_s``), the survivors read the heartbeats and stop
with :class:`RankLost` naming the ranks that stopped first, instead of hanging; ``gnnmegatron
pretrain`` exits with code 3 and ``--resume auto`` continues from the last checkpoint with the
same data order.
"""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

__all__ = ["Heartbeat", "NonFiniteStep", "RankLost", "describe_failure"]


class RankLost(RuntimeError):
    """A collective failed because other ranks died or stopped responding."""


class NonFiniteStep(RuntimeError):
    """The loss or the gradients of a step were not finite (``train.on_nonfinite: stop``)."""


class Heartbeat:
    """Per-rank step and wall-clock time in the default store (rate-limited to one write a second)."""

    def __init__(self, prefix: str = "gnnmegatron/heartbeat", interval_s: float = 1.0):
        self.prefix = prefix
        self.interval_s = interval_s
        self.store = None
        self.rank = 0
        self.world = 1
        self._last = -1e9
        if dist.is_available() and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
                self.rank, self.world = dist.get_rank(), dist.get_world_size()
            except Exception:  # pragma: no cover - a custom process group without a store
                self.store = None

    def beat(self, step: int, force: bool = False) -> None:
        now = time.time()
        if self.store is None or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        try:
            self.store.set(f"{self.prefix}/{self.rank}", f"{step} {now:.3f}")
        except Exception:  # the store itself is gone: the failure report says so
            self.store = None

    def snapshot(self) -> dict[int, tuple[int, float] | None]:
        """``{rank: (step, time) or None}`` of the last beats (None: never beat, or unreadable)."""
        out: dict[int, tuple[int, float] | None] = {}
        if self.store is None:
            return out
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))
        except Exception:
            pass
        for r in range(self.world):
            try:
                step, t = self.store.get(f"{self.prefix}/{r}").decode().split()
                out[r] = (int(step), float(t))
            except Exception:
                out[r] = None
        return out


def describe_failure(heartbeat: Heartbeat, step: int, exc: BaseException, timeout_s: float) -> str:
    """The message of a :class:`RankLost`: which ranks stopped, when, and what to do."""
    beats = heartbeat.snapshot()
    here = heartbeat.rank
    if not beats:
        lost = "the rendezvous store is unreachable (the launcher or rank 0 died)"
    else:
        now = time.time()
        stale = sorted((r for r, b in beats.items() if r != here and (b is None or now - b[1] > 2.5)),
                       key=lambda r: (beats[r] or (-1, 0))[1])
        behind = sorted(r for r, b in beats.items() if b is not None and b[0] < step and r not in stale)
        if stale:
            detail = ", ".join(f"rank {r}" + (f" (last seen at step {beats[r][0]}, {now - beats[r][1]:.0f} s ago)"
                                              if beats[r] else " (never reported)") for r in stale)
            lost = f"lost {detail}"
        elif behind:
            lost = f"ranks {behind} are behind (still at an earlier step)"
        else:
            lost = "no rank's heartbeat is stale; a peer closed its connection"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"rank {here} at step {step}: a collective failed ({type(exc).__name__}: {first}); {lost}. "
            f"The job stops (collective timeout {timeout_s:.0f} s); restart it with --resume auto to continue "
            f"from the last checkpoint with the same data order")
