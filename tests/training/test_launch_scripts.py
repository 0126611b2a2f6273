"""The launch scripts: single-node torchrun (run for real with pp=2) and the Slurm example (dry run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_single_node_launcher_runs_a_pipeline(emt_store, tmp_path):
    from gnnmegatron.training.config import config_from_dict

    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 1,
        "data": {"store": str(emt_store), "cutoff": 4.0, "budget_atoms": 40, "splits": [0.8, 0.2, 0.0]},
        "model": {"preset": "egnn-tiny", "layers": 4},
        "train": {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "progress": False},
    })
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "launch_pretrain.sh"), "2", str(path),
                          "--set", "parallel.pp=2", "--set", "train.micro_batches=3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["layout"] == {"tp": 1, "pp": 2, "dp": 1} and report["step"] == 2
    assert "energy MAE (meV/atom)" in out.stdout


def test_launcher_usage_error():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "launch_pretrain.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_slurm_example_builds_the_torchrun_command():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_JOB_ID": "77", "GPUS_PER_NODE": "8",
           "SLURMD_NODENAME": "node17", "PATH": os.environ["PATH"]}
    env.pop("SLURM_JOB_NODELIST", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_pretrain.sbatch"), "my.yaml", "--set", "parallel.tp=4"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout
    for part in ("srun", "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_id=77",
                 "-m gnnmegatron.cli pretrain --config my.yaml --set parallel.tp=4"):
        assert part in cmd, (part, cmd)
