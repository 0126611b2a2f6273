"""Any file ASE reads (extxyz, .traj, OUTCAR, vasprun.xml, CIF, ASE databases), one shard per file.

Labels come from each frame's calculator results (``energy``, else ``free_energy``; ``forces``;
``stress``), as :func:`gnnmegatron.data.importers.atoms_to_structure` reads them; units are
ASE's (eV, Å, eV/Å, eV/Å^3, stress positive = tensile), so nothing is converted. Each input file
is its own source (named after its stem). Errors raised by ASE while reading a frame are
reported with the file and the frame number instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gnnmegatron.data.formats.base import (DataImportError, EnergyChoice, ImportOptions, InputError, Rejected,
                                           SourceFormat)

# Suffixes of text formats: a binary file with one of them is refused before ASE sees it.
_TEXT_SUFFIXES = (".xyz", ".extxyz", ".cif", ".pdb", ".json", ".xml", ".vasp", ".poscar", ".in", ".out",
                  ".log", ".cfg", ".res", ".gen", ".xsf")


def parse_index(index) -> int | slice:
    """ASE frame selection ("::10", "-5:", "3", ":") -> int or slice; DataImportError if malformed."""
    from ase.io.formats import string2index

    if index is None:
        return slice(None)
    if isinstance(index, (int, slice)):
        return index
    text = str(index).strip()
    try:
        parts = text.split(":")
        if len(parts) > 3 or not all(p.strip().lstrip("-").isdigit() or p.strip() == "" for p in parts):
            raise ValueError(text)
        sel = string2index(text)
    except (ValueError, TypeError):
        raise DataImportError(f"--index {index!r} is not a frame selection; use ASE syntax: ':' (all), '::10' "
                              "(every 10th), '-5:' (last 5), '3' (frame 3), '2:8:2'") from None
    if isinstance(sel, slice) and sel.step == 0:
        raise DataImportError(f"--index {index!r} has step 0; the step must be a non-zero integer")
    return sel


class AseFormat(SourceFormat):
    name = "ase"
    title = "structure (any ASE-readable format)"
    progress_unit = "files"
    text = False
    energies = {"energy": EnergyChoice("calculator energy (free_energy if absent)", "forces",
                                       "as computed by the producer of the file", "the frame's energy")}
    default_energy = "energy"
    units = "ASE units: eV, Å, eV/Å, eV/Å^3 (no conversion)"
    sign = "ASE conventions: forces -dE/dx, stress positive = tensile"

    def expand_inputs(self, paths) -> list[Path]:
        files = []
        for p in map(str, paths):
            if "://" in p:
                files.append(p)  # database URL (postgresql://, mysql://)
                continue
            path = Path(p)
            if not path.exists():
                raise InputError(path, "does not exist")
            if path.is_dir():
                raise InputError(path, "is a directory; give the files inside it (e.g. "
                                       f"{path}/*.extxyz), or pass --format for a release folder")
            self.check_file(path)
            files.append(path)
        return files

    def check_file(self, path: Path) -> None:
        if path.suffix.lower() == ".aselmdb":
            raise InputError(path, "is an ASE-LMDB database (OMat24 / sAlex): import it with --format omat24 or "
                                   "--format alexandria (plain ASE needs fairchem's LMDB backend to read it)")
        super().check_file(path)
        if path.suffix.lower() in _TEXT_SUFFIXES:
            from gnnmegatron.data.formats.base import _looks_binary
            with open(path, "rb") as fh:
                if _looks_binary(fh.read(8192)):
                    raise InputError(path, f"is a binary file, but its suffix {path.suffix} names a text format "
                                           "(wrong file?)")

    def requires_forces(self, opts: ImportOptions) -> bool:
        return False  # ASE files often hold energies only; missing forces are stored as absent

    def plan(self, files, opts: ImportOptions) -> list[dict]:
        return [{"file": str(f), "source": k, "work": 1, "unit": "files", "single": len(files) == 1}
                for k, f in enumerate(files)]

    def read(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        from gnnmegatron.data.importers import NoFrameSelected, atoms_to_structure, iter_frames

        path = task["file"]
        label = "first frame"
        frames = iter_frames(path, index=opts.index, format=opts.ase_format, require_frames=task.get("single", True))
        k = 0
        while True:
            try:
                label, atoms = next(frames)
            except StopIteration:
                break
            except DataImportError:
                raise
            except NoFrameSelected as e:
                raise InputError(path, e.reason) from None
            except Exception as e:  # ASE raises many types; name the file and frame instead
                where = _failed_frame(opts.index, k, label)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(path, f"cannot be read by ASE ({type(e).__name__}: {msg})", where) from None
            k += 1
            try:
                s = atoms_to_structure(atoms, source=task["source"])
            except (TypeError, ValueError) as e:
                yield f"{Path(path).name}:{label}", f"{path}: {label}", Rejected("bad_value", str(e)), 0
                continue
            s.pop("source", None)
            yield f"{Path(path).name}:{label.replace(' ', '')}", f"{path}: {label}", s, 0


def _failed_frame(index, k: int, last: str) -> str:
    """Name of the frame ASE failed on: the (k+1)-th selected frame (k frames were read before it)."""
    sel = parse_index(index)
    if isinstance(sel, int):
        return f"frame {sel}" if sel >= 0 else f"frame {sel} (counted from the end)"
    start, step = sel.start or 0, sel.step or 1
    if start >= 0 and step > 0:
        return f"frame {start + k * step}"
    return f"item {k} of --index {index!r}" + (f" (after {last})" if k else "")


__all__ = ["AseFormat", "parse_index"]
