"""bf16 autocast under tensor parallelism: the parallel model equals the single-device one.

Both models keep float32 weights (master weights) and run their forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``; the backward runs outside autocast, as in the
Trainer. The TP collectives carry whatever dtype reaches them (bf16 activations on the node-sized
all-reduces), so TP changes the summation order of bf16 partial GEMMs: outputs and gradients of
the tp=2 model agree with the single-device bf16 model within BF16_TP, and both stay within
BF16_VS_FP32 of the float32 model (relative errors in norm, ||a - b|| / ||b||, per tensor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_egnn_tp import make_batch, make_model

from gnnmegatron.parallel.testing import run_distributed

# bf16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3); a few roundings per block and a
# different order of partial sums under TP: seen <= 2.7e-2 (direct forces' head gradient).
BF16_TP = 5e-2
# bf16 vs float32 of the same model: seen <= 8.4e-2 (the first block's coordinate-vector gradient,
# a sum of many small cancelling edge terms); everything else <= 5.4e-2.
BF16_VS_FP32 = 0.15


def _run(model, batch, bf16: bool):
    stress = model.cfg.force_mode == "conservative"
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(batch, compute_stress=stress)
    out = {k: v.float() for k, v in out.items()}
    loss = (out["energy"] ** 2).sum() + (out["forces"] - 0.1).pow(2).sum()
    model.zero_grad()
    loss.backward()
    return {k: v.detach() for k, v in out.items()}


def _rel(a, b):
    """Relative error in norm, ||a - b|| / ||b||."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(tp: int, overrides: dict) -> dict:
    from gnnmegatron.parallel import init_layout
    from gnnmegatron.parallel.parallelize import gather_grads, parallelize

    torch.set_num_threads(1)
    layout = init_layout(tp=tp, groups="torch")
    batch = make_batch(torch.float32)
    ref = make_model(dtype=torch.float32, **overrides).train()
    par = parallelize(copy.deepcopy(ref), layout)
    out32 = _run(ref, batch, bf16=False)
    grads32 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    out16 = _run(ref, batch, bf16=True)
    grads16 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    outp = _run(par, batch, bf16=True)
    gradsp = gather_grads(par)
    res = {"tp_vs_single_bf16": {}, "bf16_vs_fp32": {}}
    for k in out32:
        res["tp_vs_single_bf16"][k] = _rel(outp[k], out16[k])
        res["bf16_vs_fp32"][k] = _rel(outp[k], out32[k])
    for n in grads32:
        res["tp_vs_single_bf16"][f"grad.{n}"] = _rel(gradsp[n], grads16[n])
        res["bf16_vs_fp32"][f"grad.{n}"] = _rel(gradsp[n], grads32[n])
    return res


CASES = {"conservative": {}, "direct-fused": {"force_mode": "direct", "execution": "fused"},
         "grouped-fused": {"message_groups": 4, "execution": "fused"}}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_tp2_matches_single_device(case):
    for rank, res in enumerate(run_distributed(_compare, 2, 2, CASES[case])):
        worst = max(res["tp_vs_single_bf16"].items(), key=lambda kv: kv[1])
        assert worst[1] < BF16_TP, f"{case} rank {rank}: tp=2 bf16 vs single-device bf16, worst {worst[0]} {worst[1]:.2e}"
        worst = max(res["bf16_vs_fp32"].items(), key=lambda kv: kv[1])
        assert worst[1] < BF16_VS_FP32, f"{case} rank {rank}: tp=2 bf16 vs float32, worst {worst[0]} {worst[1]:.2e}"
        # and autocast really ran in bf16: the energy differs from float32 by more than fp32 rounding
        assert res["bf16_vs_fp32"]["energy"] > 1e-5, f"{case} rank {rank}: bf16 energy equals float32's"

