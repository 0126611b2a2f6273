"""The block path of the import against the per-frame reference: same stores bit for bit, same rejections, same errors.

The block path validates structures a block at a time (gnnmegatron/data/blocks.py) and lets readers
decode runs of records together (extxyz atom lines by np.loadtxt, ANI-1x conformer arrays); the
reference validates and reads one structure at a time (GraphStoreWriter._append_reference,
import_reference.run_task_per_frame, the readers' read_frames). Inputs are awkward on purpose.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import zarr
from ase.calculators.singlepoint import SinglePointCalculator
from release_writers import SYMBOLS, mptrj_frame, oc20_frame_text, write_ani1x, write_aselmdb, write_mptrj

from gnnmegatron.data.blocks import block_from_structures, screen_block
from gnnmegatron.data.formats import DataImportError, extxyz
from gnnmegatron.data.import_driver import PER_FRAME_ENV, import_dataset
from gnnmegatron.data.schema import ARRAYS, StructureError, _close_pair, _periodic_basis
from gnnmegatron.data.writer import GraphStoreWriter

SMALL = dict(atoms_per_chunk=16, graphs_per_chunk=4, chunks_per_shard=2)
TWO = np.array([[0.0, 0, 0], [1, 0, 0]])


# ---------------------------------------------------------------------------- writer: block vs one by one
def _cells(rng):
    tri = np.array([[5.0, 0, 0], [2.5, 4.3, 0], [1.0, 1.0, 4.0]])
    skew = np.array([[4.0, 0, 0], [3.9, 0.6, 0], [0.2, 0.3, 5.0]])  # a very acute angle
    return [(np.eye(3) * 6.0, [True] * 3), (tri, [True] * 3), (skew, [True] * 3),
            (np.eye(3) * 6.0, [True, True, False]), (tri, [False, True, False]), (np.zeros((3, 3)), [False] * 3),
            (tri + rng.normal(0, 0.2, (3, 3)), [True] * 3)]


def _awkward_structures(seed: int = 0) -> list:
    """Valid and invalid structures of every kind validate_structure distinguishes, in a mixed order."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(60):
        cell, pbc = _cells(rng)[k % 7]
        n = int(rng.integers(1, 12))
        frac = rng.uniform(-0.2, 1.2, (n, 3))  # atoms outside the cell too
        pos = frac @ (cell if cell.any() else np.eye(3) * 6.0)
        s = {"atomic_numbers": rng.integers(1, 90, n), "positions": pos, "cell": cell, "pbc": np.array(pbc),
             "energy": float(rng.normal()), "forces": rng.normal(size=(n, 3)),
             "stress": rng.normal(size=(3, 3)) if k % 3 == 0 else (rng.normal(size=6) if k % 3 == 1 else None),
             "id": f"s{k}"}
        if n > 1 and k % 4 == 0:  # a pair close to the threshold, possibly through a periodic face
            lattice = cell if cell.any() else np.zeros((3, 3))
            shift = lattice[np.flatnonzero(pbc)[0]] if np.any(pbc) and cell.any() else 0.0
            d = [0.05, 0.1 - 1e-9, 0.1 + 1e-9, 0.3][(k // 4) % 4]
            u = rng.normal(size=3)
            s["positions"][1] = s["positions"][0] + shift + d * u / np.linalg.norm(u)
        out.append(s)
    nan = float("nan")
    out += [
        {"atomic_numbers": np.array([8]), "positions": np.array([[0.0, 0, 0]])},      # one atom, no labels
        {"atomic_numbers": [1, 1], "positions": [[0, 0, 0], [0.7, 0, 0]], "energy": 1, "pbc": True,  # lists, int energy
         "cell": (np.eye(3) * 5).tolist()},
        {"atomic_numbers": np.array([1.0, 6.0]), "positions": np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]]},  # float Z
        {"atomic_numbers": np.array([1, 6], np.uint8), "positions": np.array([[0, 0, 0], [1, 0, 0]], np.float32),
         "forces": np.ones((2, 3), np.float32), "energy": 2.0},                                     # narrow dtypes
        {"atomic_numbers": np.array([1, 200]), "positions": np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]]},  # Z > 118
        {"atomic_numbers": np.array([0]), "positions": np.zeros((1, 3))},                                # Z = 0
        {"atomic_numbers": np.zeros(0, int), "positions": np.zeros((0, 3))},                             # empty
        {"atomic_numbers": np.array([1, 1]), "positions": np.array([[0, 0, nan], [1, 0, 0]])},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "energy": nan},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "forces": np.ones((3, 3))},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO,
         "stress": np.array([1, 2, 3, 4, 5, nan])},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "cell": np.diag([5, 5, 0.15]),
         "pbc": np.array([True] * 3)},                                                                # height < 0.2 Å
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "cell": np.diag([5, 5, 0.2]),
         "pbc": np.array([True] * 3)},                                                                # height = 0.2 Å
        {"atomic_numbers": np.array([1, 1]), "positions": TWO,
         "cell": np.array([[1e9, 0, 0], [0, 1, 0], [0, 0, 1]]),
         "pbc": np.array([True, True, False])},                                                       # 2-row svd limit
        {"atomic_numbers": np.array([1, 1]), "positions": np.array([[1e6, 0, 0], [1e6 + 0.09, 0, 0]])},  # far away
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "source": 5},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "source": -1},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "source": True},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "source": 1, "id": 7},
        {"atomic_numbers": np.array([1, 1]), "positions": TWO, "force": 1},  # unknown key
        {"atomic_numbers": np.array([[1, 1]]), "positions": np.zeros((2, 3))},                          # Z not [n]
        {"atomic_numbers": np.array([1, 1]), "positions": TWO[::1, :],
         "cell": np.asfortranarray(np.eye(3) * 4), "pbc": np.array([1, 1, 1])},                        # int pbc
        ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], cell=np.eye(3) * 5, pbc=True),
    ]
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.6
    big = {"atomic_numbers": np.full(216, 6), "positions": grid + rng.normal(0, 0.05, grid.shape),
           "cell": np.eye(3) * 9.6, "pbc": np.array([True] * 3), "energy": -1.0}
    out += [big, dict(big, positions=np.vstack([big["positions"][:-1], big["positions"][:1] + [9.6 - 0.03, 0, 0]]))]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _copy(s):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} if isinstance(s, dict) else s


