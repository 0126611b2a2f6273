"""Pipeline schedules as per-rank action lists, checked for deadlock by simulation.

A schedule gives every pipeline rank an ordered list of :class:`Action` s
``(sweep, chunk, micro_batch)``. Sweeps and their direction through the virtual stages:

==========  ==========  ===========================================================================
sweep       direction   what a stage does
==========  ==========  ===========================================================================
``F``       forward     receive ``(h, x)``, run its blocks, send ``(h, x)`` (the last stage: heads)
``B``       backward    receive d(loss)/d(outputs), backpropagate, send d(loss)/d(inputs)
``B1``      backward    conservative forces: receive the cotangent of its outputs, return the
                        cotangent of its inputs (``create_graph``) and keep its dE/dx share
``SYNC``    --          all-reduce of the force/stress shares over the pipeline group, then the loss
``B2a``     forward     second order, part 1: differentiate this stage's B1 outputs; send the
                        gradient of the cotangent it received to the next stage
``B2b``     backward    second order, part 2: backpropagate the outputs' gradient through the F graph
==========  ==========  ===========================================================================

The executor (``engine.py``) sends without blocking and blocks only to receive, on one
channel per (direction, sender, receiver), first in first out. So a schedule is safe when
(1) every channel's sender sends in the order its receiver receives, and (2) running every
rank's list with blocking receives cannot stall. :func:`simulate` checks both (unit-time
actions, ``F`` = 1, backward sweeps = 2) and every builder here simulates its result before
returning it; the tests run it over many ``(p, m, v)``.

Builders:

* :func:`gpipe` -- all forwards, then all backwards (``(p-1)/(m+p-1)`` bubble, all micro-batches'
  activations alive at once).
* :func:`one_f_one_b` -- PipeDream-flush/Megatron 1F1B: rank ``s`` runs ``p - s - 1`` warm-up
  forwards, then alternates one forward and one backward; at most ``p - s`` micro-batches alive.
* :func:`interleaved` -- Megatron's interleaved 1F1B with ``v`` chunks per rank: micro-batches
  in groups of ``p``, chunk by chunk; warm-up ``2 (p - s - 1) + (v - 1) p`` (grown where the
  simulation finds a stall, which happens for some ``m`` not divisible by ``p``); bubble
  ``(p-1)/(v m + p - 1)``.
* :func:`conservative_gpipe` -- conservative forces: ``F``, ``B1`` (all micro-batches), ``SYNC``,
  ``B2a``, ``B2b`` (see ``engine.py`` for why the second-order pass needs two sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Action", "Schedule", "ScheduleError", "build_schedule", "conservative_gpipe", "gpipe", "interleaved",
           "one_f_one_b", "replay", "simulate", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")
FORWARD_SWEEPS = ("F", "B2a")
BACKWARD_SWEEPS = ("B", "B1", "B2b")
_COST = {"F": 1, "B": 2, "B1": 2, "B2a": 2, "B2b": 2, "SYNC": 0}


class ScheduleError(RuntimeError):
    """A schedule would deadlock or mis-order a channel (a bug: the builders simulate their output)."""


class Action(NamedTuple):
    """One step of a rank: ``sweep`` on virtual stage ``chunk * p + rank`` for ``micro_batch``."""

    sweep: str
    chunk: int
    micro_batch: int


@dataclass
class Schedule:
    """Per-rank action lists and what the simulation measured.

    Attributes:
        name: builder name.
        p, m, v: pipeline ranks, micro-batches, chunks per rank.
        actions: ``actions[rank]`` -> ordered list of ``Action``.
        makespan: simulated time (unit forward, backward 2) of the whole step.
        bubble: simulated idle fraction, ``1 - busy / (p * makespan)``.
        peak_in_flight: per rank, the most micro-batch chunks whose forward ran and whose
            backward had not (activation memory in units of one chunk's activations).
    """

    name: str
    p: int
    m: int
    v: int
    actions: list[list[Action]]
    makespan: int = 0
    bubble: float = 0.0
    peak_in_flight: list[int] = field(default_factory=list)

    def stage(self, rank: int, chunk: int) -> int:
        """Virtual stage index of ``chunk`` on ``rank``."""
        return chunk * self.p + rank


def _forward_order(m: int, v: int, group: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) in Megatron's interleaved order: groups of ``group`` micro-batches, chunk by chunk."""
    order = []
    for g0 in range(0, m, group):
        mbs = range(g0, min(g0 + group, m))
        for c in range(v):
            order.extend((c, mb) for mb in mbs)
    return order


def _backward_order(m: int, v: int, group: int) -> list[tuple[int, int]]:
    order = []
    for g0 in range(0, m, group):
        mbs = range(g0, min(g0 + group, m))
        for c in reversed(range(v)):
            order.extend((c, mb) for mb in mbs)
    return order


def _interleave(fwd: list[tuple[int, int]], bwd: list[tuple[int, int]], warmup: int) -> list[Action]:
    """``warmup`` forwards, then one forward / one backward, then the remaining backwards."""
    warmup = min(warmup, len(fwd))
    acts = [Action("F", c, mb) for c, mb in fwd[:warmup]]
    f, b = warmup, 0
    while f < len(fwd):
        acts.append(Action("F", *fwd[f]))
        f += 1
        acts.append(Action("B", *bwd[b]))
        b += 1
    acts.extend(Action("B", c, mb) for c, mb in bwd[b:])
    return acts


def gpipe(p: int, m: int, v: int = 1) -> Schedule:
    """All forwards (chunk-major order), then all backwards."""
    _check(p, m, v)
    fwd = _forward_order(m, v, max(m, 1))
    bwd = _backward_order(m, v, max(m, 1))
    acts = [[Action("F", c, mb) for c, mb in fwd] + [Action("B", c, mb) for c, mb in bwd] for _ in range(p)]
    return simulate(Schedule("gpipe", p, m, v, acts))


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (one chunk per rank): ``p - s - 1`` warm-up forwards on rank ``s``."""
    _check(p, m, 1)
    fwd = [(0, mb) for mb in range(m)]
    acts = [_interleave(fwd, list(fwd), p - s - 1) for s in range(p)]
    return simulate(Schedule("1f1b", p, m, 1, acts))


def interleaved(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B with ``v`` chunks per rank (Megatron's order; any ``m`` >= 1)."""
    _check(p, m, v)
    fwd, bwd = _forward_order(m, v, p), _backward_order(m, v, p)
    warm = [2 * (p - s - 1) + (v - 1) * p for s in range(p)]
    for _ in range(p * m * v + 1):
        sched = Schedule("interleaved", p, m, v, [_interleave(fwd, bwd, w) for w in warm])
        stalled = _run(sched)[0]
        if not stalled:
            return simulate(sched)
        for s in stalled:  # a stalled rank waits on a backward whose forward it has not run: warm up more
            warm[s] += 1
    raise ScheduleError(f"no deadlock-free interleaved schedule found for p={p}, m={m}, v={v}")  # pragma: no cover


def conservative_gpipe(p: int, m: int, v: int = 1) -> Schedule:
    """Conservative forces: ``F``, ``B1``, ``SYNC``, ``B2a``, ``B2b`` sweeps over all micro-batches."""
    _check(p, m, v)
    fwd = _forward_order(m, v, max(m, 1))
    bwd = _backward_order(m, v, max(m, 1))
    acts = []
    for _ in range(p):
        a = [Action("F", c, mb) for c, mb in fwd] + [Action("B1", c, mb) for c, mb in bwd]
        a.append(Action("SYNC", -1, -1))
        a += [Action("B2a", c, mb) for c, mb in fwd] + [Action("B2b", c, mb) for c, mb in bwd]
        acts.append(a)
    return simulate(Schedule("conservative-gpipe", p, m, v, acts))


def build_schedule(name: str, p: int, m: int, v: int = 1, *, conservative: bool = False) -> Schedule:
    """The schedule ``name`` (``gpipe``, ``1f1b``, ``interleaved``) for ``p`` ranks and ``m`` micro-batches.

    Conservative forces run :func:`conservative_gpipe` whatever ``name`` asks (its sweeps are
    GPipe-ordered); ``v > 1`` needs ``interleaved`` (or ``gpipe``, which runs chunk-major).
    """
    if conservative:
        return conservative_gpipe(p, m, v)
    if name == "gpipe":
        return gpipe(p, m, v)
    if name == "1f1b":
        if v != 1:
            raise ValueError(f"pp_schedule=1f1b runs one chunk per rank; virtual_stages={v} needs "
                             f"pp_schedule=interleaved")
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    raise ValueError(f"unknown pipeline schedule {name!r}; use one of {list(SCHEDULES)}")


def _check(p: int, m: int, v: int) -> None:
    for name, val in (("p", p), ("m", m), ("v", v)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"pipeline schedule needs {name} >= 1, got {val!r}")


# ------------------------------------------------------------------------------------------ simulation
def _deps(a: Action, stage: int, S: int) -> list[tuple[str, int, int]]:
    """(sweep, virtual stage, micro-batch) that must be done before ``a`` runs on ``stage``."""
    mb = a.micro_batch
    if a.sweep == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    if a.sweep in ("B", "B1"):
        own = [("F", stage, mb)]
        return own + ([(a.sweep, stage + 1, mb)] if stage < S - 1 else [])
    if a.sweep == "B2a":
        return [("SYNC", -1, -1)] + ([("B2a", stage - 1, mb)] if stage > 0 else [])
    if a.sweep == "B2b":
        return [("B2a", stage, mb)] + ([("B2b", stage + 1, mb)] if stage < S - 1 else [])
    return []


def _channel(a: Action, stage: int, S: int, p: int) -> tuple[str, int, int] | None:
    """The channel ``a`` sends on: (direction, from rank, to rank), or None (end of its sweep)."""
    if a.sweep in FORWARD_SWEEPS and stage < S - 1:
        return ("fwd", stage % p, (stage + 1) % p)
    if a.sweep in BACKWARD_SWEEPS and stage > 0:
        return ("bwd", stage % p, (stage - 1) % p)
    return None


def _recv_channel(a: Action, stage: int, S: int, p: int) -> tuple[str, int, int] | None:
    if a.sweep in FORWARD_SWEEPS and stage > 0:
        return ("fwd", (stage - 1) % p, stage % p)
    if a.sweep in BACKWARD_SWEEPS and stage < S - 1:
        return ("bwd", (stage + 1) % p, stage % p)
    return None


def _run(sched: Schedule, durations: list[list[float]] | None = None) -> tuple[list[int], float, list[int], float]:
    """Simulate; returns (stalled ranks or [], makespan, peak in-flight per rank, busy time).

    ``durations[rank][i]``: the time of that rank's i-th action (default: unit forward, backward 2).
    """
    p, S = sched.p, sched.p * sched.v
    done: set[tuple[str, int, int]] = set()
    ptr = [0] * p
    free_at = [0] * p  # time each rank finishes its current action
    finish: dict[tuple[str, int, int], int] = {}
    in_flight = [0] * p
    peak = [0] * p
    busy = 0
    t = 0
    total = sum(len(a) for a in sched.actions)
    executed = 0
    sync_waiting: set[int] = set()
    while executed < total:
        progressed = False
        for r in range(p):
            if ptr[r] >= len(sched.actions[r]) or free_at[r] > t:
                continue
            a = sched.actions[r][ptr[r]]
            if a.sweep == "SYNC":
                sync_waiting.add(r)
                if len(sync_waiting) < p or any(free_at[q] > t for q in range(p)):
                    continue
                for q in range(p):  # a collective: every rank passes it together
                    ptr[q] += 1
                executed += p
                done.add(("SYNC", -1, -1))
                finish[("SYNC", -1, -1)] = t
                progressed = True
                break
            stage = sched.stage(r, a.chunk)
            deps = _deps(a, stage, S)
            if all(d in done and finish[d] <= t for d in deps):
                key = (a.sweep, stage, a.micro_batch)
                cost = _COST[a.sweep] if durations is None else durations[r][ptr[r]]
                free_at[r] = t + cost
                finish[key] = t + cost
                done.add(key)
                busy += cost
                if a.sweep == "F":
                    in_flight[r] += 1
                    peak[r] = max(peak[r], in_flight[r])
                elif a.sweep in ("B", "B2b"):
                    in_flight[r] -= 1
                ptr[r] += 1
                executed += 1
                progressed = True
        if not progressed:
            nxt = [f for f in free_at if f > t] + [v for v in finish.values() if v > t]
            if not nxt:
                stalled = [r for r in range(p) if ptr[r] < len(sched.actions[r])]
                return stalled, t, peak, busy
            t = min(nxt)
    return [], max(free_at + [t]), peak, busy


def replay(sched: Schedule, durations: list[list[float]]) -> dict[str, float]:
    """The schedule run with measured action times and no communication cost.

    ``durations[rank][i]`` is the measured compute time of rank's i-th action (``SYNC`` entries
    are ignored). Returns ``makespan`` and ``bubble`` (``1 - busy / (p * makespan)``): the idle
    fraction the schedule itself implies for these compute times, to compare with the measured
    one (the difference is communication and framework overhead).
    """
    stalled, makespan, _, busy = _run(sched, durations)
    if stalled:
        raise ScheduleError(f"replay of {sched.name} stalls on ranks {stalled}")
    return {"makespan": makespan, "bubble": 1.0 - busy / (sched.p * makespan) if makespan else 0.0}


def simulate(sched: Schedule) -> Schedule:
    """Check a schedule (no stall, every channel in order) and fill in makespan, bubble and peak in-flight.

    Raises:
        ScheduleError: a rank would wait forever, or a channel's sends and receives are in
            different orders (the message received would not be the one expected).
    """
    p, S = sched.p, sched.p * sched.v
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for r, acts in enumerate(sched.actions):
        for a in acts:
            if a.sweep == "SYNC":
                continue
            st = sched.stage(r, a.chunk)
            # a message is named by (sweep, sending virtual stage, micro-batch) on both ends
            ch = _channel(a, st, S, p)
            if ch is not None:
                sends.setdefault(ch, []).append((a.sweep, st, a.micro_batch))
            ch = _recv_channel(a, st, S, p)
            if ch is not None:
                src = st - 1 if a.sweep in FORWARD_SWEEPS else st + 1
                recvs.setdefault(ch, []).append((a.sweep, src, a.micro_batch))
    for ch in set(sends) | set(recvs):
        s, r = sends.get(ch, []), recvs.get(ch, [])
        if s != r:
            raise ScheduleError(f"{sched.name} p={p} m={sched.m} v={sched.v}: channel {ch} sends {s[:6]}... but "
                                f"receives {r[:6]}...")
    stalled, makespan, peak, busy = _run(sched)
    if stalled:
        raise ScheduleError(f"{sched.name} p={p} m={sched.m} v={sched.v} deadlocks: ranks {stalled} wait forever")
    sched.makespan = makespan
    sched.bubble = 1.0 - busy / (p * makespan) if makespan else 0.0
    sched.peak_in_flight = peak
    return sched
