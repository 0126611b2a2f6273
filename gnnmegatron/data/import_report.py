"""Progress bar, per-shard statistics and the end-of-import summary of ``gnnmegatron data import``."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class ShardStats:
    """Counts, label ranges, rejections and the time split of one shard's import."""

    structures: int = 0
    atoms: int = 0
    with_stress: int = 0
    energy_min: float = float("inf")
    energy_max: float = float("-inf")
    energy_per_atom_min: float = float("inf")
    energy_per_atom_max: float = float("-inf")
    force_max: float = 0.0          # largest |F| of any atom (eV/Å)
    rejected: dict = dataclasses.field(default_factory=dict)
    read_s: float = 0.0             # reader: file I/O, decompression, parsing, unit conversion
    process_s: float = 0.0          # validation + appending to the writer's buffers (+ flushes)
    flush_s: float = 0.0            # encoding, compressing, checksumming and writing shard files
    open_s: float = 0.0             # creating the shard store (zarr metadata of its arrays)
    cpu_s: float = 0.0              # CPU time of the process over the whole task (wall minus waiting)
    read_cpu_s: float = 0.0         # the same stages in CPU time of the process (all its threads): what the
    process_cpu_s: float = 0.0      # stages cost on a shared machine, where wall time also counts waiting
    flush_cpu_s: float = 0.0        # for a core
    open_cpu_s: float = 0.0

    def add(self, s: dict) -> None:
        n = len(s["atomic_numbers"])
        e = float(s["energy"])
        self.structures += 1
        self.atoms += n
        self.energy_min, self.energy_max = min(self.energy_min, e), max(self.energy_max, e)
        self.energy_per_atom_min = min(self.energy_per_atom_min, e / n)
        self.energy_per_atom_max = max(self.energy_per_atom_max, e / n)
        f = s.get("forces")
        if f is not None:
            f = np.asarray(f)
            self.force_max = max(self.force_max, float(np.sqrt(np.einsum("ij,ij->i", f, f).max())))
        self.with_stress += s.get("stress") is not None

    def add_block(self, res) -> None:
        """Structures appended by one ``GraphStoreWriter.append_block`` call (all with an energy), as ``add`` each."""
        if not res.counts:
            return
        n = np.concatenate(res.counts)
        if not n.size:
            return
        e = np.concatenate(res.energy)
        epa = e / n
        self.structures += int(n.size)
        self.atoms += int(n.sum())
        self.energy_min, self.energy_max = min(self.energy_min, float(e.min())), max(self.energy_max, float(e.max()))
        self.energy_per_atom_min = min(self.energy_per_atom_min, float(epa.min()))
        self.energy_per_atom_max = max(self.energy_per_atom_max, float(epa.max()))
        self.force_max = max(self.force_max, res.force_max)
        self.with_stress += res.with_stress

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not np.isfinite(v):
                d[k] = None
        return d


