"""OMat24 and Alexandria (sAlex) releases: ASE-LMDB (``*.aselmdb``) databases or extxyz exports.

ASE-LMDB layout (fairchem's ``LMDBDatabase``, the ASE-DB backend the OMat24 and sAlex files are
written with): an LMDB file (``subdir=False``) whose key ``str(id).encode("ascii")`` holds
``zlib.compress(orjson.dumps(row))`` for ids 1..nextid-1 except the deleted ones; the reserved
keys ``"nextid"`` and ``"deleted_ids"`` hold the same encoding of an int and a list. A row is
the dict of an ``ase.db`` AtomsRow: ``numbers``, ``positions`` [n, 3] Å, ``cell`` [3, 3] Å,
``pbc``, ``energy`` (eV), ``forces`` [n, 3] (eV/Å), ``stress`` (eV/Å^3, Voigt [6] in ASE order
xx yy zz yz xz xy, ASE sign: positive = tensile), ``key_value_pairs``, ``data``, ``unique_id``.
Older files encode arrays as ``{"__ndarray__": [shape, dtype, flat values]}``; both are read.

OMat24 documents its labels as "total energy (eV), forces (eV/A) and stress (eV/A^3)", so no unit
conversion is applied; energies are DFT total energies without MP2020 corrections.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gnnmegatron.data.blocks import columns_block
from gnnmegatron.data.formats import extxyz
from gnnmegatron.data.formats.base import EnergyChoice, ImportOptions, InputError, ReaderBlock, SourceFormat
from gnnmegatron.data.formats.oc20 import open_lmdb

_ID_KEYS = ("sid", "id", "mat_id", "material_id", "structure_id")


def _loads(raw: bytes):
    try:
        import orjson
        return orjson.loads(raw)
    except ImportError:
        return json.loads(raw)


def _arr(v, dtype=np.float64):
    if isinstance(v, dict):
        if "__ndarray__" in v:
            shape, dt, flat = v["__ndarray__"]
            return np.asarray(flat, dtype=dt).reshape(shape).astype(dtype)
        if "array" in v:  # an encoded ase.cell.Cell
            return _arr(v["array"], dtype)
    return np.asarray(v, dtype=dtype)


def _decode(raw: bytes, path: Path, where: str):
    try:
        return _loads(zlib.decompress(raw))
    except (zlib.error, ValueError) as e:
        raise InputError(path, f"is not a zlib-compressed JSON row of an ASE-LMDB database ({e})", where) from None


class OMat24Format(SourceFormat):
    name = "omat24"
    title = "OMat24 (ASE-LMDB .aselmdb, or extxyz)"
    suffixes = (".aselmdb", ".extxyz", ".extxyz.xz", ".extxyz.gz", ".extxyz.bz2")
    energies = {"total": EnergyChoice("energy", "forces", "PBE/PBE+U, VASP PAW (OMat24)",
                                      "DFT total energy as released (no MP2020 corrections)")}
    default_energy = "total"
    units = "eV, Å, eV/Å, eV/Å^3 as released (no conversion)"
    sign = "forces -dE/dx; stress in ASE convention (positive = tensile) as released, Voigt [6] expanded"

    def check_file(self, path: Path) -> None:
        if path.name.endswith(".aselmdb"):
            if path.stat().st_size == 0:
                raise InputError(path, "is empty; expected an ASE-LMDB (.aselmdb) file")
            return
        super().check_file(path)

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        tasks = []
        for f in files:
            if not f.name.endswith(".aselmdb"):
                pts = extxyz.split_points(f, opts.shard_bytes)
                size = f.stat().st_size
                for k, (start, frame, line) in enumerate(pts):
                    stop = pts[k + 1][0] if k + 1 < len(pts) else None
                    tasks.append({"kind": "extxyz", "file": str(f), "start": start, "stop": stop,
                                  "frame": frame, "line": line, "work": (stop or size) - start, "unit": "B"})
                continue
            nextid, deleted = self._ids(f)
            lo = 1
            while lo < nextid:
                hi, n = lo, 0
                while hi < nextid and n < opts.shard_structures:  # one id range per shard
                    step = min(nextid - hi, opts.shard_structures - n)
                    n += step - sum(1 for d in deleted if hi <= d < hi + step)
                    hi += step
                tasks.append({"kind": "aselmdb", "file": str(f), "id_lo": lo, "id_hi": hi, "work": n,
                              "unit": "structures"})
                lo = hi
        units = {t["unit"] for t in tasks}
        if len(units) > 1:
            raise InputError(files[0].parent, "give either .aselmdb files or extxyz files, not both in one import")
        return tasks

    @staticmethod
    def _ids(path: Path) -> tuple[int, list[int]]:
        env = open_lmdb(path)
        try:
            with env.begin() as txn:
                raw_next, raw_del = txn.get(b"nextid"), txn.get(b"deleted_ids")
            nextid = 1 if raw_next is None else int(_decode(raw_next, path, "key 'nextid'"))
            deleted = [] if raw_del is None else sorted(int(i) for i in _decode(raw_del, path, "key 'deleted_ids'"))
        finally:
            env.close()
        return nextid, deleted

    def read(self, task: dict, opts: ImportOptions) -> Iterator:
        path = Path(task["file"])
        if task["kind"] == "extxyz":
            yield from self._read_extxyz(task, path, blocks=True)
            return
        yield from self._read_rows(task, path)

    def read_frames(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        path = Path(task["file"])
        if task["kind"] == "extxyz":
            yield from self._read_extxyz(task, path, blocks=False)
            return
        yield from self._read_rows(task, path)

    def _read_rows(self, task: dict, path: Path) -> Iterator[tuple]:
        env = open_lmdb(path)
        n = 0
        try:
            with env.begin() as txn:
                for rid in range(task["id_lo"], task["id_hi"]):
                    raw = txn.get(str(rid).encode("ascii"))
                    if raw is None:
                        continue  # a deleted row
                    where = f"{path}: row id={rid}"
                    row = _decode(raw, path, f"row id={rid}")
                    n += 1
                    yield self._row(row, rid, path, where) + (n,)
        finally:
            env.close()

    def _row(self, row: dict, rid: int, path: Path, where: str) -> tuple:
        try:
            z = _arr(row["numbers"], np.int64).reshape(-1)
            pos = _arr(row["positions"]).reshape(-1, 3)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"row has no valid numbers/positions ({type(e).__name__}: {e})",
                             f"row id={rid}") from None
        cell = row.get("cell")
        cell = np.zeros((3, 3)) if cell is None else _arr(cell).reshape(3, 3)
        pbc = np.asarray(row.get("pbc", [False] * 3), dtype=bool).reshape(-1)
        kvp, data = row.get("key_value_pairs") or {}, row.get("data") or {}
        ident = next((str(d[k]) for k in _ID_KEYS for d in (kvp, data) if d.get(k) is not None),
                     row.get("unique_id") or f"{path.name}:{rid}")
        energy = row.get("energy")
        forces, stress = row.get("forces"), row.get("stress")
        s = {"atomic_numbers": z, "positions": pos, "cell": cell, "pbc": pbc,
             "energy": None if energy is None else float(energy),
             "forces": None if forces is None else _arr(forces), "stress": None if stress is None else _arr(stress)}
        return str(ident), where, s

    @staticmethod
    def _extxyz_labels(info: dict, where: str, path: Path, k: int):
        e = extxyz.info_numbers(info, "energy", (1,), where, path)
        st = extxyz.info_numbers(info, "stress", (6, 9), where, path)
        ident = next((info[key] for key in _ID_KEYS if info.get(key)), f"{path.name}:frame{k}")
        stress = None if st is None else (st if st.size == 6 else st.reshape(3, 3))
        return (None if e is None else float(e[0])), stress, str(ident)

    def _read_extxyz(self, task: dict, path: Path, blocks: bool) -> Iterator:
        start = task["start"]
        args = (path, start, task["stop"], task["frame"], task["line"])
        for item in (extxyz.iter_blocks(*args) if blocks else extxyz.iter_frames(*args)):
            if isinstance(item, extxyz.FrameBlock):
                yield from self._frame_block(item, path, start)
                continue
            k, fr, pos = item
            energy, stress, ident = self._extxyz_labels(fr["info"], fr["where"], path, k)
            s = {"atomic_numbers": fr["numbers"], "positions": fr["positions"], "cell": fr["cell"],
                 "pbc": fr["pbc"], "energy": energy,
                 "forces": fr["arrays"].get("forces", fr["arrays"].get("force")), "stress": stress}
            yield ident, f"{path}: {fr['where']}", s, pos - start

    def _frame_block(self, fb, path: Path, start: int) -> Iterator[ReaderBlock]:
        """A ReaderBlock of a FrameBlock; an error in frame j comes after a block of the frames before it."""
        ids, energy, stress, error = [], [], [], None
        for j, k in enumerate(fb.frames):
            try:
                e, st, ident = self._extxyz_labels(fb.infos[j], fb.wheres[j], path, k)
            except InputError as err:
                error = err
                break
            ids.append(ident)
            energy.append(e)
            stress.append(st)
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
                        "forces": None if forces is None else forces[lo:hi], "stress": stress[r]}

            blk = columns_block(fb.counts[:n], fb.numbers[:a], fb.positions[:a], None if forces is None else forces[:a],
                                energy, fb.cells[:n], fb.pbcs[:n], stress, ids, row_dict)
            yield ReaderBlock(blk, ids, lambda r: f"{path}: {fb.wheres[r]}", {}, fb.pos - start)
        if error is not None:
            raise error


class AlexandriaFormat(OMat24Format):
    name = "alexandria"
    title = "Alexandria / sAlex (ASE-LMDB .aselmdb, or extxyz)"
    energies = {"total": EnergyChoice("energy", "forces", "PBE/PBE+U, VASP PAW (Alexandria)",
                                      "DFT total energy as released (no MP2020 corrections)")}


__all__ = ["AlexandriaFormat", "OMat24Format"]
