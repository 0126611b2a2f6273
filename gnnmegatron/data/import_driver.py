"""Parallel, streaming, resumable import of a release into a sharded dataset (``gnnmegatron data import``).

The chosen reader (:mod:`gnnmegatron.data.formats`) plans the inputs into *tasks* (a file and a
range of it, about ``shard_bytes`` or ``shard_structures`` each); every task becomes one shard
store, written by one worker process with :class:`~gnnmegatron.data.writer.GraphStoreWriter`
(validated, atomically renamed into place when complete). A manifest in the root group
(:mod:`gnnmegatron.data.manifest`) joins the shards, in task order, into one dataset, so the
result does not depend on the number of workers and reads back as one ``GraphStore``.

Everything is built in ``<out>.partial/`` (``import-plan.json``, finished shards
``shard-00000`` ..., a lock file) and renamed to ``<out>`` at the end. An interrupted import
(Ctrl-C, kill, a refused record, a malformed file) keeps its finished shards; running the same
command again continues with the unfinished tasks (``restart=True`` discards them). Bad records
(NaN, missing labels, degenerate cell, atoms on top of each other, ...) stop the import
(``on_bad="refuse"``) or are skipped and logged with their original ids to
``<out>/rejections.jsonl`` (``on_bad="skip"``).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import queue
import shutil
import socket
import time
import traceback
from pathlib import Path

import numpy as np

from gnnmegatron.data.blocks import block_from_structures
from gnnmegatron.data.formats import FORMATS
from gnnmegatron.data.formats.base import (DataImportError, ImportOptions, InputError, OutputError, ReaderBlock,
                                           Rejected, RejectedRecordError, file_signature)
from gnnmegatron.data.import_report import ShardStats, Progress, summarize
from gnnmegatron.data.manifest import dataset_attrs, write_root
from gnnmegatron.data.schema import STORE_FORMAT
from gnnmegatron.data.writer import GraphStoreWriter, _pid_alive, _read_attrs

PRODUCER = "gnnmegatron data import"
PLAN_VERSION = 1
PLAN_FILE = "import-plan.json"
LOCK_FILE = "import.lock"
REJECTIONS = "rejections.jsonl"


class _Stopped(Exception):
    """Another worker failed; this one stops (its unfinished shard is discarded)."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def import_dataset(inputs, out, options: ImportOptions | None = None, *, overwrite: bool = False,
                   restart: bool = False, progress: bool = True, **option_kwargs) -> dict:
    """Import release files into a sharded dataset at ``out``; returns the summary dict.

    Args:
        inputs: files or folders of the release (see ``--format`` in ``gnnmegatron data import``).
        out: dataset directory to create.
        options: an :class:`ImportOptions`, or give its fields as keyword arguments.
        overwrite: replace an existing dataset at ``out`` (only when the new one is complete).
        restart: discard an interrupted import in ``<out>.partial`` instead of continuing it.
        progress: show a progress bar (work, structures/s, ETA) on stderr.

    Raises:
        InputError: an input is missing, empty, binary, a directory, or malformed (names file and frame).
        RejectedRecordError: a bad record with ``on_bad="refuse"`` (finished shards are kept).
        OutputError: ``out`` exists, is not writable, or ``<out>.partial`` holds another import.
    """
    opts = options if options is not None else ImportOptions(**option_kwargs)
    fmt = FORMATS[opts.format]
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    _check_output(out, overwrite)
    files = fmt.expand_inputs(inputs if isinstance(inputs, (list, tuple)) else [inputs])
    if not files:
        raise InputError(out, "no input files given")
    sources = _source_names(opts, files)
    _prepare_workdir(work)
    with _Lock(work):
        try:
            plan = _load_or_make_plan(fmt, files, opts, sources, work, restart)
        except BaseException:
            if not any(_shard_complete(p) for p in work.glob("shard-*")):
                shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping
            raise
        tasks = plan["tasks"]
        done = {k for k in range(len(tasks)) if _shard_complete(work / shard_name(k))}
        t0 = time.perf_counter()
        bar = Progress(fmt.name, tasks, done, enabled=progress)
        try:
            if opts.workers == 1 or len(tasks) - len(done) <= 1:
                for k in range(len(tasks)):
                    if k not in done:
                        run_task(fmt.name, tasks[k], k, work, opts, sources, bar.update)
                        bar.task_done(k)
            else:
                _run_parallel(fmt.name, tasks, done, work, opts, sources, bar)
        except DataImportError as e:
            bar.close()
            raise _rebuild(type(e).__name__, str(e) + _kept_note(e, work, len(tasks))) from None
        except KeyboardInterrupt:
            bar.close()
            raise DataImportError("interrupted" + _kept_note(None, work, len(tasks))) from None
        bar.close()
        elapsed = time.perf_counter() - t0
        summary = _finish(fmt, plan, work, out, opts, sources, done, elapsed, overwrite)
    return summary


