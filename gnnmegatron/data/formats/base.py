"""Shared pieces of the source-release readers: errors, options, the reader interface, file checks.

A reader (:class:`SourceFormat`) turns the files of one release, as downloaded, into a list of
*tasks* (JSON-serialisable dicts: a file and a range of it, each of which becomes one shard of
the dataset) and streams each task's structures as *items*::

    (id, where, structure, done)

``id`` is the structure's identifier in the release (kept in the store), ``where`` names the file
and frame for messages, ``structure`` is a dict in the store's units (keys ``atomic_numbers``,
``positions`` [Å], ``cell`` [Å], ``pbc``, ``energy`` [eV], ``forces`` [eV/Å], ``stress``
[eV/Å^3, ASE sign]; a label the release lacks is None) or a :class:`Rejected` when the reader
itself found the record unusable, and ``done`` is the task's progress so far in the format's
``progress_unit`` ("B": input bytes, "structures": records).

A reader that decodes many records at once (ANI-1x conformer arrays, extxyz text) may instead
yield a :class:`ReaderBlock`: the same information for a run of records, in columns (a
:class:`~gnnmegatron.data.blocks.StructureBlock`). Its ``read_frames`` then yields the same records
one item at a time (the per-frame reference, ``GNNMEGATRON_IMPORT_PER_FRAME=1``); both give the
same store, rejections and errors.

Malformed input raises :class:`InputError` naming the file and frame; a missing optional
package raises :class:`MissingDependencyError` naming the ``importers`` extra.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

EXTRA = "importers"  # setup.py extra that holds the optional packages of the readers


class DataImportError(RuntimeError):
    """Any error of ``gnnmegatron data import`` that has a one-line explanation for the user."""


class InputError(DataImportError):
    """An input file is missing, unreadable or malformed; the message names the file and frame."""

    def __init__(self, path, message: str, where: str | None = None):
        self.path, self.where = str(path), where
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


class OutputError(DataImportError):
    """The output location cannot be written (or already holds something)."""


class RejectedRecordError(DataImportError):
    """A bad record was found and ``on_bad="refuse"`` (the default)."""


class MissingDependencyError(DataImportError):
    """An optional package a reader needs is not installed."""


class Rejected(NamedTuple):
    """A record a reader found unusable (yielded in place of the structure)."""

    reason: str  # one of gnnmegatron.data.schema.REJECTION_REASONS
    message: str


class ReaderBlock(NamedTuple):
    """A run of records decoded together (yielded by a reader in place of single items).

    ``block`` holds every record of the run in columns (rows listed in ``rejected`` are ignored);
    ``ids`` are their identifiers, ``where(row)`` names a row's file and frame for messages, and
    ``done`` is the task's progress after the run.
    """

    block: object            # gnnmegatron.data.blocks.StructureBlock
    ids: list
    where: object            # callable: row -> str
    rejected: dict           # row -> Rejected
    done: int


def optional_import(module: str, purpose: str, pip_name: str | None = None):
    """Import an optional dependency or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_name = pip_name or module
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{pip_name}', which is not installed; install the "
            f"importers extra (pip install 'gnnmegatron[{EXTRA}]') or just `pip install {pip_name}`") from None


@dataclasses.dataclass
class ImportOptions:
    """What to import and how (validated; messages show the values).

    Args:
        format: reader name (see ``gnnmegatron.data.formats.FORMATS``).
        energy: which energy to take (format-specific names, None: the format's default).
        lmdb_energy: what the energy of OC20 LMDB records is ("adsorption": fairchem's S2EF LMDBs,
            referenced; "total").
        oc20_ref: fairchem's ``oc20_ref.pkl`` (system id -> energy that turns an OC20 adsorption
            energy into a total energy), for total energies from OC20 LMDBs.
        index: frame selection of the ``ase`` format (ASE syntax, e.g. ":" or "::10").
        ase_format: ASE format name for ambiguous suffixes (``ase`` format only).
        workers: worker processes (1: import in this process).
        on_bad: "refuse" (stop at the first bad record; finished shards are kept) or "skip" (log it
            to the rejection file and go on).
        skip_missing_energy: skip records without an energy even when ``on_bad="refuse"``.
        shard_bytes: target input bytes per shard for text releases (extxyz, MPtrj JSON).
        shard_structures: target structures per shard for record releases (HDF5, LMDB).
        source_names: source name(s); default: the format name (one source), or for ``ase`` the
            input file stems (one source per file).
    """

    format: str = "ase"
    energy: str | None = None
    lmdb_energy: str = "adsorption"
    oc20_ref: str | None = None
    index: str = ":"
    ase_format: str | None = None
    workers: int = 1
    on_bad: str = "refuse"
    skip_missing_energy: bool = False
    shard_bytes: int = 512 << 20
    shard_structures: int = 100_000
    source_names: list | None = None

    def __post_init__(self):
        from gnnmegatron.data.formats import FORMATS

        if self.format not in FORMATS:
            raise DataImportError(f"--format {self.format!r} is not a known source format; choose one of "
                                  f"{sorted(FORMATS)}")
        fmt = FORMATS[self.format]
        if self.energy is None:
            self.energy = fmt.default_energy
        if self.energy not in fmt.energies:
            raise DataImportError(f"--energy {self.energy!r} is not available for --format {self.format}; "
                                  f"choose one of {list(fmt.energies)} (default {fmt.default_energy!r})")
        if self.lmdb_energy not in ("adsorption", "total"):
            raise DataImportError(f"--lmdb-energy {self.lmdb_energy!r} must be 'adsorption' or 'total'")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise DataImportError(f"--workers {self.workers!r} must be an integer >= 1")
        if self.on_bad not in ("refuse", "skip"):
            raise DataImportError(f"--on-bad {self.on_bad!r} must be 'refuse' or 'skip'")
        if not self.shard_bytes >= 1 or not self.shard_structures >= 1:
            raise DataImportError(f"shard sizes must be >= 1, got shard_bytes={self.shard_bytes}, "
                                  f"shard_structures={self.shard_structures}")
        if self.format != "ase" and (self.index not in (":", None) or self.ase_format):
            raise DataImportError(f"--index/--ase-format apply to --format ase only, not --format {self.format}")
        if self.format == "ase":
            from gnnmegatron.data.formats.ase_files import parse_index
            parse_index(self.index)  # a bad --index fails here, before anything is read or written

    def fingerprint_dict(self) -> dict:
        """The options that decide what the shards contain (a resumed import must match them)."""
        d = dataclasses.asdict(self)
        for k in ("workers", "on_bad", "skip_missing_energy"):
            d.pop(k)
        return d


