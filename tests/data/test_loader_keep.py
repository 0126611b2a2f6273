"""GraphLoader.iterate(keep=...): only the kept batches are read (validation sharded over data-parallel ranks)."""

import pytest


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterate_reads_only_the_kept_batches(emt_store, prefetch):
    from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader
    from gnnmegatron.data.store import GraphStore

    store = GraphStore(emt_store)
    calls = []

    class Counting:
        def get_many(self, idx):
            calls.append(list(idx))
            return store.get_many(idx)

    sampler = ChunkAwareSampler(store.atom_counts, store.graph_chunks, range(len(store)), seed=0, shuffle=False,
                                budget_atoms=48)
    loader = GraphLoader(Counting(), sampler, cutoff=4.0, prefetch=prefetch)
    every = [b["index"].tolist() for b in loader]
    assert len(every) >= 4
    calls.clear()
    sampler.set_epoch(0)
    sampler.batches_done = 0
    odd = [b["index"].tolist() for b in loader.iterate(keep=lambda k: k % 2 == 1)]
    assert odd == every[1::2]
    assert calls == every[1::2]  # the others were never read
    assert sampler.batches_done == len(every)
