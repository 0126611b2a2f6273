"""Tests of the Zarr graph store: schema round trip, validation, atomic writes, corruption."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from gnnmegatron.data.schema import (ARRAYS, SCHEMA_VERSION, StoreError, StructureError,
                                     find_close_pair, validate_structure)
from gnnmegatron.data.store import GraphStore, GraphStoreWriter, split_indices

SMALL = dict(atoms_per_chunk=16, graphs_per_chunk=4, chunks_per_shard=2)  # many shards, straddles


def make_structure(rng, n, periodic=True, labels=True, source=None):
    """Atoms on a jittered grid (>= ~1.5 Å apart, also across periodic images)."""
    g = int(np.ceil(n ** (1 / 3)))
    a = 2.5
    grid = np.stack(np.meshgrid(*[np.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    pos = (grid + rng.uniform(-0.15, 0.15, (n, 3))) * a
    s = {
        "atomic_numbers": rng.integers(1, 90, n),
        "positions": pos,
        "cell": np.diag([g * a] * 3) + (rng.uniform(-0.3, 0.3, (3, 3)) if periodic else 0)
        if periodic else np.zeros((3, 3)),
        "pbc": np.array([periodic] * 3),
    }
    if labels:
        s.update(energy=float(rng.normal()), forces=rng.normal(size=(n, 3)),
                 stress=rng.normal(size=(3, 3)) if periodic else None)
    if source is not None:
        s["source"] = source
    return s


def dataset(seed=0, count=30):
    """Mixed sizes (1..19 atoms, one of 50 spanning several 16-atom chunks), labels and pbc."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = 50 if i == count // 2 else int(rng.integers(1, 20))
        out.append(make_structure(rng, n, periodic=bool(i % 3), labels=(i % 5 != 4)))
    return out


def write(path, structures, batches=1, **kw):
    kw = {**SMALL, "producer": "test", **kw}
    with GraphStoreWriter(path, **kw) as w:
        for part in np.array_split(np.arange(len(structures)), batches):
            w.append([structures[k] for k in part])
    return GraphStore(path)


def assert_same(got, want):
    np.testing.assert_array_equal(got["atomic_numbers"], want["atomic_numbers"])
    np.testing.assert_array_equal(got["positions"], want["positions"])
    np.testing.assert_array_equal(got["cell"], want["cell"])
    np.testing.assert_array_equal(got["pbc"], want["pbc"])
    assert got["energy"] == want.get("energy")
    if want.get("forces") is None:
        assert got["forces"] is None
    else:  # stored as float32
        np.testing.assert_array_equal(got["forces"], np.asarray(want["forces"], np.float32))
    if want.get("stress") is None:
        assert got["stress"] is None
    else:
        np.testing.assert_array_equal(got["stress"], want["stress"])


def test_round_trip_values_dtypes_metadata(tmp_path):
    data = dataset()
    store = write(tmp_path / "s.zarr", data, sources=["a", "b"])
    assert len(store) == len(data)
    for i, s in enumerate(data):
        got = store[i]
        assert_same(got, s)
        assert got["index"] == i and got["source"] == 0
        assert got["atomic_numbers"].dtype == np.int64 and got["positions"].dtype == np.float64
        assert got["cell"].dtype == np.float64 and got["pbc"].dtype == bool
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name, spec in ARRAYS.items():
        assert g[name].dtype == np.dtype(spec.dtype), name
        assert g[name].shards is not None, name
    md = store.metadata
    n_atoms = sum(len(s["atomic_numbers"]) for s in data)
    assert md["complete"] is True and md["schema_version"] == SCHEMA_VERSION == md["version"]
    assert md["producer"] == "test" and md["sources"] == ["a", "b"]
    assert md["num_graphs"] == len(data) and md["num_atoms"] == n_atoms == store.num_atoms
    assert md["elements"] == sorted({int(z) for s in data for z in s["atomic_numbers"]})
    assert md["units"]["positions"] == "Å" and md["units"]["stress"] == "eV/Å^3"
    assert md["counts"]["with_energy"] == sum(s.get("energy") is not None for s in data)
    assert md["counts"]["with_stress"] == sum(s.get("stress") is not None for s in data)
    assert md["counts"]["per_source"] == [len(data), 0] and md["has_stress"] is True
    np.testing.assert_array_equal(store.atom_counts, [len(s["atomic_numbers"]) for s in data])


