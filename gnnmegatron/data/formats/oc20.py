"""OC20 and OC22 S2EF releases: extxyz + txt trajectories and fairchem LMDBs.

Field names and conventions (fairchem ``docs/core/datasets/oc20.md``, ``oc22.md``,
``scripts/preprocess_ef.py``, ``datasets/lmdb_dataset.py``, ``oc22_lmdb_dataset.py``):

- S2EF extxyz release (``<k>.extxyz[.xz]`` + ``<k>.txt[.xz]``): each frame holds ``Lattice``,
  ``Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3``, ``energy=`` (the raw
  DFT total energy, eV) and ``pbc``; line k of the txt file describes frame k as
  ``system_id,frame_number,reference_energy`` (e.g. ``random1331004,frame44,-0.437``). The
  adsorption energy is ``energy - reference_energy`` (what ``preprocess_ef.py --ref-energy``
  stores).
- LMDBs: key ``str(i).encode("ascii")`` -> pickled ``torch_geometric.data.Data`` with ``pos``
  [n, 3] Å, ``cell`` [1, 3, 3] Å, ``atomic_numbers`` [n], ``natoms``, ``tags``, ``fixed``,
  ``y`` (older) or ``energy`` (eV), ``force`` (older) or ``forces`` (eV/Å), ``sid``, ``fid``;
  key ``"length"`` -> pickled count. OC20 S2EF LMDBs hold *adsorption* energies (fairchem adds
  ``oc20_ref.pkl[f"random{sid}"]`` to get total energies); OC22 LMDBs (records carry ``oc22``)
  hold total energies.

Units are already the store's (eV, Å, eV/Å); forces are forces (-dE/dx, no sign change); there is
no stress. Atom ``tags`` and ``fixed`` flags are not kept (the store has no field for them).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gnnmegatron.data.blocks import columns_block
from gnnmegatron.data.formats import extxyz
from gnnmegatron.data.formats.base import (EnergyChoice, ImportOptions, InputError, ReaderBlock, Rejected,
                                           SourceFormat, optional_import)

_OC20_DFT = "RPBE, VASP PAW (OC20)"
_OC22_DFT = "PBE+U, VASP PAW (OC22)"
_TXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".txt.bz2")


def _lmdb_path(path: Path) -> tuple[str, bool]:
    """(path, subdir) for lmdb.open: a file, or a directory holding data.mdb."""
    return (str(path), True) if path.is_dir() else (str(path), False)


def open_lmdb(path: Path):
    lmdb = optional_import("lmdb", "reading LMDB releases (OC20/OC22, OMat24/Alexandria)")
    p, subdir = _lmdb_path(path)
    try:
        return lmdb.open(p, subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=1)
    except lmdb.Error as e:
        raise InputError(path, f"is not an LMDB database ({e})") from None


class _Restricted(pickle.Unpickler):
    """Plain data only (dicts, strings, numbers, numpy scalars): oc20_ref.pkl and LMDB lengths."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                              ("numpy", "dtype")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


_REF_CACHE: dict[str, dict] = {}


def load_oc20_ref(path: str) -> dict:
    """fairchem's ``oc20_ref.pkl``: {"random<sid>": energy to add to an adsorption energy (eV)}."""
    if path not in _REF_CACHE:
        import io
        try:
            data = Path(path).read_bytes()
            ref = _Restricted(io.BytesIO(data)).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise InputError(path, f"cannot be read as fairchem's oc20_ref.pkl ({e})") from None
        if not isinstance(ref, dict):
            raise InputError(path, f"holds a {type(ref).__name__}, expected a dict system id -> energy")
        _REF_CACHE[path] = {str(k): float(v) for k, v in ref.items()}
    return _REF_CACHE[path]


def _lmdb_length(env, path: Path) -> int:
    """Records of a fairchem LMDB: its pickled ``"length"`` entry, else the number of keys."""
    import io
    with env.begin() as txn:
        raw = txn.get(b"length")
        if raw is not None:
            try:
                return int(_Restricted(io.BytesIO(raw)).load())
            except Exception as e:
                raise InputError(path, f"its 'length' entry is not a pickled integer ({e})") from None
        return int(env.stat()["entries"])


