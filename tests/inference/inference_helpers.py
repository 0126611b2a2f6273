"""Structures and models shared by the inference tests."""

import numpy as np
import torch


def cu_au_cell(repeat=(2, 1, 1), a=3.6, rattle=0.05, seed=0):
    """fcc Cu cell (cubic, ``repeat``) with every other atom Au, rattled (seeded)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True) * repeat
    numbers = atoms.numbers.copy()
    numbers[::2] = 79
    atoms.numbers = numbers
    if rattle:
        atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


def random_model(force_mode="conservative", scale=30.0, seed=0, cutoff=4.0):
    """An untrained egnn-tiny: a smooth potential; ``scale`` (energy_scale) sets forces to ~0.1 eV/Å."""
    from gnnmegatron.models import AtomisticModel, get_preset

    torch.manual_seed(seed)
    model = AtomisticModel(get_preset("egnn-tiny", cutoff=cutoff, force_mode=force_mode))
    model.set_normalization(scale, 0.0)
    return model.double().eval()
