"""Import any ASE-readable file into a gnnmegatron graph store (streaming).

Every format ``ase.io.iread`` reads works: extended XYZ, ASE trajectories (.traj), VASP
OUTCARs/vasprun.xml, CIF, and so on. ASE databases (``.db`` SQLite, ``.json``, or a
``postgresql://`` / ``mysql://`` URL) are read row by row with ``ase.db.connect(...).select()``.
Each input file becomes its own source (``store.metadata["sources"]``), so one store can hold
several datasets and losses can weight them.

Labels are read from the frame's calculator results (``energy``, ``forces``, ``stress``; this is
where extxyz, trajectories and ASE databases put them), or, with ``energy_key`` /
``forces_key`` / ``stress_key``, from ``atoms.info`` / ``atoms.arrays`` (extxyz fields such as
``REF_energy``) or a database row's key-value pairs or data.

Typical use::

    from gnnmegatron.data.importers import import_ase
    summary = import_ase(["train.extxyz", "oxides.db"], "data/mixed.zarr")

This writes one plain store in one process. ``gnnmegatron data import`` (any ASE files, and the
study's releases with ``--format``) uses :func:`gnnmegatron.data.import_driver.import_dataset`
instead: worker processes, shards joined by a manifest, resume, a rejection log.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

PRODUCER = "gnnmegatron.data.importers"
_DB_SUFFIXES = (".db", ".json", ".aselmdb")
_DB_SCHEMES = ("postgresql://", "mysql://", "mariadb://")


def is_ase_database(path: str) -> bool:
    """True for inputs read with ``ase.db.connect`` (.db, .json, .aselmdb files and database URLs)."""
    p = str(path)
    return p.startswith(_DB_SCHEMES) or Path(p).suffix.lower() in _DB_SUFFIXES


def _parse_index(index) -> int | slice:
    from ase.io.formats import string2index

    return string2index(index) if isinstance(index, str) else index


def iter_frames(path: str, index=":", format: str | None = None, *,
                require_frames: bool = True) -> Iterator[tuple[str, Atoms]]:
    """Stream ``(label, atoms)`` pairs from one input; ``label`` names the frame in error messages.

    ``label`` is "frame K" with K the 0-based frame index in the file when it is known (non-negative
    slice or integer index), "item K of index=..." otherwise, and "row id=R (item K)" for databases.
    An ``index`` other than ":" that selects no frame raises ``NoFrameSelected`` when
    ``require_frames`` (one input: the selection is wrong), and yields nothing otherwise (one of
    several inputs applying the same selection may be shorter).
    """
    sel = _parse_index(index)
    count = 0
    for count, item in enumerate(_iter_selected(path, sel, index, format), 1):
        yield item
    if count == 0 and require_frames and not (isinstance(sel, slice) and sel == slice(None)):
        raise NoFrameSelected(path, f"index {index!r} selects no frame of it (past its last frame?); "
                                    f"':' takes them all")


class NoFrameSelected(ValueError):
    """An explicit frame selection (``index``) that selects nothing of a file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def _iter_selected(path: str, sel, index, format) -> Iterator[tuple[str, Atoms]]:
    if is_ase_database(path):
        yield from _iter_db(path, sel)
        return
    import ase.io

    if isinstance(sel, int):
        frame_numbers = iter([sel]) if sel >= 0 else None
    elif (sel.start or 0) >= 0 and (sel.stop is None or sel.stop >= 0) and (sel.step or 1) > 0:
        frame_numbers = itertools.count(sel.start or 0, sel.step or 1)
    else:
        frame_numbers = None
    for k, atoms in enumerate(ase.io.iread(path, index=sel, format=format)):
        label = f"frame {next(frame_numbers)}" if frame_numbers is not None else f"item {k} of index={index!r}"
        yield label, atoms


def _iter_db(path: str, sel) -> Iterator[tuple[str, Atoms]]:
    import ase.db

    db = ase.db.connect(path)
    if isinstance(sel, int):
        sel = slice(sel, sel + 1 if sel != -1 else None)
    start, stop, step = sel.start, sel.stop, sel.step or 1
    if step <= 0:
        raise ValueError(f"{path}: database import needs a positive step in index, got step {step}")
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        start, stop, step = slice(start, stop, step).indices(db.count())
    for k, row in enumerate(itertools.islice(db.select(), start, stop, step)):
        yield f"row id={row.id} (item {k})", row.toatoms(add_additional_information=True)


def _lookup(atoms: Atoms, key: str, per_atom: bool):
    """Find a label under ``key`` in calc results, info/arrays, or database key-value pairs / data."""
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]
    if per_atom and key in atoms.arrays:
        return atoms.arrays[key]
    if key in atoms.info:
        return atoms.info[key]
    for extra in ("key_value_pairs", "data"):
        d = atoms.info.get(extra) or {}
        if key in d:
            return d[key]
    return None