def test_graph_chunks_match_storage_chunks(tmp_path):
    store = write(tmp_path / "s.zarr", dataset(count=40))
    gc, apc = store.graph_chunks, store.atoms_per_chunk
    assert gc[0] == 0 and gc[-1] == len(store) and np.all(np.diff(gc) >= 0)
    assert store.num_chunks == -(-store.num_atoms // apc) > 3
    for i in range(len(store)):
        c = int(np.searchsorted(gc, i, side="right") - 1)
        assert c == store.atom_offsets[i] // apc == store.chunk_of([i])[0]


def test_append_in_batches_equals_one_batch(tmp_path):
    data = dataset(seed=1, count=37)
    one = write(tmp_path / "one.zarr", data, batches=1)
    many = write(tmp_path / "many.zarr", data, batches=7)
    g1 = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")
    g2 = zarr.open_group(str(tmp_path / "many.zarr"), mode="r")
    for name in ARRAYS:
        np.testing.assert_array_equal(g1[name][...], g2[name][...], err_msg=name)
    assert len(one) == len(many) == 37


def test_direct_shard_reader_equals_zarr_path(tmp_path):
    store = write(tmp_path / "s.zarr", dataset(seed=8, count=60))
    via_zarr = GraphStore(tmp_path / "s.zarr", direct_read=False)
    assert store._readers is not None and via_zarr._readers is None
    for got, want in zip(store.get_many(range(len(store))), via_zarr.get_many(range(len(store)))):
        assert_same(got, want)


def test_random_access_equals_sequential(tmp_path):
    data = dataset(seed=2, count=50)
    store = write(tmp_path / "s.zarr", data)
    seq = [store[i] for i in range(len(store))]
    small_cache = GraphStore(tmp_path / "s.zarr", cache_chunks=1)
    perm = np.random.default_rng(0).permutation(len(store))
    for i, got in zip(perm, small_cache.get_many(perm)):
        assert got["index"] == i
        assert_same(got, seq[i])
    assert_same(store[-1], data[-1])
    with pytest.raises(IndexError, match="out of range"):
        store[len(data)]
    with pytest.raises(IndexError, match="out of range"):
        store.get_many([0, len(data)])
    again = pickle.loads(pickle.dumps(store))
    assert_same(again[7], data[7])


def _bad_cases():
    rng = np.random.default_rng(3)

    def base(n=4, periodic=True):
        return make_structure(rng, n, periodic=periodic)

    def with_(field, fn, **kw):
        s = base(**kw)
        s[field] = fn(s)
        return s

    def nan_at(x, where, val=np.nan):
        x = np.array(x, dtype=float)
        x[where] = val
        return x

    L = 6.0
    pbc_dup = dict(atomic_numbers=[1, 8], positions=[[0.02, 1.0, 1.0], [L - 0.03, 1.0, 1.0]],
                   cell=np.eye(3) * L, pbc=[True, True, True])
    # Triclinic cell; second atom is the first one's image shifted by 0.05 Å.
    tri = np.array([[5.0, 0, 0], [2.5, 4.3, 0], [1.0, 1.0, 4.0]])
    tri_dup = dict(atomic_numbers=[6, 6], positions=[[0.3, 0.2, 0.1], [0.35 + 5.0 + 2.5, 0.2 + 4.3, 0.1]],
                   cell=tri, pbc=[True, True, True])
    slab_dup = dict(atomic_numbers=[6, 6], positions=[[0.01, 1, 1], [L - 0.01, 1, 1]],
                    cell=np.eye(3) * L, pbc=[True, True, False])
    return [
        ("nan-positions", with_("positions", lambda s: nan_at(s["positions"], (1, 2))), "positions"),
        ("inf-forces", with_("forces", lambda s: nan_at(s["forces"], (0, 0), np.inf)), "forces"),
        ("nan-energy", with_("energy", lambda s: float("nan")), "energy"),
        ("inf-cell", with_("cell", lambda s: nan_at(s["cell"], (2, 2), -np.inf)), "cell"),
        ("nan-stress", with_("stress", lambda s: nan_at(s["stress"], (0, 1))), "stress"),
        ("z-zero", with_("atomic_numbers", lambda s: [0, 1, 1, 1]), "atomic_numbers"),
        ("z-119", with_("atomic_numbers", lambda s: [1, 119, 1, 1]), "atomic_numbers"),
        ("forces-length", with_("forces", lambda s: s["forces"][:3]), "forces"),
        ("cell-shape", with_("cell", lambda s: np.eye(3)[:2]), "cell"),
        ("cell-degenerate", with_("cell", lambda s: np.diag([5.0, 5.0, 0.0])), "cell"),
        ("duplicate", with_("positions", lambda s: np.vstack([s["positions"][:3],
                                                             s["positions"][:1] + 0.05]),
                            periodic=False), "positions"),
        ("duplicate-pbc", pbc_dup, "positions"),
        ("duplicate-triclinic", tri_dup, "positions"),
        ("duplicate-slab", slab_dup, "positions"),
        ("empty", dict(atomic_numbers=np.zeros(0, int), positions=np.zeros((0, 3))), "atomic_numbers"),
        ("unknown-key", with_("force", lambda s: s["forces"]), "force"),
    ]


@pytest.mark.parametrize("name,bad,field", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_invalid_structure_names_index_and_field(tmp_path, name, bad, field):
    good = dataset(seed=4, count=5)
    path = tmp_path / "s.zarr"
    with pytest.raises(StructureError) as info:
        with GraphStoreWriter(path, producer="t", **SMALL) as w:
            w.append(good[:3])
            w.append([good[3], good[4], bad])
    assert info.value.index == 5 and info.value.field == field
    assert "structure 5" in str(info.value) and f"'{field}'" in str(info.value)
    assert not path.exists() and not (tmp_path / "s.zarr.partial").exists()


def test_valid_neighbours_across_boundary_and_known_elements(tmp_path):
    L = 6.0
    # 0.5 Å apart through the boundary: fine; same atoms without pbc are 5.5 Å apart: fine.
    ok = dict(atomic_numbers=[1, 1], positions=[[0.2, 1, 1], [L - 0.3, 1, 1]], cell=np.eye(3) * L,
              pbc=[True] * 3)
    slab_z = dict(atomic_numbers=[6, 6], positions=[[1, 1, 0.01], [1, 1, L - 0.01]],
                  cell=np.eye(3) * L, pbc=[True, True, False])  # z is not periodic
    store = write(tmp_path / "s.zarr", [ok, slab_z])
    assert len(store) == 2
    with pytest.raises(StructureError, match=r"structure 0, field 'atomic_numbers'.*Z=8"):
        with GraphStoreWriter(tmp_path / "k.zarr", producer="t", known_elements=[1, 6]) as w:
            w.append([dict(atomic_numbers=[8], positions=[[0, 0, 0]])])


def test_close_pair_search_in_blocks_matches_brute_force():
    rng = np.random.default_rng(9)
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)[:200]
    pos = grid * 1.7 + rng.uniform(-0.1, 0.1, (200, 3))
    cell, pbc = np.eye(3) * 6 * 1.7, np.array([True, False, True])
    assert find_close_pair(pos, cell, pbc, block_elems=300) is None
    pos[199] = pos[150] + [0.0, 0.0, 0.06]
    i, j, d = find_close_pair(pos, cell, pbc, block_elems=300)  # ~1 row per block
    assert (i, j) == (150, 199) and abs(d - 0.06) < 1e-9
    pos[199] = pos[3] + cell[0] - [0.05, 0, 0]  # image of atom 3 across periodic x
    assert find_close_pair(pos, cell, pbc, block_elems=300)[:2] == (3, 199)
    pos[199] = pos[3] + cell[1] - [0, 0.05, 0]  # y is not periodic: far apart
    assert find_close_pair(pos, cell, pbc, block_elems=300) is None


def test_validate_structure_normalises():
    s = validate_structure(0, dict(atomic_numbers=np.array([8.0, 1.0]), positions=[[0, 0, 0], [1, 0, 0]],
                                   stress=[1, 2, 3, 4, 5, 6], pbc=True, cell=np.eye(3) * 5, index=3))
    assert s["atomic_numbers"].dtype == np.int64 and s["pbc"].tolist() == [True] * 3
    np.testing.assert_array_equal(s["stress"], [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    assert s["energy"] is None and s["forces"] is None and s["source"] is None
    with pytest.raises(StructureError, match="structure 7, field 'atomic_numbers': not integers"):
        validate_structure(7, dict(atomic_numbers=[1.5], positions=[[0, 0, 0]]))
    with pytest.raises(ValueError, match="atoms_per_chunk=0 must be >= 1"):
        GraphStoreWriter("/nonexistent/x.zarr", producer="t", atoms_per_chunk=0)


def test_exception_inside_with_keeps_previous_store(tmp_path):
    path = tmp_path / "s.zarr"
    old = dataset(seed=5, count=10)
    write(path, old)
    with pytest.raises(RuntimeError, match="boom"):
        with GraphStoreWriter(path, producer="new", overwrite=True, **SMALL) as w:
            w.append(dataset(seed=6, count=40))  # flushes several shards into the partial
            raise RuntimeError("boom")
    store = GraphStore(path)
    assert len(store) == 10 and store.metadata["producer"] == "test"
    assert_same(store[9], old[9])
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_abandoned_writer_leaves_store_reader_refuses(tmp_path):
    path = tmp_path / "s.zarr"
    w = GraphStoreWriter(path, producer="t", **SMALL)
    w.append(dataset(count=40))  # no close(): as if the process died here
    with pytest.raises(StoreError, match=r"incomplete \(interrupted write.*re-run the import"):
        GraphStore(path)
    with pytest.raises(StoreError, match=r"s.zarr.partial is incomplete \(interrupted write\); "
                                         r"re-run the import"):
        GraphStore(tmp_path / "s.zarr.partial")
    del w
    assert len(write(path, dataset(count=3))) == 3  # a new import replaces the stale partial


def test_killed_writer_process(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, dataset(count=4))
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_store import dataset, SMALL
        from gnnmegatron.data.store import GraphStoreWriter
        w = GraphStoreWriter({str(path)!r}, producer="killed", overwrite=True, **SMALL)
        w.append(dataset(count=40))
        print("flushed", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "flushed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(GraphStore(path)) == 4  # the old store is untouched
    with pytest.raises(StoreError, match=r"incomplete \(interrupted write\); re-run the import"):
        GraphStore(tmp_path / "s.zarr.partial")
    assert len(write(path, dataset(count=6), overwrite=True)) == 6  # stale partial of a dead pid


def test_overwrite_refused_unless_asked(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, dataset(count=3))
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        GraphStoreWriter(path, producer="t")
    assert len(write(path, dataset(count=5), overwrite=True)) == 5
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a gnnmegatron graph store; refusing"):
        GraphStoreWriter(other, producer="t", overwrite=True)
    assert (other / "precious.txt").exists()


def _shard(path, name, k=1):
    ndim = 1 + len(ARRAYS[name].inner_shape)
    return path / name / "c" / (str(k) + "/0" * (ndim - 1))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_atom_chunk_raises_store_error(tmp_path, damage, direct):
    path = tmp_path / "s.zarr"
    write(path, dataset(count=40))
    f = _shard(path, "positions", 1)
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        for k in range(8, len(data) // 2, 7):
            data[k] ^= 0x5A
        f.write_bytes(bytes(data))
    else:
        f.unlink()
    store = GraphStore(path, direct_read=direct)  # opens: per-atom chunks are read lazily
    with pytest.raises(StoreError, match=r"array 'positions' chunk \d+ .*re-import"):
        store.get_many(range(len(store)))


def test_corrupt_graph_array_and_offsets_raise_at_open(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, dataset(count=40))
    _shard(path, "cell", 1).write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"array 'cell' could not be read.*re-import"):
        GraphStore(path)
    write(path, dataset(count=40), overwrite=True)
    _shard(path, "energy", 2).unlink()
    with pytest.raises(StoreError, match=r"array 'energy' is missing shard"):
        GraphStore(path)
    write(path, dataset(count=40), overwrite=True)
    off = zarr.open_array(str(path / "atom_offsets"), mode="r+")
    off[5] = off[4]  # an empty graph: offsets no longer consistent
    with pytest.raises(StoreError, match="atom_offsets are inconsistent"):
        GraphStore(path)


def test_unreadable_metadata_names_the_store_and_array(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, dataset(count=5))
    (path / "energy" / "zarr.json").write_text('{"shape": [')
    with pytest.raises(StoreError, match=r"metadata of array 'energy' .*energy\) cannot be read.*re-import"):
        GraphStore(path)
    write(path, dataset(count=5), overwrite=True)
    (path / "zarr.json").write_text('{"zarr_format": 3, "attributes": {')
    with pytest.raises(StoreError, match=r"metadata .*zarr.json is not valid JSON; the store is corrupt"):
        GraphStore(path)
    other = tmp_path / "t.zarr"
    write(other, dataset(count=5))
    with pytest.raises(StoreError, match="not a gnnmegatron graph store"):  # a valid zarr array: not corrupt
        GraphStore(other / "energy")


def test_reader_refuses_missing_foreign_and_unknown_version(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        GraphStore(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a gnnmegatron graph store"):
        GraphStore(tmp_path / "empty")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["format"] = "other"
    with pytest.raises(StoreError, match="not a gnnmegatron graph store"):
        GraphStore(tmp_path / "foreign.zarr")
    path = tmp_path / "s.zarr"
    write(path, dataset(count=3))
    zarr.open_group(str(path), mode="r+").attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99 but this gnnmegatron reads version 1"):
        GraphStore(path)


def test_ase_atoms_with_single_point_calculator(tmp_path):
    ase = pytest.importorskip("ase")
    from ase.calculators.singlepoint import SinglePointCalculator
    rng = np.random.default_rng(7)
    s = make_structure(rng, 6)
    atoms = ase.Atoms(numbers=s["atomic_numbers"], positions=s["positions"], cell=s["cell"],
                      pbc=True)
    voigt = np.array([1.0, 2.0, 3.0, 0.4, 0.5, 0.6]) * 1e-3  # xx yy zz yz xz xy
    atoms.calc = SinglePointCalculator(atoms, energy=-12.5, forces=s["forces"], stress=voigt)
    mol = ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    store = write(tmp_path / "s.zarr", [atoms, mol], sources=["x", "y"], batches=1)
    got = store[0]
    assert got["energy"] == -12.5
    np.testing.assert_array_equal(got["stress"], 1e-3 * np.array([[1, .6, .5], [.6, 2, .4], [.5, .4, 3]]))
    np.testing.assert_array_equal(got["forces"], s["forces"].astype(np.float32))
    np.testing.assert_allclose(got["cell"], s["cell"])
    m = store[1]
    assert m["energy"] is None and m["forces"] is None and m["stress"] is None
    np.testing.assert_array_equal(m["atomic_numbers"], [1, 1, 8])
    assert not m["pbc"].any()


def test_sources_tagging(tmp_path):
    data = dataset(count=6)
    path = tmp_path / "s.zarr"
    with GraphStoreWriter(path, producer="t", sources=["a", "b"]) as w:
        w.append(data[:3], source=1)
        w.append(data[3:])
    store = GraphStore(path)
    np.testing.assert_array_equal(store.sources, [1, 1, 1, 0, 0, 0])
    assert store.metadata["counts"]["per_source"] == [3, 3]
    with pytest.raises(StructureError, match="structure 0, field 'source'.*out of range"):
        with GraphStoreWriter(tmp_path / "x.zarr", producer="t") as w:
            w.append(data[:1], source=2)


def test_split_indices_deterministic_and_disjoint():
    a = split_indices(1001, (0.8, 0.1, 0.1), seed=3)
    b = split_indices(1001, (0.8, 0.1, 0.1), seed=3)
    c = split_indices(1001, (0.8, 0.1, 0.1), seed=4)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k], b[k])
        assert np.all(np.diff(a[k]) > 0)
    assert not np.array_equal(a["val"], c["val"])
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(1001))
    assert abs(len(a["val"]) - 100) <= 1 and abs(len(a["test"]) - 100) <= 1
    for bad in [(0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.2, 0.2), (np.nan, 0.5, 0.5)]:
        with pytest.raises(ValueError, match="fractions"):
            split_indices(10, bad)
    assert sum(len(v) for v in split_indices(0).values()) == 0
