"""Integrity checks of a graph store or sharded dataset (``gnnmegatron data info [--verify]``).

``check_store(path, full=False)`` (what ``data info`` runs) opens the store, then reads the index
of every shard file of every array and checks that each chunk the index points to lies inside
the file: a truncated or missing shard file is found without decompressing anything.
``full=True`` (``--verify``) reads and decodes every chunk: checksums (CRC32C of every chunk and
shard index), decompression, chunk sizes, infinite floats, and the fill-value sentinels that mark
data that was never written (NaN positions/forces/energies/cells/stresses, atomic number 0,
offset/source -1) within each array's length.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gnnmegatron.data.schema import ARRAYS, ShardReader, StoreError


def _stores(path: Path) -> list[Path]:
    from gnnmegatron.data.store import GraphStore

    store = GraphStore(path)  # raises StoreError for anything wrong at the metadata level
    if store._parts is None:
        return [path]
    return [p.path for p in store._parts]


def _check_array(root: Path, name: str, arr, full: bool, problems: list, counts: dict) -> None:
    rows = int(arr.shape[0])
    if rows == 0:
        return
    try:
        rd = ShardReader(root, name, arr)
    except NotImplementedError:
        problems.append(f"{root}/{name}: not in the gnnmegatron shard layout; cannot verify it")
        return
    per_shard_rows = rd.inner * rd.per_shard
    n_shards = -(-rows // per_shard_rows)
    empty = np.uint64(2**64 - 1)
    for s in range(n_shards):
        fpath = rd.dir / f"{s}{rd.suffix}"
        try:
            fh = open(fpath, "rb")
        except OSError as e:
            problems.append(f"{root}/{name}: shard file {s} missing ({e.strerror or e})")
            continue
        with fh:
            try:
                idx = rd._shard_index(s, fh)
            except (OSError, ValueError) as e:
                problems.append(f"{root}/{name}: shard file {s}: {e}")
                continue
            fh.seek(0, 2)
            fsize = fh.tell()
            counts["bytes"] += fsize
            for j in range(rd.per_shard):
                k = s * rd.per_shard + j
                if k * rd.inner >= rows:
                    break
                off, nbytes = idx[j]
                counts["chunks"] += 1
                if off == empty:
                    problems.append(f"{root}/{name}: chunk {k} (rows {k * rd.inner}..) is missing from shard {s}")
                    continue
                if int(off) + int(nbytes) > fsize:
                    problems.append(f"{root}/{name}: chunk {k} runs past the end of shard file {s} "
                                    f"({int(off) + int(nbytes)} > {fsize} bytes: truncated file)")
                    continue
                if not full:
                    continue
                try:
                    got = rd.read(k * rd.inner, min(rows, (k + 1) * rd.inner))
                except (OSError, ValueError, RuntimeError) as e:
                    problems.append(f"{root}/{name}: chunk {k}: {e}")
                    continue
                spec = ARRAYS[name]
                if spec.dtype.startswith("float"):
                    inf = np.isinf(got)
                    if inf.any():
                        problems.append(f"{root}/{name}: chunk {k} holds an infinite value at row "
                                        f"{k * rd.inner + int(np.argwhere(inf)[0][0])}; no importer writes one, "
                                        f"re-import the data")
                    bad = np.isnan(got)
                elif name == "atomic_numbers":
                    bad = got == 0
                elif name in ("atom_offsets", "source"):
                    bad = got < 0
                else:
                    bad = np.zeros(1, dtype=bool)
                if bad.any():
                    problems.append(f"{root}/{name}: chunk {k} holds fill values (never written, or NaN "
                                    f"written) at row {k * rd.inner + int(np.argwhere(bad)[0][0])}")


def check_store(path, full: bool = False) -> dict:
    """Check a store/dataset; returns {"ok", "stores", "chunks", "bytes", "seconds", "problems"}.

    Raises:
        StoreError: the store cannot even be opened (missing, incomplete, inconsistent metadata).
    """
    import zarr

    t0 = time.perf_counter()
    problems: list[str] = []
    counts = {"chunks": 0, "bytes": 0}
    roots = _stores(Path(path))
    for root in roots:
        group = zarr.open_group(str(root), mode="r")
        for name in ARRAYS:
            _check_array(root, name, group[name], full, problems, counts)
        if full and "ids" in group:
            arr = group["ids"]
            step = int(arr.chunks[0])
            for a in range(0, int(arr.shape[0]), step):
                try:
                    arr[a:a + step]
                    counts["chunks"] += 1
                except Exception as e:
                    problems.append(f"{root}/ids: chunk {a // step}: {type(e).__name__}: {e}")
    return {"ok": not problems, "mode": "full (every chunk decoded)" if full else "quick (shard indices)",
            "stores": len(roots), "chunks": counts["chunks"], "bytes": counts["bytes"],
            "seconds": round(time.perf_counter() - t0, 3), "problems": problems}


__all__ = ["StoreError", "check_store"]
