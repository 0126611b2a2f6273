"""gnnmegatron: Megatron-style parallelism for graph neural networks on atoms."""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gnnmegatron" / "__init__.py").read_text()).group(1)

# Every package under gnnmegatron/ (subpackages included), plus the top-level kernels/ folder.
PACKAGES = sorted(
    ".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "gnnmegatron").rglob("__init__.py")
) + ["gnnmegatron.kernels"]

setup(
    name="gnnmegatron",
    version=VERSION,
    description="Megatron-style tensor/pipeline/data parallelism for atomistic graph neural networks",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",
    packages=PACKAGES,
    # The Triton kernels live in the top-level kernels/ folder and install as gnnmegatron.kernels.
    package_dir={"gnnmegatron.kernels": "kernels"},
    package_data={"gnnmegatron": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.5,<2.14",
        "megatron-core>=0.16,<0.17",
        "triton>=3.2; platform_system=='Linux'",
        "numpy>=1.26",
        "scipy>=1.10",
        "zarr>=3.0,<4",
        "ase>=3.23",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "h5py>=3.8", "lmdb>=1.4", "orjson>=3.9", "tensorboard>=2.14"],
        # train.tensorboard: true logs through torch.utils.tensorboard, which needs the tensorboard package.
        "tensorboard": ["tensorboard>=2.14"],
        # Readers of HDF5 (ANI-1x, QM7-X) and LMDB (OC20/OC22, OMat24/Alexandria) releases; orjson speeds up
        # MPtrj JSON and ASE-LMDB rows (the stdlib json is the fallback).
        "importers": ["h5py>=3.8", "lmdb>=1.4", "orjson>=3.9"],
        # Optional baselines for the kernel benchmarks; torch-scatter builds from source (~9 min).
        # (No apex extra: nothing imports apex; torch's fused AdamW and native norms cover it, and
        # the package of that name on the index is unrelated to NVIDIA's.)
        "baselines": ["torch-scatter>=2.1", "torch-geometric>=2.5"],
    },
    entry_points={"console_scripts": ["gnnmegatron=gnnmegatron.cli:main"]},
)