def atoms_to_structure(atoms: Atoms, *, source: int = 0, energy_key: str | None = None,
                       forces_key: str | None = None, stress_key: str | None = None) -> dict:
    """Convert one ``ase.Atoms`` frame to the store's structure dict (labels looked up as described above).

    Shapes:
        atomic_numbers [n] int64, positions [n, 3] float64, cell [3, 3] float64, pbc [3] bool,
        energy float or None (eV), forces [n, 3] float64 or None (eV/Å), stress [3, 3] float64 or None
        (eV/Å^3; Voigt [6] input is expanded).
    """
    def calc_result(name):
        calc = atoms.calc
        return None if calc is None else getattr(calc, "results", {}).get(name)

    energy = _lookup(atoms, energy_key, False) if energy_key else calc_result("energy")
    if energy is None and not energy_key:
        energy = calc_result("free_energy")
    forces = _lookup(atoms, forces_key, True) if forces_key else calc_result("forces")
    stress = _lookup(atoms, stress_key, False) if stress_key else calc_result("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (6,):
            stress = voigt_6_to_full_3x3_stress(stress)
    return {
        "atomic_numbers": np.asarray(atoms.numbers, dtype=np.int64),
        "positions": np.asarray(atoms.positions, dtype=np.float64),
        "cell": np.asarray(atoms.cell.array, dtype=np.float64),
        "pbc": np.asarray(atoms.pbc, dtype=bool),
        "energy": None if energy is None else float(np.asarray(energy).reshape(())),
        "forces": None if forces is None else np.asarray(forces, dtype=np.float64),
        "stress": stress,
        "source": int(source),
    }


def _default_source_names(inputs: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for p in inputs:
        stem = Path(str(p).rstrip("/")).stem or str(p)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem] - 1}")
    return names


def import_ase(inputs: str | Sequence[str], out_path, *, source_names: Sequence[str] | None = None,
               index: str | int | slice = ":", format: str | None = None, energy_key: str | None = None,
               forces_key: str | None = None, stress_key: str | None = None, skip_missing_energy: bool = False,
               progress: bool = True, overwrite: bool = False, producer: str = PRODUCER) -> dict:
    """Import ASE-readable files into one Zarr graph store, one source per input file (streaming).

    Args:
        inputs: a path or list of paths (any ``ase.io.iread`` format; .db/.json ASE databases).
        out_path: output store directory.
        source_names: one name per input (default: file stems, made unique).
        index: frames to read from every input, ASE syntax (":" all, "::10", "-5:", 3).
        format: ASE format name for ``ase.io.iread`` when the suffix is ambiguous (ignored for databases).
        energy_key: read the energy (eV) from this key instead of the calculator results.
        forces_key: read the forces (eV/Å) from this per-atom array/key instead.
        stress_key: read the stress (eV/Å^3, Voigt [6] or [3, 3]) from this key instead.
        skip_missing_energy: skip frames with no energy (counted in the summary) instead of raising.
        progress: show a tqdm progress bar.
        overwrite: replace an existing store at ``out_path``.
        producer: recorded in the store metadata.

    Returns:
        Summary dict: path, num_graphs, num_atoms, elements (sorted atomic numbers), skipped_missing_energy,
        sources (list of names), per_source ({name: {"graphs", "atoms", "skipped", "input"}}).

    Raises:
        FileNotFoundError: an input file does not exist (checked before anything is written).
        StructureError: a frame fails validation or has no energy; the message names the input file
            and the frame. The previous store at ``out_path`` (if any) is left untouched.
    """
    from tqdm.auto import tqdm

    from gnnmegatron.data.schema import StructureError
    from gnnmegatron.data.store import GraphStoreWriter

    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
    if not inputs:
        raise ValueError("import_ase needs at least one input file")
    for p in inputs:
        if not p.startswith(_DB_SCHEMES) and not Path(p).exists():
            raise FileNotFoundError(f"input file {p!r} does not exist")
    names = list(source_names) if source_names is not None else _default_source_names(inputs)
    if len(names) != len(inputs):
        raise ValueError(f"got {len(names)} source_names for {len(inputs)} inputs; give one name per input")
    if len(set(names)) != len(names):
        raise ValueError(f"source_names must be unique, got {names}")

    per_source = {n: {"graphs": 0, "atoms": 0, "skipped": 0, "input": p} for n, p in zip(names, inputs)}
    elements: set[int] = set()
    bar = tqdm(unit="struct", disable=not progress, desc="import")
    try:
        with GraphStoreWriter(out_path, producer=producer, sources=names, overwrite=overwrite) as writer:
            for src, (path, name) in enumerate(zip(inputs, names)):
                stats = per_source[name]
                bar.set_postfix_str(Path(path).name)
                for label, atoms in iter_frames(path, index=index, format=format, require_frames=len(inputs) == 1):
                    where = f"input {path!r} {label}"
                    try:
                        s = atoms_to_structure(atoms, source=src, energy_key=energy_key,
                                               forces_key=forces_key, stress_key=stress_key)
                    except (TypeError, ValueError) as e:
                        raise StructureError(writer.num_graphs, "labels", f"{where}: cannot read labels: {e}") from e
                    if s["energy"] is None:
                        if skip_missing_energy:
                            stats["skipped"] += 1
                            continue
                        key = (f"energy_key={energy_key!r} not found" if energy_key
                               else "no energy in calculator results")
                        raise StructureError(
                            writer.num_graphs, "energy",
                            f"{where}: structure has no energy ({key}); pass energy_key=<name> if the energy "
                            "is stored under another name, or skip_missing_energy=True to skip such frames"
                        )
                    try:
                        writer.append([s], source=src)
                    except StructureError as e:
                        detail = str(e).removeprefix(f"structure {e.index}, field '{e.field}': ")
                        raise StructureError(e.index, e.field, f"{where}: {detail}") from e
                    stats["graphs"] += 1
                    stats["atoms"] += len(s["atomic_numbers"])
                    elements.update(int(z) for z in np.unique(s["atomic_numbers"]))
                    bar.update(1)
    finally:
        bar.close()
    return {
        "path": str(out_path),
        "num_graphs": sum(v["graphs"] for v in per_source.values()),
        "num_atoms": sum(v["atoms"] for v in per_source.values()),
        "elements": sorted(elements),
        "skipped_missing_energy": sum(v["skipped"] for v in per_source.values()),
        "sources": names,
        "per_source": per_source,
    }


__all__ = ["PRODUCER", "atoms_to_structure", "import_ase", "is_ase_database", "iter_frames"]
