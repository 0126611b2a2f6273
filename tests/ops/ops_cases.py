"""Graphs, tolerances and comparison helpers shared by the op tests (and the triton subprocess)."""

from __future__ import annotations

import torch

# (dtype) -> (atol, rtol) for backend vs reference. Half types: both sides accumulate in fp32
# and round once, so they differ by about one bf16/fp16 ulp of the result.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

GRAPHS = ("ragged", "empty", "isolated", "one_atom", "hub")


def make_graph(kind: str, sorted: bool, seed: int = 0, hub_edges: int = 3000) -> tuple[torch.Tensor, int]:
    """(edge_index [2, E] with row 0 = dst, number of nodes N).

    ragged: N=13, E=37 (not a multiple of any block or chunk), repeated destinations.
    empty: N=5, E=0. isolated: N=11 with 4 nodes that receive no edge.
    one_atom: a batch of three one-atom graphs and one 2-atom graph (2 edges).
    hub: node 3 receives ``hub_edges`` edges, the others a few.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "ragged":
        n, dst = 13, torch.randint(0, 13, (37,), generator=g)
    elif kind == "empty":
        n, dst = 5, torch.zeros(0, dtype=torch.long)
    elif kind == "isolated":
        n = 11
        dst = torch.tensor([0, 2, 5, 7, 9, 10, 8])[torch.randint(0, 7, (29,), generator=g)]
    elif kind == "one_atom":
        n, dst = 5, torch.tensor([3, 4])
    elif kind == "hub":
        n = 9
        dst = torch.cat([torch.full((hub_edges,), 3), torch.randint(0, 9, (25,), generator=g)])
    else:
        raise ValueError(kind)
    if kind == "one_atom":
        src = torch.tensor([4, 3])
    else:
        src = torch.randint(0, n, (dst.numel(),), generator=g)
    ei = torch.stack([dst, src]).long()
    if sorted:
        ei = ei[:, torch.argsort(ei[0], stable=True)]
    else:
        ei = ei[:, torch.randperm(ei.shape[1], generator=g)]
        if ei.shape[1] > 2 and bool((ei[0, 1:] >= ei[0, :-1]).all()):  # make sure it is unsorted
            ei = ei.flip(1)
    return ei, n


def max_diff(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    if actual.numel() == 0:
        return 0.0, 0.0
    d = (actual.double() - expected.double()).abs()
    return float(d.max()), float((d / expected.double().abs().clamp_min(1e-30)).max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise |a - e| <= atol + rtol |e| with the TOL table; the message gives the max difference."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    atol, rtol = TOL[dtype]
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    bad = (a - e).abs() > atol + rtol * e.abs()
    if bool(bad.any()):
        abs_d, rel_d = max_diff(actual, expected)
        raise AssertionError(f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; max abs diff "
                             f"{abs_d:.3e}, max rel diff {rel_d:.3e} (atol {atol:g}, rtol {rtol:g})")


def fused_inputs(E: int, N: int, F: int, K: int, dtype: torch.dtype, seed: int = 0, w=True, v=True, b=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    P, Q = rnd(N, F), rnd(N, F)
    R, C = rnd(E, K), rnd(K, F, scale=0.5)
    bias = rnd(F) if b else None
    wt = torch.rand(E, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if w else None
    vec = rnd(F) if v else None
    return P, Q, R, C, bias, wt, vec


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|a - e| <= atol + rtol max|e| for every element: for second-order gradients, whose entries
    are sums of large terms that cancel, so that their rounding error scales with the largest."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    if actual.numel() == 0:
        return
    atol, rtol = TOL[dtype]
    scale = float(expected.double().abs().max())
    worst = float((actual.double() - expected.double()).abs().max())
    assert worst <= atol + rtol * scale, (f"{what} ({dtype}): max abs diff {worst:.3e} > {atol:g} + {rtol:g} x "
                                          f"max|expected| {scale:.3e}")
