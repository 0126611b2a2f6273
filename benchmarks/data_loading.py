"""Random-access batch assembly on one core: Zarr graph store vs an ASE SQLite database.

Both sides hold the same random structures (4..64 atoms, half periodic, energy + forces, stress
on periodic ones). A "batch" is 32 structure dicts plus their concatenated atom arrays.

- zarr (chunk-aware): shuffle storage chunks, shuffle graphs within each chunk, batches of 32
  (what ChunkAwareSampler does); ``GraphStore.get_many`` per batch. A full epoch.
- zarr (random order): uniformly random graphs, for reference (each batch touches ~32 chunks).
- ASE db: uniformly random rows, ``db.get(id=...).toatoms()`` inside ``with db:`` (one held
  connection: ASE's fastest read path), converted to the same structure dicts.

Run: ``OMP_NUM_THREADS=1 python benchmarks/data_loading.py`` (~2 min on 2 cores). Writes
benchmarks/results/data_loading-<machine>.json/.csv/.png. Every timing is the best of
``--repeats`` runs (the machine may be shared; its load average is recorded).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import RESULTS, machine_info, pin_one_core, versions, write_results  # noqa: E402,F401

TARGET_GRAPHS_PER_S = 20_000
TARGET_SPEEDUP = 10.0


def make_structures(num_graphs: int, min_atoms: int = 4, max_atoms: int = 64, seed: int = 0):
    """Random structures: atoms on a jittered grid (no duplicates), half periodic."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_graphs):
        n = int(rng.integers(min_atoms, max_atoms + 1))
        g = int(np.ceil(n ** (1 / 3)))
        spacing = rng.uniform(2.0, 2.8)
        grid = np.stack(np.meshgrid(*[np.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)
        grid = grid[rng.permutation(grid.shape[0])[:n]]
        pos = (grid + rng.uniform(-0.15, 0.15, (n, 3))) * spacing
        periodic = bool(i % 2)
        s = {
            "atomic_numbers": rng.integers(1, 84, n),
            "positions": pos,
            "cell": np.eye(3) * g * spacing if periodic else np.zeros((3, 3)),
            "pbc": np.array([periodic] * 3),
            "energy": float(rng.normal(-3.0 * n, 1.0)),
            "forces": rng.normal(0, 0.5, (n, 3)),
            "stress": rng.normal(0, 0.01, (3, 3)) if periodic else None,
        }
        if periodic:
            s["stress"] = 0.5 * (s["stress"] + s["stress"].T)
        out.append(s)
    return out


def assemble(structs: list[dict]) -> dict:
    """The numpy part of collate: concatenated atom arrays + stacked per-graph arrays."""
    return {
        "atomic_numbers": np.concatenate([s["atomic_numbers"] for s in structs]),
        "positions": np.concatenate([s["positions"] for s in structs]),
        "forces": np.concatenate([s["forces"] for s in structs]),
        "cell": np.stack([s["cell"] for s in structs]),
        "energy": np.array([s["energy"] for s in structs]),
    }


def chunk_aware_order(graph_chunks: np.ndarray, rng) -> np.ndarray:
    """Shuffle chunks, then shuffle graphs within each chunk (ChunkAwareSampler's order)."""
    parts = [rng.permutation(np.arange(graph_chunks[c], graph_chunks[c + 1]))
             for c in rng.permutation(len(graph_chunks) - 1)]
    return np.concatenate(parts)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_zarr(path: Path, structs: list[dict], **kw) -> float:
    from gnnmegatron.data.store import GraphStoreWriter
    t = time.perf_counter()
    with GraphStoreWriter(path, producer="benchmarks/data_loading.py random structures",
                          overwrite=True, **kw) as w:
        for k in range(0, len(structs), 1000):
            w.append(structs[k:k + 1000])
    return time.perf_counter() - t


def time_zarr(path: Path, order: np.ndarray, batch_size: int, cache_chunks: int = 8,
              direct_read: bool = True) -> float:
    """Seconds to assemble all batches of ``order`` from a freshly opened store."""
    from gnnmegatron.data.store import GraphStore
    store = GraphStore(path, cache_chunks=cache_chunks, direct_read=direct_read)
    t = time.perf_counter()
    for k in range(0, len(order), batch_size):
        assemble(store.get_many(order[k:k + batch_size]))
    return time.perf_counter() - t


# ------------------------------------------------------------------ ASE side
def write_asedb(path: Path, structs: list[dict]) -> float:
    import ase
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator
    if path.exists():
        path.unlink()
    t = time.perf_counter()
    db = ase.db.connect(str(path))
    with db:
        for s in structs:
            atoms = ase.Atoms(numbers=s["atomic_numbers"], positions=s["positions"],
                              cell=s["cell"], pbc=s["pbc"])
            st = s["stress"]
            voigt = None if st is None else st[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            atoms.calc = SinglePointCalculator(atoms, energy=s["energy"], forces=s["forces"],
                                               stress=voigt)
            db.write(atoms)
    return time.perf_counter() - t


def asedb_structure(row) -> dict:
    atoms = row.toatoms()
    res = atoms.calc.results
    st = res.get("stress")
    return {
        "atomic_numbers": atoms.numbers, "positions": atoms.positions,
        "cell": atoms.cell.array, "pbc": atoms.pbc, "energy": res.get("energy"),
        "forces": res.get("forces"),
        "stress": None if st is None else st[[0, 5, 4, 5, 1, 3, 4, 3, 2]].reshape(3, 3),
    }


def time_asedb(path: Path, order: np.ndarray, batch_size: int) -> float:
    import ase.db
    db = ase.db.connect(str(path))
    t = time.perf_counter()
    with db:  # one held connection (faster than ASE's default connect-per-call)
        for k in range(0, len(order), batch_size):
            assemble([asedb_structure(db.get(id=int(i) + 1)) for i in order[k:k + batch_size]])
    return time.perf_counter() - t


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", type=int, default=20000)
    p.add_argument("--min-atoms", type=int, default=4)
    p.add_argument("--max-atoms", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--asedb-reads", type=int, default=2000, help="random ASE rows timed per repeat")
    p.add_argument("--random-reads", type=int, default=4000, help="random-order zarr graphs timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machine", default="cpu2")
    p.add_argument("--workdir", default=None, help="where the two databases go (default: a tmp dir)")
    args = p.parse_args(argv)

    cpu = pin_one_core()
    from gnnmegatron.data.store import DEFAULT_ATOMS_PER_CHUNK, GraphStore
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gnm_data_loading_"))
    work.mkdir(parents=True, exist_ok=True)
    zpath, dbpath = work / "bench.zarr", work / "bench.db"
    try:
        structs = make_structures(args.graphs, args.min_atoms, args.max_atoms)
        n_atoms = sum(len(s["atomic_numbers"]) for s in structs)
        print(f"{args.graphs} graphs, {n_atoms} atoms; pinned to CPU {cpu}", flush=True)
        t_zw = write_zarr(zpath, structs)
        t_aw = write_asedb(dbpath, structs)
        print(f"write: zarr {t_zw:.1f} s, ASE db {t_aw:.1f} s", flush=True)
        del structs
        store = GraphStore(zpath)
        graph_chunks = store.graph_chunks
        rng = np.random.default_rng(1)
        res = {"zarr_chunk_aware": [], "zarr_random": [], "asedb_random": []}
        counts = {"zarr_chunk_aware": args.graphs,
                  "zarr_random": min(args.random_reads, args.graphs),
                  "asedb_random": min(args.asedb_reads, args.graphs)}
        for r in range(args.repeats):  # interleaved, so load changes hit every method alike
            res["zarr_chunk_aware"].append(time_zarr(zpath, chunk_aware_order(graph_chunks, rng),
                                                     args.batch_size))
            res["zarr_random"].append(time_zarr(
                zpath, rng.permutation(args.graphs)[:counts["zarr_random"]], args.batch_size))
            res["asedb_random"].append(time_asedb(
                dbpath, rng.permutation(args.graphs)[:counts["asedb_random"]], args.batch_size))
            print(f"repeat {r}: " + ", ".join(f"{k} {counts[k] / v[-1]:,.0f} graphs/s"
                                              for k, v in res.items()), flush=True)
        sizes = {"zarr": dir_bytes(zpath), "asedb": dir_bytes(dbpath)}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for key, times in res.items():
        fmt, order = key.split("_", 1)
        best, med = min(times), float(np.median(times))
        rows.append({
            "method": fmt, "order": order.replace("_", "-"), "graphs_timed": counts[key],
            "batch_size": args.batch_size, "repeats": args.repeats, "best_s": round(best, 4),
            "graphs_per_s": round(counts[key] / best, 1),
            "graphs_per_s_median": round(counts[key] / med, 1),
            "store_bytes": sizes["zarr" if fmt == "zarr" else "asedb"],
            "write_s": round(t_zw if fmt == "zarr" else t_aw, 2),
            "atoms_per_chunk": DEFAULT_ATOMS_PER_CHUNK if fmt == "zarr" else None,
        })
    z, a = rows[0]["graphs_per_s"], rows[2]["graphs_per_s"]
    summary = {
        "graphs_per_s_zarr": z,
        "graphs_per_s_asedb": a,
        "speedup_vs_asedb": round(z / a, 2),
        "graphs_per_s_zarr_random_order": rows[1]["graphs_per_s"],
        "store_bytes_zarr": sizes["zarr"], "store_bytes_asedb": sizes["asedb"],
        "num_graphs": args.graphs, "num_atoms": n_atoms,
        "target_graphs_per_s": TARGET_GRAPHS_PER_S, "target_speedup_vs_asedb": TARGET_SPEEDUP,
        "meets_targets": bool(z >= TARGET_GRAPHS_PER_S and z / a >= TARGET_SPEEDUP),
    }

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["Zarr store\nchunk-aware", "Zarr store\nrandom order", "ASE SQLite db\nrandom"]
        vals = [r["graphs_per_s"] for r in rows]
        bars = ax.bar(labels, vals, color=["tab:blue", "tab:cyan", "tab:gray"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals])
        ax.axhline(TARGET_GRAPHS_PER_S, ls="--", c="k", lw=1, label="target 20k graphs/s")
        ax.set_yscale("log")
        ax.set_ylabel("graphs / s (1 core, batches of %d)" % args.batch_size)
        ax.set_title(f"Random-access batch assembly: {summary['speedup_vs_asedb']}x vs ASE db")
        ax.legend(loc="upper right", fontsize=8)
        return fig

    out = write_results("data_loading", args.machine, rows, summary, plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
