"""Shared fixtures: a small EMT store built once per test session."""

import os

import pytest

# Keep the suite predictable on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def emt_store(tmp_path_factory):
    """Path of a 60-structure EMT store (seed 0, at most 12 atoms per structure)."""
    from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

    path = tmp_path_factory.mktemp("emt") / "emt.zarr"
    generate_emt_dataset(path, EMTConfig(num_structures=60, seed=0, max_atoms=12), workers=1, progress=False)
    return path
