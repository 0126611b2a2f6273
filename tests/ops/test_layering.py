"""Layering: ``kernels/`` (installed as ``gnnmegatron.kernels``) imports no other gnnmegatron layer."""

import subprocess
import sys

import pytest

CHECK = """
import sys
import gnnmegatron.kernels.aot, gnnmegatron.kernels.codes, gnnmegatron.kernels.edge_vector
import gnnmegatron.kernels.fused_message, gnnmegatron.kernels.fused_message_bwd
import gnnmegatron.kernels.fused_message_bwd2, gnnmegatron.kernels.segment_reduce
import gnnmegatron.kernels.faithful_message, gnnmegatron.kernels.faithful_message_bwd
import gnnmegatron.kernels.faithful_message_bwd2
others = sorted(m for m in sys.modules if m.startswith("gnnmegatron.") and not m.startswith("gnnmegatron.kernels"))
print(others)
assert not others, others
"""


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_kernels_import_no_other_layer():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ops_import_does_not_import_triton():
    """The ops take the kernel codes from kernels/codes.py, which needs no triton (non-Linux installs)."""
    proc = subprocess.run([sys.executable, "-c", "import sys, gnnmegatron.ops.activations; "
                           "assert 'triton' not in sys.modules, 'triton imported'"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
