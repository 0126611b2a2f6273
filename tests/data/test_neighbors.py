"""radius_graph_pbc against ASE's primitive_neighbor_list (the oracle)."""
import numpy as np
import pytest
import torch
from ase.neighborlist import primitive_neighbor_list

from gnnmegatron.data.neighbors import radius_graph_pbc

METHODS = ["brute", "cell"]


def ase_edges(pos, cell, pbc, cutoff, offset=0):
    i, j, shift = primitive_neighbor_list("ijS", np.asarray(pbc), np.asarray(cell), np.asarray(pos), cutoff)
    return {(int(a) + offset, int(b) + offset, *map(int, s)) for a, b, s in zip(i, j, shift)}


def run(structs, cutoff, method, **kw):
    """structs: list of (pos [n,3], cell [3,3], pbc [3]); returns (edge set, edge_index, shift, inputs)."""
    pos = torch.tensor(np.concatenate([np.asarray(s[0], float).reshape(-1, 3) for s in structs]))
    cell = torch.tensor(np.stack([np.asarray(s[1], float) for s in structs]))
    pbc = torch.tensor(np.stack([np.asarray(s[2], bool) for s in structs]))
    counts = torch.tensor([len(s[0]) for s in structs])
    batch = torch.repeat_interleave(torch.arange(len(structs)), counts)
    ei, sh = radius_graph_pbc(pos, cell, pbc, batch, cutoff, method=method, **kw)
    assert ei.dtype == torch.int64 and ei.shape[0] == 2 and sh.shape == (ei.shape[1], 3)
    assert torch.equal(sh, sh.round()), "shifts must be integer multiples"
    got = {(int(a), int(b), *map(int, s)) for a, b, s in zip(ei[0], ei[1], sh.long())}
    assert len(got) == ei.shape[1], "duplicate edges"
    return got, ei, sh, (pos, cell, pbc, batch)


def ase_reference(structs, cutoff):
    ref, off = set(), 0
    for pos, cell, pbc in structs:
        ref |= ase_edges(np.asarray(pos, float).reshape(-1, 3), cell, pbc, cutoff, off)
        off += len(pos)
    return ref


def check_geometry(ei, sh, pos, cell, batch, cutoff):
    r = pos[ei[1]] - pos[ei[0]] + torch.einsum("ei,eij->ej", sh.to(pos.dtype), cell[batch[ei[0]]])
    d = r.norm(dim=1)
    assert bool((d > 0).all()) and bool((d < cutoff).all()), f"|r| range [{d.min()}, {d.max()}]"
    assert bool((batch[ei[0]] == batch[ei[1]]).all()), "edge crosses graphs"
    key = ei[0] * len(pos) + ei[1]
    assert bool((key[1:] >= key[:-1]).all()), "edges not sorted by (dst, src)"


def random_triclinic(rng, n, pbc=(True, True, True)):
    cell = np.diag(rng.uniform(3.0, 6.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3))
    pos = rng.uniform(-0.7, 1.7, (n, 3)) @ cell  # partly outside the cell: tests wrapping
    return pos, cell, np.array(pbc)


def fcc_primitive(a=3.6):
    return np.zeros((1, 3)), 0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0.0]]), np.ones(3, bool)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_triclinic_periodic_matches_ase(method, seed):
    rng = np.random.default_rng(seed)
    structs = [random_triclinic(rng, int(rng.integers(1, 12))) for _ in range(3)]
    cutoff = 4.5
    got, ei, sh, (pos, cell, _, batch) = run(structs, cutoff, method)
    ref = ase_reference(structs, cutoff)
    assert got == ref, f"missing {sorted(ref - got)[:5]}, extra {sorted(got - ref)[:5]}"
    assert len(ref) > 50
    check_geometry(ei, sh, pos, cell, batch, cutoff)


