"""Zarr v3 graph store: streaming, validating, atomic writer and a chunk-caching reader.

The layout is documented in :mod:`gnnmegatron.data.schema`. Writing goes to a sibling
directory ``<path>.partial`` (attribute ``complete=False``) that is renamed into place on
``close()``; readers refuse anything not marked complete.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

import gnnmegatron

from gnnmegatron.data.schema import (ARRAYS, MAX_Z, MIN_DISTANCE, SCHEMA_VERSION, STORE_FORMAT,
                                     UNITS, ShardReader, StoreError, StructureError,
                                     chunk_compressors, validate_structure)

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
DEFAULT_CACHE_CHUNKS = 16


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _read_attrs(path: Path) -> dict | None:
    """Group attributes of a zarr group at ``path`` or None if it is not one."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None


def _try(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as e:
        return e


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
        self.buf = np.empty((shard_rows,) + tuple(array.shape[1:]), dtype=array.dtype)
        self.n = 0

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
            end = self.written + self.n
            self.array.resize((end,) + self.array.shape[1:])
            self.array[self.written:end] = self.buf[:self.n]
            self.written, self.n = end, 0

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
                 min_distance: float = MIN_DISTANCE):
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
        self._group.attrs.update(self._attrs)
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

    def close(self) -> None:
        """Flush the final partial shards, mark the store complete and rename it into place."""
        if self._closed:
            return
        try:
            for col in self._cols.values():
                col.finish()
            self._attrs.update({
                "complete": True, "num_graphs": self.num_graphs, "num_atoms": self.num_atoms,
                "elements": np.flatnonzero(self._elements).tolist(),
                "counts": dict(self._counts, per_source=self._per_source),
                "has_stress": self._counts["with_stress"] > 0,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
            self._group.attrs.update(self._attrs)
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


def _shard_files_present(root: Path, name: str, rows: int, shard_rows: int, ndim: int) -> list[int]:
    """Indices of shard files of array ``name`` that are missing on disk."""
    n_shards = -(-rows // shard_rows)
    suffix = "/0" * (ndim - 1)
    return [k for k in range(n_shards) if not (root / name / "c" / f"{k}{suffix}").is_file()]


class GraphStore:
    """Read-only random access to a graph store.

    ``store[i]`` and ``store.get_many(indices)`` return structure dicts (as accepted by the
    writer, plus ``"index"``). Offsets and per-graph arrays are read at open (about 170 bytes
    per graph); per-atom arrays are read one storage chunk at a time through an LRU cache of
    ``cache_chunks`` decoded chunks, so reading graphs in chunk-aware order (all graphs of a
    chunk together, e.g. ``ChunkAwareSampler``) decodes each chunk once.

    Args:
        path: the store directory.
        cache_chunks: decoded per-atom chunks kept in memory (56 bytes per atom each).
        direct_read: decode per-atom chunks straight from the shard files (plain file I/O +
            numcodecs, ~5x faster per chunk than zarr's async pipeline); False reads through
            zarr. Stores in another layout always read through zarr.

    Raises:
        StoreError: path missing, not a gnnmegatron store, incomplete (interrupted write),
            unknown schema version, offsets inconsistent with the arrays, missing/corrupt chunk
            (also raised later, when a corrupt chunk is first read).

    Shapes:
        G graphs, C storage chunks: ``atom_counts`` [G], ``atom_offsets`` [G+1],
        ``graph_chunks`` [C+1] (graph i is in chunk c iff graph_chunks[c] <= i < graph_chunks[c+1]).
    """

    def __init__(self, path, cache_chunks: int = DEFAULT_CACHE_CHUNKS, direct_read: bool = True):
        self.path = Path(path)
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks={cache_chunks} must be >= 1")
        self.cache_chunks = int(cache_chunks)
        self.direct_read = bool(direct_read)
        self._open()

    # ---------------------------------------------------------------- opening and checks
    def _open(self) -> None:
        p = self.path
        if not p.exists():
            partial = _partial_path(p)
            if partial.exists() and (_read_attrs(partial) or {}).get("complete"):
                raise StoreError(f"store {p} does not exist but {partial} is a complete store whose "
                                 f"final rename was interrupted; rename it to {p.name}")
            if partial.exists():
                raise StoreError(f"store {p} is incomplete (interrupted write; partial data in "
                                 f"{partial}); re-run the import")
            raise StoreError(f"store {p} does not exist; create it with `gnnmegatron data import` "
                             "or GraphStoreWriter")
        attrs = _read_attrs(p)
        if attrs is None or attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{p} is not a gnnmegatron graph store (no zarr group with "
                             f"format={STORE_FORMAT!r}); create it with GraphStoreWriter")
        if not attrs.get("complete", False):
            raise StoreError(f"store {p} is incomplete (interrupted write); re-run the import")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"store {p} has schema version {attrs.get('schema_version')!r} but this "
                             f"gnnmegatron reads version {SCHEMA_VERSION}; upgrade gnnmegatron or "
                             "re-import the data")
        self._attrs = attrs
        group = zarr.open_group(str(p), mode="r")
        try:
            self._arrays = {name: group[name] for name in ARRAYS}
        except KeyError as e:
            raise StoreError(f"store {p} lacks array {e}; it is corrupt, re-import the data") from None
        G, N = int(attrs["num_graphs"]), int(attrs["num_atoms"])
        for name, spec in ARRAYS.items():
            arr = self._arrays[name]
            rows = {"atom": N, "graph": G, "offsets": G + 1}[spec.level]
            if arr.shape != (rows,) + spec.inner_shape:
                raise StoreError(f"store {p}: array '{name}' has shape {arr.shape}, expected "
                                 f"{(rows,) + spec.inner_shape} for {G} graphs / {N} atoms; it is "
                                 "corrupt or truncated, re-import the data")
            if spec.level != "atom":
                missing = _shard_files_present(p, name, rows, arr.shards[0], arr.ndim)
                if missing:
                    raise StoreError(f"store {p}: array '{name}' is missing shard file(s) "
                                     f"{missing[:5]}; the store is corrupt, re-import the data")
        self._offsets = self._read_eager("atom_offsets")
        off = self._offsets
        if off[0] != 0 or off[-1] != N or np.any(np.diff(off) < 1):
            raise StoreError(f"store {p}: atom_offsets are inconsistent with the atom arrays "
                             f"(first {off[0]}, last {off[-1]}, {N} atoms, every graph needs >= 1 "
                             "atom); the store is corrupt, re-import the data")
        self._energy = self._read_eager("energy")
        self._cell = self._read_eager("cell")
        self._pbc = self._read_eager("pbc")
        self._stress = self._read_eager("stress")
        self._has_energy = self._read_eager("has_energy")
        self._has_forces = self._read_eager("has_forces")
        self._has_stress = self._read_eager("has_stress")
        self._source = self._read_eager("source")
        for name, a in (("energy", self._energy), ("cell", self._cell), ("stress", self._stress)):
            if a.size and np.isnan(a).any():
                g = int(np.argwhere(np.isnan(a))[0][0])
                raise StoreError(f"store {p}: array '{name}' has missing data (graph {g}); the "
                                 "store is corrupt, re-import the data")
        if G and (self._source.min() < 0 or self._source.max() >= len(attrs["sources"])):
            raise StoreError(f"store {p}: array 'source' holds ids outside the {len(attrs['sources'])}"
                             " sources; the store is corrupt, re-import the data")
        self._apc = int(self._arrays["positions"].chunks[0])
        names = ("atomic_numbers", "positions", "forces")
        self._atom_arrays = [self._arrays[n] for n in names]
        self._readers = None
        if self.direct_read:  # fast synchronous path for stores in the GraphStoreWriter layout
            try:
                self._readers = [ShardReader(p, n, self._arrays[n]) for n in names]
            except NotImplementedError:
                pass
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        n_chunks = -(-N // self._apc)
        self._graph_chunks = np.searchsorted(off[:-1], np.arange(n_chunks + 1) * self._apc,
                                             side="left").astype(np.int64)

    def _read_eager(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._arrays[name][...])
        except Exception as e:
            raise StoreError(f"store {self.path}: array '{name}' could not be read or decoded "
                             f"({type(e).__name__}: {e}); a file may be truncated or corrupt, "
                             "re-import the data") from e

    def __getstate__(self) -> dict:  # picklable (DataLoader workers): reopened on unpickling
        return {"path": self.path, "cache_chunks": self.cache_chunks, "direct_read": self.direct_read}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self._offsets.shape[0] - 1

    def __repr__(self) -> str:
        return (f"GraphStore({str(self.path)!r}, graphs={len(self)}, atoms={self.num_atoms}, "
                f"chunks={self.num_chunks}, sources={self._attrs['sources']})")

    @property
    def metadata(self) -> dict:
        """Group attributes (units, elements, producer, schema_version, sources, counts, ...)."""
        md = dict(self._attrs)
        md["version"] = md["schema_version"]
        return md

    @property
    def num_atoms(self) -> int:
        return int(self._offsets[-1])

    @property
    def atom_offsets(self) -> np.ndarray:
        """[G+1] int64 atom offsets (read-only view)."""
        v = self._offsets.view()
        v.flags.writeable = False
        return v

    @property
    def atom_counts(self) -> np.ndarray:
        """[G] int64 atoms per graph."""
        return np.diff(self._offsets)

    @property
    def atoms_per_chunk(self) -> int:
        return self._apc

    @property
    def num_chunks(self) -> int:
        return self._graph_chunks.shape[0] - 1

    @property
    def graph_chunks(self) -> np.ndarray:
        """[C+1] int64 graph boundaries of the storage chunks (a graph's chunk is its first atom's)."""
        return self._graph_chunks.copy()

    @property
    def sources(self) -> np.ndarray:
        """[G] int32 source id of every graph."""
        return self._source.copy()

    # ---------------------------------------------------------------- chunk cache
    def _read_chunk(self, c: int) -> tuple:
        """Atoms of all graphs that start in storage chunk ``c`` (may run into chunk c+1)."""
        g0, g1 = int(self._graph_chunks[c]), int(self._graph_chunks[c + 1])
        a0, a1 = int(self._offsets[g0]), int(self._offsets[g1])
        if a1 == a0:
            return a0, np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3))
        if self._readers is not None:
            got = [_try(r.read, a0, a1) for r in self._readers]
        else:
            got = _read_concurrently(self._atom_arrays, slice(a0, a1))
        for name, x in zip(("atomic_numbers", "positions", "forces"), got):
            if isinstance(x, BaseException):
                raise StoreError(f"store {self.path}: array '{name}' chunk {c} (atoms {a0}..{a1}) "
                                 f"could not be read or decoded ({type(x).__name__}: {x}); a file "
                                 "may be truncated or corrupt, re-import the data") from x
        z, pos, forces = got
        for name, bad in (("atomic_numbers", z == 0), ("positions", np.isnan(pos)),
                          ("forces", np.isnan(forces))):
            if bad.any():
                raise StoreError(f"store {self.path}: array '{name}' chunk {c} (atoms {a0}..{a1}) is "
                                 "missing or zeroed (fill values found); the store is corrupt, "
                                 "re-import the data")
        return a0, z.astype(np.int64), pos, forces.astype(np.float64)

    def _chunk(self, c: int) -> tuple:
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        data = self._read_chunk(c)
        self._cache[c] = data
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return data

    # ---------------------------------------------------------------- access
    def __getitem__(self, i) -> dict:
        G = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_)):
            raise TypeError(f"graph index must be an int, got {type(i).__name__}")
        if not -G <= i < G:
            raise IndexError(f"graph index {i} out of range for a store of {G} graphs")
        return self.get_many([i])[0]

    def get_many(self, indices) -> list[dict]:
        """Structures for ``indices`` (in that order), decoding each storage chunk once.

        Indices are visited grouped by storage chunk, so a batch spread over k chunks costs k
        chunk reads at most even when the cache holds fewer than k chunks. Arrays in the
        returned dicts are fresh copies (per-graph ones are views of per-call arrays).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        G = len(self)
        if idx.size and (idx.min() < -G or idx.max() >= G):
            bad = idx[(idx < -G) | (idx >= G)][0]
            raise IndexError(f"graph index {bad} out of range for a store of {G} graphs")
        idx = np.where(idx < 0, idx + G, idx)
        starts, ends = self._offsets[idx], self._offsets[idx + 1]
        chunks = starts // self._apc
        cell, pbc, stress = self._cell[idx], self._pbc[idx], self._stress[idx]
        energy, source = self._energy[idx].tolist(), self._source[idx].tolist()
        has_e, has_f = self._has_energy[idx].tolist(), self._has_forces[idx].tolist()
        has_s = self._has_stress[idx].tolist()
        starts, ends, chunk_l, idx_l = starts.tolist(), ends.tolist(), chunks.tolist(), idx.tolist()
        out: list = [None] * idx.size
        current = -1
        for k in np.argsort(chunks, kind="stable").tolist():
            if chunk_l[k] != current:
                current = chunk_l[k]
                a0, z, pos, f = self._chunk(current)
            lo, hi = starts[k] - a0, ends[k] - a0
            out[k] = {
                "atomic_numbers": z[lo:hi].copy(),
                "positions": pos[lo:hi].copy(),
                "cell": cell[k],
                "pbc": pbc[k],
                "energy": energy[k] if has_e[k] else None,
                "forces": f[lo:hi].copy() if has_f[k] else None,
                "stress": stress[k] if has_s[k] else None,
                "source": source[k],
                "index": idx_l[k],
            }
        return out

    def chunk_of(self, indices) -> np.ndarray:
        """Storage chunk of each graph index. Shapes: indices [B] -> [B] int64."""
        return self._offsets[np.asarray(indices, dtype=np.int64)] // self._apc


def _read_concurrently(arrays: list, sel: slice) -> list:
    """``arrays[k][sel]`` for all k in one event-loop round trip (zarr's fixed per-call latency,
    ~1 ms, dominates reads of one chunk). Returns, per array, an ndarray or the exception."""
    from zarr.core.sync import sync

    async def _gather():
        return await asyncio.gather(*(a.async_array.getitem(sel) for a in arrays),
                                    return_exceptions=True)

    return [x if isinstance(x, BaseException) else np.asarray(x) for x in sync(_gather())]


def split_indices(num_graphs: int, fractions=(0.9, 0.05, 0.05), seed: int = 0) -> dict:
    """Deterministic random train/val/test split.

    Args:
        num_graphs: G.
        fractions: (train, val, test), each >= 0, summing to 1.
        seed: numpy Generator seed; the same (G, fractions, seed) gives the same split.

    Returns:
        dict(train=, val=, test=) of sorted, disjoint int64 index arrays covering range(G).
    """
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, (int, np.integer)) or num_graphs < 0:
        raise ValueError(f"num_graphs={num_graphs!r} must be an int >= 0")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or not np.all(np.isfinite(fr)) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise ValueError(f"fractions={tuple(fractions)} must be 3 non-negative numbers "
                         "(train, val, test) summing to 1")
    perm = np.random.default_rng(seed).permutation(int(num_graphs))
    b1, b2 = np.round(np.cumsum(fr)[:2] * num_graphs).astype(np.int64)
    return {"train": np.sort(perm[:b1]), "val": np.sort(perm[b1:b2]), "test": np.sort(perm[b2:])}
