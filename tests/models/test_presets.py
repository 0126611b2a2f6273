"""Presets, parameter counts on the meta device, analytic FLOPs and config validation."""

import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnnmegatron.models import (PRESETS, STUDY_GRID, AtomisticModel, ModelConfig, ModelConfigError,
                                PresetNotFoundError, count_parameters, flops_per_step, format_preset_table,
                                forward_flops, get_preset)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def expected_parameters(cfg: ModelConfig) -> int:
    """Independent closed form of AtomisticModel's parameter count."""
    H, K, L = cfg.hidden, cfg.num_rbf, cfg.layers
    edge = (2 * H + K) * H + H + H * H + H
    node = 2 * H * H + H + H * H + H
    coord = H * H + H + H
    norm = 2 * H if cfg.layer_norm else 0
    heads = (H * H + H + H) * (2 if cfg.force_mode == "direct" else 1)
    return (cfg.max_z + 1) * H + L * (edge + node + norm) + cfg.coord_blocks * coord + heads


def expected_parameters_tp_native(cfg: ModelConfig) -> int:
    """Closed form for node_split with grouped message mixing (the tpegnn family)."""
    H, K, L, G = cfg.hidden, cfg.num_rbf, cfg.layers, cfg.message_groups
    edge = (2 * H + K) * H + H                      # one edge linear (A, B, C and b)
    node = H * H + H + G * (H // G) ** 2 + H * H + H  # W0h, b0, block-diagonal W0m, W2, b2
    heads = (H * H + H + H) * (2 if cfg.force_mode == "direct" else 1)
    return (cfg.max_z + 1) * H + L * (edge + node) + cfg.coord_blocks * H + heads


def test_tp_native_family():
    from gnnmegatron.models.presets import TP_NATIVE_PRESETS

    for name, (h, layers, g) in TP_NATIVE_PRESETS.items():
        cfg = PRESETS[name]
        assert (cfg.hidden, cfg.layers, cfg.message, cfg.message_groups) == (h, layers, "node_split", g)
        assert count_parameters(name)["total"] == expected_parameters_tp_native(cfg), name
    assert 1.0e9 < count_parameters("tpegnn-1b")["total"] < 1.2e9


def test_study_grid_present():
    for hidden in (800, 1100, 1700, 2500, 5400):
        for layers in (3, 4, 5, 6):
            name = f"egnn-h{hidden}-l{layers}"
            assert name in PRESETS and name in STUDY_GRID, name
            assert (PRESETS[name].hidden, PRESETS[name].layers) == (hidden, layers)
    assert PRESETS["egnn-h10000-l30"].hidden == 10000 and PRESETS["egnn-h10000-l30"].layers == 30
    assert {"egnn-tiny", "egnn-small", "egnn-base"} <= set(PRESETS)
    assert (PRESETS["egnn-tiny"].hidden, PRESETS["egnn-tiny"].layers) == (32, 2)
    assert max(c.layers for c in PRESETS.values()) == 30 and max(c.hidden for c in PRESETS.values()) == 10000


@pytest.mark.parametrize("overrides", [{}, dict(force_mode="direct", layer_norm=True), dict(update_coords=False)])
def test_meta_count_equals_real_instance(overrides):
    cfg = get_preset("egnn-small", **overrides)
    counts = count_parameters(cfg)
    model = AtomisticModel(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert counts["total"] == real == expected_parameters(cfg)
    assert counts["non_embedding"] == real - model.embedding.weight.numel()
    assert counts["per_block"] == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert counts["embedding"] + sum(counts["per_block"]) + counts["heads"] == counts["total"]
    assert count_parameters("egnn-small")["total"] == count_parameters(get_preset("egnn-small"))["total"]


def test_largest_preset_counted_quickly_on_meta():
    start = time.perf_counter()
    counts = count_parameters("egnn-h10000-l30")
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"meta-device count took {elapsed:.1f} s"
    assert counts["total"] == expected_parameters(PRESETS["egnn-h10000-l30"])
    assert counts["total"] > 1e10, counts["total"]
    assert len(counts["per_block"]) == 30 and counts["per_block"][0] > counts["per_block"][-1]  # last: no coord MLP


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(hidden=0), r"hidden must be an integer >= 1, got 0"),
    (dict(layers=2.5), r"layers must be an integer >= 1, got 2.5"),
    (dict(cutoff=-1.0), r"cutoff must be a number > 0, got -1.0"),
    (dict(num_rbf=0), r"num_rbf .* got 0"),
    (dict(envelope_exponent=1), r"envelope_exponent must be an integer >= 2, got 1"),
    (dict(coord_clamp=0.0), r"coord_clamp .* got 0.0"),
    (dict(force_mode="exact"), r"force_mode='exact' is not one of \['conservative', 'direct'\]"),
    (dict(activation="relu"), r"activation='relu'"),
    (dict(update_coords="yes"), r"update_coords must be true or false, got 'yes'"),
    (dict(force_mode="direct", compute_stress=True), r"compute_stress=True needs force_mode='conservative'"),
    (dict(message_groups=4), r"message_groups=4 needs message='node_split', got message='faithful'"),
    (dict(message="node_split", hidden=12, message_groups=5), r"message_groups=5 must divide hidden=12"),
    (dict(message="node_split", message_groups=0), r"message_groups must be None or an integer >= 1, got 0"),
])
def test_bad_config_values_raise_with_numbers(kwargs, pattern):
    with pytest.raises(ModelConfigError, match=pattern):
        ModelConfig(**kwargs)


