"""Run a function on a few gloo processes: the harness of the distributed tests.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, initialises a gloo
process group in each (``file://`` rendezvous in a fresh temporary directory), calls
``fn(*args)`` on every rank and returns the list of return values, rank order. Inside ``fn``,
``torch.distributed`` is initialised; ``dist.get_rank()`` gives the rank.

Processes come from a ``forkserver`` that preloads torch (and, on request, megatron-core), so
a test pays the ~5 s CPU import of megatron-core once per session, not once per rank and call.
Forking straight from the test process is avoided: libgomp's thread pool is not fork-safe.

On success every rank passes a barrier before the process groups are destroyed, so no rank
exits while another is still connecting a subgroup. Failure handling: a rank that raises
writes its traceback to a file and exits non-zero; the parent then stops the other ranks
(they may wait in a collective that will never complete) and raises ``DistributedTestError``
with every failed rank's traceback. A run that exceeds ``timeout`` seconds is stopped the same
way.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["DistributedTestError", "run_distributed"]

# Modules imported once by the forkserver before it forks the ranks.
_PRELOAD = ["torch", "torch.distributed", "gnnmegatron.parallel.collectives"]
_MEGATRON_PRELOAD = ["megatron.core.parallel_state", "megatron.core.tensor_parallel"]
_CTX: Any = None
_CTX_HAS_MEGATRON = False


class DistributedTestError(RuntimeError):
    """One or more ranks failed (or the run timed out); the message holds their tracebacks."""


def _context(preload_megatron: bool):
    """The forkserver context (created once per process; preload fixed at first use)."""
    global _CTX, _CTX_HAS_MEGATRON
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # Megatron-core is preloaded whenever it is installed and the caller may need it: the
        # preload list is fixed once the server starts, and a later run that needs megatron
        # would otherwise import it in every rank.
        mods = list(_PRELOAD)
        if preload_megatron:
            mods += _MEGATRON_PRELOAD
            _CTX_HAS_MEGATRON = True
        _CTX.set_forkserver_preload(mods)
    return _CTX


def _worker(fn, rank: int, world_size: int, init_file: str, result_file: str, timeout: float, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # world_size ranks share the machine's cores
    status: tuple
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            status = ("ok", fn(*args))
            # Every rank waits for the others before tearing down: a rank that finished early
            # and exited would close the sockets of a subgroup whose full mesh a slower rank is
            # still connecting ("Gloo connectFullMesh failed ... Connection closed by peer").
            # Only on success: a rank that raised is reported and the parent stops the rest.
            if dist.is_initialized():
                dist.barrier()
        finally:
            _destroy_everything()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        status = ("err", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        payload = pickle.dumps(status)
    except Exception as exc:  # noqa: BLE001
        payload = pickle.dumps(("err", f"rank {rank}: return value is not picklable: {exc!r}"))
    tmp = result_file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, result_file)
    os._exit(0 if status[0] == "ok" else 1)


def _destroy_everything() -> None:
    """Tear down megatron's groups (if any) and the default group."""
    import sys

    import torch.distributed as dist

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    preload_megatron: bool = True,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` gloo ranks; return their results in rank order.

    Args:
        fn: a picklable (module-level) function. It runs with the default process group
            initialised (gloo); megatron's ``parallel_state`` and the default group are
            destroyed after it returns.
        world_size: number of processes (the tests use 2 and 4).
        *args: picklable arguments passed to ``fn`` on every rank.
        timeout: seconds for the whole run (also the gloo collective timeout).
        preload_megatron: import megatron-core in the forkserver (first call of the session
            decides; costs ~5 s CPU once).

    Raises:
        DistributedTestError: a rank raised, died, or the run timed out. The message holds
            the traceback of every rank that reported one.
    """
    ctx = _context(preload_megatron)
    with tempfile.TemporaryDirectory(prefix="gnnmegatron-dist-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        results = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, init_file, results[r], timeout, args),
                name=f"gnnmegatron-rank{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = timed_out = False
        while True:
            alive = [p for p in procs if p.is_alive()]
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = True
                break
            if not alive:
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            alive[0].join(0.05)
        if failed or timed_out:
            # Give the others a moment to report their own errors, then stop them.
            grace = time.monotonic() + 1.0
            for p in procs:
                p.join(max(0.0, grace - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5.0)
                if p.is_alive():
                    p.kill()
                    p.join()

        outs: list[Any] = []
        errors: list[str] = []
        for r, path in enumerate(results):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    kind, value = pickle.load(f)
                if kind == "ok":
                    outs.append(value)
                else:
                    errors.append(value)
            else:
                outs.append(None)
                code = procs[r].exitcode
                if not timed_out or code not in (None, -15, -9):
                    errors.append(f"rank {r}: exited with code {code} without a result")
        if timed_out:
            errors.insert(0, f"timed out after {timeout:.0f} s (world size {world_size})")
        if errors or failed:
            raise DistributedTestError(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(errors))
        return outs
