"""``scripts/gpu_check.sh``'s own logic, on a machine without a GPU: it stops with status 2 and says
why where no CUDA device is visible; with a stand-in interpreter that claims one, steps run in order
under the time budget, a step that would start with less than its limit left is skipped and says
so, and a failed step makes the exit status 1."""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer; this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_steps_budget_and_status_with_a_stand_in_interpreter(tmp_path):
    fake = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    # succeeds at everything (the CUDA probe included) except the medium-shape doctor run
    fake.write_text(f"#!/bin/bash\necho \"$*\" >> {calls}\ncase \"$*\" in *doctor-medium*) exit 1;; esac\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake), GPU_CHECK_BUDGET_S="250")
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=env)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 1, log
    # the benchmark needs up to 330 s of a 250 s budget: skipped; the steps with smaller limits run
    assert "SKIP egnn_blocks" in log and "egnn_blocks.py" not in calls.read_text()
    assert "DONE doctor (small shapes)" in log and "FAIL doctor (small and medium shapes): exit status 1" in log
    assert "benchmarks/kernels.py --device cuda --quick" in calls.read_text() and "DONE kernels" in log
    order = [line.split(" (")[0] for line in log.splitlines() if line.startswith("== START")]
    assert order == ["== START environment", "== START doctor", "== START doctor", "== START kernels"], order

    env["GPU_CHECK_BUDGET_S"] = "170"  # only the environment step fits: status 3 (skipped, none failed)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out2")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 3, (tmp_path / "out2" / "gpu_check.log").read_text()
