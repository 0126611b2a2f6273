"""Multi-source pretraining under tensor, pipeline and data parallelism equals one process (gloo, float64).

Each layout runs on 2 processes over the two-source mixture of ``multisource_helpers`` (mixed labels,
per-source loss weights, temperature sampling): tp=2 with per-source heads, pp=2 with the learned
source embedding (conservative forces through the pipeline, 2 micro-batches), and dp=2 with
per-source heads, interrupted after step 3 and resumed. Each is compared with one process running
the same global batches: the loss curve within rtol 1e-9 and every final weight within 1e-9
(relative), validation errors per source alike.
"""
from __future__ import annotations

import pytest
import torch
from multisource_helpers import make_two_sources

from gnnmegatron.parallel.testing import run_distributed
from gnnmegatron.training.config import config_from_dict
from gnnmegatron.training.logging import read_metrics

STEPS = 6
RTOL = 1e-9


def _cfg(stores, run_dir, *, tp=1, pp=1, m=1, heads="per_source", steps=STEPS):
    a, b = stores
    return config_from_dict({
        "run_dir": str(run_dir), "seed": 5,
        "data": {"sources": [{"store": str(a)}, {"store": str(b), "energy_weight": 2.0}], "sampling": "temperature",
                 "temperature": 2.0, "cutoff": 4.0, "budget_atoms": 40, "splits": [0.75, 0.25, 0.0], "prefetch": 1},
        "model": {"preset": "egnn-tiny", "message": "node_split", "heads": heads},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "clip_grad_norm": 0.5},
        "loss": {"stress_weight": 0.5},
        "train": {"max_steps": steps, "eval_every": 3, "checkpoint_every": 100, "log_every": 1, "progress": False,
                  "dtype": "float64", "micro_batches": m},
        "parallel": {"tp": tp, "pp": pp},
    })


def _worker(stores, run_dir, kwargs, stop_at):
    from gnnmegatron.training.trainer import Trainer

    if stop_at:
        Trainer(_cfg(stores, run_dir, **kwargs), resume="never").fit(stop_at=stop_at)
        trainer = Trainer(_cfg(stores, run_dir, **kwargs), resume="auto")
        assert trainer.step == stop_at
    else:
        trainer = Trainer(_cfg(stores, run_dir, **kwargs), resume="never")
    return trainer.fit()["val"]


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def _dp_reference(stores, run_dir, dp, m=1, **kwargs):
    """One process running each step's global batch: the dp shards of the mixture, gradients averaged."""
    from gnnmegatron.data.mixture import MixtureSampler
    from gnnmegatron.data.sampler import GraphLoader
    from gnnmegatron.training.losses import compute_loss, loss_denominators
    from gnnmegatron.training.optim import lr_at, set_lr
    from gnnmegatron.training.trainer import Trainer

    ref = Trainer(_cfg(stores, run_dir, m=m, **kwargs), resume="never")
    base, cfg = ref.train_sampler, ref.cfg
    iters = []
    for r in range(dp):
        sampler = MixtureSampler(base.atom_counts, base.graph_chunks, base.source_indices, base.probabilities,
                                 seed=cfg.seed, epoch_graphs=base.epoch_graphs, budget_atoms=cfg.data.budget_atoms,
                                 dp_rank=r, dp_size=dp)
        loader = GraphLoader(ref.store, sampler, cutoff=cfg.data.cutoff, dtype=torch.float64, prefetch=0)

        def endless(loader=loader):
            epoch = 0
            while True:
                yield from loader
                epoch += 1
                loader.set_epoch(epoch)

        iters.append(endless())
    losses = []
    for step in range(STEPS):
        set_lr(ref.optimizer, lr_at(step, cfg.optim, cfg.train.max_steps))
        ref.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for it in iters:
            micro = [next(it) for _ in range(m)]
            den = loss_denominators(micro)
            for batch in micro:
                out = ref.model(batch, compute_forces=True, compute_stress=True)
                loss, _ = compute_loss(out, batch, cfg.loss, den, ref.source_weights)
                (loss / dp).backward()
                total += float(loss.detach()) / dp
        torch.nn.utils.clip_grad_norm_(ref.model.parameters(), cfg.optim.clip_grad_norm)
        ref.optimizer.step()
        losses.append(total)
    return ref, losses


RUNS = {
    "tp2-per-source": dict(tp=2, m=2),
    "pp2-embedding": dict(pp=2, m=2, heads="embedding"),
    "dp2-per-source-resumed": dict(),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multisource-parallel")
    stores = make_two_sources(root)
    out = {}
    for name, kwargs in RUNS.items():
        stop = 3 if name.startswith("dp2") else 0
        out[name] = run_distributed(_worker, 2, stores, root / name, kwargs, stop, timeout=600)
    return root, stores, out


@pytest.mark.parametrize("name", list(RUNS))
def test_multisource_layouts_equal_one_process(runs, name):
    from gnnmegatron.inference import load_model
    from gnnmegatron.training.trainer import Trainer

    root, stores, results = runs
    kwargs = RUNS[name]
    vals = [r for r in results[name]]
    assert all(v == vals[0] for v in vals), "every rank reports the same validation"
    model_kwargs = {k: v for k, v in kwargs.items() if k in ("heads", "m")}
    if name.startswith("dp2"):
        ref, ref_losses = _dp_reference(stores, root / f"ref-{name}", 2, **model_kwargs)
    else:
        ref = Trainer(_cfg(stores, root / f"ref-{name}", **model_kwargs), resume="never")
        ref.fit()
        ref_losses = _losses(root / f"ref-{name}")
    losses = _losses(root / name)
    assert len(losses) == STEPS
    err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    assert err <= RTOL, f"{name}: loss curve differs from one process (max rel {err:.2e}):\n{losses}\n{ref_losses}"
    model, info = load_model(root / name, dtype=torch.float64)
    assert info.sources == ["metals", "shifted"]
    for key, value in ref.model.state_dict().items():
        diff = float((model.state_dict()[key] - value).abs().max())
        assert diff <= 1e-12 + RTOL * float(value.abs().max()), f"{name}: {key} differs by {diff:.2e}"
    val = ref.evaluate()
    for src in ("metals", "shifted"):
        for key in ("energy_mae_per_atom", "force_mae"):
            a, b = vals[0]["sources"][src][key], val["sources"][src][key]
            assert abs(a - b) <= RTOL * abs(b), (src, key, a, b)