@dataclasses.dataclass(frozen=True)
class EnergyChoice:
    """One selectable energy of a release: its field, the matching forces and the DFT level."""

    field: str
    forces_field: str | None
    dft_level: str
    doc: str


class SourceFormat:
    """A release reader. Subclasses set the class attributes and implement ``plan`` and ``read``."""

    name = ""
    title = ""
    progress_unit = "B"             # "B" (input bytes) or "structures"
    suffixes: tuple = ()            # file suffixes taken from a directory given as input
    text = True                     # text release: binary content is an input error
    energies: dict = {}
    default_energy = ""
    units = ""                      # unit conversion, as documentation
    sign = ""                       # sign conventions (forces, stress), as documentation

    def expand_inputs(self, paths) -> list[Path]:
        """Input paths -> files (a directory gives its files with the format's suffixes, sorted)."""
        files = []
        for p in map(Path, paths):
            if not p.exists():
                raise InputError(p, "does not exist")
            if p.is_dir():
                found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(self.suffixes))
                if not found:
                    raise InputError(p, f"is a directory with no {self.title} files in it (looked for "
                                        f"{', '.join('*' + s for s in self.suffixes)}); give the files or "
                                        "the folder that holds them")
                files.extend(found)
            else:
                files.append(p)
        for f in files:
            self.check_file(f)
        return files

    def check_file(self, path: Path) -> None:
        """Refuse unreadable, empty or (for text releases) binary files before anything is written."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(8192)
        except OSError as e:
            raise InputError(path, f"cannot be read ({e.strerror or e})") from None
        if not head:
            raise InputError(path, f"is empty (0 bytes); expected a {self.title} file")
        if self.text and not str(path).endswith((".xz", ".gz", ".bz2")) and _looks_binary(head):
            raise InputError(path, f"is a binary file, not a {self.title} text file (wrong file or "
                                   "--format?)")

    def requires_forces(self, opts: ImportOptions) -> bool:
        """Records without forces are bad records (``missing_forces``) when the energy choice has forces."""
        return self.energies[opts.energy].forces_field is not None

    def plan(self, files: list[Path], opts: ImportOptions) -> list[dict]:
        raise NotImplementedError

    def read(self, task: dict, opts: ImportOptions) -> Iterator:
        """Items ``(id, where, structure, done)`` and/or :class:`ReaderBlock` runs of them."""
        raise NotImplementedError

    def read_frames(self, task: dict, opts: ImportOptions) -> Iterator[tuple]:
        """The records of ``read`` one item at a time (the per-frame reference path)."""
        for item in self.read(task, opts):
            if isinstance(item, ReaderBlock):
                raise TypeError(f"{type(self).__name__}.read yields blocks; it must define read_frames")
            yield item

    def source_info(self, opts: ImportOptions, files) -> dict:
        """What the source is and how it was converted (stored in the dataset's ``source_info``)."""
        choice = self.energies[opts.energy]
        return {"format": self.name, "title": self.title, "energy": opts.energy,
                "energy_field": choice.field, "forces_field": choice.forces_field,
                "dft_level": choice.dft_level, "energy_doc": choice.doc, "units": self.units,
                "sign": self.sign, "inputs": [str(f) for f in files]}


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte character cut at the end is fine
    return False


def file_signature(path: Path) -> list:
    """(path, size, mtime) of an input: a resumed import refuses inputs that changed."""
    st = os.stat(path)
    return [str(path), st.st_size, int(st.st_mtime)]


def split_ranges(counts: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive index ranges [a, b) of ``counts`` whose sums are about ``target`` (>= 1 item each)."""
    out, a, acc = [], 0, 0
    for i, c in enumerate(counts):
        if acc and acc + c > target:
            out.append((a, i))
            a, acc = i, 0
        acc += c
    if a < len(counts):
        out.append((a, len(counts)))
    return out