def _kept_note(e, work: Path, n_tasks: int) -> str:
    """What is left after a failed import (and how to go on); drops a work dir without finished shards."""
    kept = sum(_shard_complete(work / shard_name(k)) for k in range(n_tasks))
    if kept == 0:
        shutil.rmtree(work, ignore_errors=True)
        return "; nothing was written" if e is not None else "; nothing was written (no shard had finished)"
    how = ("rerun with --on-bad skip to skip and log such records: the same command continues from there"
           if isinstance(e, RejectedRecordError) else
           "fix or remove the input, then the same command continues from there" if e is not None else
           "run the same command again to continue")
    return f" [{kept} of {n_tasks} shards are finished and kept in {work}; {how}]"


# ---------------------------------------------------------------------------- output and plan
def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out} already exists; pass --overwrite to replace it (it is replaced only once "
                              "the new dataset is complete) or choose another --out")
        attrs = _read_attrs(out)
        if out.is_file() or not attrs or attrs.get("format") != STORE_FORMAT:
            raise OutputError(f"{out} exists and is not a gnnmegatron graph store; refusing to replace it")


def _prepare_workdir(work: Path) -> None:
    """Create ``<out>.partial`` and check it is writable (one clear message instead of a zarr traceback)."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        probe = work / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write the output folder {work.parent} ({e.strerror or e}); choose an --out "
                          "in a writable folder") from None


class _Lock:
    """``<work>/import.lock`` with pid and host; refuses while another live import holds it."""

    def __init__(self, work: Path):
        self.path = work / LOCK_FILE

    def __enter__(self):
        if self.path.exists():
            try:
                info = json.loads(self.path.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("host") == socket.gethostname() and info.get("pid") not in (None, os.getpid()) \
                    and _pid_alive(int(info["pid"])):
                raise OutputError(f"another import (process {info['pid']}) is writing {self.path.parent}; wait "
                                  "for it or stop it first")
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except OSError:
            pass


def _source_names(opts: ImportOptions, files) -> list[str]:
    if opts.format == "ase":
        from gnnmegatron.data.importers import _default_source_names
        names = list(opts.source_names) if opts.source_names else _default_source_names([str(f) for f in files])
        if len(names) != len(files):
            raise DataImportError(f"got {len(names)} source names for {len(files)} input files; give one per file")
    else:
        names = list(opts.source_names) if opts.source_names else [opts.format]
        if len(names) != 1:
            raise DataImportError(f"--format {opts.format} imports one source; got source names {names}")
    if len(set(names)) != len(names):
        raise DataImportError(f"source names must be unique, got {names}")
    return names


def _load_or_make_plan(fmt, files, opts: ImportOptions, sources, work: Path, restart: bool) -> dict:
    fingerprint = json.loads(json.dumps({
        "plan_version": PLAN_VERSION, "options": opts.fingerprint_dict(), "sources": sources,
        "inputs": [file_signature(f) if not str(f).count("://") else [str(f)] for f in files]}))
    path = work / PLAN_FILE
    if path.exists():
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError):
            plan = None
        if plan is not None and plan.get("fingerprint") == fingerprint:
            return plan  # resume: same inputs and options
        if not restart:
            old = (plan or {}).get("fingerprint", {})
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise OutputError(f"{work} holds an interrupted import with other {', '.join(diff) or 'settings'}; run the "
                              "original command to continue it, or pass --restart to discard it")
    if restart or path.exists() or any(work.iterdir()):
        for child in work.iterdir():
            if child.name != LOCK_FILE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    tasks = fmt.plan(files, opts)
    for t in tasks:
        t.setdefault("source", 0)
    units = {t["unit"] for t in tasks}
    if len(units) > 1:
        raise InputError(files[0], f"inputs of different kinds in one import (progress units {sorted(units)})")
    if opts.format == "ase":  # one source per input file
        info = [dict(fmt.source_info(opts, [f]), name=n) for f, n in zip(files, sources)]
    else:
        info = [dict(fmt.source_info(opts, files), name=sources[0])]
    plan = {"fingerprint": fingerprint, "tasks": tasks, "sources": sources, "source_info": info}
    tmp = work / f".{PLAN_FILE}.tmp"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, path)
    return plan


def _shard_complete(path: Path) -> bool:
    return path.is_dir() and bool((_read_attrs(path) or {}).get("complete"))


# ---------------------------------------------------------------------------- one task -> one shard
# Records are validated and appended in blocks of up to BLOCK_STRUCTURES structures (or
# BLOCK_ATOMS atoms): a block costs a fixed ~40 numpy calls (GraphStoreWriter.append_block), so
# per structure the writer's work falls from 30-100 µs (one structure at a time) to a few µs at
# 256 (benchmarks/import_throughput.py); larger blocks gain little and hold more in memory.
BLOCK_STRUCTURES = 256
BLOCK_ATOMS = 1 << 16
PER_FRAME_ENV = "GNNMEGATRON_IMPORT_PER_FRAME"  # "1": the per-frame reference path (import_reference.py)


def run_task(fmt_name: str, task: dict, k: int, work: Path, opts: ImportOptions, sources: list[str],
             report=None, stop=None) -> dict:
    """Read task ``k`` and write shard ``work/shard-k`` (atomically); returns its statistics.

    ``report(k, work_delta, structures_delta)`` is called about 4 times a second; ``stop`` (an
    Event) makes the task give up (its partial shard is discarded). Records go to the writer in
    blocks; rejections, errors and the store are the same as record by record (the reference
    path, taken when the environment variable ``GNNMEGATRON_IMPORT_PER_FRAME`` is ``1``).
    """
    if os.environ.get(PER_FRAME_ENV) == "1":
        from gnnmegatron.data.import_reference import run_task_per_frame
        return run_task_per_frame(fmt_name, task, k, work, opts, sources, report, stop)
    fmt = FORMATS[fmt_name]
    stats = ShardStats()
    need_forces = fmt.requires_forces(opts)
    choice = fmt.energies[opts.energy]
    skip = opts.on_bad == "skip"
    rejections: list[dict] = []
    cpu0 = time.process_time()
    t_open = time.perf_counter()
    writer = GraphStoreWriter(work / shard_name(k), producer=f"{PRODUCER} --format {fmt_name}", sources=sources,
                              ids=True)
    stats.open_s = time.perf_counter() - t_open  # creating the shard store's arrays
    stats.open_cpu_s = time.process_time() - cpu0
    src = int(task.get("source", 0))

    def finish_block(pre: dict, rows: list, make_block, rid_of, where_of) -> None:
        """Validate+append ``rows`` (positions in the run), then log or refuse the bad ones in order.

        ``pre``: position -> (reason, message) found before validation. In refuse mode nothing at
        or after the first refused position is appended, as record by record.
        """
        fatal = None
        if not skip:
            fatal = next((p for p in sorted(pre) if not (pre[p][0] == "missing_energy" and opts.skip_missing_energy)),
                         None)
            if fatal is not None:
                rows = [r for r in rows if r < fatal]
        bad = dict(pre)
        if rows:
            res = writer.append_block(make_block(rows), src, stop_at_error=not skip)
            for r, e in res.errors:
                bad[rows[r]] = (e.reason, f"field '{e.field}': {e.detail}")
            stats.add_block(res)
        for p in sorted(bad):
            reason, msg = bad[p]
            if skip or (reason == "missing_energy" and opts.skip_missing_energy):
                stats.reject(reason)
                rejections.append({"id": rid_of(p), "where": where_of(p), "reason": reason, "message": msg,
                                   "shard": k})
            else:
                raise RejectedRecordError(f"{where_of(p)}: bad record ({reason}): {msg} (id {rid_of(p)!r}); import "
                                          "stopped (--on-bad refuse)")

    def process_items(items: list) -> None:
        pre, rows, structs = {}, [], []
        for p, (rid, _, s, _) in enumerate(items):
            if isinstance(s, Rejected):
                pre[p] = (s.reason, s.message)
            elif s["energy"] is None:
                pre[p] = ("missing_energy", f"no energy ({choice.field})")
            elif need_forces and s["forces"] is None:
                pre[p] = ("missing_forces", f"no forces ({choice.forces_field})")
            else:
                s["id"], s["source"] = rid, src
                rows.append(p)
                structs.append(s)
        # finish_block may keep only a prefix of rows (refuse mode): structs are in the same order
        finish_block(pre, rows, lambda r: block_from_structures(structs[:len(r)]),
                     lambda p: items[p][0], lambda p: items[p][1])

    def process_reader_block(rb: ReaderBlock) -> None:
        blk = rb.block
        B = len(blk)
        pre = {r: (rej.reason, rej.message) for r, rej in rb.rejected.items()}
        ok = np.ones(B, dtype=bool)
        ok[list(rb.rejected)] = False
        for r in np.flatnonzero(ok & ~blk.has_energy).tolist():
            pre[r] = ("missing_energy", f"no energy ({choice.field})")
        ok &= blk.has_energy
        if need_forces:
            for r in np.flatnonzero(ok & ~blk.has_forces).tolist():
                pre[r] = ("missing_forces", f"no forces ({choice.forces_field})")
            ok &= blk.has_forces
        blk.ids = rb.ids
        blk.source = np.full(B, src, dtype=np.int64)
        rows = np.flatnonzero(ok).tolist()
        finish_block(pre, rows, lambda r: blk if len(r) == B else blk.take(r), rb.ids.__getitem__, rb.where)

    last_where, last_done, reported, n_last = None, 0, time.monotonic(), 0
    # Objects alive before the task (modules, torch, zarr: ~10^5) are moved out of the cyclic
    # collector's reach: otherwise its full collections, triggered by the readers' allocations,
    # traverse them all again and again (measured: orjson decoding of an MPtrj frame 46 -> 29 µs with
    # a worker's modules loaded, 97 -> 31 µs with torch loaded too). The task's own objects are
    # collected as usual.
    gc.freeze()
    try:
        it = fmt.read(task, opts)
        perf, cpu = time.perf_counter, time.process_time
        pending: list = []
        pending_atoms = 0
        done = 0
        w_mark, c_mark = perf(), cpu()  # start of the current stretch of reading
        while True:
            item = error = None
            try:
                item = next(it)
            except StopIteration:
                pass
            except DataImportError as e:
                error = e
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                error = InputError(task["file"], f"cannot be read ({type(e).__name__}: {msg})",
                                   f"after {last_where}" if last_where else "first record")
            if item is not None and not isinstance(item, ReaderBlock):
                pending.append(item)
                last_where, done = item[1], item[3]
                z = item[2].get("atomic_numbers") if isinstance(item[2], dict) else None
                pending_atoms += len(z) if hasattr(z, "__len__") else 0
                if len(pending) < BLOCK_STRUCTURES and pending_atoms < BLOCK_ATOMS:
                    continue
            w1, c1 = perf(), cpu()
            stats.read_s += w1 - w_mark
            stats.read_cpu_s += c1 - c_mark
            if pending:  # records read before a block, an error or the end are processed first
                process_items(pending)
                pending, pending_atoms = [], 0
            if item is not None and isinstance(item, ReaderBlock):
                process_reader_block(item)
                if len(item.block):
                    last_where = item.where(len(item.block) - 1)
                done = item.done
            w_mark, c_mark = perf(), cpu()
            stats.process_s += w_mark - w1
            stats.process_cpu_s += c_mark - c1
            if error is not None:
                raise error
            if item is None:
                break
            now = time.monotonic()
            if now - reported > 0.25:
                if report is not None:
                    report(k, done - last_done, stats.structures + stats.rejected_total - n_last)
                last_done, n_last, reported = done, stats.structures + stats.rejected_total, now
                if stop is not None and stop.is_set():
                    raise _Stopped()
        writer.flush()
        stats.process_s += perf() - w_mark
        stats.process_cpu_s += cpu() - c_mark
        stats.flush_s = writer.flush_seconds
        stats.flush_cpu_s = writer.flush_cpu_seconds
        stats.cpu_s = time.process_time() - cpu0
        writer.write_file(REJECTIONS, "".join(json.dumps(r) + "\n" for r in rejections).encode())
        writer.set_attrs(import_task=k, import_stats=stats.to_dict())
        writer.close()  # one metadata write and a rename (not in the stats it writes)
    except BaseException:
        writer.abort()
        raise
    finally:
        gc.unfreeze()
    if report is not None:
        report(k, task["work"] - last_done, stats.structures + stats.rejected_total - n_last)
    return stats.to_dict()


# ---------------------------------------------------------------------------- worker processes
def _worker_main(fmt_name, tasks, work, opts, sources, task_q, result_q, stop) -> None:
    def report(k, dwork, dstruct):
        result_q.put(("progress", k, dwork, dstruct))

    while True:
        k = task_q.get()
        if k is None or stop.is_set():
            return
        try:
            stats = run_task(fmt_name, tasks[k], k, Path(work), opts, sources, report, stop)
        except _Stopped:
            return
        except DataImportError as e:
            result_q.put(("error", k, type(e).__name__, str(e)))
            return
        except KeyboardInterrupt:
            return
        except BaseException as e:  # a bug: hand the traceback to the parent
            result_q.put(("error", k, "DataImportError", f"internal error in shard {k} ({type(e).__name__}: {e})\n"
                                                         + traceback.format_exc()))
            return
        result_q.put(("done", k, stats))


def _run_parallel(fmt_name, tasks, done, work: Path, opts: ImportOptions, sources, bar) -> None:
    ctx = multiprocessing.get_context("spawn")
    task_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    pending = [k for k in range(len(tasks)) if k not in done]
    for k in pending:
        task_q.put(k)
    n = min(opts.workers, len(pending))
    for _ in range(n):
        task_q.put(None)
    procs = [ctx.Process(target=_worker_main, args=(fmt_name, tasks, str(work), opts, sources, task_q, result_q, stop),
                         daemon=True, name=f"gnnmegatron-import-{i}") for i in range(n)]
    with _main_without_missing_file():
        for p in procs:
            p.start()
    error = None
    finished = 0
    try:
        while finished < len(pending) and error is None:
            try:
                msg = result_q.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    error = DataImportError(f"worker process {dead[0].name} died (exit code {dead[0].exitcode}: "
                                            "killed by the system, e.g. out of memory?)")
                elif all(p.exitcode is not None for p in procs) and result_q.empty():
                    error = DataImportError("worker processes exited before finishing all shards")
                continue
            if msg[0] == "progress":
                bar.update(msg[1], msg[2], msg[3])
            elif msg[0] == "done":
                finished += 1
                bar.task_done(msg[1])
            else:
                _, k, cls, text = msg
                error = _rebuild(cls, text)
    except KeyboardInterrupt:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        raise
    stop.set()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
            p.join()
    if error is not None:
        raise error


class _main_without_missing_file:
    """Spawned workers re-run ``__main__`` from its file; one run from stdin (``python - <<EOF``) has none."""

    def __enter__(self):
        import sys
        self.main = sys.modules.get("__main__")
        self.file = getattr(self.main, "__file__", None)
        if self.file is not None and not os.path.exists(self.file):
            del self.main.__file__
        else:
            self.file = None

    def __exit__(self, *exc):
        if self.file is not None:
            self.main.__file__ = self.file


def _rebuild(cls_name: str, text: str) -> DataImportError:
    import gnnmegatron.data.formats.base as base
    cls = getattr(base, cls_name, DataImportError)
    err = cls.__new__(cls)
    RuntimeError.__init__(err, text)
    return err


# ---------------------------------------------------------------------------- manifest and commit
def _finish(fmt, plan, work: Path, out: Path, opts: ImportOptions, sources, resumed, elapsed: float,
            overwrite: bool) -> dict:
    tasks = plan["tasks"]
    entries, shard_attrs, stats = [], [], []
    rej_lines = []
    for k in range(len(tasks)):
        path = work / shard_name(k)
        attrs = _read_attrs(path)
        if not attrs or not attrs.get("complete"):
            raise OutputError(f"shard {path} is missing or incomplete after the import; rerun the command")
        stats.append(attrs.get("import_stats") or {})
        rej = path / REJECTIONS
        if rej.is_file():
            rej_lines.append(rej.read_text())
        if int(attrs["num_graphs"]) > 0:
            entries.append({"path": shard_name(k), "num_graphs": int(attrs["num_graphs"]),
                            "num_atoms": int(attrs["num_atoms"])})
            shard_attrs.append(attrs)
    (work / REJECTIONS).write_text("".join(rej_lines))
    summary = summarize(fmt.name, tasks, stats, shard_attrs, sources, elapsed, set(resumed), opts, work)
    summary["path"] = str(out)
    summary["rejections_log"] = str(out / REJECTIONS)
    attrs = dataset_attrs(entries, shard_attrs, sources, producer=f"{PRODUCER} --format {fmt.name}",
                          source_info=plan["source_info"],
                          extra={"import": {"format": fmt.name, "options": opts.fingerprint_dict(),
                                            "summary": summary}})
    write_root(work, attrs)
    (work / PLAN_FILE).unlink(missing_ok=True)
    (work / LOCK_FILE).unlink(missing_ok=True)
    if out.exists():
        _check_output(out, overwrite)
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, out)
    return summary


__all__ = ["PRODUCER", "import_dataset", "run_task", "shard_name"]
