"""Import throughput per release format: structures/s and MB/s with 1 and 2 worker processes.

For every format of ``gnnmegatron data import`` a synthetic release is written in that format's
exact on-disk layout (the writers of tests/data/release_writers.py) with the release's typical
structure size (MPtrj ~30 atoms, ANI-1x 15, OC20 72, QM7-X 17, OMat24 20), then imported with
``--workers 1`` and ``--workers 2`` (shards of 1/8 of the input, so both workers have work). Per
run: wall time, structures/s, input MB/s read and store MB/s written, and where the time goes
per structure, summed over workers (``time_split_s`` of the import summary):

- ``read_parse``: the reader (file I/O, decompression, JSON/extxyz/pickle parsing, unit conversion);
- ``validate_append``: the per-frame Python work of the writer (validation incl. the duplicate-atom
  check, copying into shard buffers) -- the per-frame overhead the issue asks to state;
- ``compress_write``: encoding, Blosc/zstd compression, CRC32C and writing the shard files.

The stage times are wall time inside the workers; ``cpu_utilization`` (CPU seconds of the workers /
(wall x workers)) shows how much of the cores they actually got (the 2-core machine is shared with
other jobs: its load average is recorded at the start and the end). Each configuration runs
``--repeats`` times (default 2); the fastest run is kept.

``raw_read_MB_per_s`` is a plain sequential read of the same input files (page cache warm), the
ceiling for "limited by reading". Inputs are written to a temporary folder (``--workdir``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/import_throughput.py`` (~8 min on 2 cores). Writes
benchmarks/results/import_throughput-<machine>.json/.csv/.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "data"))  # the release-format writers
from common import write_results  # noqa: E402
import release_writers as rw  # noqa: E402

from gnnmegatron.data.import_driver import import_dataset  # noqa: E402

ATOMS = {"mptrj": 30, "ani1x": 15, "oc20-extxyz": 72, "oc20-lmdb": 72, "qm7x": 17, "omat24": 20, "ase-extxyz": 30}
ELEMENTS = [1, 6, 8, 13, 26, 29, 47, 78]


def _geometry(rng, n, spacing=2.2):
    """n atoms on a jittered cubic grid (no two closer than ~1.6 Å) in a triclinic-ish cell."""
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    pos = grid * spacing + rng.normal(0, 0.1, (n, 3))
    cell = np.diag([side * spacing] * 3) + np.array([[0, 0, 0], [0.3, 0, 0], [0.2, 0.1, 0]])
    return pos, cell


def make_release(fmt: str, n_structures: int, root: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    n = ATOMS[fmt]
    d = root / fmt
    d.mkdir(parents=True)
    if fmt == "mptrj":
        data = {}
        for k in range(n_structures):
            pos, cell = _geometry(rng, n)
            frac = pos @ np.linalg.inv(cell)
            fr = rw.mptrj_frame(cell, rng.choice(ELEMENTS, n).tolist(), frac, float(rng.normal(-5 * n, 3)),
                                rng.normal(0, 0.5, (n, 3)), rng.normal(0, 10, (3, 3)))
            data.setdefault(f"mp-{k // 10}", {})[f"mp-{k // 10}-0-{k % 10}"] = fr
        return [rw.write_mptrj(d / "MPtrj_2022.9_full.json", data)]
    if fmt == "ani1x":
        groups, per = {}, 50
        for g in range(n_structures // per):
            pos, _ = _geometry(rng, n, 1.4)
            groups[f"C{g}H"] = {"atomic_numbers": rng.choice([1, 6, 7, 8], n),
                                "coordinates": pos[None] + rng.normal(0, 0.05, (per, n, 3)),
                                "wb97x_dz.energy": rng.normal(-300, 5, per), "wb97x_dz.forces": rng.normal(0, 0.02, (per, n, 3))}
        return [rw.write_ani1x(d / "ani1x-release.h5", groups)]
    if fmt == "qm7x":
        mols = {}
        for m in range(n_structures // 25):
            mols[str(m + 1)] = {}
            for c in range(25):
                pos, _ = _geometry(rng, n, 1.4)
                mols[str(m + 1)][f"Geom-m{m + 1}-i1-c1-d{c}"] = {
                    "atNUM": rng.choice([1, 6, 7, 8], n), "atXYZ": pos, "ePBE0+MBD": rng.normal(-1500, 50),
                    "eAT": rng.normal(-80, 5), "ePBE0": rng.normal(-1500, 50), "totFOR": rng.normal(0, 0.5, (n, 3)),
                    "pbe0FOR": rng.normal(0, 0.5, (n, 3))}
        return [rw.write_qm7x(d / "1000.hdf5", mols)]
    frames = []
    for k in range(n_structures):
        pos, cell = _geometry(rng, n)
        frames.append({"numbers": rng.choice(ELEMENTS, n).tolist(), "positions": pos, "cell": cell,
                       "energy": float(rng.normal(-4 * n, 3)), "forces": rng.normal(0, 0.3, (n, 3)),
                       "system_id": f"random{k}", "frame": k % 50, "ref_energy": -4.0 * n})
    if fmt == "oc20-extxyz":
        return [rw.write_oc20_extxyz(d, "0", frames)]
    if fmt == "oc20-lmdb":
        import torch
        recs = [{"pos": torch.tensor(f["positions"], dtype=torch.float32),
                 "cell": torch.tensor(f["cell"], dtype=torch.float32).view(1, 3, 3),
                 "atomic_numbers": torch.tensor(f["numbers"], dtype=torch.float32), "natoms": n,
                 "tags": torch.ones(n, dtype=torch.long), "fixed": torch.zeros(n),
                 "force": torch.tensor(f["forces"], dtype=torch.float32), "y": f["energy"] - f["ref_energy"],
                 "sid": k, "fid": f["frame"]} for k, f in enumerate(frames)]
        return [rw.write_fairchem_lmdb(d / "data.0000.lmdb", rw.pyg_pickles(recs))]
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    atoms = []
    for f in frames:
        a = Atoms(numbers=f["numbers"], positions=f["positions"], cell=f["cell"], pbc=True)
        a.calc = SinglePointCalculator(a, energy=f["energy"], forces=f["forces"], stress=rng.normal(0, 1e-3, 6))
        atoms.append(a)
    if fmt == "omat24":
        return [rw.write_aselmdb(d / "rattled-300.aselmdb", atoms, [{"sid": f"omat-{k}"} for k in range(len(atoms))])]
    import ase.io
    ase.io.write(d / "frames.extxyz", atoms)
    return [d / "frames.extxyz"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _raw_read(files) -> float:
    """Seconds to read the files sequentially in 16 MB blocks (the page cache is warm after the imports)."""
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t0


def run(fmt: str, files, workers: int, work: Path) -> dict:
    size = sum(_dir_bytes(f) if f.is_dir() else f.stat().st_size for f in files)
    kind = {"oc20-extxyz": "oc20", "oc20-lmdb": "oc20", "ase-extxyz": "ase"}.get(fmt, fmt)
    opts = {"energy": "adsorption"} if fmt == "oc20-lmdb" else {}
    if kind == "ase":  # one task per file: split the frames over 8 files for the 2-worker run
        files = _split_ase(files[0], work / "split", 8)
    out = work / f"{fmt}-w{workers}.zarr"
    best = None
    for _ in range(REPEATS):  # best of REPEATS by wall time (the machine is shared)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        s = import_dataset([str(f) for f in files], out, format=kind, workers=workers, progress=False,
                           shard_bytes=max(1, size // 8), shard_structures=max(1, N_CACHE[fmt] // 8), **opts)
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, s)
    wall, s = best
    out_bytes = _dir_bytes(out)
    n = s["num_graphs"]
    split = s["time_split_s"]
    row = {"format": fmt, "workers": workers, "structures": n, "atoms": s["num_atoms"], "shards": s["shards"],
           "input_MB": round(size / 1e6, 2), "output_MB": round(out_bytes / 1e6, 2), "wall_s": round(wall, 3),
           "structures_per_s": round(n / wall, 1), "input_MB_per_s": round(size / wall / 1e6, 2),
           "output_MB_per_s": round(out_bytes / wall / 1e6, 2),
           "read_parse_us": round(split["read_parse"] / n * 1e6, 1),
           "validate_append_us": round(split["validate_append"] / n * 1e6, 1),
           "compress_write_us": round(split["compress_write"] / n * 1e6, 1)}
    timed = split["read_parse"] + split["validate_append"] + split["compress_write"] + split["shard_open"]
    row["accounted_share"] = round(timed / (wall * workers), 3)          # stages timed inside the workers
    row["cpu_utilization"] = round(split["cpu_total"] / (wall * workers), 3)  # < 1: waiting (I/O, other jobs)
    row["cpu_per_structure_us"] = round(split["cpu_total"] / n * 1e6, 1)
    row["raw_read_MB_per_s"] = round(size / _raw_read(files) / 1e6, 1)
    shutil.rmtree(out)
    return row


def _split_ase(path: Path, d: Path, parts: int) -> list[Path]:
    if d.exists():
        return sorted(d.glob("*.extxyz"))
    import ase.io
    frames = ase.io.read(path, ":")
    d.mkdir()
    out = []
    for k in range(parts):
        p = d / f"part{k}.extxyz"
        ase.io.write(p, frames[k::parts])
        out.append(p)
    return out


N_CACHE: dict = {}
REPEATS = 2
LOAD0 = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structures", type=int, default=16000, help="structures per format")
    p.add_argument("--formats", nargs="*", default=list(ATOMS))
    p.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    p.add_argument("--workdir", default=None)
    p.add_argument("--machine", default="cpu2")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (best wall time kept)")
    args = p.parse_args()
    global REPEATS
    REPEATS = args.repeats
    global LOAD0
    LOAD0 = os.getloadavg()[0]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="import_bench_"))
    rows = []
    try:
        for fmt in args.formats:
            t0 = time.perf_counter()
            files = make_release(fmt, args.structures, root)
            N_CACHE[fmt] = args.structures
            print(f"{fmt}: wrote {args.structures} structures in {time.perf_counter() - t0:.1f} s", flush=True)
            for w in args.workers:
                row = run(fmt, files, w, root)
                rows.append(row)
                print(row, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for fmt in args.formats:
        r = {row["workers"]: row for row in rows if row["format"] == fmt}
        s = {f"structures_per_s_w{w}": r[w]["structures_per_s"] for w in r}
        s.update({f"input_MB_per_s_w{w}": r[w]["input_MB_per_s"] for w in r})
        s.update({f"output_MB_per_s_w{w}": r[w]["output_MB_per_s"] for w in r})
        s.update({f"cpu_utilization_w{w}": r[w]["cpu_utilization"] for w in r})
        w1 = r.get(1, next(iter(r.values())))
        s["per_structure_us_w1"] = {k: w1[f"{k}_us"] for k in ("read_parse", "validate_append", "compress_write")}
        s["cpu_per_structure_us_w1"] = w1["cpu_per_structure_us"]
        if 1 in r and 2 in r:
            s["speedup_2_workers"] = round(r[2]["structures_per_s"] / r[1]["structures_per_s"], 2)
        summary[fmt] = s
    va = [row["validate_append_us"] for row in rows if row["workers"] == 1]
    cpu = [row["cpu_per_structure_us"] for row in rows if row["workers"] == 1]
    cw = [row["compress_write_us"] for row in rows if row["workers"] == 1]
    summary["per_frame_python_overhead_us"] = {"validate_append_median": float(np.median(va)),
                                               "validate_append_range": [min(va), max(va)],
                                               "cpu_per_structure_range": [min(cpu), max(cpu)],
                                               "compress_write_range": [min(cw), max(cw)]}
    summary["note"] = ("stage times are wall time inside the workers; cpu_utilization < 1 means the workers "
                       "did not get their cores (other jobs on the shared machine, see the load averages): "
                       "2-worker rows with low utilisation do not measure scaling")

    def plot(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
        fmts = list(args.formats)
        x = np.arange(len(fmts))
        for j, w in enumerate(args.workers):
            vals = [next((r["structures_per_s"] for r in rows if r["format"] == f and r["workers"] == w), 0)
                    for f in fmts]
            a.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=f"{w} worker{'s' if w > 1 else ''}")
        a.set_xticks(x, fmts, rotation=30)
        a.set_ylabel("structures / s")
        a.set_title("import throughput")
        a.legend()
        bottom = np.zeros(len(fmts))
        for key in ("read_parse", "validate_append", "compress_write"):
            vals = np.array([next((r[f"{key}_us"] for r in rows if r["format"] == f and r["workers"] == 1), 0)
                             for f in fmts])
            b.bar(x, vals, 0.6, bottom=bottom, label=key)
            bottom += vals
        b.set_xticks(x, fmts, rotation=30)
        b.set_ylabel("µs per structure (1 worker)")
        b.set_title("where the time goes")
        b.legend()
        fig.tight_layout()
        return fig

    out = write_results("import_throughput", args.machine, rows, summary, plot,
                        extra={"structures_per_format": args.structures, "atoms_per_structure": ATOMS,
                               "repeats": REPEATS, "load_average_1min_at_start": LOAD0})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