def _error(e: StructureError):
    return (e.index, e.field, e.reason, str(e))


def _read_store(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    out = {name: g[name][:] for name in list(ARRAYS) + ["ids"] if name in g}
    out["attrs"] = {k: g.attrs[k] for k in ("num_graphs", "num_atoms", "elements", "counts", "has_stress")}
    return out


def _assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if k == "attrs":
            assert a[k] == b[k]
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k, strict=True)


def test_block_validation_equals_one_by_one(tmp_path):
    structs = _awkward_structures()
    ref_errors = []
    with GraphStoreWriter(tmp_path / "ref.zarr", producer="t", sources=["a", "b"], ids=True, **SMALL) as w:
        for s in structs:
            try:
                w._append_reference([_copy(s)])
            except StructureError as e:
                ref_errors.append(_error(e))
    with GraphStoreWriter(tmp_path / "blk.zarr", producer="t", sources=["a", "b"], ids=True, **SMALL) as w:
        res = w.append_block(block_from_structures([_copy(s) for s in structs]), stop_at_error=False)
    assert [_error(e) for _, e in res.errors] == ref_errors
    assert len(ref_errors) > 15 and {e[2] for e in ref_errors} >= {"nan", "overlapping_atoms", "degenerate_cell",
                                                                    "unknown_element", "shape", "empty"}
    _assert_same_arrays(_read_store(tmp_path / "blk.zarr"), _read_store(tmp_path / "ref.zarr"))


