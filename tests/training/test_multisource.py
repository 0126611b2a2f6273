"""Multi-source pretraining in one process: mixtures of stores, per-source references and heads,
label masks in training, per-source metrics, model cards, resume, and clear config errors."""
import json

import numpy as np
import pytest
import torch
from multisource_helpers import emt_structures, linear_structures, make_two_sources, relabel, write_store

from gnnmegatron.training.config import ConfigError, config_from_dict
from gnnmegatron.training.logging import read_metrics
from gnnmegatron.training.trainer import Trainer


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("multisource"))


def _cfg(run_dir, stores, heads="per_source", steps=6, **data):
    a, b = stores
    return config_from_dict({
        "run_dir": str(run_dir), "seed": 2,
        "data": {"sources": [{"store": str(a)}, {"store": str(b), "name": "dft", "energy_weight": 2.0}],
                 "sampling": "temperature", "temperature": 2.0, "cutoff": 4.0, "budget_atoms": 40,
                 "splits": [0.75, 0.25, 0.0], "prefetch": 1, **data},
        "model": {"preset": "egnn-tiny", "heads": heads},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "loss": {"stress_weight": 0.5},
        "train": {"max_steps": steps, "eval_every": 3, "checkpoint_every": 100, "log_every": 1, "progress": False,
                  "dtype": "float64"},
    })


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_references_per_source_are_recovered_and_stored_with_the_model(tmp_path):
    """Energies exactly linear in composition with known per-source tables (Cu in both, on other references)."""
    ta = {29: -3.7, 47: -2.8, 79: -3.2}
    tb = {29: -14.1, 28: -5.5, 8: -9.3}
    a = write_store(tmp_path / "a.zarr", linear_structures(60, 0, ta), "a")
    b = write_store(tmp_path / "b.zarr", linear_structures(60, 1, tb), "b")
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"sources": [{"store": str(a)}, {"store": str(b)}], "cutoff": 3.0, "budget_atoms": 64,
                 "splits": [0.8, 0.2, 0.0], "prefetch": 0},
        "model": {"preset": "egnn-tiny"}, "loss": {"force_weight": 0.0},
        "train": {"max_steps": 1, "progress": False, "dtype": "float64"}})
    trainer = Trainer(cfg, resume="never")
    ref = trainer.model.reference_energies
    assert ref.shape == (2, trainer.model_cfg.max_z + 1)
    for row, table in zip(ref, (ta, tb)):
        for z, e in table.items():
            assert abs(float(row[z]) - e) < 5e-3, (z, float(row[z]), e)
    # one table over both sources cannot: Cu sits on two references
    from gnnmegatron.training.baselines import fit_reference_energies

    joint, _ = fit_reference_energies(trainer.store, trainer.splits["train"], trainer.model_cfg.max_z)
    assert abs(float(joint[29]) - ta[29]) > 1.0 and abs(float(joint[29]) - tb[29]) > 1.0
    trainer.save()
    from gnnmegatron.inference import load_model

    model, info = load_model(tmp_path / "run", dtype=torch.float64)
    assert torch.equal(model.reference_energies, ref) and info.sources == ["a", "b"]
    assert info.source_elements("b") == [8, 28, 29]


