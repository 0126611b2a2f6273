"""collate / batch_to: keys, shapes, dtypes, targets, edge geometry and gradients."""
import numpy as np
import pytest
import torch
from ase.neighborlist import primitive_neighbor_list

from gnnmegatron.data.batch import batch_to, collate, voigt_to_matrix

CUTOFF = 4.0


def structures():
    rng = np.random.default_rng(0)
    cell = np.array([[4.0, 0.3, 0.0], [0.5, 4.2, 0.1], [0.2, -0.3, 3.9]])
    bulk = dict(atomic_numbers=np.array([8, 1, 1, 26]), positions=rng.uniform(0, 1, (4, 3)) @ cell, cell=cell,
                pbc=np.ones(3, bool), energy=-3.5, forces=rng.normal(size=(4, 3)),
                stress=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), source=1, index=42)
    mol = dict(atomic_numbers=np.array([6, 1, 1]), positions=rng.normal(size=(3, 3)), cell=np.zeros((3, 3)),
               pbc=np.zeros(3, bool), energy=-1.0, forces=rng.normal(size=(3, 3)), stress=None, source=0)
    one = dict(atomic_numbers=np.array([3]), positions=np.zeros((1, 3)), cell=np.eye(3) * 2.5, pbc=True,
               energy=0.5, forces=np.zeros((1, 3)), stress=np.eye(3) * 0.1, source=2, index=7)
    return [bulk, mol, one]


def test_keys_shapes_dtypes_and_targets():
    s = structures()
    b = collate(s, CUTOFF)
    B, N, E = 3, 8, b["edge_index"].shape[1]
    expected = {
        "atomic_numbers": ((N,), torch.int64), "positions": ((N, 3), torch.float32),
        "cell": ((B, 3, 3), torch.float32), "pbc": ((B, 3), torch.bool), "batch": ((N,), torch.int64),
        "ptr": ((B + 1,), torch.int64), "num_atoms": ((B,), torch.int64), "edge_index": ((2, E), torch.int64),
        "edge_shift": ((E, 3), torch.float32), "energy": ((B,), torch.float32),
        "forces": ((N, 3), torch.float32),
        "stress": ((B, 3, 3), torch.float32), "has_stress": ((B,), torch.bool), "source": ((B,), torch.int64),
        "index": ((B,), torch.int64), "has_energy": ((B,), torch.bool), "has_forces": ((B,), torch.bool),
    }
    assert set(b) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert tuple(b[k].shape) == shape and b[k].dtype == dtype, (k, b[k].shape, b[k].dtype)
    assert b["batch"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2] and b["ptr"].tolist() == [0, 4, 7, 8]
    assert b["index"].tolist() == [42, 1, 7], "index: given, else list position"
    assert b["source"].tolist() == [1, 0, 2] and b["pbc"][2].tolist() == [True] * 3
    assert b["has_stress"].tolist() == [True, False, True]
    assert b["has_energy"].tolist() == [True] * 3 and b["has_forces"].tolist() == [True] * 3
    assert torch.equal(b["stress"][1], torch.zeros(3, 3))
    assert np.allclose(b["stress"][0].numpy(), [[1, 6, 5], [6, 2, 4], [5, 4, 3]]), "Voigt xx yy zz yz xz xy"
    assert np.allclose(b["forces"][4:7].numpy(), s[1]["forces"]) and b["energy"].tolist() == [-3.5, -1.0, 0.5]
    # the lone Li in a 2.5 Å cubic cell sees its 6 + 12 images within 4 Å, the molecule no shifts
    assert int((b["edge_index"][0] == 7).sum()) == 18
    mol_edges = b["batch"][b["edge_index"][0]] == 1
    assert bool((b["edge_shift"][mol_edges] == 0).all())


def test_edges_match_ase_and_geometry():
    s = structures()
    b = collate(s, CUTOFF, dtype=torch.float64)
    ei, sh = b["edge_index"], b["edge_shift"]
    shift_vec = torch.einsum("ei,eij->ej", sh, b["cell"][b["batch"][ei[0]]])
    r = b["positions"][ei[1]] - b["positions"][ei[0]] + shift_vec
    d = r.norm(dim=1)
    assert bool((d > 0).all()) and bool((d < CUTOFF).all()), (float(d.min()), float(d.max()))
    ref = set()
    for g, st in enumerate(s):
        off = int(b["ptr"][g])
        pbc = np.broadcast_to(st["pbc"], 3)
        i, j, S = primitive_neighbor_list("ijS", pbc, st["cell"], st["positions"], CUTOFF)
        ref |= {(a + off, c + off, *map(int, x)) for a, c, x in zip(i, j, S)}
    got = {(int(a), int(c), *map(int, x)) for a, c, x in zip(ei[0], ei[1], sh.long())}
    assert got == ref
    assert bool((ei[0][1:] >= ei[0][:-1]).all()), "edge_index must be sorted by dst"


