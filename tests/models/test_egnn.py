"""Physics and plumbing tests of the single-device EGNN potential (float64 unless noted).

Edges come from ASE's neighbour list (contract: row 0 = dst i, row 1 = src j,
r_ij = x_j - x_i + S @ cell), not from gnnmegatron.data.neighbors, so the model is tested
on its own.
"""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.neighborlist import primitive_neighbor_list

from gnnmegatron.models import AtomisticModel, ModelConfig, ModelConfigError

CUTOFF = 4.0
DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: one intra-op thread is ~10x faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers
def periodic_cell(seed: int) -> Atoms:
    """8-atom Cu/Au fcc supercell with a random (triclinic) strain and rattled positions."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 2))
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 79
    strain = np.eye(3) + 0.05 * rng.standard_normal((3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
    return atoms


def cluster(seed: int, n: int = 7) -> Atoms:
    """Non-periodic Cu/Au cluster of ``n`` atoms, pairwise distances >= 2 Å."""
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0, 4.5, 3)
        if all(np.linalg.norm(p - q) >= 2.0 for q in pos):
            pos.append(p)
    return Atoms(numbers=rng.choice([29, 79], n), positions=pos)


def make_batch(structures, cutoff=CUTOFF, dtype=DT) -> dict:
    """Graph batch dict (contract layout) of a list of ase.Atoms."""
    z, pos, cells, pbcs, batch, edges, shifts = [], [], [], [], [], [], []
    offset = 0
    for g, atoms in enumerate(structures):
        i, j, S = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.array, atoms.positions, cutoff)
        order = np.argsort(i, kind="stable")
        edges.append(np.stack([i[order], j[order]]) + offset)
        shifts.append(S[order])
        z.append(atoms.numbers)
        pos.append(atoms.positions)
        cells.append(atoms.cell.array)
        pbcs.append(atoms.pbc)
        batch.append(np.full(len(atoms), g))
        offset += len(atoms)
    return dict(
        atomic_numbers=torch.tensor(np.concatenate(z), dtype=torch.long),
        positions=torch.tensor(np.concatenate(pos), dtype=dtype),
        cell=torch.tensor(np.stack(cells), dtype=dtype),
        pbc=torch.tensor(np.stack(pbcs)),
        batch=torch.tensor(np.concatenate(batch), dtype=torch.long),
        edge_index=torch.tensor(np.concatenate(edges, axis=1), dtype=torch.long),
        edge_shift=torch.tensor(np.concatenate(shifts), dtype=dtype),
    )


def make_model(seed=0, coord_boost=3000.0, **overrides) -> AtomisticModel:
    """Small float64 model; the coordinate MLP's output layer is scaled up (its init gain is
    0.001) so that coordinate updates move atoms by ~0.15 Å and the tests exercise them."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(hidden=16, layers=3, num_rbf=8, cutoff=CUTOFF), **overrides})
    model = AtomisticModel(cfg).to(DT).eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.coord_mlp is not None:
                block.coord_mlp[-1].weight.mul_(coord_boost)
    return model


def random_rotation(seed: int, reflect: bool = False) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return torch.tensor(q, dtype=DT)


def with_(base, **changes):
    out = dict(base)
    out.update(changes)
    return out


def rel_err(a, b):
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach())


VARIANTS = {
    "default": {},
    "gauss-ln-tanh": dict(radial_basis="gaussian", layer_norm=True, coord_tanh=True, coords_range=0.5,
                          message_normalizer=8.0, coord_normalizer=2.0, activation="gelu"),
}


@pytest.fixture(scope="module")
def mixed_batch():
    return make_batch([periodic_cell(1), cluster(2)])