def test_append_stops_at_the_first_error_like_one_by_one(tmp_path):
    structs = _awkward_structures(seed=1)
    for path, fn in ((tmp_path / "ref.zarr", "_append_reference"), (tmp_path / "blk.zarr", "append")):
        w = GraphStoreWriter(path, producer="t", ids=True, **SMALL)
        with pytest.raises(StructureError) as info:
            getattr(w, fn)([_copy(s) for s in structs])
        w.flush()
        got = (_error(info.value), w.num_graphs, w.num_atoms, w._ids.written)
        if fn == "_append_reference":
            want = got
        w.abort()
    assert got == want and want[1] > 0


@pytest.mark.parametrize("seed", range(4))
def test_screen_flags_every_structure_with_a_close_pair(seed):
    """No false negatives: every structure the reference finds a pair in (minimum image) is sent to it."""
    rng = np.random.default_rng(seed)
    structs, truth = [], []
    for k in range(300):
        cell, pbc = _cells(rng)[k % 7]
        n = int(rng.integers(2, 30))
        base = cell if cell.any() else np.eye(3) * 8.0
        pos = rng.uniform(-0.5, 1.5, (n, 3)) @ base
        if k % 2:  # put atom j near an image of atom i at a distance around the threshold
            i, j = rng.choice(n, 2, replace=False)
            m = rng.integers(-1, 2, 3) * np.asarray(pbc) * bool(cell.any())
            u = rng.normal(size=3)
            pos[j] = pos[i] + m @ cell + rng.choice([0.02, 0.0999999, 0.10001, 0.15]) * u / np.linalg.norm(u)
        s = {"atomic_numbers": np.ones(n, int), "positions": pos, "cell": cell, "pbc": np.array(pbc)}
        structs.append(s)
        pb = _periodic_basis(cell, np.array(pbc)) if any(pbc) else None
        degenerate = pb is not None and pb[2].min() < 0.2
        truth.append(degenerate or _close_pair(pos, pb, 0.1) is not None)
    suspect = screen_block(block_from_structures(structs))
    truth = np.array(truth)
    assert truth.sum() > 50
    assert not (truth & ~suspect).any(), np.flatnonzero(truth & ~suspect)
    assert (suspect & ~truth).sum() <= 0.05 * len(structs)  # few false alarms (they cost a reference check)


# ---------------------------------------------------------------------------- extxyz: blocks vs frames
def _frame(numbers, pos, energy, props="species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3", cell=None, extra=""):
    cell = np.diag([12.0, 12.0, 20.0]) if cell is None else cell
    lat = " ".join(f"{x:.8f}" for x in np.asarray(cell).reshape(-1))
    cols = props.split(":")[1::3]
    lines = [str(len(numbers)), f'Lattice="{lat}" Properties={props} energy={energy} pbc="T T T"{extra}']
    for z, p in zip(numbers, pos):
        row = [SYMBOLS[z], *(f"{x:.10f}" for x in p)]
        if "L" in cols:
            row += ["T", "1"]
        if props.endswith("forces:R:3"):
            row += ["0.125", "-0.25", "1e-3"]
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"


def _awkward_extxyz(rng, n_frames=40) -> list[str]:
    frames = []
    for k in range(n_frames):
        n = int(rng.integers(1, 9))
        grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
        pos = grid[:n] * 2.0 + rng.normal(0, .1, (n, 3))
        z = rng.choice([1, 6, 8, 29, 78], n)
        props = ("species:S:1:pos:R:3:forces:R:3" if k % 5 == 1 else
                 "species:S:1:pos:R:3" if k % 11 == 3 else "species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3")
        energy = {7: "nan", 13: "-1_5.0"}.get(k, f"{-10.0 - k:.6f}")
        if k == 17 and n > 1:
            pos[1] = pos[0] + [0.05, 0, 0]  # overlapping atoms
        frames.append(_frame(z, pos, energy, props))
    frames[9] = frames[9].replace(" 0.125 ", " 0.1_25 ")  # Python reads 0.1_25; loadtxt does not: per frame
    frames[21] = frames[21].replace("\n", "\r\n")           # CRLF
    return frames


_P = "Properties=species:S:1:pos:R:3"