def test_gradient_flows_to_positions_and_pair_forces_balance():
    b = collate(structures(), CUTOFF, dtype=torch.float64)
    pos = b["positions"].clone().requires_grad_(True)
    ei, sh = b["edge_index"], b["edge_shift"]
    r = pos[ei[1]] - pos[ei[0]] + torch.einsum("ei,eij->ej", sh, b["cell"][b["batch"][ei[0]]])
    energy = torch.exp(-r.norm(dim=1)).sum()
    (grad,) = torch.autograd.grad(energy, pos)
    assert float(grad.abs().max()) > 1e-3
    # translation invariance: per-graph net force is zero (edges come in consistent i<->j pairs)
    net = torch.zeros(3, 3, dtype=grad.dtype).index_add_(0, b["batch"], grad)
    assert float(net.abs().max()) < 1e-10, net
    # finite difference on one coordinate of atom 1
    eps = 1e-6
    def e_at(p):
        rr = p[ei[1]] - p[ei[0]] + torch.einsum("ei,eij->ej", sh, b["cell"][b["batch"][ei[0]]])
        return torch.exp(-rr.norm(dim=1)).sum()
    p1, p2 = b["positions"].clone(), b["positions"].clone()
    p1[1, 0] += eps
    p2[1, 0] -= eps
    fd = (e_at(p1) - e_at(p2)) / (2 * eps)
    assert abs(float(fd) - float(grad[1, 0])) < 1e-6


def test_mixed_labels_are_masked_and_absent_targets_are_omitted():
    """A batch may mix structures with and without energy, forces or stress: zeros plus has_* masks."""
    s = structures()
    s[1]["energy"] = None
    s[2]["forces"] = None
    b = collate(s, CUTOFF)
    assert b["has_energy"].tolist() == [True, False, True]
    assert b["has_forces"].tolist() == [True, True, False]
    assert b["has_stress"].tolist() == [True, False, True]
    assert b["energy"].tolist() == [-3.5, 0.0, 0.5]
    assert np.allclose(b["forces"][:7].numpy(), np.concatenate([s[0]["forces"], s[1]["forces"]]))
    assert torch.equal(b["forces"][7:], torch.zeros(1, 3))
    # forces only, no energy anywhere: still every target key, energy all unlabelled
    only_forces = [dict(st, energy=None, stress=None) for st in structures()]
    b = collate(only_forces, CUTOFF)
    assert b["has_energy"].tolist() == [False] * 3 and b["has_forces"].tolist() == [True] * 3
    assert torch.equal(b["energy"], torch.zeros(3))
    bare = [{k: st[k] for k in ("atomic_numbers", "positions", "cell", "pbc")} for st in structures()]
    b = collate(bare, CUTOFF)
    assert not {"energy", "forces", "stress", "has_stress", "has_energy", "has_forces"} & set(b)
    assert b["source"].tolist() == [0, 0, 0] and b["index"].tolist() == [0, 1, 2]


def test_field_errors_name_structure_and_field():
    s = structures()
    s[1]["positions"] = np.zeros((2, 3))
    msg = "structure 1: field 'positions' has shape \\[2, 3\\], expected \\[3, 3\\]"
    with pytest.raises(ValueError, match=msg):
        collate(s, CUTOFF)
    s = structures()
    s[0]["positions"][2, 1] = np.nan
    msg = "structure 0 \\(store index 42\\): field 'positions' has non-finite"
    with pytest.raises(ValueError, match=msg):
        collate(s, CUTOFF)
    s = structures()
    s[0]["stress"] = np.zeros(5)
    with pytest.raises(ValueError, match="'stress'.*Voigt"):
        collate(s, CUTOFF)
    with pytest.raises(ValueError, match="at least one"):
        collate([], CUTOFF)
    with pytest.raises(ValueError, match="cutoff"):
        collate(structures(), 0.0)


def test_batch_to_and_voigt():
    b = collate(structures(), CUTOFF)
    b["note"] = "kept"
    moved = batch_to(b, "cpu")
    assert moved["note"] == "kept" and all(torch.equal(moved[k], b[k]) for k in b if torch.is_tensor(b[k]))
    m = voigt_to_matrix([1, 2, 3, 4, 5, 6])
    assert np.array_equal(m, m.T) and m[1, 2] == 4 and m[0, 2] == 5 and m[0, 1] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_collate_on_cuda_matches_cpu():
    cpu = collate(structures(), CUTOFF)
    gpu = collate(structures(), CUTOFF, device="cuda")
    for k in cpu:
        assert gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]), k
