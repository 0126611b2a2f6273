"""Fixtures of the inference tests: a tiny model trained (a few steps) by the real Trainer.

The tests run on one torch thread: the graphs are tiny (8-16 atoms), where extra threads only
add synchronisation (on a loaded 2-core machine one MD step took 5 ms on one thread and up to
0.4 s on two).
"""

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(emt_store, tmp_path_factory):
    """A Trainer (egnn-tiny, conservative, cutoff 4 Å, float64) after 2 optimizer steps, its run
    directory with one checkpoint, and the validation metrics it logged (as ``fit`` would)."""
    from gnnmegatron.training.config import config_from_dict
    from gnnmegatron.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("inference") / "run"
    cfg = config_from_dict({
        "run_dir": str(run_dir),
        "seed": 5,
        "data": {"store": str(emt_store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0],
                 "prefetch": 0},
        "model": {"preset": "egnn-tiny", "force_mode": "conservative"},
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "progress": False, "dtype": "float64"},
    })
    trainer = Trainer(cfg, resume="never")
    batches = trainer._batches()
    for _ in range(2):
        trainer.train_step(next(batches))
    val = trainer.evaluate()
    trainer.best_val = dict(val, step=trainer.step)
    trainer.metrics.write({"step": trainer.step, "split": "val", **val})
    checkpoint = trainer.save()
    return SimpleNamespace(trainer=trainer, run_dir=run_dir, checkpoint=checkpoint, val=val)