@pytest.mark.parametrize("tail", ["", "\n\n", "2\ncomment\nH 0 0 0\n",
                                  f'2\nLattice="1 0 0 0 1 0" {_P}\nH 0 0 0\nH 1 0 0\n', "x\n", f"1\n{_P}\nXx 0 0 0\n",
                                  f"1\n{_P}\nH 0 0 0 9\n", "\n3\n", f"1\n{_P}\nH 0 0\xa01\n"])
@pytest.mark.parametrize("compress", [False, True])
def test_iter_blocks_equals_iter_frames(tmp_path, tail, compress):
    text = "".join(_awkward_extxyz(np.random.default_rng(3))) + tail
    path = tmp_path / ("f.extxyz.xz" if compress else "f.extxyz")
    path.write_bytes(lzma.compress(text.encode()) if compress else text.encode())

    def flatten(items):
        out = []
        for it in items:
            if isinstance(it, extxyz.FrameBlock):
                off = np.concatenate([[0], np.cumsum(it.counts)])
                for j, k in enumerate(it.frames):
                    a, b = off[j], off[j + 1]
                    out.append((k, it.numbers[a:b].tolist(), it.positions[a:b].tobytes(), it.cells[j].tobytes(),
                                it.pbcs[j].tolist(), it.infos[j], it.wheres[j],
                                {n: v[a:b].tobytes() for n, v in it.arrays.items()}))
            else:
                k, fr, _ = it
                out.append((k, fr["numbers"].tolist(), fr["positions"].tobytes(), fr["cell"].tobytes(),
                            fr["pbc"].tolist(), fr["info"], fr["where"],
                            {n: v.tobytes() for n, v in fr["arrays"].items() if n in ("forces", "force")}))
        return out

    def run(fn):
        got = []
        try:
            for it in fn(path):
                got.append(it)
        except DataImportError as e:
            return flatten(got), str(e)
        return flatten(got), None

    ref, blk = run(extxyz.iter_frames), run(lambda p: extxyz.iter_blocks(p, block=8))
    assert blk == ref
    assert len(ref[0]) >= 40


# ---------------------------------------------------------------------------- whole imports: block vs per frame
def _dataset(path: Path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    shards = [e["path"] for e in root.attrs["shards"]]
    return {p: _read_store(path / p) for p in shards}


_TIMING = ("elapsed_s", "time_split_s", "time_split_cpu_s", "per_structure_us", "per_structure_cpu_us",
           "structures_per_s", "input_MB_per_s", "output_MB_per_s", "output_bytes", "path", "rejections_log")


def _import_both(monkeypatch, tmp_path, inputs, **opts):
    """(summary or error, dataset, rejections) of the per-frame reference and of the block path."""
    out = []
    for mode in ("1", "0"):
        monkeypatch.setenv(PER_FRAME_ENV, mode)
        dest = tmp_path / f"out-{mode}.zarr"
        try:
            s = import_dataset(inputs, dest, progress=False, **opts)
        except DataImportError as e:
            work = Path(str(dest) + ".partial")  # shards an interrupted import keeps (and a rerun resumes from)
            kept = {p.name: _read_store(p) for p in sorted(work.glob("shard-*")) if not p.name.endswith(".partial")}
            out.append((type(e).__name__, str(e).replace(str(dest), "OUT"), kept))
            continue
        out.append(({k: v for k, v in s.items() if k not in _TIMING}, _dataset(dest),
                    (dest / "rejections.jsonl").read_text()))
    ref, blk = out
    if isinstance(ref[0], str):
        assert blk[:2] == ref[:2] and blk[2].keys() == ref[2].keys()
        for k in ref[2]:
            _assert_same_arrays(blk[2][k], ref[2][k])
        return ref
    assert blk[0] == ref[0] and blk[2] == ref[2]
    assert blk[1].keys() == ref[1].keys()
    for k in ref[1]:
        _assert_same_arrays(blk[1][k], ref[1][k])
    return ref


@pytest.mark.parametrize("on_bad", ["skip", "refuse"])
@pytest.mark.parametrize("compress,shard_bytes", [(False, 1 << 30), (False, 3000), (True, 1 << 30)])
def test_oc20_extxyz_import_equals_per_frame(monkeypatch, tmp_path, on_bad, compress, shard_bytes):
    frames = _awkward_extxyz(np.random.default_rng(5), 60)
    frames[13] = frames[13].replace("-1_5.0", "-15.0")
    frames.append(oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], np.zeros((3, 3)), -4.0, [[0, 0, 0]] * 2))  # cell
    text = "".join(frames)
    d = tmp_path / "s2ef"
    d.mkdir()
    raw = lzma.compress(text.encode()) if compress else text.encode()
    (d / ("0.extxyz.xz" if compress else "0.extxyz")).write_bytes(raw)
    (d / "0.txt").write_text("".join(f"random{k},frame{k},-{k}.5\n" for k in range(len(frames))))
    ref = _import_both(monkeypatch, tmp_path, [d], format="oc20", energy="adsorption", on_bad=on_bad,
                       shard_bytes=shard_bytes)
    if on_bad == "skip":
        no_forces = sum(1 for k in range(60) if k % 11 == 3 and k % 5 != 1)
        assert ref[0]["rejected"]["by_reason"] == {"degenerate_cell": 1, "missing_forces": no_forces, "nan": 1,
                                                   "overlapping_atoms": 1}
        assert ref[0]["num_graphs"] == len(frames) - 3 - no_forces
    else:
        assert ref[0] == "RejectedRecordError" and "frame 3 (line 21): bad record (missing_forces)" in ref[1]


