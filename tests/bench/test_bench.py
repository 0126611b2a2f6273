"""The harness, the memory planner and the performance model (``gnnmegatron.bench``)."""

import math

import pytest
import torch

from gnnmegatron.bench.memory import Layout, Workload, activation_coefficients, estimate_memory, rank_parameters
from gnnmegatron.bench.perf import LINKS, Device, Link, all_gather_time, allreduce_time, estimate_step, p2p_time, project
from gnnmegatron.models import count_parameters, get_preset


def test_collective_times_follow_the_alpha_beta_formulas():
    link = Link("x", alpha=1e-5, beta=1e9)
    s = 8e6
    ring = 2 * 3 * 1e-5 + 2 * 3 / 4 * s / 1e9
    tree = 2 * 2 * 1e-5 + 2 * s / 1e9
    assert allreduce_time(s, 4, link) == pytest.approx(min(ring, tree))
    assert allreduce_time(8.0, 1024, link) == pytest.approx(2 * 10 * 1e-5 + 16 / 1e9)  # tiny: the tree wins
    assert allreduce_time(s, 1, link) == 0.0
    assert all_gather_time(s, 4, link) == pytest.approx(3e-5 + 0.75 * s / 1e9)
    assert p2p_time(s, link) == pytest.approx(1e-5 + s / 1e9)


def test_step_model_parts_and_scaling_projection():
    cfg = get_preset("tpegnn-large", execution="fused")
    dev = Device("gpu", 100e12, 80e9)
    w = Workload(512, 30.0)
    one = estimate_step(cfg, Layout(), w, dev)
    assert one["step_s"] == pytest.approx(one["compute_s"]) and one["tp_s"] == one["pp_s"] == one["dp_s"] == 0
    tp = estimate_step(cfg, Layout(tp=4), w, dev)
    assert tp["compute_s"] == pytest.approx(one["compute_s"] / 4) and tp["tp_s"] > 0
    pp = estimate_step(cfg, Layout(pp=4, micro_batches=8), w, dev)
    assert pp["bubble"] == pytest.approx(3 / 11) and pp["pp_s"] > 0
    # the bubble is the idle fraction of the step: busy time x (1 + (p - 1) / m)
    busy = pp["step_s"] - pp["tp_s"] - pp["pp_s"] - pp["dp_s"]
    assert busy == pytest.approx(pp["compute_s"] * (1 + 3 / 8))
    slow_link = Device("gpu", 100e12, 80e9, p2p=LINKS["slingshot11"])
    slow_p2p = estimate_step(cfg, Layout(pp=4, micro_batches=8), w, slow_link)
    assert slow_p2p["pp_s"] > pp["pp_s"] and slow_p2p["tp_s"] == pp["tp_s"]
    rows = project(cfg, w, dev, [1, 8, 64, 1024])
    assert rows[0]["weak_efficiency"] == pytest.approx(1.0) and rows[0]["strong_efficiency"] == pytest.approx(1.0)
    assert all(0 < r["weak_efficiency"] <= 1.0 + 1e-12 for r in rows)
    # strong scaling shrinks every replica's batch: it falls faster than weak scaling
    assert rows[-1]["strong_efficiency"] < rows[-1]["weak_efficiency"]
    # a slower network costs efficiency
    slow = project(cfg, w, Device("gpu", 100e12, 80e9, inter=LINKS["slingshot11"]), [1, 1024])
    assert slow[-1]["weak_efficiency"] <= rows[-1]["weak_efficiency"]


def test_rank_parameters_split_the_model_exactly():
    cfg = get_preset("tpegnn-small")
    total = count_parameters(cfg)["total"]
    assert rank_parameters(cfg, Layout())[0]["params"] == total
    stages = rank_parameters(cfg, Layout(pp=2))
    assert sum(s["params"] for s in stages) == total and [s["blocks"] for s in stages] == [2, 2]
    tp2 = rank_parameters(cfg, Layout(tp=2))[0]["params"]
    assert total / 2 < tp2 < total  # blocks halve, embedding and heads are replicated


def test_activation_coefficients_are_affine_in_the_hidden_size():
    from gnnmegatron.bench.memory import _measure

    cfg = get_preset("tpegnn-small", hidden=64, message_groups=4)
    extrapolated = activation_coefficients(get_preset("tpegnn-small", hidden=64, message_groups=4), 2, True, False)
    direct = _measure(cfg, 2, False)
    for value, exact in zip(extrapolated.values(), direct):
        assert value == pytest.approx(float(exact), rel=1e-6, abs=1.0)