class OC20Format(SourceFormat):
    name = "oc20"
    title = "OC20 S2EF (extxyz + txt, or LMDB)"
    suffixes = (".extxyz", ".extxyz.xz", ".extxyz.gz", ".extxyz.bz2", ".lmdb")
    energies = {
        "total": EnergyChoice("energy (extxyz); LMDB: y + oc20_ref[random<sid>]", "forces", _OC20_DFT,
                              "raw DFT total energy of the adsorbate+slab system"),
        "adsorption": EnergyChoice("energy - reference_energy (txt); LMDB: y", "forces", _OC20_DFT,
                                   "adsorption energy, referenced to the bare slab and gas-phase molecules"),
    }
    default_energy = "total"
    units = "eV, Å, eV/Å as released (no conversion)"
    sign = "forces are -dE/dx as released; no stress in OC20/OC22"
    dft = _OC20_DFT

    def expand_inputs(self, paths) -> list[Path]:
        return [f for f in super().expand_inputs(paths) if not f.name.endswith(_TXT_SUFFIXES)]

    def check_file(self, path: Path) -> None:
        if path.name.endswith(".lmdb") or path.is_dir():
            if path.is_dir() and not (path / "data.mdb").is_file():
                raise InputError(path, "is a directory but not an LMDB environment (no data.mdb inside)")
            if path.is_file() and path.stat().st_size == 0:
                raise InputError(path, "is empty; expected an LMDB file")
            return
        super().check_file(path)

    @staticmethod
    def txt_for(path: Path) -> Path | None:
        stem = path.name
        for suf in (".extxyz.xz", ".extxyz.gz", ".extxyz.bz2", ".extxyz"):
            if stem.endswith(suf):
                stem = stem[: -len(suf)]
                break
        for suf in _TXT_SUFFIXES:
            cand = path.with_name(stem + suf)
            if cand.is_file():
                return cand
        return None

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        kinds = {"lmdb" if (f.name.endswith(".lmdb") or f.is_dir()) else "extxyz" for f in files}
        if len(kinds) > 1:
            raise InputError(files[0].parent, "give either the extxyz/txt files or the LMDB files of a release, "
                                              "not both in one import")
        tasks = []
        for f in files:
            if "lmdb" in kinds:
                self._check_lmdb_energy(f, opts)
                env = open_lmdb(f)
                try:
                    n = _lmdb_length(env, f)
                finally:
                    env.close()
                for a in range(0, n, opts.shard_structures):
                    b = min(n, a + opts.shard_structures)
                    tasks.append({"kind": "lmdb", "file": str(f), "start": a, "stop": b, "work": b - a,
                                  "unit": "structures"})
                continue
            txt = self.txt_for(f)
            if txt is None and opts.energy == "adsorption":
                raise InputError(f, f"--energy adsorption needs the frame log {f.name.split('.')[0]}.txt "
                                    "(system_id,frame,reference_energy per frame) next to it; it is missing")
            pts = extxyz.split_points(f, opts.shard_bytes)
            size = f.stat().st_size
            for k, (start, frame, line) in enumerate(pts):
                stop = pts[k + 1][0] if k + 1 < len(pts) else None
                tasks.append({"kind": "extxyz", "file": str(f), "txt": None if txt is None else str(txt),
                              "start": start, "stop": stop, "frame": frame, "line": line,
                              "work": (stop or size) - start, "unit": "B"})
        return tasks

    def _check_lmdb_energy(self, f: Path, opts: ImportOptions) -> None:
        if opts.energy == "total" and opts.lmdb_energy == "adsorption" and not opts.oc20_ref:
            raise InputError(f, "OC20 S2EF LMDBs hold adsorption energies (fairchem's --ref-energy); for "
                                "--energy total pass --oc20-ref oc20_ref.pkl (fairchem's OC20 reference "
                                "energies), or use --energy adsorption, or --lmdb-energy total if this LMDB "
                                "was written with total energies")
        if opts.energy == "adsorption" and opts.lmdb_energy == "total":
            raise InputError(f, "--energy adsorption from an LMDB with total energies (--lmdb-energy total) "
                                "needs the reference energies of the extxyz release's txt files; import "
                                "the extxyz/txt release instead")

    def read(self, task: dict, opts: ImportOptions) -> Iterator:
        if task["kind"] == "lmdb":
            yield from self._read_lmdb(task, opts)
        else:
            yield from self._read_extxyz(task, opts, blocks=True)

    def read_frames(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        if task["kind"] == "lmdb":
            yield from self._read_lmdb(task, opts)
        else:
            yield from self._read_extxyz(task, opts, blocks=False)

    # ------------------------------------------------------------------ extxyz + txt
    def _read_extxyz(self, task: dict, opts: ImportOptions, blocks: bool) -> Iterator:
        path = Path(task["file"])
        txt = None
        if task["txt"]:
            txt = extxyz.Reader(Path(task["txt"]))
            for _ in range(task["frame"]):
                txt.f.readline()
        start = task["start"]
        try:
            if not blocks:
                for k, fr, pos in extxyz.iter_frames(path, start, task["stop"], task["frame"], task["line"]):
                    yield self._frame_item(k, fr, pos - start, path, txt.f.readline() if txt else None, task, opts)
                return
            for item in extxyz.iter_blocks(path, start, task["stop"], task["frame"], task["line"]):
                if isinstance(item, extxyz.FrameBlock):
                    yield from self._frame_block(item, path, txt, task, opts)
                else:
                    k, fr, pos = item
                    yield self._frame_item(k, fr, pos - start, path, txt.f.readline() if txt else None, task, opts)
        finally:
            if txt is not None:
                txt.close()

    def _txt(self, raw: bytes | None, k: int, path: Path, task: dict) -> tuple:
        """(system id, reference energy) of frame k from its line of the txt file (None, None without one)."""
        if raw is None:
            return None, None
        line = raw.decode("utf-8", errors="replace").strip()
        parts = line.split(",")
        if len(parts) < 3:
            raise InputError(task["txt"], f"line {k + 1} is {line!r}; expected "
                                          "system_id,frame_number,reference_energy for frame "
                                          f"{k} of {path.name}", f"frame {k}")
        try:
            ref = float(parts[2])
        except ValueError:
            raise InputError(task["txt"], f"line {k + 1}: reference energy {parts[2]!r} is not a "
                                          "number", f"frame {k}") from None
        return f"{parts[0]},{parts[1]}", ref

    def _energy(self, info: dict, where: str, path: Path, ref, opts: ImportOptions):
        e = extxyz.info_numbers(info, "energy", (1,), where, path)
        energy = None if e is None else float(e[0])
        if energy is not None and opts.energy == "adsorption":
            energy -= ref
        return energy

    def _frame_item(self, k: int, fr: dict, done: int, path: Path, txt_line, task: dict, opts: ImportOptions):
        sys_id, ref = self._txt(txt_line, k, path, task)
        energy = self._energy(fr["info"], fr["where"], path, ref, opts)
        s = {"atomic_numbers": fr["numbers"], "positions": fr["positions"], "cell": fr["cell"],
             "pbc": fr["pbc"], "energy": energy,
             "forces": fr["arrays"].get("forces", fr["arrays"].get("force")), "stress": None}
        return sys_id or f"{path.name}:frame{k}", f"{path}: {fr['where']}", s, done

    def _frame_block(self, fb, path: Path, txt, task: dict, opts: ImportOptions) -> Iterator[ReaderBlock]:
        """A ReaderBlock of a FrameBlock; an error in frame j comes after a block of the frames before it."""
        lines = [txt.f.readline() for _ in range(len(fb))] if txt is not None else None
        ids, energy, error = [], [], None
        for j, k in enumerate(fb.frames):
            try:
                sys_id, ref = self._txt(lines[j] if lines is not None else None, k, path, task)
                energy.append(self._energy(fb.infos[j], fb.wheres[j], path, ref, opts))
            except InputError as e:
                error = e
                break
            ids.append(sys_id or f"{path.name}:frame{k}")
        n = len(ids)
        if n:
            forces = fb.arrays.get("forces", fb.arrays.get("force"))
            off = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(fb.counts[:n], out=off[1:])
            a = int(off[-1])

            def row_dict(r):
                lo, hi = int(off[r]), int(off[r + 1])
                return {"atomic_numbers": fb.numbers[lo:hi], "positions": fb.positions[lo:hi], "cell": fb.cells[r],
                        "pbc": fb.pbcs[r], "energy": energy[r],
                        "forces": None if forces is None else forces[lo:hi], "stress": None}

            blk = columns_block(fb.counts[:n], fb.numbers[:a], fb.positions[:a], None if forces is None else forces[:a],
                                energy, fb.cells[:n], fb.pbcs[:n], None, ids, row_dict)
            yield ReaderBlock(blk, ids, lambda r: f"{path}: {fb.wheres[r]}", {}, fb.pos - task["start"])
        if error is not None:
            raise error

    # ------------------------------------------------------------------ LMDB
    def _read_lmdb(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        from gnnmegatron.data.formats.pyg_pickle import loads

        path = Path(task["file"])
        ref = load_oc20_ref(opts.oc20_ref) if opts.oc20_ref else None
        env = open_lmdb(path)
        try:
            with env.begin() as txn:
                for i in range(task["start"], task["stop"]):
                    where = f"{path}: record {i}"
                    raw = txn.get(str(i).encode("ascii"))
                    if raw is None:
                        raise InputError(path, "key missing (keys must run 0..length-1)", f"record {i}")
                    try:
                        d = loads(raw)
                    except Exception as e:
                        raise InputError(path, f"cannot be unpickled as a torch_geometric Data object "
                                               f"({type(e).__name__}: {e})", f"record {i}") from None
                    yield self._record(d, i, path, where, opts, ref) + (i + 1 - task["start"],)
        finally:
            env.close()

    def _record(self, d: dict, i: int, path: Path, where: str, opts: ImportOptions, ref) -> tuple:
        for key in ("pos", "atomic_numbers"):
            if key not in d:
                raise InputError(path, f"the Data object has no '{key}' (attributes: {sorted(d)})", f"record {i}")
        pos = np.asarray(d["pos"], dtype=np.float64).reshape(-1, 3)
        z = np.rint(np.asarray(d["atomic_numbers"], dtype=np.float64)).astype(np.int64).reshape(-1)
        cell = d.get("cell")
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(d.get("pbc", [True, True, True]), dtype=bool).reshape(-1)
        y = d.get("y", d.get("energy"))
        forces = d.get("force", d.get("forces"))
        sid, fid = d.get("sid"), d.get("fid")
        is_oc22 = self.name == "oc22" or "oc22" in d
        rid = (f"{sid},frame{fid}" if is_oc22 else f"random{sid},frame{fid}") if sid is not None else \
            f"{path.name}:{i}"
        energy = None if y is None else float(np.asarray(y, dtype=np.float64).reshape(-1)[0])
        if energy is not None and not is_oc22 and opts.energy == "total" and opts.lmdb_energy == "adsorption":
            key = f"random{sid}"
            if ref is None or key not in ref:
                return rid, where, Rejected("missing_energy", f"no entry {key!r} in --oc20-ref {opts.oc20_ref} "
                                                              "to turn the adsorption energy into a total energy")
            energy += ref[key]
        s = {"atomic_numbers": z, "positions": pos, "cell": cell, "pbc": pbc, "energy": energy,
             "forces": None if forces is None else np.asarray(forces, dtype=np.float64), "stress": None}
        return rid, where, s


class OC22Format(OC20Format):
    name = "oc22"
    title = "OC22 S2EF-Total (LMDB, or extxyz)"
    energies = {"total": EnergyChoice("y (LMDB) / energy (extxyz)", "forces", _OC22_DFT,
                                      "raw DFT total energy (OC22 S2EF-Total)")}
    default_energy = "total"
    dft = _OC22_DFT

    def _check_lmdb_energy(self, f: Path, opts: ImportOptions) -> None:
        return None


__all__ = ["OC20Format", "OC22Format", "load_oc20_ref", "open_lmdb"]
