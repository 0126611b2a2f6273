"""Scaling sweeps: budget and lr rules, planning, a 2x2 mini sweep, skip, resume and refusal."""
import json
import math

import numpy as np
import pytest
import yaml

from gnnmegatron.scaling import sweep as sw
from gnnmegatron.scaling.sweep import (
    BudgetConfig,
    LRRule,
    SweepError,
    budget_to_max_steps,
    load_sweep_config,
    plan_sweep,
    run_sweep,
    scaled_lr,
    scaled_warmup,
    sweep_config_from_dict,
)

RECORD_KEYS = {"name", "preset", "params", "params_total", "data_fraction", "train_graphs", "train_atoms",
               "atoms_seen", "flops", "val_energy_mae", "val_force_mae", "val_loss", "best_val_loss",
               "wall_time_s", "steps", "lr", "warmup_steps", "config_hash"}
# Differ between two runs of the same config: timing and where the run lives.
VOLATILE = {"wall_time_s", "segments", "run_dir", "config"}


def _sweep_dict(store, out_dir, **extra):
    values = {
        "base": {
            "seed": 3,
            "data": {"store": str(store), "cutoff": 4.0, "budget_atoms": 64, "splits": [0.8, 0.2, 0.0],
                     "prefetch": 1},
            "model": {"preset": "egnn-tiny", "force_mode": "conservative"},
            "optim": {"lr": 2e-3},
            "train": {"log_every": 1},
        },
        "grid": {"preset": "egnn-tiny", "hidden": [8, 16], "layers": [1]},
        "data_fractions": [0.5, 1.0],
        "budget": {"rule": "epochs", "epochs": 1},
        "lr_rule": {"base_width": 16, "width_exponent": 0.5, "warmup_fraction": 0.2, "min_warmup": 1},
        "evals_per_run": 2,
        "checkpoints_per_run": 2,
        "out_dir": str(out_dir),
    }
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def mini(emt_store, tmp_path_factory):
    """A finished 2x2 sweep (hidden 8, 16 x fractions 0.5, 1.0) and its records."""
    out = tmp_path_factory.mktemp("sweep")
    cfg = sweep_config_from_dict(_sweep_dict(emt_store, out))
    records = run_sweep(cfg, progress=False)
    return cfg, records


# ----------------------------------------------------------------------------------- rules
def test_budget_rule_to_max_steps():
    epochs = BudgetConfig(rule="epochs", epochs=2.5)
    assert budget_to_max_steps(epochs, train_atoms=400, budget_atoms=64, batches_per_epoch=10) == 25
    assert budget_to_max_steps(epochs, train_atoms=400, budget_atoms=64, batches_per_epoch=10, dp=2) == 13
    # no sampler count: estimated as full batches, ceil(1000 / 128) = 8 per epoch
    assert budget_to_max_steps(BudgetConfig(rule="epochs", epochs=1), train_atoms=1000, budget_atoms=128) == 8
    atoms = BudgetConfig(rule="atoms", atoms=1000)
    assert budget_to_max_steps(atoms, train_atoms=400, budget_atoms=64, batches_per_epoch=10) == 25  # 40 atoms/step
    assert budget_to_max_steps(atoms, train_atoms=4000, budget_atoms=64, batches_per_epoch=100) == 25  # iso-atoms
    floor = BudgetConfig(rule="epochs", epochs=0.1, min_steps=7)
    assert budget_to_max_steps(floor, train_atoms=400, budget_atoms=64, batches_per_epoch=10) == 7


def test_lr_and_warmup_rules():
    rule = LRRule(base_width=64, width_exponent=0.5, warmup_fraction=0.1, min_warmup=10)
    assert scaled_lr(rule, 64, 2e-3) == pytest.approx(2e-3)
    assert scaled_lr(rule, 16, 2e-3) == pytest.approx(4e-3)        # (64/16)^0.5 = 2
    assert scaled_lr(rule, 256, 2e-3) == pytest.approx(1e-3)
    assert scaled_lr(LRRule(base_width=64, width_exponent=1.0), 128, 2e-3) == pytest.approx(1e-3)  # muP-like 1/width
    assert scaled_lr(LRRule(base_width=64, width_exponent=0.0), 128, 2e-3) == pytest.approx(2e-3)
    assert scaled_lr(LRRule(base_lr=1e-3, base_width=32), 32, 5.0) == pytest.approx(1e-3)
    assert scaled_warmup(rule, 1000) == 100
    assert scaled_warmup(rule, 50) == 10
    assert scaled_warmup(rule, 5) == 5


