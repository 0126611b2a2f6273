"""Triton kernels in the interpreter: (1) every launcher takes non-contiguous and misaligned views
of every tensor argument and gives the bits it gives on contiguous copies (TPEGCL hands strided
views: ``gs`` is a column of a stacked [E, 2] tensor, ``C`` a transposed slice of a weight);
(2) deterministic mode gives bit-identical outputs, gradients and double-backward gradients
over repeated runs with shuffled (unsorted) edges while the interpreter runs the programs of
each launch in a random order, as a GPU scheduler may. A control run without deterministic
mode shows that the fp32 atomics on dQ then change the bits, so the check can fail.
"""

import os
import sys
from pathlib import Path

import pytest

from test_triton_interpret import run_interpreted

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_views_and_deterministic_mode_in_interpreter():
    out = run_interpreted(Path(__file__).resolve())
    assert "views: " in out and "deterministic: " in out, out[-2000:]


def strided(t):
    """The same values as a view with doubled strides (and, for 1-D and index tensors, a 4-byte
    misaligned start), so that a launcher that assumed unit stride or alignment would misread."""
    import torch

    if t is None:
        return None
    if t.dim() == 1:
        base = torch.zeros(2 * t.numel() + 2, dtype=t.dtype)
        view = base[1:1 + 2 * t.numel():2] if t.element_size() == 4 else base[2:2 + 2 * t.numel():2]
    else:
        base = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype)
        view = base[:, 1:1 + 2 * t.shape[1]:2]
    view.copy_(t)
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def misaligned(t):
    """Contiguous but starting 4 bytes after a 16-byte boundary (a slice of a bigger buffer)."""
    import torch

    shift = max(1, 4 // t.element_size())
    base = torch.zeros(t.numel() + shift, dtype=t.dtype)
    view = base[shift:].view(t.shape)
    view.copy_(t)
    return view


def check_views():
    import torch

    from gnnmegatron.kernels.edge_vector import edge_vector_aggregate_fwd
    from gnnmegatron.kernels.fused_message import fused_message_bwd, fused_message_bwd2, fused_message_fwd
    from gnnmegatron.kernels.segment_reduce import segment_reduce_fwd
    from ops_cases import fused_inputs, make_graph

    g = torch.Generator().manual_seed(0)
    ei, n = make_graph("ragged", False)
    dst, src = ei[0].clone(), ei[1].clone()
    perm = torch.argsort(dst, stable=True)
    ptr = torch.searchsorted(dst[perm], torch.arange(n + 1))
    src_perm = torch.argsort(src, stable=True)
    src_ptr = torch.searchsorted(src[src_perm], torch.arange(n + 1))
    E = dst.numel()
    P, Q, R, C, b, w, v = [t.detach() for t in fused_inputs(E, n, 20, 5, torch.float32)]
    gm, gs = torch.randn(n, 20, generator=g), torch.randn(E, generator=g)
    gg = (torch.randn(n, 20, generator=g), torch.randn(n, 20, generator=g), torch.randn(E, 5, generator=g),
          torch.randn(5, 20, generator=g), torch.randn(20, generator=g), torch.randn(E, generator=g),
          torch.randn(20, generator=g))
    need = dict.fromkeys(("gm", "gs", "P", "Q", "R", "C", "b", "w", "v"), True)

    def calls(f):  # every launcher, every tensor argument passed through f
        out = {}
        out["fwd"] = fused_message_fwd(f(P), f(Q), f(src), f(ptr), f(perm), f(R), f(C), f(b), f(w), f(v), "silu")
        for det in (False, True):
            out[f"bwd det={det}"] = fused_message_bwd(f(gm), f(gs), f(P), f(Q), f(dst), f(src), f(ptr), f(perm), f(R),
                                                      f(C), f(b), f(w), f(v), "silu", [True] * 7, f(src_ptr),
                                                      f(src_perm), deterministic=det)
            res = fused_message_bwd2(f(gm), f(gs), f(P), f(Q), f(dst), f(src), f(ptr), f(perm), f(R), f(C), f(b),
                                     f(w), f(v), "gelu", tuple(f(t) for t in gg), need, f(src_ptr), f(src_perm),
                                     deterministic=det)
            out[f"bwd2 det={det}"] = [res[k] for k in need]
        for reduce in ("sum", "max"):
            out[f"segment {reduce}"] = segment_reduce_fwd(f(R), f(ptr), f(perm), reduce)
        out["edge_vector"] = edge_vector_aggregate_fwd(f(R[:, :3]), f(w), f(ptr), f(perm))
        return out

    def flat(x):
        return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else [x]

    base = calls(lambda t: t.contiguous())
    count = 0
    for name, f in (("strided", strided), ("misaligned", misaligned)):
        got = calls(f)
        for key in base:
            for i, (a, e) in enumerate(zip(flat(got[key]), flat(base[key]))):
                assert torch.equal(a, e), f"{key} output {i} differs with {name} inputs: max diff " \
                                          f"{(a.double() - e.double()).abs().max():.3e}"
                count += 1

    # op level, as TPEGCL calls it: P, Q column slices of one [N, 2F] projection, C a transposed
    # weight slice, w a column of a stacked [E, 2] tensor, gs through torch.stack of two scalar sets
    from gnnmegatron.ops import fused_message_aggregate
    from ops_cases import assert_close

    W = torch.randn(20, 40 + 5, generator=g)
    h = torch.randn(n, 20, generator=g)
    dw = torch.stack([torch.rand(E, generator=g), torch.rand(E, generator=g)], dim=-1)
    rbf = torch.randn(E, 5, generator=g)
    ei_view = torch.stack([src, dst], dim=-1).flip(-1).t()  # [2, E] with strides (1, 2)
    v1, v2 = torch.randn(20, generator=g), torch.randn(20, generator=g)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (W, h, dw, rbf, v1, v2)]
        Wl, hl, dwl, rl, a1, a2 = leaves
        PQ = hl @ torch.cat([Wl[:, :20], Wl[:, 20:40]]).t()  # [N, 40]
        Pv, Qv, Cv, wv = PQ[:, :20], PQ[:, 20:], Wl[:, 40:].t(), dwl[:, 1]
        m, s1 = fused_message_aggregate(Pv, Qv, ei_view, rl, Cv, None, wv, a1, backend=backend)
        _, s2 = fused_message_aggregate(Pv, Qv, ei_view, rl, Cv, None, wv, a2, backend=backend)
        s_all = torch.stack([s1, s2], dim=-1)
        loss = (m ** 2).sum() + (s_all[:, 0] * s_all[:, 1]).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        second = torch.autograd.grad(sum((gr ** 2).sum() for gr in grads), leaves)
        results[backend] = [m, s_all] + list(grads) + list(second)
    for i, (a, e) in enumerate(zip(results["triton"], results["reference"])):
        scale = float(e.abs().max())
        assert float((a - e).abs().max()) <= 1e-4 * max(scale, 1.0), f"TPEGCL-style views, output {i}"
        count += 1
    assert_close(results["triton"][0], results["reference"][0], torch.float32, "m with strided inputs")
    print(f"views: {count} comparisons")


