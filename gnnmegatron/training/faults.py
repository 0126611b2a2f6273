"""Failure handling of distributed runs: lost ranks, collective timeouts, non-finite steps.

A lost rank: every rank records a heartbeat (its step and the time) in the rendezvous store
(``torch.distributed``'s default store: the launcher's TCP store under torchrun) at most once a
second. When a collective fails (gloo: the peer's connection closes; NCCL or a hung peer: the
collective timeout, ``train.collective_timeout_s``), each survivor announces itself in the store
and waits a few seconds for the others; the ranks that never announce are the lost ones. The
survivors stop with :class:`RankLost` naming them (with their last heartbeat) instead of hanging;
``gnnmegatron pretrain`` exits with code 3 and ``--resume auto`` continues from the last
checkpoint with the same data order.
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


def describe_failure(heartbeat: Heartbeat, step: int, exc: BaseException, timeout_s: float,
                     wait_s: float = 5.0) -> str:
    """The message of a :class:`RankLost`: which ranks stopped, when, and what to do.

    This rank announces its failure in the store, then waits up to ``wait_s`` for every other
    rank to do the same; those that do not are reported lost, with their last heartbeat.
    """
    here, store = heartbeat.rank, heartbeat.store
    lost: list[int] | None = None
    if store is not None:
        try:
            store.set(f"{heartbeat.prefix}/failed/{here}", str(step))
            deadline = time.time() + wait_s
            while True:
                missing = []
                for r in range(heartbeat.world):
                    try:
                        if not store.check([f"{heartbeat.prefix}/failed/{r}"]):
                            missing.append(r)
                    except Exception:
                        missing.append(r)
                if not missing or time.time() > deadline:
                    break
                time.sleep(0.2)
            lost = missing
        except Exception:
            lost = None
    beats = heartbeat.snapshot() if lost else {}
    now = time.time()
    if lost is None:
        what = "the rendezvous store is unreachable (the launcher or rank 0 died)"
    elif not lost:
        what = "every rank reported the failure (a network error or a timeout, no rank died)"
    else:
        def seen(r):
            b = beats.get(r)
            return f" (last heartbeat at step {b[0]}, {now - b[1]:.0f} s ago)" if b else " (no heartbeat)"
        what = "lost " + ", ".join(f"rank {r}{seen(r)}" for r in lost)
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"rank {here} at step {step}: a collective failed ({type(exc).__name__}: {first}); {what}. "
            f"The job stops (collective timeout {timeout_s:.0f} s); restart it with --resume auto to continue "
            f"from the last checkpoint with the same data order")
