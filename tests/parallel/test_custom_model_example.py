"""scripts/custom_tp_model.py (the README's custom-model example) runs under torchrun and its
tensor-parallel model equals the single-device one (the script asserts it, 1e-10 relative)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "custom_tp_model.py"


@pytest.mark.parametrize("groups", [4, 0])
def test_custom_model_example_under_torchrun(groups):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), "--hidden", "16", "--layers", "2", "--groups", str(groups)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tp=2:" in out.stdout and "max relative difference" in out.stdout, out.stdout
