"""``scripts/gpu_check.sh``'s own logic, on a machine without a GPU: it stops with status 2 and says
why where no CUDA device is visible; with a stand-in interpreter that claims one, the package is
installed where it does not import, steps run in order under the time budget, a step that would
start with less than its limit left is skipped and says so, a failed step makes the exit status 1,
and the run's benchmark files are packed into OUTDIR/benchmarks.tar.gz."""

import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer; this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in (tmp_path / "out" / "gpu_check.log").read_text()


def _stand_in(tmp_path, result_file):
    """An interpreter that records its arguments: the CUDA probe passes, ``import gnnmegatron.kernels``
    fails (so the script installs), the medium-shape doctor run fails, the kernel benchmark writes a
    result file; everything else succeeds."""
    fake = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    fake.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
case "$*" in
  *"import gnnmegatron.kernels"*) exit 1;;
  *doctor-medium*) exit 1;;
  *benchmarks/kernels.py*) echo '{{}}' > {result_file};;
esac
exit 0
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake, calls


def test_steps_budget_and_status_with_a_stand_in_interpreter(tmp_path):
    result_file = ROOT / "benchmarks" / "results" / f"kernels-standin-{os.getpid()}.json"
    fake, calls = _stand_in(tmp_path, result_file)
    env = dict(os.environ, PYTHON=str(fake), GPU_CHECK_BUDGET_S="300")
    try:
        # a relative OUTDIR is taken from the caller's directory
        proc = subprocess.run(["bash", str(SCRIPT), "out"], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
        log = (tmp_path / "out" / "gpu_check.log").read_text()
        assert proc.returncode == 1, log
        called = calls.read_text()
        assert f"-m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e {ROOT}" in called
        assert "DONE install" in log
        # the benchmark's 330 s limit exceeds the 300 s budget: skipped; the steps with smaller limits run
        assert "SKIP egnn_blocks" in log and "egnn_blocks.py" not in called
        assert "quick=True" in called and "quick=False" in called
        assert "DONE doctor (small shapes)" in log and "FAIL doctor (small and medium shapes): exit status 1" in log
        assert "benchmarks/kernels.py --device cuda --quick" in called and "DONE kernels" in log
        order = [line.split(" (")[0] for line in log.splitlines() if line.startswith("== START")]
        assert order == ["== START environment", "== START install", "== START doctor", "== START doctor",
                         "== START kernels"], order
        with tarfile.open(tmp_path / "out" / "benchmarks.tar.gz") as tar:
            assert result_file.name in tar.getnames()  # this run's result file, and not older ones
            assert all(name.startswith("kernels-standin") for name in tar.getnames()), tar.getnames()
    finally:
        result_file.unlink(missing_ok=True)

    env["GPU_CHECK_BUDGET_S"] = "170"  # only the environment step fits: status 3 (skipped, none failed)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out2")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 3, (tmp_path / "out2" / "gpu_check.log").read_text()
    assert not (tmp_path / "out2" / "benchmarks.tar.gz").exists()
