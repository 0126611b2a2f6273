"""MPtrj release (``MPtrj_2022.9_full.json``, figshare 23713842; CHGNet's training set).

Layout (CHGNet ``chgnet/data/dataset.py`` ``StructureJsonData``; the release's documentation):
``{mp_id: {frame_id: frame}}`` with frame ids ``<task_id>-<calc_id>-<ionic_step>`` and each
frame holding ``structure`` (a pymatgen ``Structure.as_dict()``: ``lattice.matrix`` rows in Å,
``lattice.pbc``, ``sites[i].species[0].element``, ``sites[i].xyz`` Cartesian Å /
``sites[i].abc`` fractional), ``uncorrected_total_energy`` (raw VASP, eV),
``corrected_total_energy`` (with the MP2020 compatibility corrections, eV; CHGNet's
``energy_per_atom`` label is this divided by the number of atoms), ``energy_per_atom``,
``ef_per_atom``, ``force`` [n, 3] (eV/Å), ``stress`` [3, 3] (kBar, VASP sign: positive =
compressive), ``magmom`` and ``bandgap``.

Conversion: stress_store = -0.1 GPa/kBar x stress x (1 eV/Å^3 / 160.21766 GPa), i.e.
``stress * -6.2415091e-4`` eV/Å^3 (CHGNet applies the same ``* -0.1`` to get GPa in the ASE
sign, positive = tensile). Energies and forces need no conversion; forces are -dE/dx. Magnetic
moments and band gaps are not kept (the store has no field for them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gnnmegatron.data.formats.base import EnergyChoice, ImportOptions, InputError, Rejected, SourceFormat
from gnnmegatron.data.formats.jsonscan import top_level_entries

KBAR_TO_EV_A3 = 0.1 / 160.21766208  # 1 kBar = 0.1 GPa; 1 eV/Å^3 = 160.21766208 GPa (ase.units.GPa)
_DFT = "PBE (GGA) / PBE+U (GGA+U), VASP PAW, Materials Project 2022.9"


def _loads(raw: bytes):
    try:
        import orjson
        return orjson.loads(raw)
    except ImportError:
        return json.loads(raw)


def _symbols() -> dict[str, int]:
    from ase.data import atomic_numbers
    return atomic_numbers


class MPtrjFormat(SourceFormat):
    name = "mptrj"
    title = "MPtrj JSON"
    suffixes = (".json",)
    energies = {
        "corrected_total_energy": EnergyChoice("corrected_total_energy", "force", _DFT,
                                               "total energy with MP2020 compatibility corrections "
                                               "(= CHGNet's energy_per_atom x atoms)"),
        "uncorrected_total_energy": EnergyChoice("uncorrected_total_energy", "force", _DFT,
                                                 "raw VASP total energy (no corrections)"),
    }
    default_energy = "corrected_total_energy"
    units = "energy eV, forces eV/Å, positions Å (no conversion); stress kBar -> eV/Å^3 (x -6.2415091e-4)"
    sign = ("stress: VASP kBar (positive = compressive) -> ASE convention (positive = tensile), sign flipped; "
            "forces -dE/dx as released")

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        tasks = []
        for f in files:
            entries = []  # (mp_id, start, end), merged into byte ranges of about shard_bytes
            for key, a, b in top_level_entries(f):
                entries.append((key, a, b))
            if not entries:
                raise InputError(f, "holds no mp-id entries ({} or an empty object)")
            group: list = []
            for e in entries + [None]:
                if e is None or (group and e[2] - group[0][1] > opts.shard_bytes):
                    tasks.append({"file": str(f), "entries": [list(x) for x in group],
                                  "work": group[-1][2] - group[0][1], "unit": "B"})
                    group = []
                if e is not None:
                    group.append(e)
        return tasks

    def read(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        path = Path(task["file"])
        entries = task["entries"]
        lo = entries[0][1]
        with open(path, "rb") as fh:
            for mp_id, a, b in entries:  # one mp-id at a time: memory stays at one entry (~100 kB)
                fh.seek(a)
                yield from self._entry(fh.read(b - a), path, mp_id, a, b, lo, opts)

    def _entry(self, raw: bytes, path: Path, mp_id: str, a: int, b: int, lo: int, opts: ImportOptions):
        """The frames of one mp-id entry (bytes a..b of the file)."""
        try:
            frames = _loads(raw)
        except ValueError as e:
            raise InputError(path, f"invalid JSON ({e})", f"entry {mp_id!r} (bytes {a}..{b})") from None
        if not isinstance(frames, dict):
            raise InputError(path, f"value is a {type(frames).__name__}, expected {{frame_id: frame}}",
                             f"entry {mp_id!r}")
        for frame_id, fr in frames.items():
            where = f"{path}: {mp_id} frame {frame_id}"
            try:
                s = self._frame(fr, path, mp_id, frame_id, opts)
            except (KeyError, TypeError, ValueError, IndexError) as e:  # InputError is not among these
                raise InputError(path, f"malformed frame ({type(e).__name__}: {e})",
                                 f"{mp_id} frame {frame_id}") from None
            yield f"{mp_id}/{frame_id}", where, s, b - lo

    def _frame(self, fr, path: Path, mp_id: str, frame_id: str, opts: ImportOptions):
        where = f"{mp_id} frame {frame_id}"
        if not isinstance(fr, dict) or not isinstance(fr.get("structure"), dict):
            raise InputError(path, "frame has no 'structure' dictionary (not an MPtrj frame)", where)
        st = fr["structure"]
        try:
            lat = st["lattice"]
            cell = np.asarray(lat["matrix"], dtype=np.float64)
            pbc = np.asarray(lat.get("pbc", (True, True, True)), dtype=bool)
            sites = st["sites"]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"structure is not a pymatgen Structure dict ({type(e).__name__}: {e})",
                             where) from None
        table = _symbols()
        fast = _ordered_sites(sites, table)
        if fast is not None:
            z, xyz = fast
        else:
            res = self._sites(sites, cell, table, path, where)
            if isinstance(res, Rejected):
                return res
            z, xyz = res
        choice = self.energies[opts.energy]
        energy = fr.get(choice.field)
        forces = fr.get(choice.forces_field)
        stress = fr.get("stress")
        if stress is not None and len(stress):
            stress = np.asarray(stress, dtype=np.float64)
            if stress.shape != (3, 3):
                return Rejected("shape", f"stress has shape {stress.shape}, expected [3, 3] (kBar)")
            stress = stress * -KBAR_TO_EV_A3
        else:
            stress = None
        return {"atomic_numbers": np.asarray(z, dtype=np.int64), "positions": np.asarray(xyz, dtype=np.float64),
                "cell": cell, "pbc": pbc, "energy": None if energy is None else float(energy),
                "forces": None if forces is None else np.asarray(forces, dtype=np.float64), "stress": stress}

    @staticmethod
    def _sites(sites, cell, table, path: Path, where: str):
        """(atomic numbers, xyz) site by site with every check, or Rejected (the reference of _ordered_sites)."""
        z, xyz = [], []
        for k, site in enumerate(sites):
            species = site.get("species") or []
            if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-6:
                return Rejected("bad_value", f"site {k} is disordered (species {species}); MPtrj frames "
                                             "are ordered structures")
            sym = str(species[0].get("element", ""))
            if sym not in table:
                raise InputError(path, f"site {k}: unknown element {sym!r}", where)
            z.append(table[sym])
            if "xyz" in site:
                xyz.append(site["xyz"])
            else:
                xyz.append(np.asarray(site["abc"], dtype=np.float64) @ cell)
        return z, xyz


def _ordered_sites(sites, table) -> tuple | None:
    """(atomic numbers, xyz) of a list of ordered sites that all carry ``xyz``, by list comprehensions
    (~2x faster than the site loop of ``MPtrjFormat._sites``); None for anything else (disorder, a
    site without ``xyz``, an unknown element, a malformed site), which the site loop then handles."""
    try:
        species = [site["species"] for site in sites]
        if list(map(len, species)).count(1) != len(species):
            return None
        first = [sp[0] for sp in species]
        occu = [d.get("occu", 1.0) for d in first]
        if occu.count(1) != len(occu):
            return None
        z = [table[d["element"]] for d in first]
        xyz = [site["xyz"] for site in sites]
    except (KeyError, TypeError, AttributeError, IndexError):
        return None
    return z, xyz


__all__ = ["KBAR_TO_EV_A3", "MPtrjFormat"]
