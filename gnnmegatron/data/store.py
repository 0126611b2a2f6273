"""Zarr v3 graph store: a chunk-caching reader (:class:`GraphStore`) of one store or sharded dataset.

The layout is documented in :mod:`gnnmegatron.data.schema`; the writer lives in
:mod:`gnnmegatron.data.writer` (re-exported here). Writing goes to a sibling directory
``<path>.partial`` (attribute ``complete=False``) that is renamed into place on ``close()``;
readers refuse anything not marked complete.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zarr

from gnnmegatron.data.schema import ARRAYS, SCHEMA_VERSION, STORE_FORMAT, ShardReader, StoreError
from gnnmegatron.data.writer import (DEFAULT_ATOMS_PER_CHUNK, DEFAULT_GRAPHS_PER_CHUNK,  # noqa: F401
                                     SHARD_ATOMS, SHARD_GRAPHS, GraphStoreWriter, _partial_path,
                                     _read_attrs)

__all__ = ["DEFAULT_ATOMS_PER_CHUNK", "DEFAULT_CACHE_CHUNKS", "DEFAULT_GRAPHS_PER_CHUNK", "GraphStore",
           "GraphStoreWriter", "SHARD_ATOMS", "SHARD_GRAPHS", "split_indices"]

DEFAULT_CACHE_CHUNKS = 16


def _try(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def _shard_files_present(root: Path, name: str, rows: int, shard_rows: int, ndim: int) -> list[int]:
    """Indices of shard files of array ``name`` that are missing on disk."""
    n_shards = -(-rows // shard_rows)
    suffix = "/0" * (ndim - 1)
    return [k for k in range(n_shards) if not (root / name / "c" / f"{k}{suffix}").is_file()]


def _refuse_unreadable_metadata(p: Path) -> None:
    """StoreError when ``p`` holds zarr metadata that is not valid JSON (a damaged store), rather than
    the "not a graph store" a valid zarr array or a plain folder gets."""
    import json

    for name in ("zarr.json", ".zgroup", ".zattrs"):
        meta = p / name
        if meta.is_file():
            try:
                json.loads(meta.read_text())
            except (ValueError, UnicodeDecodeError):
                raise StoreError(f"{p}: its metadata {meta} is not valid JSON; the store is corrupt, re-import the "
                                 f"data") from None


class GraphStore:
    """Read-only random access to a graph store.

    ``store[i]`` and ``store.get_many(indices)`` return structure dicts (as accepted by the
    writer, plus ``"index"``). Offsets and per-graph arrays are read at open (about 170 bytes
    per graph); per-atom arrays are read one storage chunk at a time through an LRU cache of
    ``cache_chunks`` decoded chunks, so reading graphs in chunk-aware order (all graphs of a
    chunk together, e.g. ``ChunkAwareSampler``) decodes each chunk once.

    A sharded dataset (a root group whose manifest lists shard stores, as written by
    ``gnnmegatron data import``; see :mod:`gnnmegatron.data.manifest`) reads as one store: graph
    indices, ``atom_offsets``, ``graph_chunks`` and ``sources`` are global.

    Args:
        path: the store (or sharded dataset) directory.
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
                                 f"{partial}); re-run the import (`gnnmegatron data import` "
                                 "continues from the shards it finished)")
            raise StoreError(f"store {p} does not exist; create it with `gnnmegatron data import` "
                             "or GraphStoreWriter")
        attrs = _read_attrs(p)
        if attrs is None:
            _refuse_unreadable_metadata(p)
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
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        if attrs.get("layout") == "sharded":
            from gnnmegatron.data.manifest import open_sharded
            open_sharded(self)  # sets the same fields from the shard stores, plus self._parts
            return
        self._parts = None
        group = zarr.open_group(str(p), mode="r")
        self._arrays = {}
        for name in ARRAYS:
            try:
                self._arrays[name] = group[name]
            except KeyError:
                raise StoreError(f"store {p} lacks array '{name}'; it is corrupt, re-import the data") from None
            except (ValueError, TypeError) as e:  # unreadable metadata (zarr.json / .zarray): JSON or schema errors
                raise StoreError(f"store {p}: the metadata of array '{name}' ({p / name}) cannot be read "
                                 f"({type(e).__name__}: {e}); the store is corrupt, re-import the data") from None
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
        n_chunks = -(-N // self._apc)
        self._graph_chunks = np.searchsorted(off[:-1], np.arange(n_chunks + 1) * self._apc,
                                             side="left").astype(np.int64)
        self._chunk_of_graph = off[:-1] // self._apc

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
        if self._parts is not None:
            from gnnmegatron.data.manifest import read_part_chunk
            return read_part_chunk(self, c)
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
        chunks = self._chunk_of_graph[idx]
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
        return self._chunk_of_graph[np.asarray(indices, dtype=np.int64)]

    @property
    def num_shards(self) -> int:
        """Shard stores of a sharded dataset (1 for a plain store)."""
        return 1 if self._parts is None else len(self._parts)

    def structure_ids(self, indices) -> list[str]:
        """Original identifiers (``ids`` array written by the importers) of graphs ``indices``.

        Returns "" for graphs of stores written without ids. Shapes: indices [B] -> list of B str.
        """
        from gnnmegatron.data.manifest import structure_ids
        return structure_ids(self, indices)

    def provenance(self, i: int) -> dict:
        """Where graph ``i`` came from: source name, its import description and original id."""
        G = len(self)
        if not -G <= int(i) < G:
            raise IndexError(f"graph index {i} out of range for a store of {G} graphs")
        i = int(i) % G if G else int(i)
        src = int(self._source[i])
        info = (self._attrs.get("source_info") or [None] * len(self._attrs["sources"]))[src]
        return {"index": i, "source": self._attrs["sources"][src], "source_info": info,
                "id": self.structure_ids([i])[0]}


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
