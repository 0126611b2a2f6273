"""Streaming, validating, atomic writer of one graph store (layout: :mod:`gnnmegatron.data.schema`).

Writing goes to a sibling directory ``<path>.partial`` (attribute ``complete=False``) that is
renamed into place on ``close()``; readers refuse anything not marked complete.
"""

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

import gnnmegatron

from gnnmegatron.data.blocks import StructureBlock, block_from_structures, screen_block
from gnnmegatron.data.schema import (ARRAYS, MAX_Z, MIN_DISTANCE, SCHEMA_VERSION, STORE_FORMAT,
                                     UNITS, StoreError, StructureError, chunk_compressors,
                                     validate_structure)

# Measured by benchmarks/store_chunks.py (results/store_chunks-cpu2.json: 20k graphs of 4..64
# atoms, one core, chunk-aware batches of 32, best of 9): 1024 atoms/chunk 75k graphs/s, 4096
# 134k, 8192 153k, 16384 164k, 65536 167k; per-graph work dominates from ~8192 on. 8192 is the
# smallest within 10% of the best; smaller chunks give the sampler finer shuffling and make
# random-order access cheaper (1.9k graphs/s at 8192 vs 0.7k at 65536). A decoded chunk: 0.46 MB.
DEFAULT_ATOMS_PER_CHUNK = 8192
# Per-graph arrays are read whole at open, so this only sets shard/file granularity.
DEFAULT_GRAPHS_PER_CHUNK = 8192
# Shard files hold 2^19 atoms and 2^16 graphs by default: ~2000 files per array at 10^9 atoms,
# and the writer's buffers (one shard per array) stay at ~30 MB.
SHARD_ATOMS = 1 << 19
SHARD_GRAPHS = 1 << 16
# Structures per validation block of append(): the screen's numpy calls cost ~20 µs each, so
# blocks of a few hundred structures make them negligible per structure while the block's
# arrays stay small (a few MB at 100 atoms per structure).
APPEND_BLOCK = 512


