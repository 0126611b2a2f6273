"""ChunkAwareSampler and GraphLoader: determinism, coverage, DP sharding, budgets, chunk locality, resume."""
import warnings

import numpy as np
import pytest
import torch

from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader


class FakeStore:
    """Minimal store: random small structures in chunks of `per_chunk` graphs."""

    def __init__(self, num_graphs=300, per_chunk=25, seed=0, max_atoms=12):
        rng = np.random.default_rng(seed)
        self.atom_counts = rng.integers(1, max_atoms + 1, num_graphs).astype(np.int64)
        self.graph_chunks = np.append(np.arange(0, num_graphs, per_chunk), num_graphs).astype(np.int64)
        self.calls = []
        self._rng = rng

    def __len__(self):
        return len(self.atom_counts)

    def get_many(self, indices):
        self.calls.append(list(indices))
        out = []
        for i in indices:
            r = np.random.default_rng(int(i))
            n = int(self.atom_counts[i])
            out.append(dict(atomic_numbers=r.integers(1, 10, n), positions=r.uniform(0, 4, (n, 3)),
                            cell=np.eye(3) * 4.0, pbc=np.ones(3, bool), energy=float(r.normal()),
                            forces=r.normal(size=(n, 3)), stress=None, source=int(i % 2)))
        return out


def make(store, indices=None, **kw):
    kw.setdefault("seed", 7)
    kw.setdefault("budget_atoms", 60)
    return ChunkAwareSampler(store.atom_counts, store.graph_chunks, indices, **kw)


