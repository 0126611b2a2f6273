"""GNNMegatronCalculator: forces and stress are derivatives of the energy, NVE conserves energy,
the neighbour list is reused exactly, unknown elements are refused."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet
from inference_helpers import cu_au_cell, random_model

from gnnmegatron.data.batch import collate
from gnnmegatron.inference import GNNMegatronCalculator, UnknownElementError


def _energy(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def _cluster():
    """A non-periodic 6-atom Cu-Au cluster (zero cell)."""
    rng = np.random.default_rng(3)
    pos = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.5, 2.5, 0], [1.2, 1.3, 1.9]], float)
    return Atoms([29, 79, 29, 79, 29, 29], positions=pos + rng.normal(0, 0.05, pos.shape))


@pytest.mark.parametrize("kind", ["periodic", "cluster"])
@pytest.mark.parametrize("source", ["checkpoint", "model"])
def test_forces_are_minus_energy_gradient(tiny_run, kind, source):
    """Central differences, h = 1e-4 Å, float64: truncation ~h^2 |E'''| ~ 1e-9, rounding ~1e-16 E/h ~ 1e-11
    (measured errors 2e-10 to 4e-10 eV/Å). ``checkpoint``: the Trainer's model loaded from its run directory;
    ``model``: an untrained model with 10x larger forces."""
    atoms = cu_au_cell() if kind == "periodic" else _cluster()
    calc = GNNMegatronCalculator(tiny_run.run_dir if source == "checkpoint" else random_model(), skin=0.5)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-4, "forces vanish: the check would be vacuous"
    h = 1e-4
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            fd[i, k] = -(_energy(calc, plus) - _energy(calc, minus)) / (2 * h)
    err = np.abs(forces - fd).max()
    assert err < 1e-7, f"max |F - (-dE/dx)| = {err:.3g} eV/Å (max |F| = {np.abs(forces).max():.3g})"


def test_stress_is_energy_strain_derivative():
    """sigma_ij = (1/V) dE/d eps_ij by central differences of a symmetric strain (positions follow the cell)."""
    atoms = cu_au_cell()
    calc = GNNMegatronCalculator(random_model(), skin=0.5)
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-4
    volume, h = atoms.get_volume(), 1e-5
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] += 0.5
            eps[j, i] += 0.5
            energies = []
            for sign in (1, -1):
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ (np.eye(3) + sign * h * eps), scale_atoms=True)
                energies.append(_energy(calc, strained))
            fd[i, j] = (energies[0] - energies[1]) / (2 * h) / volume
    err = np.abs(stress - fd).max()
    assert err < 1e-8, f"max |stress - dE/deps / V| = {err:.3g} eV/Å^3 (max |stress| = {np.abs(stress).max():.3g})"
    voigt = atoms.get_stress()
    assert np.allclose(voigt, [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])


def test_nve_energy_drift_is_small():
    """200 velocity-Verlet steps of 1 fs, 16-atom Cu-Au cell, 300 K, float64, untrained (still smooth and
    conservative) egnn-tiny with energy_scale 30 (forces ~0.1 eV/Å, T rises to ~300 K).

    Bound 2e-5 eV/atom on the largest excursion of the total energy: measured 5.7e-7 eV/atom (35x margin);
    scaling the forces by 1.05 (a 5% non-conservative error) gives 5.7e-4 eV/atom, so the bound still
    catches force errors 30x below that. A small skin (0.2 Å) makes the run rebuild the neighbour list
    several times, so reuse and rebuilds both lie on the trajectory.
    """
    atoms = cu_au_cell(repeat=(2, 2, 1), rattle=0.0)
    numbers = atoms.numbers.copy()
    numbers[:] = 29
    numbers[::3] = 79
    atoms.numbers = numbers
    from ase.md.velocitydistribution import Stationary

    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(0.0, 1.0, (len(atoms), 3)) * np.sqrt(masses * units.kB * 300.0))
    Stationary(atoms)
    atoms.calc = GNNMegatronCalculator(random_model(scale=30.0), skin=0.2)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy() / len(atoms)), interval=1)
    dyn.run(200)
    energies = np.asarray(energies)
    drift = np.abs(energies - energies[0]).max()
    assert atoms.calc.neighbor_list_builds > 2, atoms.calc.neighbor_list_builds
    assert drift < 2e-5, f"total energy moved by {drift:.3g} eV/atom in 200 fs"


def test_neighbor_list_reused_within_half_skin_and_exact():
    atoms = cu_au_cell(repeat=(2, 1, 1), rattle=0.0)  # atom 0 at the origin; third fcc shell at a*sqrt(1.5)=4.41 Å
    calc = GNNMegatronCalculator(random_model(), skin=1.0)  # cutoff 4 Å, candidates to 5 Å
    atoms.calc = calc
    atoms.get_forces()
    assert calc.neighbor_list_builds == 1
    edges0 = calc.num_edges
    direction = np.array([1.0, 0.5, 0.5]) / np.sqrt(1.5)  # towards a third-shell neighbour of atom 0

    def check_against_fresh(moved):
        fresh = moved.copy()
        fresh.calc = GNNMegatronCalculator(random_model(), skin=1.0)
        for name in ("energy", "forces", "stress"):
            a, b = moved.calc.get_property(name, moved), fresh.calc.get_property(name, fresh)
            assert np.allclose(a, b, rtol=1e-12, atol=1e-12), (name, np.abs(a - b).max())
        assert moved.calc.num_edges == fresh.calc.num_edges

    # 0.45 Å < skin/2: no rebuild, but the pair at 4.41 Å has come within 3.96 Å < cutoff
    atoms.positions[0] += 0.45 * direction
    atoms.get_forces()
    assert calc.neighbor_list_builds == 1
    assert calc.num_edges > edges0, "the edge set should have grown from the candidate list"
    check_against_fresh(atoms)
    # 0.55 Å from where the list was built: rebuild
    atoms.positions[0] += 0.10 * direction
    atoms.get_forces()
    assert calc.neighbor_list_builds == 2
    check_against_fresh(atoms)
    # cell, pbc and numbers changes rebuild even without motion
    atoms.set_cell(atoms.cell.array * 1.001, scale_atoms=False)
    atoms.get_forces()
    assert calc.neighbor_list_builds == 3
    numbers = atoms.numbers.copy()
    numbers[1] = 29 if numbers[1] == 79 else 79
    atoms.numbers = numbers
    atoms.get_forces()
    assert calc.neighbor_list_builds == 4
    atoms.pbc = [True, True, False]
    atoms.get_potential_energy()
    assert calc.neighbor_list_builds == 5


def test_calculator_equals_model_on_collated_batch(tiny_run):
    atoms = cu_au_cell(repeat=(2, 1, 1))
    atoms.calc = GNNMegatronCalculator(tiny_run.checkpoint, skin=1.0)
    model = atoms.calc.model
    s = {"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array, "pbc": atoms.pbc}
    out = model(collate([s], model.cfg.cutoff, dtype=torch.float64), compute_stress=True)
    assert np.allclose(atoms.get_potential_energy(), float(out["energy"][0].detach()), rtol=0, atol=1e-12)
    assert np.allclose(atoms.get_forces(), out["forces"].detach().numpy(), rtol=0, atol=1e-12)
    assert atoms.get_potential_energy() == atoms.get_potential_energy(force_consistent=True)


def test_unknown_element_refused_with_its_symbol(tiny_run):
    atoms = cu_au_cell()
    numbers = atoms.numbers.copy()
    numbers[3] = 26  # Fe: not in the EMT training data (Al, Ni, Cu, Pd, Ag, Pt, Au)
    atoms.numbers = numbers
    atoms.calc = GNNMegatronCalculator(tiny_run.run_dir)
    with pytest.raises(UnknownElementError, match=r"never seen Fe \(Z=26\)"):
        atoms.get_potential_energy()
    # a model object with an explicit element list
    atoms.calc = GNNMegatronCalculator(random_model(), elements=["Cu", "Au"])
    atoms.numbers = [29, 79, 29, 79, 1, 29, 79, 29]
    with pytest.raises(UnknownElementError, match=r"never seen H \(Z=1\)"):
        atoms.get_forces()


def test_broken_structures_refused_even_with_a_reused_neighbour_list(tiny_run):
    """NaN positions and atoms on top of each other are errors naming the atoms, also after earlier
    calls (when the cached neighbour list would otherwise be reused without looking)."""
    atoms = cu_au_cell()
    calc = GNNMegatronCalculator(tiny_run.run_dir)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    pos = atoms.positions.copy()
    pos[2, 0] = np.nan
    atoms.positions = pos
    with pytest.raises(ValueError, match=r"positions of atom 2 are not finite"):
        atoms.get_potential_energy()
    pos = atoms.positions.copy()
    pos[2] = pos[5] + 0.01  # within half the skin of nothing: a fresh list is built, the pair is caught
    atoms.positions = pos
    with pytest.raises(ValueError, match=r"atoms (2 and 5|5 and 2) are 0.0173 Å apart, closer than 0.1 Å"):
        atoms.get_forces()
    atoms = cu_au_cell()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(e0, rel=1e-12)  # the calculator still works


def test_stress_refused_for_direct_models_and_non_periodic_atoms():
    atoms = cu_au_cell()
    atoms.calc = GNNMegatronCalculator(random_model(force_mode="direct"), dtype=torch.float32)
    assert atoms.get_forces().shape == (len(atoms), 3)
    with pytest.raises(PropertyNotImplementedError, match="conservative"):
        atoms.get_stress()
    cluster = _cluster()
    cluster.calc = GNNMegatronCalculator(random_model())
    assert np.isfinite(cluster.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        cluster.get_stress()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu(tiny_run):
    atoms = cu_au_cell()
    atoms.calc = GNNMegatronCalculator(tiny_run.run_dir)
    ref = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    gpu = atoms.copy()
    gpu.calc = GNNMegatronCalculator(tiny_run.run_dir, device="cuda")
    got = (gpu.get_potential_energy(), gpu.get_forces(), gpu.get_stress())
    for a, b in zip(ref, got):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-10)