class Progress:
    """tqdm bar over the tasks' work (input bytes, structures or files), with structures/s and ETA."""

    def __init__(self, fmt_name: str, tasks: list[dict], done: set, enabled: bool = True):
        from tqdm.auto import tqdm

        self.work = [int(t["work"]) for t in tasks]
        self.got = [w if k in done else 0 for k, w in enumerate(self.work)]
        unit = tasks[0]["unit"] if tasks else "B"
        self.structures = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.bar = tqdm(total=sum(self.work), initial=sum(self.got), unit={"B": "B", "structures": "struct",
                                                                           "files": "file"}[unit],
                        unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                        desc=f"import {fmt_name}", disable=not enabled, smoothing=0.05, dynamic_ncols=True)
        if done:
            self.bar.set_postfix_str(f"resumed: {len(done)} of {len(tasks)} shards already done")

    def update(self, k: int, dwork: int, dstruct: int) -> None:
        dwork = max(0, min(dwork, self.work[k] - self.got[k]))
        self.got[k] += dwork
        self.structures += dstruct
        self.bar.update(dwork)
        now = time.monotonic()
        if now - self.last > 0.5:
            rate = self.structures / max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.structures:,} structures, {rate:,.0f} structures/s", refresh=False)
            self.last = now

    def task_done(self, k: int) -> None:
        self.update(k, self.work[k] - self.got[k], 0)

    def close(self) -> None:
        rate = self.structures / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.structures:,} structures, {rate:,.0f} structures/s", refresh=True)
        self.bar.close()


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def summarize(fmt_name: str, tasks: list[dict], stats: list[dict], shard_attrs: list[dict], sources: list[str],
              elapsed: float, resumed: set, opts, work: Path) -> dict:
    """The end-of-import summary (also stored in the dataset's ``import`` attribute).

    Throughput counts only the shards written by this run (not those kept from an interrupted one).
    """
    def agg(key, fn):
        vals = [s[key] for s in stats if s.get(key) is not None]
        return fn(vals) if vals else None

    rejected: dict = {}
    for s in stats:
        for r, n in (s.get("rejected") or {}).items():
            rejected[r] = rejected.get(r, 0) + n
    elements = sorted({int(z) for a in shard_attrs for z in a.get("elements", [])})
    structures = sum(int(s.get("structures", 0)) for s in stats)
    read_s = sum(s.get("read_s", 0.0) for s in stats)
    process_s = sum(s.get("process_s", 0.0) for s in stats)
    flush_s = sum(s.get("flush_s", 0.0) for s in stats)
    open_s = sum(s.get("open_s", 0.0) for s in stats)
    cpu_s = sum(s.get("cpu_s", 0.0) for s in stats)
    cpu = {k: sum(s.get(f"{k}_cpu_s", 0.0) for s in stats) for k in ("read", "process", "flush", "open")}
    file_work: dict = {}
    for t in tasks:
        file_work[t["file"]] = file_work.get(t["file"], 0) + int(t["work"])
    fresh = [k for k in range(len(tasks)) if k not in resumed]

    def in_bytes(k):
        t = tasks[k]
        if t["unit"] == "B":
            return int(t["work"])
        size = os.path.getsize(t["file"]) if os.path.isfile(t["file"]) else _du(Path(t["file"]))
        return size * int(t["work"]) / max(file_work[t["file"]], 1)

    from gnnmegatron.data.import_driver import shard_name
    fresh_in = sum(in_bytes(k) for k in fresh)
    fresh_out = sum(_du(work / shard_name(k)) for k in fresh)
    fresh_n = sum(int(stats[k].get("structures", 0)) + sum((stats[k].get("rejected") or {}).values())
                  for k in fresh)
    per = 1e6 / max(structures, 1)
    summary = {
        "format": fmt_name, "sources": sources, "energy": opts.energy, "num_graphs": structures,
        "num_atoms": sum(int(s.get("atoms", 0)) for s in stats), "elements": elements,
        "energy_range_eV": [agg("energy_min", min), agg("energy_max", max)],
        "energy_per_atom_range_eV": [agg("energy_per_atom_min", min), agg("energy_per_atom_max", max)],
        "max_force_eV_per_A": agg("force_max", max),
        "with_stress": sum(int(s.get("with_stress", 0)) for s in stats),
        "rejected": {"total": sum(rejected.values()), "by_reason": dict(sorted(rejected.items()))},
        "on_bad": opts.on_bad, "shards": len(tasks), "shards_resumed": len(resumed), "workers": opts.workers,
        "elapsed_s": round(elapsed, 3),
        "input_bytes": int(sum(in_bytes(k) for k in range(len(tasks)))), "output_bytes": _du(work),
        "time_split_s": {"read_parse": round(read_s, 3), "validate_append": round(process_s - flush_s, 3),
                         "compress_write": round(flush_s, 3), "shard_open": round(open_s, 3),
                         "cpu_total": round(cpu_s, 3)},
        "per_structure_us": {"read_parse": round(read_s * per, 1),
                             "validate_append": round((process_s - flush_s) * per, 1),
                             "compress_write": round(flush_s * per, 1)},
        # the same split in CPU seconds of the worker processes (all threads): on a shared machine
        # wall time inside a worker also counts the time it waited for a core
        "time_split_cpu_s": {"read_parse": round(cpu["read"], 3),
                             "validate_append": round(cpu["process"] - cpu["flush"], 3),
                             "compress_write": round(cpu["flush"], 3), "shard_open": round(cpu["open"], 3),
                             "cpu_total": round(cpu_s, 3)},
        "per_structure_cpu_us": {"read_parse": round(cpu["read"] * per, 1),
                                 "validate_append": round((cpu["process"] - cpu["flush"]) * per, 1),
                                 "compress_write": round(cpu["flush"] * per, 1),
                                 "total": round(cpu_s * per, 1)},
    }
    if elapsed > 0:
        summary["structures_per_s"] = round(fresh_n / elapsed, 1)
        summary["input_MB_per_s"] = round(fresh_in / elapsed / 1e6, 3)
        summary["output_MB_per_s"] = round(fresh_out / elapsed / 1e6, 3)
    return summary


def format_summary(s: dict) -> str:
    """A few human-readable lines of a summary (the CLI prints them to stderr)."""
    lines = [f"imported {s['num_graphs']:,} structures ({s['num_atoms']:,} atoms, {len(s['elements'])} elements) "
             f"from --format {s['format']} into {s['path']} in {s['elapsed_s']:.1f} s"
             + (f" ({s['structures_per_s']:,.0f} structures/s, {s['input_MB_per_s']:.1f} MB/s read, "
                f"{s['output_MB_per_s']:.1f} MB/s written" if "structures_per_s" in s else " (")
             + (f"; {s['shards_resumed']} of {s['shards']} shards kept from an interrupted run)"
                if s["shards_resumed"] else ")")]
    e, ea = s["energy_range_eV"], s["energy_per_atom_range_eV"]
    if e[0] is not None:
        lines.append(f"energy ({s['energy']}) {e[0]:.4g} .. {e[1]:.4g} eV ({ea[0]:.4g} .. {ea[1]:.4g} eV/atom); "
                     f"max |force| {s['max_force_eV_per_A'] or 0:.4g} eV/Å; {s['with_stress']:,} with stress")
    r = s["rejected"]
    lines.append(f"rejected {r['total']:,}" + (f" {r['by_reason']} (ids in {s['rejections_log']})" if r["total"] else ""))
    return "\n".join(lines)


__all__ = ["Progress", "ShardStats", "format_summary", "summarize"]