@pytest.mark.parametrize("method", METHODS)
def test_small_cell_sees_own_images(method):
    # fcc a=3.6: shells 12 @2.55, 6 @3.6, 24 @4.41, 12 @5.09, 24 @5.69 -> 78 within 6 Å
    structs = [fcc_primitive()]
    got, ei, sh, (pos, cell, _, batch) = run(structs, 6.0, method)
    assert got == ase_reference(structs, 6.0)
    assert len(got) == 78 and all(e[0] == e[1] == 0 for e in got)
    check_geometry(ei, sh, pos, cell, batch, 6.0)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_pbc_and_zero_nonperiodic_row(method):
    rng = np.random.default_rng(3)
    pos, cell, _ = random_triclinic(rng, 9, (True, True, False))
    pbc = np.array([True, True, False])
    ref = ase_reference([(pos, cell, pbc)], 5.0)
    got, *_ = run([(pos, cell, pbc)], 5.0, method)
    assert got == ref and len(ref) > 0
    flat = cell.copy()
    flat[2] = 0.0  # slab given with a zero out-of-plane vector: must give the same graph
    got_flat, *_ = run([(pos, flat, pbc)], 5.0, method)
    assert got_flat == ref
    assert all(e[4] == 0 for e in got), "non-periodic axis got a shift"