def test_mixed_label_step_equals_hand_computed_masked_loss(stores, tmp_path):
    trainer = Trainer(_cfg(tmp_path / "run", stores, budget_atoms=400), resume="never")
    batches = trainer._batches()
    micro = next(batches)
    b = micro[0]
    assert not bool(b["has_forces"].all()) and not bool(b["has_energy"].all()), "the batch mixes labels"
    assert set(b["source"].tolist()) == {0, 1}
    model = trainer.model.train()
    out = model(b, compute_forces=True, compute_stress=True)
    w = {0: (1.0, 1.0, 0.5), 1: (2.0, 1.0, 0.5)}  # the config's per-source (energy, force, stress) weights
    n, src = b["num_atoms"], b["source"]
    e_terms = [w[int(src[g])][0] * abs(float(out["energy"][g] - b["energy"][g])) / int(n[g])
               for g in range(len(n)) if b["has_energy"][g]]
    f_terms, ptr = [], b["ptr"].tolist()
    for g in range(len(n)):
        if b["has_forces"][g]:
            diff = (out["forces"][ptr[g]:ptr[g + 1]] - b["forces"][ptr[g]:ptr[g + 1]]).abs().detach()
            f_terms += (w[int(src[g])][1] * diff).flatten().tolist()
    s_terms = [w[int(src[g])][2] * float(v) for g in range(len(n)) if b["has_stress"][g]
               for v in (out["stress"][g] - b["stress"][g]).abs().detach().flatten()]
    want = sum(e_terms) / len(e_terms) + sum(f_terms) / len(f_terms) + sum(s_terms) / len(s_terms)
    trainer.optimizer.step = lambda: None
    loss, parts = trainer.train_step(micro)
    assert abs(loss - want) < 1e-10 * want, (loss, want)
    labels = trainer._last_labels
    assert labels == {"graphs": len(n), "energy": len(e_terms), "forces": int(b["has_forces"].sum()),
                      "stress": len(s_terms) // 9}
    del trainer.optimizer.step
    for _ in range(3):  # and the mixed batches train
        loss, _ = trainer.train_step(next(batches))
        assert np.isfinite(loss)


def test_run_reports_per_source_and_resumes_bit_for_bit(stores, tmp_path):
    full = Trainer(_cfg(tmp_path / "full", stores), resume="never")
    report = full.fit()
    part = Trainer(_cfg(tmp_path / "part", stores), resume="never")
    assert part.fit(stop_at=4) is None
    resumed = Trainer(_cfg(tmp_path / "part", stores), resume="auto")
    assert resumed.step == 4 and resumed.train_sampler.batches_done > 0
    resumed.fit()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name

    val = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["split"] == "val"][-1]
    assert set(val["sources"]) == {"metals", "dft"}
    per = val["sources"]
    assert per["metals"]["graphs"] + per["dft"]["graphs"] == val["graphs"]
    assert per["dft"]["energy_graphs"] < per["dft"]["graphs"], "dft's unlabelled energies are not counted"
    train = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["labelled"]["forces"] <= r["labelled"]["graphs"] for r in train)
    rep = json.loads((tmp_path / "full" / "report.json").read_text())
    assert [s["name"] for s in rep["sources"]] == ["metals", "dft"]
    probs = [s["probability"] for s in rep["sources"]]
    sizes = [s["graphs"]["train"] for s in rep["sources"]]
    assert abs(probs[0] / probs[1] - np.sqrt(sizes[0] / sizes[1])) < 1e-9, "temperature 2: p ~ sqrt(n)"
    assert report["val"]["sources"]["dft"]["energy_mae_per_atom"] == rep["val"]["sources"]["dft"]["energy_mae_per_atom"]
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 0
    from gnnmegatron.training.model_card import read_model_card

    card = read_model_card(tmp_path / "full")
    assert [s["name"] for s in card["sources"]] == ["metals", "dft"] and card["heads"] == "per_source"
    assert card["sources"][1]["loss_weights"]["energy"] == 2.0 and card["sources"][0]["elements"] == ["Cu", "Ag", "Au"]
    md = (tmp_path / "full" / "checkpoints" / "step_00000006.card.md").read_text()
    assert "`dft`" in md and "sampling probability" in md


def test_per_source_heads_beat_a_shared_head_when_energy_scales_differ(tmp_path):
    """Two sources of the same kind of structures, the second on another scale (-2 E + offsets)."""
    a = write_store(tmp_path / "a.zarr", emt_structures(60, 7, max_atoms=8), "a")
    b = write_store(tmp_path / "b.zarr", relabel(emt_structures(60, 8, max_atoms=8), scale=-2.0,
                                                  offsets={29: -3.0, 47: -2.0, 79: -4.0}), "b")
    errors = {}
    for heads in ("shared", "per_source"):
        cfg = config_from_dict({
            "run_dir": str(tmp_path / heads), "seed": 0,
            "data": {"sources": [{"store": str(a)}, {"store": str(b)}], "cutoff": 4.0, "budget_atoms": 64,
                     "splits": [0.75, 0.25, 0.0], "prefetch": 1},
            "model": {"preset": "egnn-tiny", "heads": heads}, "optim": {"lr": 5e-3, "warmup_steps": 5},
            "train": {"max_steps": 200, "eval_every": 200, "checkpoint_every": 1000, "log_every": 50,
                      "progress": False}})
        errors[heads] = Trainer(cfg, resume="never").fit()["val"]["sources"]
    for src in ("a", "b"):
        for key in ("energy_mae_per_atom", "force_mae"):
            shared, own = errors["shared"][src][key], errors["per_source"][src][key]
            assert own < 0.7 * shared, (src, key, own, shared)