@pytest.mark.parametrize("bad", ["energy", "lattice", "atoms", "txt"])
def test_oc20_extxyz_input_errors_equal_per_frame(monkeypatch, tmp_path, bad):
    frames = _awkward_extxyz(np.random.default_rng(6), 30)
    frames[7] = frames[7].replace("energy=nan", "energy=-3.0")
    frames[13] = frames[13].replace("-1_5.0", "-15.0")
    if bad == "energy":
        frames[20] = frames[20].replace(" energy=", " energy=abc e0=", 1)
    elif bad == "lattice":
        frames[20] = frames[20].replace('Lattice="', 'Lattice="1 2 3" L0="', 1)
    elif bad == "atoms":
        frames[20] = frames[20].replace(" 0.125 ", " 0.125 9 ", 1)
    d = tmp_path / "s2ef"
    d.mkdir()
    (d / "0.extxyz").write_text("".join(frames))
    lines = [f"random{k},frame{k},-0.5\n" for k in range(len(frames))]
    if bad == "txt":
        lines[20] = "random20,frame20,x\n"
    (d / "0.txt").write_text("".join(lines))
    ref = _import_both(monkeypatch, tmp_path, [d], format="oc20", energy="adsorption", on_bad="skip")
    assert ref[0] == "InputError" and "frame 20" in ref[1], ref


