"""The per-frame reference of the import: one record at a time through the reader, validation and writer.

This is the import as it was before records went to the writer in blocks (each record read by
the reader's ``read_frames``, validated by :func:`gnnmegatron.data.schema.validate_structure` and
appended on its own). :func:`gnnmegatron.data.import_driver.run_task` takes this path when the
environment variable ``GNNMEGATRON_IMPORT_PER_FRAME`` is ``1`` (inherited by worker processes);
the tests compare the two paths' stores, rejection logs and error messages bit for bit, and the
benchmark measures both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gnnmegatron.data.formats import FORMATS
from gnnmegatron.data.formats.base import DataImportError, ImportOptions, InputError, Rejected, RejectedRecordError
from gnnmegatron.data.import_report import ShardStats
from gnnmegatron.data.schema import StructureError
from gnnmegatron.data.writer import GraphStoreWriter


def run_task_per_frame(fmt_name: str, task: dict, k: int, work: Path, opts: ImportOptions, sources: list[str],
                       report=None, stop=None) -> dict:
    """:func:`~gnnmegatron.data.import_driver.run_task` one record at a time (the reference of its block path)."""
    from gnnmegatron.data.import_driver import PRODUCER, REJECTIONS, _Stopped, shard_name

    fmt = FORMATS[fmt_name]
    stats = ShardStats()
    need_forces = fmt.requires_forces(opts)
    rejections: list[dict] = []
    cpu0 = time.process_time()
    t_open = time.perf_counter()
    writer = GraphStoreWriter(work / shard_name(k), producer=f"{PRODUCER} --format {fmt_name}", sources=sources,
                              ids=True)
    stats.open_s = time.perf_counter() - t_open  # creating the shard store's arrays
    stats.open_cpu_s = time.process_time() - cpu0
    src = int(task.get("source", 0))
    last_where, last_done, reported, n_last = None, 0, time.monotonic(), 0
    try:
        it = fmt.read_frames(task, opts)
        perf, cpu = time.perf_counter, time.process_time
        while True:
            t0, c0 = perf(), cpu()
            try:
                rid, where, s, done = next(it)
            except StopIteration:
                break
            except DataImportError:
                raise
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise InputError(task["file"], f"cannot be read ({type(e).__name__}: {msg})",
                                 f"after {last_where}" if last_where else "first record") from None
            t1, c1 = perf(), cpu()
            stats.read_s += t1 - t0
            stats.read_cpu_s += c1 - c0
            last_where = where
            reason = msg = None
            if isinstance(s, Rejected):
                reason, msg = s
            elif s["energy"] is None:
                reason, msg = "missing_energy", f"no energy ({fmt.energies[opts.energy].field})"
            elif need_forces and s["forces"] is None:
                reason, msg = "missing_forces", f"no forces ({fmt.energies[opts.energy].forces_field})"
            else:
                s["id"], s["source"] = rid, src
                try:
                    writer._append_reference((s,))
                    stats.add(s)
                except StructureError as e:
                    reason, msg = e.reason, f"field '{e.field}': {e.detail}"
            if reason is not None:
                if opts.on_bad == "skip" or (reason == "missing_energy" and opts.skip_missing_energy):
                    stats.reject(reason)
                    rejections.append({"id": rid, "where": where, "reason": reason, "message": msg, "shard": k})
                else:
                    raise RejectedRecordError(f"{where}: bad record ({reason}): {msg} (id {rid!r}); import stopped "
                                              "(--on-bad refuse)")
            stats.process_s += perf() - t1
            stats.process_cpu_s += cpu() - c1
            now = time.monotonic()
            if now - reported > 0.25:
                if report is not None:
                    report(k, done - last_done, stats.structures + stats.rejected_total - n_last)
                last_done, n_last, reported = done, stats.structures + stats.rejected_total, now
                if stop is not None and stop.is_set():
                    raise _Stopped()
        t2, c2 = perf(), cpu()
        writer.flush()
        stats.process_s += perf() - t2
        stats.process_cpu_s += cpu() - c2
        stats.flush_s = writer.flush_seconds
        stats.flush_cpu_s = writer.flush_cpu_seconds
        stats.cpu_s = time.process_time() - cpu0
        writer.write_file(REJECTIONS, "".join(json.dumps(r) + "\n" for r in rejections).encode())
        writer.set_attrs(import_task=k, import_stats=stats.to_dict())
        writer.close()  # one metadata write and a rename (not in the stats it writes)
    except BaseException:
        writer.abort()
        raise
    if report is not None:
        report(k, task["work"] - last_done, stats.structures + stats.rejected_total - n_last)
    return stats.to_dict()


__all__ = ["run_task_per_frame"]