@pytest.mark.parametrize("change, message", [
    ({"budget": {"rule": "flops"}}, "budget.rule must be one of"),
    ({"budget": {"rule": "epochs"}}, "budget.epochs > 0, got None"),
    ({"budget": {"rule": "atoms", "atoms": -5}}, "budget.atoms > 0, got -5"),
    ({"data_fractions": [0.5, 1.5]}, "data_fractions must lie in (0, 1], got [1.5]"),
    ({"lr_rule": {"width_exponent": 3}}, "width_exponent must be in [0, 2], got 3"),
    ({"presets": ["egnn-tiny"], "models": [{"preset": "egnn-tiny"}], "grid": None}, "model names repeat"),
    ({"grid": None}, "the sweep has no models"),
    ({"bogus": 1}, "unknown key(s) ['bogus']"),
    ({"d_key": "edges_seen"}, "d_key must be atoms_seen, train_atoms or null, got 'edges_seen'"),
    ({"presets": "egnn-tiny"}, "presets must be a list (e.g. presets: [...]), got 'egnn-tiny'"),
    ({"data_fractions": 0.5}, "data_fractions must be a list"),
    ({"data_fractions": ["half"]}, "data_fractions must be numbers in (0, 1], got ['half']"),
    ({"overrides": 5}, "overrides must be a mapping of config sections"),
    ({"grid": {"preset": "egnn-tiny", "hidden": [8], "name": "w{width}"}},
     "grid.name 'w{width}' cannot be filled in (KeyError: 'width')"),
    ({"grid": {"preset": "egnn-tiny", "hidden": ["wide"]}}, "grid.hidden must be a list of positive integers"),
    ({"budget": {"rule": "epochs", "epochs": [1]}}, "budget.epochs must be a number, got [1]"),
    ({"evals_per_run": [4]}, "sweep config.evals_per_run must be an integer, got [4]"),
])
def test_bad_sweep_configs_name_the_numbers(tmp_path, change, message):
    with pytest.raises(SweepError) as err:
        sweep_config_from_dict(_sweep_dict("unused.zarr", tmp_path, **change))
    assert message in str(err.value)


def test_d_key_follows_the_budget_rule(tmp_path):
    """D of the fits: atoms processed under the epochs rule, the subset's atoms under iso-data atoms."""
    epochs = sweep_config_from_dict(_sweep_dict("unused.zarr", tmp_path))
    atoms = sweep_config_from_dict(_sweep_dict("unused.zarr", tmp_path, budget={"rule": "atoms", "atoms": 1000}))
    forced = sweep_config_from_dict(_sweep_dict("unused.zarr", tmp_path, d_key="atoms_seen",
                                                budget={"rule": "atoms", "atoms": 1000}))
    assert (epochs.fit_d_key, atoms.fit_d_key, forced.fit_d_key) == ("atoms_seen", "train_atoms", "atoms_seen")


def test_yaml_base_path_is_relative_to_the_sweep_file(emt_store, tmp_path):
    values = _sweep_dict(emt_store, tmp_path / "out")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(values.pop("base")))
    values["base"] = "base.yaml"
    values["budget"] = {"rule": "epochs", "epochs": "2.0"}  # YAML strings become numbers
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(values))
    cfg = load_sweep_config(tmp_path / "sweep.yaml")
    assert cfg.budget.epochs == 2.0 and cfg.base_dict()["seed"] == 3