def test_ani1x_import_equals_per_frame(monkeypatch, tmp_path):
    rng = np.random.default_rng(2)
    groups = {}
    for g, (na, nc) in enumerate([(5, 7), (1, 3), (12, 40), (3, 2)]):
        coords = rng.normal(0, 2.0, (nc, na, 3))
        if na > 1:
            coords[1, 1] = coords[1, 0] + 0.05  # overlapping atoms in conformer 1
        e = rng.normal(-40, 1, nc)
        e[nc // 2] = np.nan
        cc = rng.normal(-40, 1, nc)
        cc[::2] = np.nan
        f = rng.normal(0, 0.1, (nc, na, 3))
        if nc > 3:
            f[3, 0, 0] = np.nan
        groups[f"G{g}"] = {"atomic_numbers": rng.choice([1, 6, 7, 8], na), "coordinates": coords,
                           "wb97x_dz.energy": e, "wb97x_dz.forces": f, "ccsd(t)_cbs.energy": cc}
    src = write_ani1x(tmp_path / "ani1x-release.h5", groups)
    for energy in ("wb97x_dz", "ccsd(t)_cbs"):
        for on_bad in ("skip", "refuse"):
            ref = _import_both(monkeypatch, tmp_path / f"{energy}-{on_bad}", [src], format="ani1x", energy=energy,
                               on_bad=on_bad, shard_structures=9)
            assert isinstance(ref[0], dict) == (on_bad == "skip")


def test_omat24_and_mptrj_imports_equal_per_frame(monkeypatch, tmp_path):
    rng = np.random.default_rng(4)
    atoms = []
    for k in range(30):
        n = int(rng.integers(1, 6))
        a = ase.Atoms(numbers=rng.choice([1, 8, 26], n), positions=rng.uniform(0, 6, (n, 3)),
                      cell=np.eye(3) * 6 + k * 0.01, pbc=True)
        a.calc = SinglePointCalculator(a, energy=None if k == 5 else -float(k), forces=rng.normal(size=(n, 3)),
                                       stress=rng.normal(size=6) if k % 7 else rng.normal(size=(3, 3)))
        a.info["sid"] = f"m{k}"
        atoms.append(a)
    ase.io.write(tmp_path / "alex.extxyz", atoms)
    _import_both(monkeypatch, tmp_path / "x", [tmp_path / "alex.extxyz"], format="omat24", on_bad="skip")
    write_aselmdb(tmp_path / "rows.aselmdb", atoms, [{"sid": f"r{k}"} for k in range(30)], delete=(3,))
    _import_both(monkeypatch, tmp_path / "l", [tmp_path / "rows.aselmdb"], format="omat24", on_bad="skip",
                 shard_structures=7)
    for a in atoms[1:]:  # blocks of regular rows (Voigt stress only), with one row without stress
        a.calc.results["stress"] = rng.normal(size=6)
    atoms[9].calc.results.pop("stress")
    atoms[12].positions[1:2] = atoms[12].positions[0] + 0.01 if len(atoms[12]) > 1 else atoms[12].positions[:1]
    write_aselmdb(tmp_path / "voigt.aselmdb", atoms, [{} if k == 4 else {"sid": f"v{k}"} for k in range(30)])
    ref = _import_both(monkeypatch, tmp_path / "v", [tmp_path / "voigt.aselmdb"], format="omat24", on_bad="skip",
                       shard_structures=40)
    assert ref[0]["num_graphs"] >= 27 and ref[0]["with_stress"] >= 26
    data = {}
    for k in range(40):
        n = int(rng.integers(1, 6))
        cell = np.eye(3) * 5 + rng.normal(0, 0.3, (3, 3))
        frac = rng.uniform(0, 1, (n, 3))
        if k == 11 and n > 1:
            frac[1] = frac[0] + 0.001
        data.setdefault(f"mp-{k // 4}", {})[f"mp-{k // 4}-0-{k % 4}"] = mptrj_frame(
            cell, rng.choice([3, 8, 26], n).tolist(), frac, -float(k), rng.normal(size=(n, 3)),
            None if k % 3 == 0 else rng.normal(size=(3, 3)), with_xyz=bool(k % 5))
    src = write_mptrj(tmp_path / "MPtrj_2022.9_full.json", data)
    for on_bad in ("skip", "refuse"):
        _import_both(monkeypatch, tmp_path / f"mp-{on_bad}", [src], format="mptrj", on_bad=on_bad, shard_bytes=5000)


def test_rejection_log_of_the_block_path_names_ids_in_order(monkeypatch, tmp_path):
    monkeypatch.setenv(PER_FRAME_ENV, "0")
    frames = _awkward_extxyz(np.random.default_rng(5), 25)
    frames[13] = frames[13].replace("-1_5.0", "-15.0")
    (tmp_path / "a.extxyz").write_text("".join(frames))
    import_dataset([tmp_path / "a.extxyz"], tmp_path / "o.zarr", format="oc20", on_bad="skip", progress=False)
    log = [json.loads(x) for x in (tmp_path / "o.zarr" / "rejections.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in log] == [("a.extxyz:frame3", "missing_forces"), ("a.extxyz:frame7", "nan"),
                                                     ("a.extxyz:frame14", "missing_forces"),
                                                     ("a.extxyz:frame17", "overlapping_atoms")]
    assert log[1]["where"].endswith("a.extxyz: frame 7 (line " + str(1 + sum(f.count("\n") for f in frames[:7])) + ")")
    assert "duplicate atoms 0 and 1 are 0.0500 Å apart" in log[3]["message"]


@pytest.mark.parametrize("odd", ["none", "disordered", "abc-only", "near-one-occupancy", "unknown-element"])
def test_mptrj_site_fast_path_equals_site_loop(monkeypatch, tmp_path, odd):
    import gnnmegatron.data.formats.mptrj as mptrj

    rng = np.random.default_rng(8)
    data = {}
    for k in range(12):
        n = int(rng.integers(1, 5))
        fr = mptrj_frame(np.eye(3) * 5 + rng.normal(0, 0.2, (3, 3)), rng.choice([3, 8, 26], n).tolist(),
                         rng.uniform(0, 1, (n, 3)), -float(k), rng.normal(size=(n, 3)), rng.normal(size=(3, 3)))
        data.setdefault(f"mp-{k // 3}", {})[f"mp-{k // 3}-0-{k % 3}"] = fr
    site = data["mp-2"]["mp-2-0-1"]["structure"]["sites"][0]
    if odd == "disordered":
        site["species"] = [{"element": "Li", "occu": 0.5}, {"element": "Fe", "occu": 0.5}]
    elif odd == "abc-only":
        del site["xyz"]
    elif odd == "near-one-occupancy":
        site["species"][0]["occu"] = 1.0 - 1e-9
    elif odd == "unknown-element":
        site["species"][0]["element"] = "Xx"
    src = write_mptrj(tmp_path / "MPtrj_2022.9_full.json", data)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(mptrj, "_ordered_sites", lambda sites, table: None)
        out = tmp_path / f"o{fast}.zarr"
        try:
            s = import_dataset([src], out, format="mptrj", on_bad="skip", progress=False)
            results.append(({k: v for k, v in s.items() if k not in _TIMING}, _dataset(out),
                            (out / "rejections.jsonl").read_text()))
        except DataImportError as e:
            results.append(str(e).replace(str(out), "OUT"))
    if isinstance(results[0], str):
        assert results[0] == results[1] and "unknown element 'Xx'" in results[0]
        return
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2]
    for k in results[0][1]:
        _assert_same_arrays(results[0][1][k], results[1][1][k])
    assert ("disordered" in results[0][2]) == (odd == "disordered")


def test_comment_parser_equals_pair_by_pair_parsing_with_the_original_pattern():
    import random
    import re

    old = re.compile(r'\s*([^\s=]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|[^\s"]*))?')

    def reference(line):  # the parser before the fast path, with the regex before it was unrolled
        out, pos = {}, 0
        while pos < len(line):
            m = old.match(line, pos)
            if m is None or m.end() == pos:
                if line[pos:].strip():
                    raise ValueError(f"cannot parse the comment line near {line[pos:pos + 30]!r}")
                break
            key, val = m.group(1), m.group(2)
            if val is not None and len(val) >= 2 and val[0] in '"{[' and val[-1] in '"}]':
                val = val[1:-1]
            out[key] = val
            pos = m.end()
        return out

    def outcome(fn, line):
        try:
            return fn(line)
        except ValueError as e:
            return str(e)

    rng = random.Random(0)
    lines = ['Lattice="1 0 0 0 1 0 0 0 1" Properties=species:S:1:pos:R:3 energy=-1.5 pbc="T T F"',
             'a="x \\" y" b={1 2} c=[3, 4] flag d= e =f', 'x="unterminated y=2', '=5 a=1', 'a=1 "b"', '']
    lines += ["".join(rng.choice('ab= "\\{}[]\t,x1') for _ in range(rng.randint(0, 16))) for _ in range(20000)]
    for line in lines:
        assert outcome(extxyz.parse_comment, line) == outcome(reference, line), line
