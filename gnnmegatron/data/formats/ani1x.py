"""ANI-1x / ANI-1ccx release (``ani1x-release.h5``).

Layout (aiqm/ANI1x_datasets ``dataloader.py`` and README; Smith et al., Sci. Data 7, 134
(2020)): one HDF5 group per molecular formula (e.g. ``C4H6N2O``), each holding
``atomic_numbers`` [Na], ``coordinates`` [Nc, Na, 3] (Å) and one array per property and level of
theory, e.g. ``wb97x_dz.energy`` [Nc] (Hartree), ``wb97x_dz.forces`` [Nc, Na, 3] (Hartree/Å),
``wb97x_tz.energy``, ``wb97x_tz.forces``, ``ccsd(t)_cbs.energy``. A value a conformer lacks is
NaN (the reference loader drops such rows).

Conversion: energy x 27.211386 eV/Hartree (``ase.units.Hartree``), forces x 27.211386
(Hartree/Å -> eV/Å). Forces are forces (-dE/dx) as released: no sign change. Molecules: cell
zeros, no periodicity, no stress. A conformer whose chosen energy (or forces) is NaN lacks that
label: a bad record (reason ``missing_energy`` / ``missing_forces``), refused, or skipped and
logged with ``--on-bad skip``; with ``--energy ccsd(t)_cbs`` most conformers have no CCSD(T)
energy, so use ``--on-bad skip`` there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gnnmegatron.data.blocks import StructureBlock
from gnnmegatron.data.formats.base import (EnergyChoice, ImportOptions, InputError, ReaderBlock, Rejected, SourceFormat,
                                           optional_import, split_ranges)

HARTREE_EV = 27.211386024367243  # ase.units.Hartree (CODATA 2014), checked in the tests
_READ_CONFORMERS = 4096  # conformers read (and validated) at a time: ~4 MB at 60 atoms
_ZERO33 = np.zeros((3, 3))


def _slice_shape(shape: tuple, c0: int, c1: int) -> tuple:
    """Shape of ``dataset[c0:c1]`` for a dataset of ``shape``."""
    return (len(range(*slice(c0, c1).indices(shape[0]))),) + tuple(shape[1:])


def h5py_module():
    return optional_import("h5py", "reading HDF5 releases (ANI-1x, QM7-X)")


def open_h5(path: Path):
    h5py = h5py_module()
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"is not an HDF5 file ({e})") from None


class ANI1xFormat(SourceFormat):
    name = "ani1x"
    title = "ANI-1x HDF5"
    progress_unit = "structures"
    suffixes = (".h5", ".hdf5")
    text = False
    energies = {
        "wb97x_dz": EnergyChoice("wb97x_dz.energy", "wb97x_dz.forces", "ωB97x/6-31G(d) (Gaussian 09)",
                                 "ANI-1x DFT energies and forces (all conformers)"),
        "wb97x_tz": EnergyChoice("wb97x_tz.energy", "wb97x_tz.forces", "ωB97x/def2-TZVPP (ORCA)",
                                 "triple-zeta DFT subset (AIMNet)"),
        "ccsd(t)_cbs": EnergyChoice("ccsd(t)_cbs.energy", None, "CCSD(T)*/CBS (ANI-1ccx)",
                                    "coupled-cluster energies, no forces (ANI-1ccx subset)"),
    }
    default_energy = "wb97x_dz"
    units = "energy Hartree -> eV (x 27.211386), forces Hartree/Å -> eV/Å (x 27.211386), coordinates Å"
    sign = "forces are -dE/dx as released (no sign change); molecules: no cell, no stress"

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        choice = self.energies[opts.energy]
        tasks = []
        for f in files:
            with open_h5(f) as h:
                segs = []
                for name, grp in h.items():
                    if not hasattr(grp, "keys") or "coordinates" not in grp or "atomic_numbers" not in grp:
                        raise InputError(f, "is not in the ANI-1x layout (each top-level group needs "
                                            "'atomic_numbers' and 'coordinates')", f"group {name!r}")
                    for key in (choice.field, choice.forces_field):
                        if key and key not in grp:
                            raise InputError(f, f"has no dataset {key!r} (--energy {opts.energy}); present: "
                                                f"{sorted(grp.keys())}", f"group {name!r}")
                    nc = int(grp["coordinates"].shape[0])
                    for c0 in range(0, nc, opts.shard_structures):  # big groups may span shards
                        segs.append((name, c0, min(nc, c0 + opts.shard_structures)))
            for a, b in split_ranges([s[2] - s[1] for s in segs], opts.shard_structures):
                tasks.append({"file": str(f), "segments": [list(s) for s in segs[a:b]],
                              "work": sum(s[2] - s[1] for s in segs[a:b]), "unit": "structures"})
        return tasks

    def _segments(self, task: dict, opts: ImportOptions):
        """Per slice of a group: (name, first conformer, z [Na], coordinates [n, Na, 3] Å, energy [n] eV,
        forces [n, Na, 3] eV/Å or None)."""
        choice = self.energies[opts.energy]
        path = Path(task["file"])
        with open_h5(path) as h:
            for name, c0, c1 in task["segments"]:
                grp = h[name]
                z = np.asarray(grp["atomic_numbers"][()], dtype=np.int64).reshape(-1)
                # shapes of the whole segment's slices, checked before reading it in pieces
                cshape = _slice_shape(grp["coordinates"].shape, c0, c1)
                eshape = (int(np.prod(_slice_shape(grp[choice.field].shape, c0, c1))),)
                fshape = _slice_shape(grp[choice.forces_field].shape, c0, c1) if choice.forces_field else None
                n = c1 - c0
                if cshape != (n, z.size, 3) or eshape != (n,) or (fshape is not None and fshape != (n, z.size, 3)):
                    raise InputError(path, f"shapes do not match: atomic_numbers {z.shape}, coordinates "
                                           f"{cshape}, {choice.field} {eshape}"
                                           + (f", {choice.forces_field} {fshape}" if fshape is not None else ""),
                                     f"group {name!r} conformers {c0}..{c1 - 1}")
                for a in range(c0, c1, _READ_CONFORMERS):  # big groups: bounded memory
                    b = min(c1, a + _READ_CONFORMERS)
                    coords = np.asarray(grp["coordinates"][a:b], dtype=np.float64)
                    energy = np.asarray(grp[choice.field][a:b], dtype=np.float64).reshape(-1)
                    forces = (np.asarray(grp[choice.forces_field][a:b], dtype=np.float64)
                              if choice.forces_field else None)
                    energy = energy * HARTREE_EV
                    if forces is not None:
                        forces = forces * HARTREE_EV
                    yield name, a, z, coords, energy, forces

    def _missing(self, energy, forces, opts: ImportOptions) -> dict:
        """Conformers without the chosen label (NaN in the release) -> Rejected."""
        choice = self.energies[opts.energy]
        no_e = np.isnan(energy)
        no_f = np.isnan(forces).any(axis=(1, 2)) if forces is not None else no_e & False
        return {k: Rejected("missing_energy" if no_e[k] else "missing_forces",
                            f"no {choice.field if no_e[k] else choice.forces_field} value (NaN in the release)")
                for k in np.flatnonzero(no_e | no_f).tolist()}

    def read(self, task: dict, opts: ImportOptions) -> Iterator[ReaderBlock]:
        """Whole conformer arrays as blocks (one per group slice): no per-conformer Python work."""
        path = Path(task["file"])
        done = 0
        for name, c0, z, coords, energy, forces in self._segments(task, opts):
            n, na = coords.shape[:2]
            done += n
            ids = [f"{name}/{c0 + k}" for k in range(n)]

            def row_dict(k, z=z, coords=coords, energy=energy, forces=forces):
                return {"atomic_numbers": z, "positions": coords[k], "cell": _ZERO33, "pbc": None,
                        "energy": float(energy[k]), "forces": None if forces is None else forces[k], "stress": None}

            blk = StructureBlock(
                counts=np.full(n, na, dtype=np.int64), atomic_numbers=np.tile(z, n), positions=coords.reshape(-1, 3),
                forces=np.zeros((n * na, 3)) if forces is None else forces.reshape(-1, 3),
                has_forces=np.full(n, forces is not None), energy=energy, has_energy=np.ones(n, dtype=bool),
                cell=np.zeros((n, 3, 3)), pbc=np.zeros((n, 3), dtype=bool), stress=np.zeros((n, 3, 3)),
                has_stress=np.zeros(n, dtype=bool), source=np.full(n, -1, dtype=np.int64), ids=ids,
                suspect=np.zeros(n, dtype=bool), row_dict=row_dict)
            yield ReaderBlock(blk, ids, lambda k, name=name, c0=c0: f"{path}: group {name!r} conformer {c0 + k}",
                              self._missing(energy, forces, opts), done)

    def read_frames(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        """One conformer at a time (the per-frame reference of ``read``)."""
        path = Path(task["file"])
        done = 0
        for name, c0, z, coords, energy, forces in self._segments(task, opts):
            rejected = self._missing(energy, forces, opts)
            for k in range(coords.shape[0]):
                done += 1
                rid, where = f"{name}/{c0 + k}", f"{path}: group {name!r} conformer {c0 + k}"
                if k in rejected:
                    yield rid, where, rejected[k], done
                    continue
                yield (rid, where,
                       {"atomic_numbers": z, "positions": coords[k], "cell": _ZERO33, "pbc": None,
                        "energy": float(energy[k]), "forces": None if forces is None else forces[k],
                        "stress": None}, done)


__all__ = ["ANI1xFormat", "HARTREE_EV", "open_h5"]