def test_memory_estimate_responds_to_layout_options():
    cfg = get_preset("tpegnn-small", execution="fused")
    w = Workload(2048, 30.0)
    base = estimate_memory(cfg, Layout(dp=4), w)
    zero = estimate_memory(cfg, Layout(dp=4, zero=1), w)
    assert zero.optimizer == pytest.approx(base.optimizer / 4) and zero.parameters == base.parameters
    ckpt = estimate_memory(cfg, Layout(checkpointing=True), w)
    plain = estimate_memory(cfg, Layout(), w)
    assert ckpt.activations < plain.activations
    gpipe = estimate_memory(cfg, Layout(pp=2, micro_batches=8, schedule="gpipe"), Workload(2048, 30.0, conservative=False))
    ofob = estimate_memory(cfg, Layout(pp=2, micro_batches=8, schedule="1f1b"), Workload(2048, 30.0, conservative=False))
    assert ofob.activations < gpipe.activations


def test_plan_command_lists_fitting_layouts(capsys):
    from gnnmegatron.cli import main

    assert main(["plan", "--preset", "tpegnn-small", "--gpus", "4", "--gpu-mem", "80GB", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "tpegnn-small on 4 x GPU" in out and "total GiB" in out and out.count("tp") >= 3
    assert main(["plan", "--preset", "tpegnn-1b", "--gpus", "1", "--gpu-mem", "4GB"]) == 1
    assert "no layout fits" in capsys.readouterr().out


def test_harness_runs_a_config_in_fresh_processes(emt_store, tmp_path):
    import json

    from gnnmegatron.bench.harness import run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"store": str(emt_store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0]},
        "model": {"preset": "egnn-tiny", "layers": 2},
        "train": {"max_steps": 100, "eval_every": 1000, "checkpoint_every": 1000, "progress": False},
    }))
    with pytest.raises(ValueError, match="memory='heap'"):
        run_config(cfg, 2, memory="heap")
    # bad input is one message before any process starts: a layout that does not divide, a step count
    with pytest.raises(ValueError, match="world size 3 is not divisible by tp\\*pp=1\\*2=2"):
        run_config(cfg, 3, overrides=["parallel.pp=2"])
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        run_config(cfg, 1, steps=0)
    # the config's own run directory (a trained run, say) is left as it was
    kept = tmp_path / "run" / "checkpoints" / "step_00000005"
    kept.mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 5}\n')
    # the live-memory mode (glibc returns freed blocks at once): the same measurements
    r = run_config(cfg, 2, overrides=["parallel.pp=2", "train.micro_batches=2"], steps=2, warmup=1, memory="live")
    assert r["memory_mode"] == "live"
    assert r["world"] == 2 and r["layout"] == {"tp": 1, "pp": 2, "dp": 1} and r["steps"] == 2
    assert r["atoms_per_s"] > 0 and r["pp_bytes_per_step"] > 0 and 0 <= r["data_wait_fraction"] < 1
    assert len(r["peak_bytes_per_rank"]) == 2 and min(r["peak_bytes_per_rank"]) > 2 ** 20
    assert 2 ** 20 < min(r["rss_start_bytes_per_rank"]) <= min(r["rss_built_bytes_per_rank"])
    assert max(r["rss_warm_bytes_per_rank"]) <= max(r["peak_bytes_per_rank"])
    assert 0 < r["cpu_utilisation"] < 64  # cores kept busy by a rank: process CPU time over wall time
    assert kept.is_dir() and (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 5}\n'


def test_fixed_cost_per_micro_batch_splits_over_stages_not_tensor_ranks():
    cfg = get_preset("tpegnn-small", execution="fused")
    w = Workload(256, 30.0)
    plain, slow = Device("cpu", 1e10, 8e9), Device("cpu", 1e10, 8e9, overhead_s=0.1)
    for layout, passes in ((Layout(), 1.0), (Layout(tp=2), 1.0), (Layout(pp=2, micro_batches=4), 2.0),
                           (Layout(micro_batches=3), 3.0)):
        a, b = estimate_step(cfg, layout, w, plain), estimate_step(cfg, layout, w, slow)
        assert b["compute_s"] - a["compute_s"] == pytest.approx(0.1 * passes), layout


def test_gradient_accumulation_layouts_and_measured_framework_term():
    from gnnmegatron.bench.plan import candidate_layouts

    cfg = get_preset("tpegnn-small", execution="fused")
    layouts = candidate_layouts(cfg, 4, 8)
    assert any(l.pp == 1 and l.micro_batches == 8 for l in layouts)  # accumulation without a pipeline
    assert all(l.micro_batches >= l.pp for l in layouts)
    w = Workload(256, 30.0)
    one, four = estimate_memory(cfg, Layout(), w), estimate_memory(cfg, Layout(micro_batches=4), w)
    assert four.activations == pytest.approx(one.activations)  # one micro-batch's activations alive at a time
    assert four.buffers == pytest.approx(4 * one.buffers)  # the step's micro-batches are read together
    assert estimate_memory(cfg, Layout(), w, framework_bytes=123.0).framework == 123.0


