"""Choose the graph store's atoms_per_chunk: random-access graphs/s and size per chunk size.

Timings are best-of-N (the 2-core machine is shared; its load average is recorded).

One synthetic dataset (default 20k random structures of 4..64 atoms, as in data_loading.py) is
written once per ``atoms_per_chunk``; shards hold 2^19 atoms for every setting, so only the
inner chunk changes. For each store, on one pinned core, best of ``--repeats``:

- chunk-aware epoch (shuffle chunks, then graphs within a chunk; batches of 32) through the
  direct shard reader (the default) and through zarr's own read path (``direct_read=False``);
- uniformly random batches of 32 (no chunk locality), direct reader;
- store size on disk and the memory of one decoded cached chunk.

Run: ``OMP_NUM_THREADS=1 python benchmarks/store_chunks.py`` (~1-2 min on 2 cores). Writes
benchmarks/results/store_chunks-<machine>.json/.csv/.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gnnmegatron.data.store import SHARD_ATOMS  # noqa: E402
from data_loading import (chunk_aware_order, dir_bytes, make_structures, pin_one_core,  # noqa: E402
                          time_zarr, write_results, write_zarr)

BYTES_PER_CACHED_ATOM = 8 + 24 + 24  # int64 Z, float64 positions, float64 forces


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", type=int, default=20000)
    p.add_argument("--min-atoms", type=int, default=4)
    p.add_argument("--max-atoms", type=int, default=64)
    p.add_argument("--atoms-per-chunk", type=int, nargs="+",
                   default=[1024, 2048, 4096, 8192, 16384, 65536])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--random-reads", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=9, help="chunk-aware epochs (direct reader)")
    p.add_argument("--slow-repeats", type=int, default=2, help="zarr-path and random-order runs")
    p.add_argument("--choose-within", type=float, default=0.9,
                   help="pick the smallest chunk within this fraction of the best chunk-aware rate")
    p.add_argument("--machine", default="cpu2")
    args = p.parse_args(argv)

    cpu = pin_one_core()
    from gnnmegatron.data.store import DEFAULT_ATOMS_PER_CHUNK, GraphStore
    structs = make_structures(args.graphs, args.min_atoms, args.max_atoms)
    n_atoms = sum(len(s["atomic_numbers"]) for s in structs)
    print(f"{args.graphs} graphs, {n_atoms} atoms ({n_atoms / args.graphs:.1f}/graph); CPU {cpu}")
    work = Path(tempfile.mkdtemp(prefix="gnm_store_chunks_"))
    rows = []
    try:
        stores = {}
        for apc in args.atoms_per_chunk:
            path = work / f"apc{apc}.zarr"
            t_write = write_zarr(path, structs, atoms_per_chunk=apc,
                                 chunks_per_shard=max(1, SHARD_ATOMS // apc))
            stores[apc] = (path, GraphStore(path).graph_chunks, t_write)
        del structs
        t = {apc: {"aware": [], "aware_zarr": [], "random": []} for apc in stores}
        n_rand = min(args.random_reads, args.graphs)
        rng = np.random.default_rng(0)
        # Round-robin over chunk sizes, so load from other processes hits every size alike.
        for r in range(max(args.repeats, args.slow_repeats)):
            for apc, (path, gc, _) in stores.items():
                if r < args.repeats:
                    t[apc]["aware"].append(time_zarr(path, chunk_aware_order(gc, rng),
                                                     args.batch_size))
                if r < args.slow_repeats:
                    t[apc]["aware_zarr"].append(time_zarr(path, chunk_aware_order(gc, rng),
                                                          args.batch_size, direct_read=False))
                    t[apc]["random"].append(time_zarr(path, rng.permutation(args.graphs)[:n_rand],
                                                      args.batch_size))
            print(f"repeat {r}: " + ", ".join(f"{apc}: {args.graphs / t[apc]['aware'][-1]:,.0f}"
                                              for apc in stores if r < args.repeats), flush=True)
        for apc, (path, gc, t_write) in stores.items():
            ta = t[apc]
            row = {
                "atoms_per_chunk": apc, "chunks_per_shard": max(1, SHARD_ATOMS // apc),
                "num_chunks": len(gc) - 1,
                "graphs_per_chunk_mean": round(args.graphs / (len(gc) - 1), 1),
                "graphs_per_s_chunk_aware": round(args.graphs / min(ta["aware"]), 1),
                "graphs_per_s_chunk_aware_median": round(args.graphs / np.median(ta["aware"]), 1),
                "graphs_per_s_chunk_aware_zarr_path": round(args.graphs / min(ta["aware_zarr"]), 1),
                "graphs_per_s_random_order": round(n_rand / min(ta["random"]), 1),
                "store_bytes": dir_bytes(path),
                "cached_chunk_bytes": apc * BYTES_PER_CACHED_ATOM,
                "write_s": round(t_write, 2), "repeats": args.repeats,
                "slow_repeats": args.slow_repeats,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = max(r["graphs_per_s_chunk_aware"] for r in rows)
    chosen = min((r for r in rows if r["graphs_per_s_chunk_aware"] >= args.choose_within * best),
                 key=lambda r: r["atoms_per_chunk"])
    default = next((r for r in rows if r["atoms_per_chunk"] == DEFAULT_ATOMS_PER_CHUNK), None)
    summary = {
        "chosen_atoms_per_chunk": chosen["atoms_per_chunk"],
        "rule": f"smallest atoms_per_chunk within {args.choose_within:.0%} of the best chunk-aware rate",
        "graphs_per_s_chosen": chosen["graphs_per_s_chunk_aware"],
        "graphs_per_s_best": best,
        "default_atoms_per_chunk": DEFAULT_ATOMS_PER_CHUNK,
        "graphs_per_s_default": default and default["graphs_per_s_chunk_aware"],
        "graphs_per_s_random_order_default": default and default["graphs_per_s_random_order"],
        "store_bytes_default": default and default["store_bytes"],
        "num_graphs": args.graphs, "num_atoms": n_atoms,
    }

    def plot(plt):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        x = [r["atoms_per_chunk"] for r in rows]
        for key, label in (("graphs_per_s_chunk_aware", "chunk-aware, direct reader"),
                           ("graphs_per_s_chunk_aware_zarr_path", "chunk-aware, zarr read path"),
                           ("graphs_per_s_random_order", "random order, direct reader")):
            ax1.plot(x, [r[key] for r in rows], "o-", label=label)
        ax1.axvline(chosen["atoms_per_chunk"], c="k", ls="--", lw=1, label="chosen")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xlabel("atoms_per_chunk")
        ax1.set_ylabel("graphs / s (1 core, batches of %d)" % args.batch_size)
        ax1.legend(fontsize=7)
        ax2.plot(x, [r["store_bytes"] / 2**20 for r in rows], "o-", label="store size (MiB)")
        ax2.plot(x, [r["cached_chunk_bytes"] / 2**20 for r in rows], "s-", label="one cached chunk (MiB)")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("atoms_per_chunk")
        ax2.legend(fontsize=7)
        fig.suptitle(f"Graph store chunk size ({args.graphs} graphs, {n_atoms} atoms)")
        return fig

    out = write_results("store_chunks", args.machine, rows, summary, plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
