"""Writers of small files in the exact on-disk formats of the study's data releases (test helpers).

Each writer takes plain Python values in the release's own units and layout, so the tests can
compare what the importer stores against values converted by hand.
"""

from __future__ import annotations

import json
import lzma
import pickle
import sys
import types
import zlib
from pathlib import Path

import numpy as np

SYMBOLS = {1: "H", 3: "Li", 6: "C", 7: "N", 8: "O", 13: "Al", 26: "Fe", 29: "Cu", 47: "Ag", 78: "Pt"}


# ------------------------------------------------------------------ MPtrj (pymatgen Structure.as_dict)
def pymatgen_structure_dict(cell, numbers, frac, with_xyz=True, magmoms=None) -> dict:
    """What pymatgen's ``Structure.as_dict()`` writes (lattice with parameters, sites with abc/xyz)."""
    cell = np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(cell, axis=1)

    def angle(u, v):
        return float(np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))))

    sites = []
    for k, (z, f) in enumerate(zip(numbers, frac)):
        site = {"species": [{"element": SYMBOLS[z], "occu": 1}], "abc": list(map(float, f)),
                "properties": {"magmom": None if magmoms is None else magmoms[k]}, "label": SYMBOLS[z]}
        if with_xyz:
            site["xyz"] = list(map(float, np.asarray(f) @ cell))
        sites.append(site)
    return {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
            "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True], "a": float(lengths[0]),
                        "b": float(lengths[1]), "c": float(lengths[2]), "alpha": angle(cell[1], cell[2]),
                        "beta": angle(cell[0], cell[2]), "gamma": angle(cell[0], cell[1]),
                        "volume": float(abs(np.linalg.det(cell)))},
            "properties": {}, "sites": sites}


def mptrj_frame(cell, numbers, frac, energy, forces, stress_kbar, corrected_shift=-0.5, with_xyz=True) -> dict:
    n = len(numbers)
    return {"structure": pymatgen_structure_dict(cell, numbers, frac, with_xyz),
            "uncorrected_total_energy": energy, "corrected_total_energy": energy + corrected_shift,
            "energy_per_atom": (energy + corrected_shift) / n, "ef_per_atom": -0.1,
            "e_per_atom_relaxed": (energy + corrected_shift) / n, "ef_per_atom_relaxed": -0.1,
            "force": np.asarray(forces, dtype=float).tolist(),
            "stress": None if stress_kbar is None else np.asarray(stress_kbar, dtype=float).tolist(),
            "magmom": [0.0] * n, "bandgap": 0.0, "mp_id": None}


def write_mptrj(path: Path, data: dict, indent=None) -> Path:
    for mp_id, frames in data.items():
        for fr in frames.values():
            fr["mp_id"] = mp_id
    Path(path).write_text(json.dumps(data, indent=indent))
    return Path(path)


# ------------------------------------------------------------------ HDF5 releases
def write_ani1x(path: Path, groups: dict) -> Path:
    """groups: {formula: {"atomic_numbers": [Na], "coordinates": [Nc, Na, 3], "<level>.energy": ..., ...}}."""
    import h5py
    with h5py.File(path, "w") as f:
        for name, g in groups.items():
            grp = f.create_group(name)
            for key, val in g.items():
                arr = np.asarray(val)
                if key == "atomic_numbers":
                    arr = arr.astype(np.uint8)
                elif key == "coordinates" or key.endswith("forces"):
                    arr = arr.astype(np.float32)
                grp.create_dataset(key, data=arr)
    return Path(path)


def write_qm7x(path: Path, molecules: dict) -> Path:
    """molecules: {molid: {confid: {"atNUM", "atXYZ", "ePBE0+MBD", "eAT", "ePBE0", "totFOR", "pbe0FOR"}}}."""
    import h5py
    with h5py.File(path, "w") as f:
        for mol, confs in molecules.items():
            g = f.create_group(mol)
            for conf, d in confs.items():
                c = g.create_group(conf)
                for key, val in d.items():
                    arr = np.asarray(val, dtype=np.int64 if key == "atNUM" else np.float64)
                    if key.startswith("e"):
                        arr = arr.reshape(1)  # QM7-X stores scalars as 1-element arrays
                    c.create_dataset(key, data=arr)
    return Path(path)


# ------------------------------------------------------------------ OC20 S2EF extxyz + txt
def oc20_frame_text(numbers, positions, cell, energy, forces, fixed=None, tags=None) -> str:
    n = len(numbers)
    fixed = [False] * n if fixed is None else fixed
    tags = [1] * n if tags is None else tags
    lat = " ".join(f"{x:.8f}" for x in np.asarray(cell).reshape(-1))
    lines = [str(n), f'Lattice="{lat}" Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 '
                     f'energy={energy:.8f} free_energy={energy - 0.01:.8f} pbc="T T T"']
    for z, p, fx, t, f in zip(numbers, positions, fixed, tags, forces):
        lines.append(f"{SYMBOLS[z]} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f} {'F' if fx else 'T'} {t} "
                     f"{f[0]:.8f} {f[1]:.8f} {f[2]:.8f}")
    return "\n".join(lines) + "\n"