def check_determinism():
    import numpy as np
    import torch
    from triton.runtime import interpreter

    from gnnmegatron.kernels import _fused_common
    from gnnmegatron.ops import fused_message_aggregate
    from ops_cases import fused_inputs

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state = {"rng": np.random.default_rng(0), "perm": None}

    def shuffled_dim(nx, ny, nz):  # a random program order per launch
        state["perm"] = state["rng"].permutation(nx)
        return set_dim(nx, ny, nz)

    def shuffled_idx(x, y, z):
        return set_idx(int(state["perm"][x]), y, z)

    builder.set_grid_dim, builder.set_grid_idx = shuffled_dim, shuffled_idx
    _fused_common.INTERPRET_CONFIG["BLOCK_F"] = 16
    g = torch.Generator().manual_seed(1)
    N, E, F, K = 12, 90, 20, 4  # every source feeds several destination programs
    dst = torch.randint(0, N, (E,), generator=g)
    src = torch.randint(0, N, (E,), generator=g)
    ei = torch.stack([dst, src])[:, torch.randperm(E, generator=g)]  # shuffled edge order
    inputs = fused_inputs(E, N, F, K, torch.float32, seed=3)

    def run(seed):
        state["rng"] = np.random.default_rng(seed)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        P, Q, R, C, b, w, v = leaves
        m, s = fused_message_aggregate(P, Q, ei, R, C, b, w, v, backend="triton")
        gw = torch.Generator().manual_seed(9)
        loss = (m * torch.randn(m.shape, generator=gw)).sum() + (s * torch.randn(s.shape, generator=gw)).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        second = torch.autograd.grad(sum((gr ** 2).sum() for gr in grads), leaves)
        return [m, s] + list(grads) + list(second)

    names = ["m", "s"] + [f"d{k}" for k in "PQRCbwv"] + [f"dd{k}" for k in "PQRCbwv"]
    try:
        os.environ["GNNMEGATRON_DETERMINISTIC"] = "1"
        runs = [run(seed) for seed in (1, 2, 3)]
        for other in runs[1:]:
            for name, a, e in zip(names, other, runs[0]):
                assert torch.equal(a, e), f"deterministic mode: {name} differs between runs (max diff " \
                                          f"{(a - e).abs().max():.3e})"
        os.environ["GNNMEGATRON_DETERMINISTIC"] = "0"
        control = [run(seed) for seed in (1, 2, 3)]
    finally:
        os.environ.pop("GNNMEGATRON_DETERMINISTIC", None)
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx
    differs = [name for name, *vals in zip(names, *control) if not all(torch.equal(vals[0], x) for x in vals[1:])]
    assert "dQ" in differs, f"control: atomics in shuffled program order should change dQ's bits; differing: {differs}"
    for name, a, e in zip(names, control[0], runs[0]):  # both modes compute the same values
        assert float((a - e).abs().max()) <= 1e-4 * max(float(e.abs().max()), 1.0), name
    print(f"deterministic: {len(names)} tensors bit-identical over 3 shuffled-order runs; "
          f"without deterministic mode {differs} differ")


def main() -> None:  # runs in the subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    torch.set_num_threads(1)
    check_views()
    check_determinism()
    print("ALL OK")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