def epoch_lists(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_deterministic_in_seed_and_epoch():
    store = FakeStore()
    a, b = make(store), make(store)
    assert epoch_lists(a, 3) == epoch_lists(b, 3)
    assert epoch_lists(a, 3) != epoch_lists(a, 4)
    assert epoch_lists(a, 3) != epoch_lists(make(store, seed=8), 3)
    flat = [i for batch in epoch_lists(a, 0) for i in batch]
    assert sorted(flat) == list(range(len(store))), "dp_size=1 must cover every graph once"


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_disjoint_equal_length_cover_all_but_dropped_tail(dp_size):
    store = FakeStore()
    sel = np.random.default_rng(1).choice(len(store), 200, replace=False)
    ranks = [make(store, sel, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    glob = make(store, sel).global_batches(epoch=2)  # the same global plan without sharding
    per_rank = [epoch_lists(s, 2) for s in ranks]
    lengths = {len(p) for p in per_rank}
    assert lengths == {len(glob) // dp_size} and lengths == {len(s) for s in ranks}
    seen = [i for p in per_rank for b in p for i in b]
    assert len(seen) == len(set(seen)), "ranks overlap or repeat graphs"
    dropped = [i for b in glob[len(glob) // dp_size * dp_size:] for i in b]
    assert sorted(seen + dropped) == sorted(sel.tolist())
    # global batch b goes to rank b % dp_size
    for b, batch in enumerate(glob[: len(glob) // dp_size * dp_size]):
        assert per_rank[b % dp_size][b // dp_size] == batch.tolist()
    summary = ranks[0].epoch_summary()
    assert summary["dropped_graphs"] == len(dropped) and summary["batches_per_rank"] == len(per_rank[0])


def test_budgets_respected_and_greedy():
    store = FakeStore(max_atoms=12)
    s = make(store, budget_atoms=50, max_graphs=6)
    order = []
    for batch in epoch_lists(s, 0):
        atoms = store.atom_counts[batch]
        assert atoms.sum() <= 50 and len(batch) <= 6
        order.append(batch)
    for cur, nxt in zip(order[:-1], order[1:]):  # greedy: the next graph did not fit
        assert store.atom_counts[cur].sum() + store.atom_counts[nxt[0]] > 50 or len(cur) == 6
    e = make(store, budget_atoms=None, budget_edges=300.0, edges_per_atom=20.0)
    assert all(store.atom_counts[b].sum() * 20.0 <= 300.0 for b in epoch_lists(e, 0))
    with pytest.raises(ValueError, match="edges_per_atom"):
        make(store, budget_atoms=None, budget_edges=300.0)
    with pytest.raises(ValueError, match="at least one"):
        make(store, budget_atoms=None)


def test_oversized_graph_own_batch_warns_once():
    store = FakeStore(num_graphs=40)
    store.atom_counts[[3, 17]] = 500
    s = make(store, budget_atoms=100)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches = epoch_lists(s, 0)
    assert sum("over the batch budget" in str(w.message) for w in rec) == 1
    assert [3] in batches and [17] in batches


def chunk_locality(batches, graph_chunks):
    """Fraction of consecutive graph pairs within a batch that share a storage chunk."""
    same = total = 0
    for b in batches:
        c = np.searchsorted(graph_chunks, b, side="right") - 1
        same += int((c[1:] == c[:-1]).sum())
        total += len(b) - 1
    return same / total


def test_chunk_awareness_measured():
    store = FakeStore(num_graphs=1000, per_chunk=50)
    local = chunk_locality(epoch_lists(make(store), 0), store.graph_chunks)
    window = chunk_locality(epoch_lists(make(store, window_chunks=4), 0), store.graph_chunks)
    uniform = chunk_locality(epoch_lists(make(store, window_chunks=10**6), 0), store.graph_chunks)
    # ~8 graphs per batch, 50 per chunk: only batches straddling a chunk boundary mix chunks
    assert local > 0.9 and 0.15 < window < 0.5 and uniform < 0.1, (local, window, uniform)
    s = make(store)
    s.set_epoch(0)
    order = [i for b in s for i in b]
    chunks = np.searchsorted(store.graph_chunks, order, side="right") - 1
    assert int((np.diff(chunks) != 0).sum()) == 19, "each chunk must be visited in one contiguous run"


def test_no_shuffle_keeps_given_order():
    store = FakeStore(num_graphs=50)
    sel = np.array([9, 3, 40, 1, 2, 30])
    s = make(store, sel, shuffle=False, max_graphs=4, budget_atoms=None)
    assert epoch_lists(s, 5) == [[9, 3, 40, 1], [2, 30]]


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(dp_size):
    store = FakeStore()
    for rank in range(dp_size):
        full = make(store, dp_rank=rank, dp_size=dp_size)
        expected = epoch_lists(full, 1) + epoch_lists(full, 2)
        run = make(store, dp_rank=rank, dp_size=dp_size)
        run.set_epoch(1)
        got = []
        for k, b in enumerate(run):
            got.append(b)
            if k == 4:
                break
        state = run.state_dict()
        assert state["batches_done"] == 5 and state["epoch"] == 1
        resumed = make(store, dp_rank=rank, dp_size=dp_size)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # what a training loop does at the top of the epoch: must not reset
        got += list(resumed)
        got += epoch_lists(resumed, 2)
        assert got == expected


def test_state_mismatch_raises():
    store = FakeStore()
    state = make(store).state_dict()
    with pytest.raises(ValueError, match="another dataset or batching config"):
        make(store, budget_atoms=61).load_state_dict(state)
    with pytest.raises(ValueError, match="another dataset or batching config"):
        make(store, np.arange(100)).load_state_dict(state)
    other = FakeStore(seed=1)
    with pytest.raises(ValueError, match="another dataset or batching config"):
        make(other).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7"):
        make(store, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size=1"):
        make(store, dp_size=2).load_state_dict(state)
    make(store).load_state_dict(state)  # the same config loads


def test_validation_messages():
    store = FakeStore(num_graphs=10, per_chunk=5)
    with pytest.raises(ValueError, match="index 10 is out of range"):
        make(store, [1, 10])
    with pytest.raises(ValueError, match="graph 2 appears"):
        make(store, [2, 2])
    with pytest.raises(ValueError, match="graph_chunks"):
        ChunkAwareSampler(store.atom_counts, [0, 5], seed=0, budget_atoms=10)
    with pytest.raises(ValueError, match="dp_rank=2"):
        make(store, dp_rank=2, dp_size=2)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_graph_loader_batches_and_resume(prefetch):
    store = FakeStore(num_graphs=60, per_chunk=10)
    ref = [b for b in epoch_lists(make(store), 0)]
    loader = GraphLoader(store, make(store), cutoff=3.0, prefetch=prefetch)
    loader.set_epoch(0)
    seen = []
    for k, batch in enumerate(loader):
        assert batch["positions"].dtype == torch.float32
        assert batch["index"].tolist() == ref[k]
        assert batch["num_atoms"].tolist() == store.atom_counts[ref[k]].tolist()
        seen.append(batch["index"].tolist())
        if k == 2:
            break
    state = loader.state_dict()  # exact despite prefetching ahead
    assert state["batches_done"] == 3
    resumed = GraphLoader(store, make(store), cutoff=3.0, prefetch=prefetch)
    resumed.load_state_dict(state)
    seen += [b["index"].tolist() for b in resumed]
    assert seen == ref and len(resumed) == len(ref)


def test_graph_loader_propagates_store_errors():
    class Broken(FakeStore):
        def get_many(self, indices):
            raise OSError("disk gone")

    store = Broken(num_graphs=20)
    with pytest.raises(OSError, match="disk gone"):
        list(GraphLoader(store, make(store), cutoff=3.0, prefetch=2))


def test_with_real_store(tmp_path):
    store_mod = pytest.importorskip("gnnmegatron.data.store")
    rng = np.random.default_rng(0)
    structs = []
    for i in range(30):
        n = int(rng.integers(1, 6))
        structs.append(dict(atomic_numbers=rng.integers(1, 20, n), positions=rng.uniform(0, 5, (n, 3)),
                            cell=np.eye(3) * 5.0, pbc=np.ones(3, bool), energy=float(i),
                            forces=np.zeros((n, 3)), stress=None, source=0))
    with store_mod.GraphStoreWriter(tmp_path / "s.zarr", producer="test", atoms_per_chunk=16) as w:
        w.append(structs)
    store = store_mod.GraphStore(tmp_path / "s.zarr")
    assert len(store.graph_chunks) > 3, store.graph_chunks  # several storage chunks
    sampler = ChunkAwareSampler.from_store(store, seed=0, budget_atoms=20)
    sampler.set_epoch(0)
    expected = [b for b in sampler]
    batches = list(GraphLoader(store, sampler, cutoff=4.0))
    assert [b["index"].tolist() for b in batches] == expected
    assert sorted(i for b in expected for i in b) == list(range(30))
    for b in batches:
        assert b["energy"].tolist() == [float(i) for i in b["index"].tolist()]