def test_get_preset_overrides_and_errors():
    cfg = get_preset("egnn-h800-l3", force_mode="direct", cutoff=6.0)
    assert (cfg.hidden, cfg.layers, cfg.force_mode, cfg.cutoff) == (800, 3, "direct", 6.0)
    assert PRESETS["egnn-h800-l3"].force_mode == "conservative", "get_preset must not mutate PRESETS"
    with pytest.raises(PresetNotFoundError, match=r"egnn-h800-l7.*closest.*egnn-h800-l"):
        get_preset("egnn-h800-l7")
    with pytest.raises(KeyError):
        get_preset("nonsense")
    with pytest.raises(ModelConfigError, match=r"hiden"):
        get_preset("egnn-tiny", hiden=3)
    with pytest.raises(ModelConfigError, match=r"hidden must be an integer >= 1, got -4"):
        get_preset("egnn-tiny", hidden=-4)


def test_config_dict_round_trip():
    cfg = get_preset("egnn-base", layer_norm=True, coord_clamp=2.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelConfigError, match=r"\['hiddn'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiddn": 3})


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*k*n for every mm / addmm / bmm (works with autograd.grad, unlike FlopCounterMode)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket
        if op is torch.ops.aten.mm:
            self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif op is torch.ops.aten.addmm:
            self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif op is torch.ops.aten.bmm:
            self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[0].shape[2] * args[1].shape[2]
        return out


def cluster_batch(n=12, cutoff=5.0, seed=0):
    """Non-periodic cluster, brute-force edges (every pair within the cutoff, both directions)."""
    rng = np.random.default_rng(seed)
    pos = torch.tensor(rng.uniform(0, 6, (n, 3)))
    d = torch.cdist(pos, pos)
    i, j = torch.nonzero((d < cutoff) & ~torch.eye(n, dtype=torch.bool), as_tuple=True)
    return dict(atomic_numbers=torch.full((n,), 29), positions=pos, cell=torch.zeros(1, 3, 3, dtype=torch.float64),
                pbc=torch.zeros(1, 3, dtype=torch.bool), batch=torch.zeros(n, dtype=torch.long),
                edge_index=torch.stack([i, j]), edge_shift=torch.zeros(len(i), 3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_analytic_flops_match_counted_matmuls(mode):
    cfg = ModelConfig(hidden=24, layers=3, num_rbf=8, force_mode=mode)
    model = AtomisticModel(cfg).double().eval()
    batch = cluster_batch()
    n, e = batch["positions"].shape[0], batch["edge_index"].shape[1]
    f = forward_flops(cfg)
    # forward: energies (+ the direct force head, which forward_flops counts in direct mode)
    with MatmulFlops() as counter:
        model(batch, compute_forces=mode == "direct")
    assert counter.flops == f["per_atom"] * n + f["per_edge"] * e
    # inference with forces: 1 F (direct) or 2 F (conservative)
    with MatmulFlops() as counter:
        model(batch)
    inference = flops_per_step(cfg, n, e, training=False)
    assert abs(counter.flops / inference - 1) < 0.01, (counter.flops, inference)
    # training step with an energy + force loss: 3 F (direct) or 6 F (conservative)
    model.train()
    with MatmulFlops() as counter:
        out = model(batch)
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    step = flops_per_step(cfg, n, e)
    assert abs(counter.flops / step - 1) < 0.01, (counter.flops, step)
    assert flops_per_step(cfg, n, e, conservative=mode != "conservative") == pytest.approx(
        step * (2.0 if mode == "direct" else 0.5))


def test_preset_table_lists_study_grid():
    table = format_preset_table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["preset", "hidden", "layers", "params"]
    assert len(lines) == len(PRESETS) + 2
    for name in STUDY_GRID:
        assert any(line.startswith(name + " ") for line in lines), name
    row = next(line for line in lines if line.startswith("egnn-h10000-l30 "))
    assert "21B" in row and "GiB" in row
    one = format_preset_table(["egnn-tiny"]).splitlines()
    assert len(one) == 3 and one[2].startswith("egnn-tiny")