def write_oc20_extxyz(dirpath: Path, stem: str, frames: list[dict], compress: bool = False) -> Path:
    """frames: dicts with numbers, positions, cell, energy, forces, system_id, frame, ref_energy."""
    dirpath.mkdir(parents=True, exist_ok=True)
    xyz = "".join(oc20_frame_text(f["numbers"], f["positions"], f["cell"], f["energy"], f["forces"]) for f in frames)
    txt = "".join(f"{f['system_id']},frame{f['frame']},{f['ref_energy']:.8f}\n" for f in frames)
    if compress:
        (dirpath / f"{stem}.extxyz.xz").write_bytes(lzma.compress(xyz.encode()))
        (dirpath / f"{stem}.txt.xz").write_bytes(lzma.compress(txt.encode()))
        return dirpath / f"{stem}.extxyz.xz"
    (dirpath / f"{stem}.extxyz").write_text(xyz)
    (dirpath / f"{stem}.txt").write_text(txt)
    return dirpath / f"{stem}.extxyz"


# ------------------------------------------------------------------ OC20/OC22 LMDBs (pickled PyG Data)
def _fake_pyg():
    """Classes named like torch_geometric's, to pickle records as fairchem's LMDBs hold them."""
    names = ["torch_geometric", "torch_geometric.data", "torch_geometric.data.data", "torch_geometric.data.storage"]
    mods = {n: types.ModuleType(n) for n in names}
    classes = {}
    for mod, cls in (("torch_geometric.data.data", "Data"), ("torch_geometric.data.data", "DataEdgeAttr"),
                     ("torch_geometric.data.data", "DataTensorAttr"), ("torch_geometric.data.storage", "GlobalStorage")):
        c = type(cls, (), {"__module__": mod})
        c.__qualname__ = cls
        setattr(mods[mod], cls, c)
        classes[cls] = c
    return mods, classes


def pyg_pickles(records: list[dict], style: str = "pyg2") -> list[bytes]:
    """Pickle each {attr: tensor/number} as a torch_geometric Data object (PyG 1.x or 2.x layout)."""
    mods, cls = _fake_pyg()
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    try:
        out = []
        for attrs in records:
            d = cls["Data"].__new__(cls["Data"])
            if style == "pyg1":
                d.__dict__.update(attrs)
            else:
                store = cls["GlobalStorage"].__new__(cls["GlobalStorage"])
                store.__dict__.update({"_mapping": dict(attrs), "_parent": d})
                d.__dict__.update({"_tensor_attr_cls": cls["DataTensorAttr"], "_edge_attr_cls": cls["DataEdgeAttr"],
                                   "_store": store})
            out.append(pickle.dumps(d, protocol=-1))
        return out
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_fairchem_lmdb(path: Path, blobs: list[bytes], length: bool = True) -> Path:
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 32, subdir=False, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for i, b in enumerate(blobs):
            txn.put(f"{i}".encode("ascii"), b)
        if length:
            txn.put("length".encode("ascii"), pickle.dumps(len(blobs), protocol=-1))
    env.sync()
    env.close()
    return Path(path)


# ------------------------------------------------------------------ ASE-LMDB (OMat24 / sAlex .aselmdb)
def write_aselmdb(path: Path, atoms_list: list, key_value_pairs: list[dict], delete: tuple = ()) -> Path:
    """Rows encoded as fairchem's LMDBDatabase._write does (zlib(orjson(row dict)))."""
    import lmdb
    import orjson
    from ase.db.row import AtomsRow

    def enc(obj) -> bytes:
        return zlib.compress(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))

    env = lmdb.open(str(path), map_size=1 << 32, subdir=False, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for i, (atoms, kvp) in enumerate(zip(atoms_list, key_value_pairs), start=1):
            row = AtomsRow(atoms)
            row.ctime = 0.0
            row.user = "test"
            dct = {k: row[k] for k in row.__dict__ if not (k[0] == "_" or k in row._keys or k == "id")}
            dct["mtime"] = 0.0
            if kvp:
                dct["key_value_pairs"] = kvp
            dct["cell"] = np.asarray(dct["cell"])
            if i not in delete:
                txn.put(f"{i}".encode("ascii"), enc(dct))
        txn.put(b"nextid", enc(len(atoms_list) + 1))
        if delete:
            txn.put(b"deleted_ids", enc(list(delete)))
    env.sync()
    env.close()
    return Path(path)