# ----------------------------------------------------------------------------------- plan
def test_plan_sets_budget_lr_and_nested_fractions(emt_store, tmp_path):
    from gnnmegatron.data.store import GraphStore, split_indices
    from gnnmegatron.training.trainer import nested_subset

    cfg = sweep_config_from_dict(_sweep_dict(emt_store, tmp_path, data_fractions=[0.25, 0.5, 1.0],
                                             budget={"rule": "epochs", "epochs": 3}))
    plans = plan_sweep(cfg, progress=False)
    assert [p.name for p in plans] == [f"h{h}-l1-f{f:g}" for h in (8, 16) for f in (0.25, 0.5, 1.0)]
    store = GraphStore(emt_store)
    train = split_indices(len(store), (0.8, 0.2, 0.0), seed=0)["train"]
    subsets = [set(nested_subset(train, f, 0).tolist()) for f in (0.25, 0.5, 1.0)]
    assert subsets[0] < subsets[1] < subsets[2]  # nested
    for p, s in zip(plans[:3], subsets):
        assert p.train_graphs == len(s) == math.ceil(p.data_fraction * len(train))
        assert p.train_atoms == int(store.atom_counts[sorted(s)].sum())
        assert p.max_steps == 3 * p.steps_per_epoch and p.config.train.max_steps == p.max_steps
        assert p.config.data.train_fraction == p.data_fraction
        assert p.config.train.eval_every == math.ceil(p.max_steps / 2)
        assert p.warmup_steps == max(1, math.ceil(0.2 * p.max_steps)) == p.config.optim.warmup_steps
    assert [p.max_steps for p in plans[:3]] == sorted(p.max_steps for p in plans[:3])
    assert plans[0].lr == pytest.approx(2e-3 * math.sqrt(2)) and plans[3].lr == pytest.approx(2e-3)
    assert plans[0].config.model == {"preset": "egnn-tiny", "force_mode": "conservative", "hidden": 8, "layers": 1}
    assert len({p.hash for p in plans}) == len(plans)