@pytest.mark.parametrize("data, match", [
    ({"sources": [{"store": "missing.zarr"}]}, r"data.sources\[0\] \('missing'\): store missing.zarr does not exist"),
    ({"sources": [{"store": "x/a.zarr"}, {"store": "y/a.zarr"}]}, r"name\(s\) \['a'\] appear more than once"),
    ({"sources": [{"store": "a.zarr"}, {"store": "b.zarr"}], "sampling": "given"}, r"\['a', 'b'\] have none"),
    ({"sources": [{"store": "a.zarr", "weight": 2.0}]}, r"\['a'\] give a weight"),
    ({"sources": [{"store": "a.zarr"}], "store": "b.zarr"}, "exclusive"),
    ({"sources": [{"store": "a.zarr"}], "sampling": "zipf"}, "data.sampling must be one of"),
    ({"sources": [{"store": "a.zarr", "train_fraction": 0}]}, r"entry 'a': train_fraction must be in \(0, 1\]"),
])
def test_bad_multisource_configs_name_the_entry(tmp_path, data, match):
    values = {"run_dir": str(tmp_path / "run"), "data": {"cutoff": 4.0, **data}, "model": {"preset": "egnn-tiny"},
              "train": {"progress": False}}
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        Trainer(config_from_dict(values), resume="never")


def test_model_sources_come_from_the_data_sources(stores, tmp_path):
    cfg = _cfg(tmp_path, stores)
    cfg.model["sources"] = ["x", "y"]
    with pytest.raises(ConfigError, match=r"model.sources=\['x', 'y'\] differs"):
        cfg.model_config()
    cfg = _cfg(tmp_path, stores, heads="shared")
    assert cfg.model_config().sources == ["metals", "dft"]
    with pytest.raises(ConfigError, match="needs two or more sources"):
        config_from_dict({"data": {"store": "a.zarr"}, "model": {"preset": "egnn-tiny", "heads": "per_source"}}
                         ).model_config()


def test_embedded_second_source_is_emt_on_another_reference(tmp_path):
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.training.runtime import generate_emt_source

    emt = {"num_structures": 4, "seed": 3, "max_atoms": 6, "elements": ["Cu", "Ni"]}
    generate_emt_source(tmp_path / "plain.zarr", emt)
    generate_emt_source(tmp_path / "ref.zarr", emt, {"Cu": -3.5, "Ni": -5.0}, name="emt-ref")
    plain, ref = GraphStore(tmp_path / "plain.zarr"), GraphStore(tmp_path / "ref.zarr")
    assert ref.metadata["sources"] == ["emt-ref"]
    for a, b in zip(plain.get_many(range(4)), ref.get_many(range(4))):
        z = a["atomic_numbers"]
        assert abs(b["energy"] - a["energy"] - (-3.5 * (z == 29).sum() - 5.0 * (z == 28).sum())) < 1e-9
        assert np.array_equal(a["forces"], b["forces"])
    with pytest.raises(ValueError, match=r"unknown chemical symbol\(s\) \['Xx'\]"):
        generate_emt_source(tmp_path / "bad.zarr", emt, {"Xx": 1.0})


def test_reference_fit_names_a_graph_with_an_infinite_label(emt_store, tmp_path):
    """A store edited outside the writers (an infinite energy, then NaN forces): the fit names the graph
    and the store instead of failing later with non-finite reference energies."""
    import shutil

    import zarr

    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.training.baselines import fit_reference_energies

    path = tmp_path / "edited.zarr"
    shutil.copytree(emt_store, path)
    zarr.open_array(str(path / "energy"), mode="r+")[3] = float("inf")
    with pytest.raises(ValueError, match=rf"graph 3 of {path}: its energy is inf; the store is damaged"):
        fit_reference_energies(GraphStore(path), np.arange(10), 100)
    shutil.rmtree(path)
    shutil.copytree(emt_store, path)
    forces = zarr.open_array(str(path / "forces"), mode="r+")
    forces[0] = [float("inf"), 0.0, 0.0]
    with pytest.raises(ValueError, match=rf"graph 0 of {path}: its forces are not finite"):
        fit_reference_energies(GraphStore(path), np.arange(10), 100)
