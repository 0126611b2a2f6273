"""Sharded datasets: a manifest that joins several graph stores into one dataset.

A sharded dataset is a directory holding a Zarr v3 root group (``zarr.json``) whose attributes
are the dataset metadata of :mod:`gnnmegatron.data.schema` (``format``, ``schema_version``,
``complete``, ``sources``, ``units``, ``elements``, ``num_graphs``, ``num_atoms``, ``counts``,
...) plus the manifest:

- ``layout``: ``"sharded"``.
- ``shards``: list, in dataset order, of ``{"path": relative path of a complete store,
  "num_graphs": G_k, "num_atoms": N_k, "source_map": [dataset source id of each of the
  shard's sources] (optional, identity when absent)}``.
- ``source_info``: one dict per source (format, DFT level, energy taken, unit conversion and
  sign convention, inputs), when the importer knows it.

`gnnmegatron data import` writes its shards as child groups ``shard-00000``, ... of the root, so
the whole dataset is one Zarr hierarchy; :func:`join_datasets` writes a manifest whose shards
live in other datasets (relative paths such as ``../mptrj.zarr/shard-00003``).
:class:`gnnmegatron.data.store.GraphStore` reads a sharded dataset as one store (this module
fills its fields); the sampler and the trainer therefore see one dataset.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

from gnnmegatron.data.schema import ARRAYS, SCHEMA_VERSION, STORE_FORMAT, UNITS, StoreError

LAYOUT = "sharded"


def open_sharded(store) -> None:
    """Open the shard stores of ``store.path`` and set ``store``'s global arrays (GraphStore use)."""
    from gnnmegatron.data.store import GraphStore

    root, attrs = store.path, store._attrs
    entries = attrs.get("shards")
    if not isinstance(entries, list):
        raise StoreError(f"store {root}: layout 'sharded' but no 'shards' list in its manifest; the "
                         "dataset is corrupt, re-import it")
    names = list(attrs.get("sources") or [])
    parts, maps = [], []
    for k, e in enumerate(entries):
        try:
            path = root / e["path"]
            G, N = int(e["num_graphs"]), int(e["num_atoms"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"store {root}: manifest entry {k} ({e!r}) lacks path/num_graphs/num_atoms; "
                             "the dataset is corrupt, re-import it") from None
        try:
            part = GraphStore(path, cache_chunks=1, direct_read=store.direct_read)
        except StoreError as err:
            raise StoreError(f"store {root}: shard {k} ({e['path']}): {err}") from None
        if len(part) != G or part.num_atoms != N:
            raise StoreError(f"store {root}: shard {k} ({e['path']}) holds {len(part)} graphs / "
                             f"{part.num_atoms} atoms but the manifest says {G} / {N}; the dataset is "
                             "corrupt, re-import it")
        own = list(part._attrs["sources"])
        smap = e.get("source_map") or list(range(len(own)))
        if len(smap) != len(own) or any(not 0 <= int(m) < len(names) or names[int(m)] != s
                                        for m, s in zip(smap, own)):
            raise StoreError(f"store {root}: shard {k} ({e['path']}) has sources {own} that do not "
                             f"map onto the dataset's sources {names} (source_map {smap})")
        parts.append(part)
        maps.append(np.asarray(smap, dtype=np.int32))
    G = sum(len(p) for p in parts)
    N = sum(p.num_atoms for p in parts)
    if (G, N) != (int(attrs.get("num_graphs", -1)), int(attrs.get("num_atoms", -1))):
        raise StoreError(f"store {root}: shards hold {G} graphs / {N} atoms but the manifest says "
                         f"{attrs.get('num_graphs')} / {attrs.get('num_atoms')}; re-import the data")
    atom_base = np.cumsum([0] + [p.num_atoms for p in parts]).astype(np.int64)
    graph_base = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    chunk_base = np.cumsum([0] + [p.num_chunks for p in parts]).astype(np.int64)
    offsets = [np.zeros(1, np.int64)] + [p._offsets[1:] + atom_base[k] for k, p in enumerate(parts)]
    store._parts = parts
    store._atom_base, store._graph_base, store._chunk_base = atom_base, graph_base, chunk_base
    store._offsets = np.concatenate(offsets)
    empty = {"energy": (0,), "cell": (0, 3, 3), "pbc": (0, 3), "stress": (0, 3, 3)}
    for name in ("energy", "cell", "pbc", "stress", "has_energy", "has_forces", "has_stress"):
        arrs = [getattr(p, "_" + name) for p in parts]
        store.__dict__["_" + name] = (np.concatenate(arrs) if arrs else
                                      np.zeros(empty.get(name, (0,)), dtype=ARRAYS[name].dtype))
    store._source = (np.concatenate([m[p._source] for m, p in zip(maps, parts)]) if parts
                     else np.zeros(0, np.int32))
    gcs = [p._graph_chunks[:-1] + graph_base[k] for k, p in enumerate(parts)]
    store._graph_chunks = np.concatenate(gcs + [np.asarray([G], np.int64)]).astype(np.int64)
    store._chunk_of_graph = (np.concatenate([p._chunk_of_graph + chunk_base[k] for k, p in enumerate(parts)])
                             if parts else np.zeros(0, np.int64))
    store._apc = parts[0]._apc if parts else int(attrs.get("atoms_per_chunk") or 8192)
    store._readers = None


def read_part_chunk(store, c: int) -> tuple:
    """Global storage chunk ``c`` of a sharded dataset: (first atom (global), z, positions, forces)."""
    k = int(np.searchsorted(store._chunk_base, c, side="right")) - 1
    a0, z, pos, forces = store._parts[k]._read_chunk(c - int(store._chunk_base[k]))
    return a0 + int(store._atom_base[k]), z, pos, forces


def structure_ids(store, indices) -> list[str]:
    """Original identifiers of graphs ``indices`` ("" where a store has no ``ids`` array)."""
    import zarr

    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    G = len(store)
    if idx.size and (idx.min() < -G or idx.max() >= G):
        raise IndexError(f"graph index {idx[(idx < -G) | (idx >= G)][0]} out of range for a store of {G} graphs")
    idx = np.where(idx < 0, idx + G, idx)
    if store._parts is None:
        group = zarr.open_group(str(store.path), mode="r")
        if "ids" not in group:
            return [""] * idx.size
        arr = group["ids"]
        return [str(v) for v in arr.get_coordinate_selection(idx)] if idx.size else []
    out = [""] * idx.size
    part_of = np.searchsorted(store._graph_base, idx, side="right") - 1
    for k in np.unique(part_of):
        sel = np.flatnonzero(part_of == k)
        got = structure_ids(store._parts[k], idx[sel] - store._graph_base[k])
        for j, v in zip(sel.tolist(), got):
            out[j] = v
    return out


def write_root(path: Path, attrs: dict) -> None:
    """Write (atomically replace) the root group's ``zarr.json`` with ``attrs`` as its attributes."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    tmp = path / f".zarr.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    os.replace(tmp, path / "zarr.json")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dataset_attrs(shards: list[dict], shard_attrs: list[dict], sources: list[str], *, producer: str,
                  source_info: list | None = None, extra: dict | None = None) -> dict:
    """Root attributes of a sharded dataset from its manifest entries and each shard's attributes."""
    import gnnmegatron
    import zarr

    counts = {"with_energy": 0, "with_forces": 0, "with_stress": 0, "per_source": [0] * len(sources)}
    elements: set[int] = set()
    for e, a in zip(shards, shard_attrs):
        smap = e.get("source_map") or list(range(len(a["sources"])))
        for key in ("with_energy", "with_forces", "with_stress"):
            counts[key] += int(a["counts"][key])
        for k, n in enumerate(a["counts"]["per_source"]):
            counts["per_source"][smap[k]] += int(n)
        elements.update(int(z) for z in a["elements"])
    first = shard_attrs[0] if shard_attrs else {}
    attrs = {
        "format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "complete": True, "layout": LAYOUT,
        "producer": producer, "sources": list(sources), "units": UNITS,
        "num_graphs": sum(int(e["num_graphs"]) for e in shards),
        "num_atoms": sum(int(e["num_atoms"]) for e in shards),
        "elements": sorted(elements), "counts": counts, "has_stress": counts["with_stress"] > 0,
        "atoms_per_chunk": first.get("atoms_per_chunk"), "graphs_per_chunk": first.get("graphs_per_chunk"),
        "shards": shards, "source_info": source_info,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "writer": {"gnnmegatron": gnnmegatron.__version__, "zarr": zarr.__version__},
    }
    attrs.update(extra or {})
    return attrs


def join_datasets(inputs, out, *, overwrite: bool = False) -> dict:
    """Write a dataset at ``out`` whose manifest joins the stores/datasets ``inputs`` (no copying).

    Sources with the same name are merged; shards are referenced by paths relative to ``out``,
    so keep the directories side by side (moving ``out`` alone breaks it).

    Returns:
        The new dataset's attributes (``num_graphs``, ``num_atoms``, ``sources``, ``shards``, ...).

    Raises:
        StoreError: an input is not a complete store, or ``out`` exists (without ``overwrite``).
    """
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.data.writer import _read_attrs

    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and "joined_from" not in (_read_attrs(out) or {}):
        raise StoreError(f"{out} exists and is not a dataset made by `data join`; refusing to replace it, "
                         "remove it yourself or choose another path")
    sources: list[str] = []
    infos: list = []
    entries, shard_attrs = [], []
    from gnnmegatron.data.verify import check_store

    for src in inputs:
        ds = GraphStore(src)  # validates the metadata
        quick = check_store(src)  # and that every shard file holds its chunks (indices only, nothing decoded)
        if not quick["ok"]:
            raise StoreError(f"input {src} is damaged ({'; '.join(quick['problems'][:3])}"
                             f"{'; ...' if len(quick['problems']) > 3 else ''}); repair or re-import it before joining")
        md = ds._attrs
        parts = ds._parts or [ds]
        part_paths = ([Path(src) / e["path"] for e in md["shards"] if int(e["num_graphs"]) > 0]
                      if ds._parts is not None else [Path(src)])
        info = md.get("source_info") or [None] * len(md["sources"])
        for name, inf in zip(md["sources"], info):
            if name not in sources:
                sources.append(name)
                infos.append(inf)
        for part, ppath in zip(parts, part_paths):
            own = part._attrs["sources"]
            entries.append({"path": os.path.relpath(Path(ppath).resolve(), out.resolve()),
                            "num_graphs": len(part), "num_atoms": part.num_atoms,
                            "source_map": [sources.index(s) for s in own]})
            shard_attrs.append(part._attrs)
    out.mkdir(parents=True, exist_ok=True)
    attrs = dataset_attrs(entries, shard_attrs, sources, producer="gnnmegatron data join",
                          source_info=infos, extra={"joined_from": [str(p) for p in inputs]})
    write_root(out, attrs)
    GraphStore(out)  # re-open: the manifest must read back
    return attrs


__all__ = ["LAYOUT", "dataset_attrs", "join_datasets", "open_sharded", "structure_ids", "write_root"]