def test_side_by_side_runs_wait_for_each_other(tmp_path):
    from gnnmegatron.bench.harness import _wait_for_peers

    _wait_for_peers({})  # a run on its own does not wait
    _wait_for_peers({"start_together": [str(tmp_path), 1]})  # the only one: goes on
    (tmp_path / "other.ready").write_text("")
    _wait_for_peers({"start_together": [str(tmp_path), 2]})  # itself and the other one already there
    assert len(list(tmp_path.glob("*.ready"))) == 2


def test_cpu_workspace_of_the_fused_ops_tiles():
    from gnnmegatron.bench.memory import CPU_WORKSPACE_BYTES_PER_ELEMENT, cpu_tile_elements

    assert cpu_tile_elements(256, 100_000, chunk_elements=1 << 20) == 4096 * 256  # a full chunk
    assert cpu_tile_elements(256, 1000, chunk_elements=1 << 20) == 1000 * 256  # fewer edges than a chunk
    assert cpu_tile_elements(4096, 10, chunk_elements=1024) == 4096  # at least one edge per chunk
    w = Workload(256, 30.0)
    fused = get_preset("tpegnn-small", execution="fused")
    cpu = estimate_memory(fused, Layout(), w)
    assert cpu.workspace == pytest.approx(CPU_WORKSPACE_BYTES_PER_ELEMENT * cpu_tile_elements(256, w.edges))
    tp2 = estimate_memory(fused, Layout(tp=2), w)  # the rank's slice of the hidden units
    assert tp2.workspace == pytest.approx(CPU_WORKSPACE_BYTES_PER_ELEMENT * cpu_tile_elements(128, w.edges))
    assert estimate_memory(fused, Layout(), w, device="cuda").workspace == 0.0  # tiles stay on chip
    assert estimate_memory(get_preset("tpegnn-small", execution="unfused"), Layout(), w).workspace == 0.0
    assert cpu.total == pytest.approx(cpu.parameters + cpu.gradients + cpu.optimizer + cpu.activations + cpu.buffers
                                      + cpu.framework + cpu.workspace)


def test_tp_serial_fraction_is_the_compute_tensor_parallelism_does_not_divide():
    cfg = get_preset("tpegnn-small", execution="fused")
    w = Workload(256, 30.0)

    def compute(r, tp):
        return estimate_step(cfg, Layout(tp=tp), w, Device("cpu", 1e10, 8e9, tp_serial_fraction=r))["compute_s"]

    one = compute(0.0, 1)
    assert compute(0.0, 2) == pytest.approx(one / 2)
    assert compute(1.0, 2) == pytest.approx(one)
    assert compute(0.2, 4) == pytest.approx(one * (0.2 + 0.8 / 4))
    assert compute(0.7, 1) == pytest.approx(one)
    with pytest.raises(ValueError, match="tp_serial_fraction=1.5"):
        Device("cpu", 1e10, 8e9, tp_serial_fraction=1.5)


def test_measure_tp_shard_times_a_rank_shard_and_the_whole_model():
    from gnnmegatron.bench.harness import measure_tp_shard
    from gnnmegatron.bench.memory import _tiny_batch

    cfg = get_preset("tpegnn-small", execution="fused", hidden=32, layers=2, message_groups=4)
    batches = [_tiny_batch(n, cfg.cutoff, seed=0) for n in (16, 64)]
    r = measure_tp_shard(cfg, 2, batches, reps=1, warmup=1)
    assert r["tp"] == 2 and r["atoms"][0] < r["atoms"][1] and min(r["whole_s"] + r["shard_s"]) > 0
    assert 0.0 <= r["serial_fraction"] <= 1.0
    for tp in (1, 3):
        with pytest.raises(ValueError, match=f"tp={tp}"):
            measure_tp_shard(cfg, tp, batches)
    with pytest.raises(ValueError, match="two sizes"):
        measure_tp_shard(cfg, 2, batches[:1])


def test_link_fits_recover_alpha_and_beta():
    from gnnmegatron.bench.harness import _fit_link

    sizes = [1 << 10, 1 << 16, 1 << 20, 1 << 22]
    pingpong = _fit_link("p", [(n, 3e-4 + n / 4e9) for n in sizes], 1.0)
    assert pingpong.alpha == pytest.approx(3e-4) and pingpong.beta == pytest.approx(4e9)
    # a two-rank ring all-reduce costs 2 alpha + S / beta: the fit halves the intercept
    ring = _fit_link("a", [(n, allreduce_time(n, 2, Link("x", 1e-3, 2e9))) for n in sizes], 2.0)
    assert ring.alpha == pytest.approx(1e-3) and ring.beta == pytest.approx(2e9)
