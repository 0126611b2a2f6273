"""Streaming, validating, atomic writer of one graph store (layout: :mod:`gnnmegatron.data.schema`).

Writing goes to a sibling directory ``<path>.partial`` (attribute ``complete=False``) that is
renamed into place on ``close()``; readers refuse anything not marked complete.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

import gnnmegatron

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
            t0 = time.perf_counter()
            end = self.written + self.n
            self.array.resize((end,) + self.array.shape[1:])
            self.array[self.written:end] = self.buf[:self.n]
            self.written, self.n = end, 0
            self.flush_seconds += time.perf_counter() - t0

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
            raise StoreError(f"store {self.path} already exists; pass overwrite=True to replace it "
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
        structure's own ``source`` key overrides ``source``. Structures are validated one by
        one as they stream in; on a StructureError the ones before it in this call are kept.
        """
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

    @property
    def flush_seconds(self) -> float:
        """Seconds spent so far encoding, compressing and writing shard files."""
        cols = list(self._cols.values()) + ([self._ids] if self._ids is not None else [])
        return sum(c.flush_seconds for c in cols)

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