# ----------------------------------------------------------------------------- tests
def test_coordinate_updates_matter(mixed_batch):
    """Guards the invariance tests: coordinate updates move atoms and change the energy."""
    model = make_model()
    offset = model.edge_offsets(mixed_batch["edge_index"], mixed_batch["edge_shift"], mixed_batch["cell"],
                                mixed_batch["batch"])
    with torch.no_grad():
        out, _ = model.represent(mixed_batch["atomic_numbers"], mixed_batch["positions"],
                                 mixed_batch["edge_index"], offset)
        moved = float((out.x - mixed_batch["positions"]).norm(dim=1).max())
        e = model(mixed_batch, compute_forces=False)["energy"]
        e0 = make_model(coord_boost=0.0)(mixed_batch, compute_forces=False)["energy"]
    assert moved > 0.05, f"coordinate updates move atoms by only {moved:.2e} Å"
    assert (e - e0).abs().min() > 1e-5, f"coordinate updates change the energy by only {(e - e0).tolist()}"
    assert model.blocks[-1].coord_mlp is None and model.blocks[0].coord_mlp is not None


def test_batch_equals_separate_graphs(mixed_batch):
    model = make_model()
    out = model(mixed_batch, compute_stress=True)
    a, b = model(make_batch([periodic_cell(1)]), compute_stress=True), model(make_batch([cluster(2)]))
    torch.testing.assert_close(out["energy"], torch.cat([a["energy"], b["energy"]]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], torch.cat([a["forces"], b["forces"]]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["stress"][0], a["stress"][0], rtol=1e-10, atol=1e-12)
    assert torch.all(out["stress"][1] == 0), "non-periodic graph must get zero stress"
    torch.testing.assert_close(out["energy"], torch.zeros(2, dtype=DT).index_add(0, mixed_batch["batch"],
                                                                                  out["node_energy"]))


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_supercell_is_extensive(mode):
    """A 2x1x2 supercell has 4x the energy and the tiled forces/stress: checks image offsets."""
    model = make_model(force_mode=mode)
    atoms = periodic_cell(7)
    stress = mode == "conservative"
    small, big = model(make_batch([atoms]), compute_stress=stress), model(make_batch([atoms.repeat((2, 1, 2))]),
                                                                             compute_stress=stress)
    torch.testing.assert_close(big["energy"], 4 * small["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(big["forces"], small["forces"].repeat(4, 1), rtol=1e-8, atol=1e-10)
    if stress:
        torch.testing.assert_close(big["stress"], small["stress"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["conservative", "direct"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_translation_invariance(mixed_batch, mode, variant, reflect):
    model = make_model(force_mode=mode, **VARIANTS[variant])
    stress = mode == "conservative"
    ref = model(mixed_batch, compute_stress=stress)
    R = random_rotation(3, reflect)
    shift = torch.tensor([0.7, -1.3, 2.1], dtype=DT)
    moved = with_(mixed_batch, positions=mixed_batch["positions"] @ R.T + shift, cell=mixed_batch["cell"] @ R.T)
    out = model(moved, compute_stress=stress)
    assert (ref["energy"] - out["energy"]).abs().max() < 1e-10 * ref["energy"].abs().max()
    assert rel_err(out["forces"], ref["forces"] @ R.T) < 1e-10
    if stress:
        assert rel_err(out["stress"], R @ ref["stress"] @ R.T) < 1e-9
    assert ref["forces"].abs().max() > 1e-4, "forces are trivially zero"


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_permutation_invariance(mixed_batch, mode):
    model = make_model(force_mode=mode)
    ref = model(mixed_batch)
    n, e = mixed_batch["positions"].shape[0], mixed_batch["edge_index"].shape[1]
    g = torch.Generator().manual_seed(5)
    # permute atoms inside each graph (graphs stay contiguous), and shuffle the edge order
    perm = torch.cat([torch.nonzero(mixed_batch["batch"] == b).flatten()[torch.randperm(int((mixed_batch["batch"] == b)
                      .sum()), generator=g)] for b in range(2)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    eperm = torch.randperm(e, generator=g)
    permuted = with_(mixed_batch, atomic_numbers=mixed_batch["atomic_numbers"][perm],
                     positions=mixed_batch["positions"][perm], batch=mixed_batch["batch"][perm],
                     edge_index=inv[mixed_batch["edge_index"]][:, eperm], edge_shift=mixed_batch["edge_shift"][eperm])
    out = model(permuted)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], ref["forces"][perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["node_energy"], ref["node_energy"][perm], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conservative_forces_match_finite_differences(mixed_batch, variant):
    model = make_model(**VARIANTS[variant])
    forces = model(mixed_batch)["forces"]
    pos, h = mixed_batch["positions"], 1e-5
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for a in range(pos.shape[0]):
            for c in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[a, c] += h
                minus[a, c] -= h
                e_p = model(with_(mixed_batch, positions=plus), compute_forces=False)["energy"].sum()
                e_m = model(with_(mixed_batch, positions=minus), compute_forces=False)["energy"].sum()
                fd[a, c] = -(e_p - e_m) / (2 * h)
    err = rel_err(forces, fd)
    assert err < 1e-5, f"max relative force error vs finite differences {err:.2e}"


def finite_strain_stress(energy_fn, cell, volume, h=1e-5):
    """(1/V) dE/deps by central differences on symmetric strains (the ASE convention)."""
    stress = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            eps = np.zeros((3, 3))
            eps[a, b] += 0.5 * h
            eps[b, a] += 0.5 * h
            stress[a, b] = stress[b, a] = (energy_fn(eps) - energy_fn(-eps)) / (2 * h) / volume
    return stress


def test_finite_strain_procedure_reproduces_ase_emt_stress_sign():
    """The strain-derivative convention used below gives ASE's stress (checked on EMT)."""
    atoms = periodic_cell(4)
    atoms.set_cell(atoms.cell.array * 0.97, scale_atoms=True)  # compressed: negative diagonal stress
    atoms.calc = EMT()
    cell0 = atoms.cell.array.copy()

    def energy(eps):
        strained = atoms.copy()
        strained.calc = EMT()
        strained.set_cell(cell0 @ (np.eye(3) + eps), scale_atoms=True)
        return strained.get_potential_energy()

    fd = finite_strain_stress(energy, cell0, atoms.get_volume())
    ase_stress = atoms.get_stress(voigt=False)
    assert np.trace(ase_stress) < 0
    np.testing.assert_allclose(fd, ase_stress, atol=1e-6 * np.abs(ase_stress).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stress_matches_finite_strain_derivative(variant):
    model = make_model(**VARIANTS[variant])
    atoms = periodic_cell(6)
    batch = make_batch([atoms])
    stress = model(batch, compute_forces=False, compute_stress=True)["stress"][0].numpy()

    def energy(eps):
        m = torch.eye(3, dtype=DT) + torch.tensor(eps, dtype=DT)
        strained = with_(batch, positions=batch["positions"] @ m, cell=batch["cell"] @ m)
        with torch.no_grad():
            return float(model(strained, compute_forces=False)["energy"][0])

    fd = finite_strain_stress(energy, atoms.cell.array, atoms.get_volume())
    assert np.abs(stress).max() > 1e-4
    err = np.abs(stress - fd).max() / np.abs(fd).max()
    assert err < 1e-5, f"stress vs finite strain: max rel error {err:.2e}\n{stress}\n{fd}"


def crossing_pair(dist: float) -> Atoms:
    """Atoms 0, 1 bonded; atom 2 at ``dist`` from atom 0 along x, within the cutoff of atom 1."""
    return Atoms(numbers=[29, 79, 29], positions=[[0, 0, 0], [2.2, 1.0, 0.3], [dist, 0.2, 0.0]])


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_energy_and_forces_continuous_at_cutoff(mode):
    model = make_model(force_mode=mode)
    delta = 1e-4
    r_in, r_out = np.sqrt((CUTOFF - delta) ** 2 - 0.04), np.sqrt((CUTOFF + delta) ** 2 - 0.04)
    inside, outside = make_batch([crossing_pair(r_in)]), make_batch([crossing_pair(r_out)])
    assert inside["edge_index"].shape[1] == outside["edge_index"].shape[1] + 2, "pair 0-2 must cross the cutoff"
    a, b = model(inside), model(outside)
    jump = float((a["energy"] - b["energy"]).abs().max().detach())
    assert jump < 1e-6, f"energy jumps by {jump:.2e} eV when an atom crosses the cutoff"
    assert float((a["forces"] - b["forces"]).abs().max().detach()) < 1e-5
    # Control: without the envelope the same crossing gives a clear jump, so the test can fail.
    model.envelope.forward = lambda d: (d < CUTOFF).to(d.dtype)
    raw_jump = float((model(inside)["energy"] - model(outside)["energy"]).abs().max().detach())
    assert raw_jump > 1e-4, f"control jump without envelope only {raw_jump:.2e}"


def test_force_loss_gradients_reach_every_parameter(mixed_batch):
    """Double backward: a force loss must train every parameter (finite, non-zero grads)."""
    model = make_model(layer_norm=True).train()
    out = model(mixed_batch)
    assert out["forces"].requires_grad
    loss = (out["forces"] - 0.1).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient from a force loss"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_eval_forces_need_no_graph_and_work_under_no_grad(mixed_batch):
    model = make_model()
    ref = model(mixed_batch)
    assert not ref["forces"].requires_grad, "eval mode must not keep a graph through the forces"
    with torch.no_grad():
        out = model(mixed_batch, compute_stress=True)
    torch.testing.assert_close(out["forces"], ref["forces"].detach())
    assert "stress" in out and out["stress"].shape == (2, 3, 3)
    assert not any(v.requires_grad for v in out.values()), "outputs under no_grad must be detached"


def test_reference_energies_and_normalization(mixed_batch):
    model = make_model()
    base = model(mixed_batch)
    model.set_reference_energies({29: -3.5, 79: -2.25})
    model.set_normalization(2.0, 0.5)
    out = model(mixed_batch)
    z = mixed_batch["atomic_numbers"]
    ref_per_atom = torch.where(z == 29, -3.5, -2.25).to(DT)
    torch.testing.assert_close(out["node_energy"], ref_per_atom + 2.0 * base["node_energy"] + 0.5)
    expected = torch.zeros(2, dtype=DT).index_add(0, mixed_batch["batch"], ref_per_atom + 2 * base["node_energy"] + 0.5)
    torch.testing.assert_close(out["energy"], expected)
    torch.testing.assert_close(out["forces"], 2.0 * base["forces"])
    table = torch.zeros(101, dtype=DT)
    table[29] = 1.0
    model.set_reference_energies(table)
    assert float(model.reference_energies[29]) == 1.0 and float(model.reference_energies[79]) == 0.0
    with pytest.raises(ValueError, match=r"\[101\]"):
        model.set_reference_energies(torch.zeros(50))
    with pytest.raises(ValueError, match="scale=-1.0"):
        model.set_normalization(-1.0, 0.0)


def test_direct_mode_has_no_stress(mixed_batch):
    model = make_model(force_mode="direct")
    out = model(mixed_batch)
    assert "stress" not in out and out["forces"].shape == (mixed_batch["positions"].shape[0], 3)
    with pytest.raises(ValueError, match="direct"):
        model(mixed_batch, compute_stress=True)
    with pytest.raises(ModelConfigError, match="compute_stress"):
        ModelConfig(hidden=8, layers=1, force_mode="direct", compute_stress=True)


def test_isolated_atoms_and_no_edges():
    model = make_model()
    batch = make_batch([Atoms(numbers=[29], positions=[[0, 0, 0]]),
                        Atoms(numbers=[29, 79], positions=[[0, 0, 0], [9, 0, 0]])])
    assert batch["edge_index"].shape[1] == 0
    out = model(batch, compute_stress=True)
    assert torch.all(out["forces"] == 0) and torch.isfinite(out["energy"]).all()
    torch.testing.assert_close(out["energy"][0], out["node_energy"][0])


def test_float32_batch_and_clear_input_errors(mixed_batch):
    model32 = AtomisticModel(ModelConfig(hidden=16, layers=2, num_rbf=8, cutoff=CUTOFF))
    batch32 = make_batch([periodic_cell(1), cluster(2)], dtype=torch.float32)
    out = model32(batch32, compute_stress=True)
    assert out["energy"].dtype == torch.float32 and torch.isfinite(out["forces"]).all()
    with pytest.raises(TypeError, match="float64.*float32"):
        model32(mixed_batch)
    bad = with_(batch32, atomic_numbers=batch32["atomic_numbers"].clone())
    bad["atomic_numbers"][0] = 118
    with pytest.raises(ValueError, match="118.*max_z=100"):
        model32(bad)
    with pytest.raises(KeyError, match="edge_shift"):
        model32({k: v for k, v in batch32.items() if k != "edge_shift"})