@pytest.mark.parametrize("method", METHODS)
def test_two_atoms_at_one_position_are_refused(method):
    """Distance 0 is not an edge, so coincident atoms would silently look far apart: an error naming
    the graph and the atoms (graph 1 here, atoms 2 and 0; or on a periodic image in graph 0)."""
    ok = (np.array([[0.0, 0, 0], [1.5, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool))
    dup = (np.array([[0.0, 0, 0], [1.5, 0, 0], [0.0, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"graph 1: atoms (2 and 0|0 and 2) are at the same position"):
        run([ok, dup], 3.0, method)
    image = (np.array([[0.0, 0, 0], [4.0, 0, 0]]), np.eye(3) * 4.0, np.ones(3, bool))  # atom 1 on atom 0's image
    with pytest.raises(ValueError, match=r"graph 0: atoms (1 and 0|0 and 1) are at the same position"):
        run([image], 3.0, method)


@pytest.mark.parametrize("method", METHODS)
def test_molecule_isolated_and_one_atom(method):
    rng = np.random.default_rng(4)
    mol = (rng.normal(size=(7, 3)) * 1.5, np.zeros((3, 3)), np.zeros(3, bool))
    isolated = (np.array([[0.0, 0, 0], [10.0, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool))
    one = (np.array([[1.0, 2.0, 3.0]]), np.zeros((3, 3)), np.zeros(3, bool))
    one_periodic = (np.array([[0.5, 0.5, 0.5]]), np.eye(3) * 6.0, np.ones(3, bool))  # cutoff < cell
    got, *_ = run([mol], 3.0, method)
    assert got == ase_reference([mol], 3.0) and len(got) > 0
    assert all(e[2:] == (0, 0, 0) for e in got)
    for s in (isolated, one, one_periodic):
        got, ei, sh, _ = run([s], 5.0, method)
        assert ei.shape == (2, 0) and sh.shape == (0, 3)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_offsets_match_ase(method):
    rng = np.random.default_rng(5)
    structs = [
        random_triclinic(rng, 6),
        fcc_primitive(),
        (np.array([[0.0, 0, 0], [10.0, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool)),
        (rng.normal(size=(5, 3)), np.zeros((3, 3)), np.zeros(3, bool)),
        random_triclinic(rng, 8, (True, True, False)),
        (np.array([[1.0, 2.0, 3.0]]), np.zeros((3, 3)), np.zeros(3, bool)),
        random_triclinic(rng, 5, (False, True, False)),
    ]
    got, ei, sh, (pos, cell, _, batch) = run(structs, 5.0, method, max_pairs=97)  # many chunks
    ref = ase_reference(structs, 5.0)
    assert got == ref, f"missing {sorted(ref - got)[:5]}, extra {sorted(got - ref)[:5]}"
    check_geometry(ei, sh, pos, cell, batch, 5.0)


def test_methods_and_chunk_sizes_agree_exactly():
    rng = np.random.default_rng(6)
    structs = [random_triclinic(rng, 10) for _ in range(3)] + [fcc_primitive()]
    outs = [run(structs, 5.0, m, max_pairs=mp)[1:3] for m in METHODS for mp in (1, 50, 1 << 20)]
    for ei, sh in outs[1:]:
        assert torch.equal(ei, outs[0][0]) and torch.equal(sh, outs[0][1])


def test_empty_graph_in_batch_and_ptr():
    rng = np.random.default_rng(7)
    a, b = random_triclinic(rng, 4), random_triclinic(rng, 3)
    pos = torch.tensor(np.concatenate([a[0], b[0]]))
    cell = torch.tensor(np.stack([a[1], np.zeros((3, 3)), b[1]]))
    pbc = torch.tensor([[True] * 3, [False] * 3, [True] * 3])
    batch = torch.tensor([0] * 4 + [2] * 3)
    ptr = torch.tensor([0, 4, 4, 7])
    ei, sh = radius_graph_pbc(pos, cell, pbc, batch, 4.0, ptr=ptr)
    ref = ase_edges(*a, 4.0) | ase_edges(*b, 4.0, offset=4)
    assert {(int(x), int(y), *map(int, s)) for x, y, s in zip(ei[0], ei[1], sh.long())} == ref
    with pytest.raises(ValueError, match="ptr"):
        radius_graph_pbc(pos, cell, pbc, batch, 4.0, ptr=torch.tensor([0, 3, 4, 7]))


def test_float32_input_no_grad_and_dtype():
    rng = np.random.default_rng(8)
    p, c, pbc = random_triclinic(rng, 6)
    pos = torch.tensor(p, dtype=torch.float32, requires_grad=True)
    ei, sh = radius_graph_pbc(pos, torch.tensor(c, dtype=torch.float32)[None], torch.tensor(pbc)[None],
                              torch.zeros(6, dtype=torch.long), 4.0)
    assert sh.dtype == torch.float32 and not sh.requires_grad and ei.shape[1] > 0
    r = pos[ei[1]] - pos[ei[0]] + sh @ torch.tensor(c, dtype=torch.float32)
    r.norm(dim=1).sum().backward()
    assert pos.grad is not None and bool(torch.isfinite(pos.grad).all())


def test_validation_errors_name_the_item():
    pos = torch.zeros(4, 3)
    pos[1] = torch.tensor([1.0, 0, 0])
    pos[3] = torch.tensor([2.0, 0, 0])
    cell = torch.stack([torch.eye(3) * 5, torch.eye(3) * 5])
    pbc = torch.ones(2, 3, dtype=torch.bool)
    batch = torch.tensor([0, 0, 1, 1])
    bad = pos.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="atom 3 \\(graph 1\\)"):
        radius_graph_pbc(bad, cell, pbc, batch, 3.0)
    for cutoff in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="cutoff"):
            radius_graph_pbc(pos, cell, pbc, batch, cutoff)
    singular = cell.clone()
    singular[1, 2] = singular[1, 0]  # two equal lattice vectors in graph 1
    with pytest.raises(ValueError, match="graph 1"):
        radius_graph_pbc(pos, singular, pbc, batch, 3.0)
    # the same degenerate row on a non-periodic axis is fine
    radius_graph_pbc(pos, singular, torch.tensor([[True] * 3, [True, True, False]]), batch, 3.0)
    with pytest.raises(ValueError, match="sorted"):
        radius_graph_pbc(pos, cell, pbc, torch.tensor([0, 1, 0, 1]), 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    structs = [random_triclinic(rng, 20) for _ in range(4)] + [fcc_primitive()]
    _, ei, sh, (pos, cell, pbc, batch) = run(structs, 5.0, "auto")
    for method in METHODS:
        ei_g, sh_g = radius_graph_pbc(pos.cuda(), cell.cuda(), pbc.cuda(), batch.cuda(), 5.0, method=method)
        assert ei_g.is_cuda and torch.equal(ei_g.cpu(), ei) and torch.equal(sh_g.cpu(), sh)
