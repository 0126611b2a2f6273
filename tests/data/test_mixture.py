"""Multi-source mixtures: sampling weights, the joint store, and the mixture sampler's proportions,
data-parallel shards and exact resume."""
import numpy as np
import pytest
from scipy.stats import chi2

from gnnmegatron.data.mixture import MixtureSampler, MixtureStore, mixture_weights

SIZES = (40, 160, 400)


def _space(sizes=SIZES, chunk=16):
    """Joint index space of len(sizes) sources of 1-atom graphs, storage chunks of ``chunk`` graphs."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chunks = np.unique(np.concatenate([np.arange(o, o + n, chunk) for o, n in zip(offsets[:-1], sizes)]
                                      + [[offsets[-1]]]))
    atoms = np.ones(offsets[-1], dtype=np.int64)
    train = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(sizes))]
    return atoms, chunks, train, offsets


def _sampler(probs, epoch_graphs=600, **kw):
    atoms, chunks, train, _ = _space()
    kw.setdefault("max_graphs", 8)
    return MixtureSampler(atoms, chunks, train, probs, seed=5, epoch_graphs=epoch_graphs, **kw)


def test_mixture_weights_modes_and_errors():
    assert np.allclose(mixture_weights(SIZES, "proportional"), np.array(SIZES) / 600)
    assert np.allclose(mixture_weights(SIZES, "uniform"), [1 / 3] * 3)
    t2 = np.sqrt(SIZES) / np.sqrt(SIZES).sum()
    assert np.allclose(mixture_weights(SIZES, "temperature", temperature=2.0), t2)
    assert np.allclose(mixture_weights(SIZES, "temperature", temperature=1.0), mixture_weights(SIZES))
    assert np.allclose(mixture_weights(SIZES, "given", weights=[1, 1, 2]), [0.25, 0.25, 0.5])
    assert mixture_weights([10, 0], "uniform").tolist() == [1.0, 0.0], "an empty source is never drawn"
    with pytest.raises(ValueError, match="3 sources, 2 weights"):
        mixture_weights(SIZES, "given", weights=[1, 2])
    with pytest.raises(ValueError, match="unknown sampling mode 'zipf'"):
        mixture_weights(SIZES, "zipf")
    with pytest.raises(ValueError, match=">= 0"):
        mixture_weights(SIZES, "given", weights=[1, -1, 1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mixture_weights(SIZES, "temperature", temperature=0)


def _epoch_counts(sampler, epochs):
    _, _, _, offsets = _space()
    out = []
    for e in range(epochs):
        graphs = np.concatenate(sampler.global_batches(e))
        out.append(np.bincount(np.searchsorted(offsets, graphs, side="right") - 1, minlength=len(SIZES)))
    return np.array(out)


def test_sources_are_drawn_in_their_weights_proportion():
    """Chi-square over 30 epochs of 600 draws: the temperature weights fit, the proportional ones do not."""
    probs = mixture_weights(SIZES, "temperature", temperature=2.0)
    sampler = _sampler(probs)
    counts = _epoch_counts(sampler, 30)
    assert (counts.sum(1) == 600).all(), "an epoch is epoch_graphs draws"
    bound = chi2.ppf(0.999, df=30 * (len(SIZES) - 1))

    def stat(p):
        expected = 600 * np.asarray(p)
        return float((((counts - expected) ** 2) / expected).sum())

    assert stat(probs) < bound, (stat(probs), bound, counts.mean(0))
    assert stat(mixture_weights(SIZES)) > bound, "the test must be able to tell other proportions apart"


def test_each_source_stream_is_a_reshuffled_pass_over_its_graphs():
    _, _, train, offsets = _space()
    sampler = _sampler(mixture_weights(SIZES, "uniform"))
    order = np.concatenate(sampler.global_batches(0))
    small = order[order < offsets[1]]  # 40 graphs drawn ~200 times: whole passes, each a permutation
    assert len(small) > 80
    assert sorted(small[:40].tolist()) == train[0].tolist() and sorted(small[40:80].tolist()) == train[0].tolist()
    assert small[:40].tolist() != small[40:80].tolist(), "every pass is shuffled anew"
    big = order[order >= offsets[2]]  # 400 graphs drawn ~200 times: no repeats within the epoch
    assert len(np.unique(big)) == len(big)
    assert sampler.global_batches(1)[0].tolist() != sampler.global_batches(0)[0].tolist()
    again = _sampler(mixture_weights(SIZES, "uniform"))
    assert [b.tolist() for b in again.global_batches(3)] == [b.tolist() for b in sampler.global_batches(3)]


def test_data_parallel_shards_do_not_overlap():
    probs = mixture_weights(SIZES, "temperature", temperature=2.0)
    ranks = [_sampler(probs, dp_rank=r, dp_size=3) for r in range(3)]
    glob = ranks[0].global_batches(0)
    rounds = len(glob) // 3
    mine = [s.epoch_batches() for s in ranks]
    assert all(len(m) == rounds for m in mine)
    for r, m in enumerate(mine):  # rank r holds global batches r, r+3, ...: disjoint positions
        assert [b.tolist() for b in m] == [b.tolist() for b in glob[r: 3 * rounds: 3]]
    _, _, _, offsets = _space()
    big = np.concatenate([np.concatenate(m) for m in mine])
    big = big[big >= offsets[2]]
    assert len(np.unique(big)) == len(big), "an undersampled source's graph reaches one rank only"


def test_resumes_mid_epoch_exactly_and_refuses_another_mixture():
    probs = mixture_weights(SIZES, "uniform")
    a = _sampler(probs, dp_rank=1, dp_size=2)
    a.set_epoch(1)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    state = a.state_dict()
    rest = list(it)
    a.set_epoch(2)
    after = list(a)[:3]

    b = _sampler(probs, dp_rank=1, dp_size=2)
    b.load_state_dict(state)
    assert list(b) == rest and len(head) + len(rest) == len(a)
    b.set_epoch(2)
    assert list(b)[:3] == after
    other = _sampler(mixture_weights(SIZES), dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="another dataset or batching config"):
        other.load_state_dict(state)


def test_sampler_input_errors_name_the_problem():
    atoms, chunks, train, _ = _space()
    with pytest.raises(ValueError, match="3 sources but 2 probabilities"):
        MixtureSampler(atoms, chunks, train, [0.5, 0.5], seed=0, max_graphs=4)
    with pytest.raises(ValueError, match=r"sources \[1\] have no training graphs"):
        MixtureSampler(atoms, chunks, [train[0], train[1][:0], train[2]], [0.3, 0.3, 0.4], seed=0, max_graphs=4)


def test_mixture_store_reads_each_store_and_sets_the_source(emt_store):
    from gnnmegatron.data.store import GraphStore

    a = GraphStore(emt_store)
    mix = MixtureStore([a, a], ["metals", "again"])
    n = len(a)
    assert len(mix) == 2 * n and mix.graph_chunks[-1] == 2 * n
    assert mix.atom_counts.tolist() == a.atom_counts.tolist() * 2
    got = mix.get_many([n + 3, 2, n])
    assert [g["source"] for g in got] == [1, 0, 1] and [g["index"] for g in got] == [n + 3, 2, n]
    assert np.array_equal(got[0]["positions"], a[3]["positions"])
    assert mix.describe([n + 3, 2]) == ["again:3", "metals:2"]
    with pytest.raises(IndexError, match=f"out of range for a mixture of {2 * n} graphs"):
        mix.get_many([2 * n])
    with pytest.raises(ValueError, match="2 stores but 1 names"):
        MixtureStore([a, a], ["x"])