class BlockResult:
    """What :meth:`GraphStoreWriter.append_block` did: errors [(row, StructureError)] and a summary
    of the appended structures (atoms, energies, largest |force|, structures with stress)."""

    def __init__(self, errors: list):
        self.errors = errors
        self.counts: list = []        # int64 arrays: atoms per appended structure
        self.energy: list = []        # float64 arrays (NaN: no energy)
        self.force_max = 0.0          # largest |F| of any appended atom with forces (eV/Å)
        self.with_stress = 0

    def add_rows(self, block: StructureBlock, oa: int, ob: int, a: int, b: int) -> None:
        self.counts.append(block.counts[a:b])
        self.energy.append(np.where(block.has_energy[a:b], block.energy[a:b], np.nan))
        if block.has_forces[a:b].any():
            f = block.forces[oa:ob]
            self.force_max = max(self.force_max, float(np.sqrt(np.einsum("ij,ij->i", f, f).max())))
        self.with_stress += int(block.has_stress[a:b].sum())

    def add_one(self, st: dict) -> None:
        self.counts.append(np.array([st["atomic_numbers"].shape[0]], dtype=np.int64))
        self.energy.append(np.array([np.nan if st["energy"] is None else st["energy"]]))
        f = st["forces"]
        if f is not None:
            self.force_max = max(self.force_max, float(np.sqrt(np.einsum("ij,ij->i", f, f).max())))
        self.with_stress += st["stress"] is not None


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _read_attrs(path: Path) -> dict | None:
    """Group attributes of a zarr group at ``path`` or None if it is not one."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Column:
    """Append buffer (one shard of rows) for one zarr array; writes whole shards only.

    Full shards are written once each (no read-modify-write of a partial shard); ``finish``
    writes the final partial shard and sets the exact length. Memory: one shard per array.
    """

    def __init__(self, array: zarr.Array, shard_rows: int):
        self.array = array
        self.shard_rows = shard_rows
        self.written = 0
        dtype = object if np.dtype(array.dtype).kind in "OTU" else array.dtype  # strings: object buffer
        self.buf = np.empty((shard_rows,) + tuple(array.shape[1:]), dtype=dtype)
        self.n = 0
        self.flush_seconds = 0.0  # time spent encoding, compressing and writing shards
        self.flush_cpu_seconds = 0.0  # CPU time of the process (all threads) meanwhile

    def append(self, block: np.ndarray) -> None:
        k = 0
        while k < block.shape[0]:
            take = min(block.shape[0] - k, self.shard_rows - self.n)
            self.buf[self.n:self.n + take] = block[k:k + take]
            self.n += take
            k += take
            if self.n == self.shard_rows:
                self._flush()

    def append_row(self, row) -> None:
        self.buf[self.n] = row
        self.n += 1
        if self.n == self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if self.n:
            t0, c0 = time.perf_counter(), time.process_time()
            end = self.written + self.n
            self.array.resize((end,) + self.array.shape[1:])
            self.array[self.written:end] = self.buf[:self.n]
            self.written, self.n = end, 0
            self.flush_seconds += time.perf_counter() - t0
            self.flush_cpu_seconds += time.process_time() - c0

    def finish(self) -> None:
        self._flush()


class GraphStoreWriter:
    """Stream structures into a new graph store; commit atomically on ``close()``.

    Usage::

        with GraphStoreWriter("data.zarr", producer="my importer") as w:
            w.append(structures)            # dicts or ase.Atoms, any number of calls

    Args:
        path: target directory. Data goes to ``<path>.partial`` until ``close()`` renames it.
        producer: free text stored in the metadata (tool + input).
        sources: names of the data sources; ``append(..., source=k)`` tags graphs with k.
        overwrite: replace an existing gnnmegatron store at ``path`` (on successful close).
        atoms_per_chunk / graphs_per_chunk: inner chunk rows of per-atom / per-graph arrays.
        chunks_per_shard: inner chunks per shard file (the writer buffers one shard per array);
            default: shards of 2^19 atoms and 2^16 graphs.
        known_elements: optional allowed atomic numbers (default 1..118).
        min_distance: duplicate-atom threshold in Å.
        ids: also store each structure's ``"id"`` (its identifier in the source release) in the
            optional string array ``ids``.

    Raises:
        StoreError: ``path`` exists and ``overwrite`` is False, ``path`` is not a gnnmegatron
            store, or another live process is writing the same store.
        StructureError: from ``append`` for an invalid structure (the writer stays usable; an
            exception that leaves a ``with`` block aborts the whole write).
    """

    def __init__(self, path, *, producer: str, sources: Iterable[str] = ("default",),
                 overwrite: bool = False, atoms_per_chunk: int = DEFAULT_ATOMS_PER_CHUNK,
                 graphs_per_chunk: int = DEFAULT_GRAPHS_PER_CHUNK,
                 chunks_per_shard: int | None = None, known_elements=None,
                 min_distance: float = MIN_DISTANCE, ids: bool = False):
        self.path = Path(path)
        self.sources = [str(s) for s in sources]
        if not self.sources:
            raise ValueError("sources must name at least one data source")
        for name, v in (("atoms_per_chunk", atoms_per_chunk), ("graphs_per_chunk", graphs_per_chunk),
                        ("chunks_per_shard", 1 if chunks_per_shard is None else chunks_per_shard)):
            if int(v) < 1:
                raise ValueError(f"{name}={v} must be >= 1")
        atoms_per_chunk, graphs_per_chunk = int(atoms_per_chunk), int(graphs_per_chunk)
        shard_chunks = {"atom": max(1, SHARD_ATOMS // atoms_per_chunk),
                        "graph": max(1, SHARD_GRAPHS // graphs_per_chunk)}
        if chunks_per_shard is not None:
            shard_chunks = {"atom": int(chunks_per_shard), "graph": int(chunks_per_shard)}
        self.overwrite = overwrite
        self.known_elements = None if known_elements is None else sorted(int(e) for e in known_elements)
        self.min_distance = float(min_distance)
        self._check_target()
        self.partial = _partial_path(self.path)
        self._clear_stale_partial()
        self._closed = False
        self.num_graphs = 0
        self.num_atoms = 0
        self._elements = np.zeros(MAX_Z + 1, dtype=bool)
        self._counts = {"with_energy": 0, "with_forces": 0, "with_stress": 0}
        self._per_source = [0] * len(self.sources)
        self._attrs = {
            "format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "complete": False,
            "producer": str(producer), "sources": self.sources, "units": UNITS,
            "atoms_per_chunk": int(atoms_per_chunk), "graphs_per_chunk": int(graphs_per_chunk),
            "chunks_per_shard": shard_chunks["atom"], "graph_chunks_per_shard": shard_chunks["graph"],
            "known_elements": self.known_elements,
            "writer": {"pid": os.getpid(), "host": socket.gethostname(),
                       "gnnmegatron": gnnmegatron.__version__, "zarr": zarr.__version__},
        }
        self._group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        self._group.update_attributes(self._attrs)  # one write (attrs.update writes per key)
        self._cols: dict[str, _Column] = {}
        for spec in ARRAYS.values():
            rows = atoms_per_chunk if spec.level == "atom" else graphs_per_chunk
            shard = rows * shard_chunks["atom" if spec.level == "atom" else "graph"]
            arr = self._group.create_array(
                spec.name, shape=(0,) + spec.inner_shape, dtype=spec.dtype,
                chunks=(rows,) + spec.inner_shape, shards=(shard,) + spec.inner_shape,
                compressors=chunk_compressors(), fill_value=spec.fill_value,
                config={"write_empty_chunks": True})  # every shard exists: missing = corrupt
            self._cols[spec.name] = _Column(arr, shard)
        self._cols["atom_offsets"].append_row(0)
        self._ids = None
        if ids:
            from zarr.codecs import BloscCodec, Crc32cCodec
            shard = graphs_per_chunk * shard_chunks["graph"]
            arr = self._group.create_array(
                "ids", shape=(0,), dtype=str, chunks=(graphs_per_chunk,), shards=(shard,),
                compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"), Crc32cCodec()),
                fill_value="", config={"write_empty_chunks": True})
            self._ids = _Column(arr, shard)
        self._extra_attrs: dict = {}

    def _check_target(self) -> None:
        if not self.path.exists():
            return
        if not self.overwrite:
            raise StoreError(f"store {self.path} already exists; pass overwrite=True (--overwrite) to replace it "
                             "or choose another path")
        attrs = _read_attrs(self.path)
        if self.path.is_file() or not attrs or attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path} exists and is not a gnnmegatron graph store; refusing to "
                             "overwrite it, remove it yourself or choose another path")

    def _clear_stale_partial(self) -> None:
        if not self.partial.exists():
            return
        writer = (_read_attrs(self.partial) or {}).get("writer") or {}
        pid, host = writer.get("pid"), writer.get("host")
        if (host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
                and _pid_alive(pid)):
            raise StoreError(f"{self.partial} is being written by process {pid}; wait for it or "
                             "kill it, then retry")
        shutil.rmtree(self.partial)  # left by an interrupted write

    def __enter__(self) -> "GraphStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, structures: Iterable[Any], source: int = 0) -> int:
        """Validate and append structures; returns the number appended by this call.

        Each structure is a dict (see :func:`validate_structure`) or an ``ase.Atoms``; a
        structure's own ``source`` key overrides ``source``. Structures are taken in blocks of
        up to :data:`APPEND_BLOCK` and validated a block at a time (:meth:`append_block`, same
        result as one by one); on a StructureError the ones before it are kept (and the stream
        has been read up to the end of that structure's block).
        """
        if self._closed:
            raise StoreError(f"writer for {self.path} is closed")
        n0 = self.num_graphs
        it = iter(structures)
        while True:
            chunk = list(itertools.islice(it, APPEND_BLOCK))
            if not chunk:
                break
            res = self.append_block(block_from_structures(chunk), source, stop_at_error=True)
            if res.errors:
                raise res.errors[0][1]
        return self.num_graphs - n0

    def append_block(self, block: StructureBlock, source: int = 0, stop_at_error: bool = True) -> "BlockResult":
        """Validate and append a block of structures (vectorised; same store and errors as one by one).

        Rows that fail validation are not appended; their errors (``StructureError`` naming the
        index the structure would have had) come back in row order. With ``stop_at_error`` only
        the rows before the first failing one are appended and only that error is returned.

        Rows that :func:`~gnnmegatron.data.blocks.screen_block` cannot clear go through
        :func:`validate_structure` one by one, in order.
        """
        if self._closed:
            raise StoreError(f"writer for {self.path} is closed")
        B = len(block)
        nsrc = len(self.sources)
        suspect = screen_block(block, self.known_elements, self.min_distance)
        if not 0 <= source < nsrc:
            suspect |= block.source < 0            # the default source is out of range
        suspect |= block.source >= nsrc
        i0 = self.num_graphs
        errors: list = []
        checked: dict = {}
        for r in np.flatnonzero(suspect).tolist():
            i = i0 + r - len(errors)               # rows before r that are appended
            s = block.structure(r)
            try:
                st = validate_structure(i, s, self.known_elements, self.min_distance)
                src = source if st["source"] is None else st["source"]
                if not 0 <= src < nsrc:
                    raise StructureError(i, "source", f"source {src} is out of range; this store has "
                                         f"{nsrc} sources {self.sources}")
            except StructureError as e:
                errors.append((r, e))
                if stop_at_error:
                    break
                continue
            sid = s.get("id") if isinstance(s, dict) else None
            checked[r] = (st, src, "" if sid is None else str(sid))
        end = errors[0][0] if (stop_at_error and errors) else B
        res = BlockResult(errors)
        off = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(block.counts, out=off[1:])
        a = 0
        for r in np.flatnonzero(suspect[:end]).tolist() + [end]:
            if r > a:
                self._add_rows(block, off, a, r, source, res)
            if r < end and r in checked:
                st, src, sid = checked[r]
                self._add(st, src)
                if self._ids is not None:
                    self._ids.append_row(sid)
                res.add_one(st)
            a = r + 1
        return res

    def _append_reference(self, structures: Iterable[Any], source: int = 0) -> int:
        """``append`` one structure at a time with :func:`validate_structure` (the oracle of the block path)."""
        if self._closed:
            raise StoreError(f"writer for {self.path} is closed")
        n0 = self.num_graphs
        for s in structures:
            i = self.num_graphs
            st = validate_structure(i, s, self.known_elements, self.min_distance)
            src = source if st["source"] is None else st["source"]
            if not 0 <= src < len(self.sources):
                raise StructureError(i, "source", f"source {src} is out of range; this store has "
                                     f"{len(self.sources)} sources {self.sources}")
            self._add(st, src)
            if self._ids is not None:
                sid = s.get("id") if isinstance(s, dict) else None
                self._ids.append_row("" if sid is None else str(sid))
        return self.num_graphs - n0

    def _add(self, st: dict, src: int) -> None:
        n = st["atomic_numbers"].shape[0]
        c = self._cols
        has_f, has_e, has_s = st["forces"] is not None, st["energy"] is not None, st["stress"] is not None
        c["atomic_numbers"].append(st["atomic_numbers"])
        c["positions"].append(st["positions"])
        c["forces"].append(st["forces"] if has_f else np.zeros((n, 3), np.float32))
        self.num_atoms += n
        self.num_graphs += 1
        c["atom_offsets"].append_row(self.num_atoms)
        c["energy"].append_row(st["energy"] if has_e else 0.0)
        c["cell"].append_row(st["cell"])
        c["pbc"].append_row(st["pbc"])
        c["stress"].append_row(st["stress"] if has_s else 0.0)
        c["has_energy"].append_row(has_e)
        c["has_forces"].append_row(has_f)
        c["has_stress"].append_row(has_s)
        c["source"].append_row(src)
        self._elements[st["atomic_numbers"]] = True
        self._counts["with_energy"] += has_e
        self._counts["with_forces"] += has_f
        self._counts["with_stress"] += has_s
        self._per_source[src] += 1

    def _add_rows(self, block: StructureBlock, off: np.ndarray, a: int, b: int, source: int,
                  res: "BlockResult") -> None:
        """Append rows a..b of a block that passed the screen (the columns are validate_structure's values)."""
        c = self._cols
        oa, ob = int(off[a]), int(off[b])
        counts = block.counts[a:b]
        z = block.atomic_numbers[oa:ob]
        c["atomic_numbers"].append(z)
        c["positions"].append(block.positions[oa:ob])
        c["forces"].append(block.forces[oa:ob])
        c["atom_offsets"].append(self.num_atoms + np.cumsum(counts))
        has_e, has_f, has_s = block.has_energy[a:b], block.has_forces[a:b], block.has_stress[a:b]
        c["energy"].append(np.where(has_e, block.energy[a:b], 0.0))
        c["cell"].append(block.cell[a:b])
        c["pbc"].append(block.pbc[a:b])
        c["stress"].append(np.where(has_s[:, None, None], block.stress[a:b], 0.0))
        c["has_energy"].append(has_e)
        c["has_forces"].append(has_f)
        c["has_stress"].append(has_s)
        src = block.source[a:b]
        src = np.where(src >= 0, src, source)
        c["source"].append(src)
        if self._ids is not None:
            self._ids.append(np.array(block.ids[a:b], dtype=object))
        self._elements[z] = True
        self._counts["with_energy"] += int(has_e.sum())
        self._counts["with_forces"] += int(has_f.sum())
        self._counts["with_stress"] += int(has_s.sum())
        for k, v in enumerate(np.bincount(src, minlength=len(self.sources)).tolist()):
            self._per_source[k] += v
        self.num_atoms += ob - oa
        self.num_graphs += b - a
        res.add_rows(block, oa, ob, a, b)

    @property
    def flush_seconds(self) -> float:
        """Seconds spent so far encoding, compressing and writing shard files."""
        cols = list(self._cols.values()) + ([self._ids] if self._ids is not None else [])
        return sum(c.flush_seconds for c in cols)

    @property
    def flush_cpu_seconds(self) -> float:
        """CPU seconds of the process (zarr's codec threads included) while shard files were written."""
        cols = list(self._cols.values()) + ([self._ids] if self._ids is not None else [])
        return sum(c.flush_cpu_seconds for c in cols)

    def flush(self) -> None:
        """Write all buffered rows now (the shard files of a store are final only after ``close``)."""
        for col in list(self._cols.values()) + ([self._ids] if self._ids is not None else []):
            col.finish()

    def set_attrs(self, **attrs) -> None:
        """Extra group attributes (JSON values) written on ``close()`` (e.g. import statistics)."""
        self._extra_attrs.update(attrs)

    def write_file(self, name: str, data: bytes) -> None:
        """Write a file into the store directory; it is committed (or discarded) with the store."""
        if self._closed or "/" in name or name.startswith(".") or name == "zarr.json" or name in ARRAYS:
            raise ValueError(f"cannot write file {name!r} into store {self.path}")
        (self.partial / name).write_bytes(data)

    def close(self) -> None:
        """Flush the final partial shards, mark the store complete and rename it into place."""
        if self._closed:
            return
        try:
            for col in self._cols.values():
                col.finish()
            if self._ids is not None:
                self._ids.finish()
            self._attrs.update(self._extra_attrs)
            self._attrs.update({
                "complete": True, "num_graphs": self.num_graphs, "num_atoms": self.num_atoms,
                "elements": np.flatnonzero(self._elements).tolist(),
                "counts": dict(self._counts, per_source=self._per_source),
                "has_stress": self._counts["with_stress"] > 0,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
            self._group.update_attributes(self._attrs)  # one write (attrs.update writes per key)
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _commit(self) -> None:
        if self.path.exists():
            self._check_target()  # re-check: something may have appeared meanwhile
            old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
            os.rename(self.partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.partial, self.path)

    def abort(self) -> None:
        """Discard everything written; an existing store at ``path`` is left untouched."""
        self._closed = True
        shutil.rmtree(self.partial, ignore_errors=True)