# ----------------------------------------------------------------------------------- running
def test_mini_sweep_writes_records(mini):
    cfg, records = mini
    assert [r["name"] for r in records] == ["h8-l1-f0.5", "h8-l1-f1", "h16-l1-f0.5", "h16-l1-f1"]
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["params"] < r["params_total"] and r["flops"] > 0 and r["atoms_seen"] > 0
        assert 0 < r["best_val_loss"] <= r["val_loss"]
        assert r["val_loss"] == pytest.approx(r["val_energy_mae"] + r["val_force_mae"])
        assert (sw.Path(r["run_dir"]) / "config.yaml").exists()
    by = {r["name"]: r for r in records}
    assert by["h8-l1-f0.5"]["params"] == by["h8-l1-f1"]["params"] < by["h16-l1-f1"]["params"]
    assert by["h8-l1-f0.5"]["train_graphs"] < by["h8-l1-f1"]["train_graphs"]
    assert by["h8-l1-f0.5"]["atoms_seen"] < by["h8-l1-f1"]["atoms_seen"]  # epochs rule: D grows with the data
    lines = (sw.Path(cfg.out_dir) / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == [r["name"] for r in records]


def test_second_call_skips_finished_runs(mini, monkeypatch):
    cfg, records = mini

    def no_training(plan):
        raise AssertionError(f"{plan.name} was retrained")

    monkeypatch.setattr(sw, "_train", no_training)
    assert run_sweep(cfg, progress=False) == records
    plan = run_sweep(cfg, dry_run=True, progress=False)
    assert {p["status"] for p in plan} == {"done"}


def test_interrupted_run_resumes_to_the_same_record(mini, emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    _, records = mini
    cfg = sweep_config_from_dict(_sweep_dict(emt_store, tmp_path / "again"))
    plan = next(p for p in plan_sweep(cfg, progress=False) if p.name == "h16-l1-f1")
    assert plan.max_steps >= 3
    assert Trainer(plan.config, resume="auto").fit(stop_at=2) is None  # killed after step 2
    assert run_sweep(cfg, dry_run=True, only="h16-l1-f1", progress=False)[0]["status"] == "partial"
    [resumed] = run_sweep(cfg, only=["h16-l1-f1"], progress=False)
    full = next(r for r in records if r["name"] == "h16-l1-f1")
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}
    assert strip(resumed) == strip(full)
    # runs.jsonl of this sweep holds only its one finished run
    assert len((tmp_path / "again" / "runs.jsonl").read_text().splitlines()) == 1


def test_changed_config_for_an_existing_run_is_refused(mini):
    cfg, _ = mini
    changed = sweep_config_from_dict(_sweep_dict(sw.Path(cfg.base["data"]["store"]), cfg.out_dir,
                                                 lr_rule={"base_width": 16, "width_exponent": 1.0,
                                                          "warmup_fraction": 0.2, "min_warmup": 1}))
    with pytest.raises(SweepError) as err:
        run_sweep(changed, progress=False)
    msg = str(err.value)
    assert "h8-l1-f0.5" in msg and "optim.lr" in msg and "Delete" in msg
    # the same config with cosmetic differences (progress) is still "done"
    assert {p["status"] for p in run_sweep(cfg, dry_run=True, progress=True)} == {"done"}


def test_only_unknown_name_is_an_error(mini):
    cfg, _ = mini
    with pytest.raises(SweepError, match="matches no run"):
        run_sweep(cfg, only="h99-*", dry_run=True, progress=False)
    with pytest.raises(SweepError, match=r"--index \[99\] is past the plan's last run \(0\.\.3\)"):
        run_sweep(cfg, only=[99], dry_run=True, progress=False)


def test_cli_dry_run_and_collect(mini, tmp_path, capsys):
    cfg, records = mini
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in _sweep_dict(cfg.base["data"]["store"], cfg.out_dir).items()}))
    (sw.Path(cfg.out_dir) / "runs.jsonl").unlink()
    assert sw.main([str(path), "--collect"]) == 0
    assert len((sw.Path(cfg.out_dir) / "runs.jsonl").read_text().splitlines()) == len(records)
    assert sw.main([str(path), "--dry-run", "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "h8-l1-f0.5" in out and "done" in out and "h16-l1-f1 " not in out


def test_study_summary_has_benchmark_fields(mini):
    from gnnmegatron.scaling.fit import fit_records

    _, records = mini
    fits = fit_records(records, n_boot=0)
    s = sw.study_summary(records, fits, command="pytest", wall_s=1.0, machine="test")
    assert {"machine", "command", "versions", "date", "rows", "summary"} <= set(s)
    assert len(s["rows"]) == 4 and s["summary"]["study_wall_s"] == 1.0 and "alpha" in s["summary"]
    assert np.isfinite(s["summary"]["total_flops"])


def test_sweep_files_that_cannot_be_read_are_named(tmp_path, capsys):
    (tmp_path / "syn.yaml").write_text("presets: [egnn-tiny\n")
    with pytest.raises(SweepError, match=r"sweep config .*syn.yaml is not valid YAML"):
        load_sweep_config(tmp_path / "syn.yaml")
    with pytest.raises(SweepError, match="is a folder; give the sweep YAML file"):
        load_sweep_config(tmp_path)
    (tmp_path / "base.yaml").write_text("- not a mapping\n")
    (tmp_path / "s.yaml").write_text("base: base.yaml\npresets: [egnn-tiny]\n")
    with pytest.raises(SweepError, match=r"base config .*base.yaml must hold a mapping"):
        load_sweep_config(tmp_path / "s.yaml").base_dict()
    values = _sweep_dict("unused.zarr", tmp_path)
    values["out_dir"] = 5
    with pytest.raises(SweepError, match="out_dir must be a folder path, got 5"):
        sweep_config_from_dict(values)
    # the torchrun entry point prints bad input as one line, exit 2, as `gnnmegatron scaling sweep` does
    assert sw.main([str(tmp_path / "syn.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep config") and "Traceback" not in err


def test_unreadable_run_files_name_the_run_and_the_file(mini):
    cfg, _ = mini
    plans = plan_sweep(cfg, progress=False)
    plan = plans[0]
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    record = plan.run_dir / "record.json"
    before = record.read_text() if record.exists() else None
    record.write_text('{"config_hash": "abc", "na')
    try:
        with pytest.raises(SweepError, match=rf"run '{plan.name}': .*record.json cannot be read .*delete"):
            plan.status()
    finally:  # the module's other tests share these runs
        if before is None:
            record.unlink()
        else:
            record.write_text(before)
