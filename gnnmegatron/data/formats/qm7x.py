"""QM7-X release (``1000.hdf5`` ... ``8000.hdf5``, decompressed from the ``.xz`` files on Zenodo).

Layout (Hoja et al., Sci. Data 8, 43 (2021); the readers of schnetpack, openqdc, mlcg): per file,
one group per molecule (``"1"``, ``"2"``, ...), inside it one group per conformer (e.g.
``Geom-m1-i1-c1-opt``, ``Geom-m1-i1-c1-d1``), each holding ``atNUM`` [n] atomic numbers,
``atXYZ`` [n, 3] (Å), energies in eV (``ePBE0+MBD`` total energy, ``ePBE0``, ``eAT``
atomization energy, ...; stored as 1-element arrays) and forces in eV/Å (``totFOR`` =
PBE0+MBD forces, ``pbe0FOR``, ``vdwFOR``).

Units are already the store's (eV, Å, eV/Å): no conversion. Forces are forces (-dE/dx) as
released. Molecules: no cell, no periodicity, no stress.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gnnmegatron.data.formats.ani1x import open_h5
from gnnmegatron.data.formats.base import EnergyChoice, ImportOptions, InputError, SourceFormat, split_ranges

_DFT = "PBE0+MBD (FHI-aims, tight)"


class QM7XFormat(SourceFormat):
    name = "qm7x"
    title = "QM7-X HDF5"
    progress_unit = "structures"
    suffixes = (".hdf5", ".h5")
    text = False
    energies = {
        "ePBE0+MBD": EnergyChoice("ePBE0+MBD", "totFOR", _DFT, "total energy with many-body dispersion"),
        "eAT": EnergyChoice("eAT", "totFOR", _DFT, "atomization energy (total minus free-atom energies; "
                                                   "same forces as the total energy)"),
        "ePBE0": EnergyChoice("ePBE0", "pbe0FOR", "PBE0 (FHI-aims, tight)", "PBE0 energy without dispersion"),
    }
    default_energy = "ePBE0+MBD"
    units = "eV, Å, eV/Å as released (no conversion)"
    sign = "forces are -dE/dx as released; molecules: no cell, no stress"

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        tasks = []
        for f in files:
            with open_h5(f) as h:
                mols = list(h.keys())
                counts = []
                for m in mols:
                    g = h[m]
                    if not hasattr(g, "keys"):
                        raise InputError(f, "is not in the QM7-X layout (molecule groups holding "
                                            "conformer groups)", f"entry {m!r}")
                    counts.append(len(g))
            for a, b in split_ranges(counts, opts.shard_structures):
                tasks.append({"file": str(f), "mol_start": a, "mol_stop": b, "work": sum(counts[a:b]),
                              "unit": "structures"})
        return tasks

    def read(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        from h5py import h5d, h5g, h5s

        def dataset(gid, name: str, dtype, mol, conf, where):
            try:
                d = h5d.open(gid, name.encode())
            except KeyError:
                raise InputError(path, f"has no dataset {name!r} (--energy {opts.energy}); present: "
                                       f"{sorted(mol[conf].keys())[:12]}", where) from None
            out = np.empty(d.shape, dtype=dtype)
            d.read(h5s.ALL, h5s.ALL, out)  # h5py's low-level reads: ~40% less per-conformer overhead
            return out

        choice = self.energies[opts.energy]
        path = Path(task["file"])
        done = 0
        zero = np.zeros((3, 3))
        with open_h5(path) as h:
            for m in list(h.keys())[task["mol_start"]:task["mol_stop"]]:
                mol = h[m]
                for conf in mol.keys():
                    done += 1
                    where = f"molecule {m!r} conformer {conf!r}"
                    gid = h5g.open(mol.id, conf.encode())
                    e = dataset(gid, choice.field, np.float64, mol, conf, where).reshape(-1)
                    if e.size != 1:
                        raise InputError(path, f"{choice.field} has {e.size} values, expected 1", where)
                    s = {"atomic_numbers": dataset(gid, "atNUM", np.int64, mol, conf, where).reshape(-1),
                         "positions": dataset(gid, "atXYZ", np.float64, mol, conf, where), "cell": zero,
                         "pbc": None, "energy": float(e[0]),
                         "forces": dataset(gid, choice.forces_field, np.float64, mol, conf, where), "stress": None}
                    yield conf, f"{path}: {where}", s, done


__all__ = ["QM7XFormat"]
