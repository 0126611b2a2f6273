"""Chunked torch backend of ``faithful_message_aggregate`` (the CPU path): forward and the
recomputing backward.

Edges are visited in destination-sorted order, ``chunk`` at a time (``settings.edges_per_chunk``
of the widest layer). Each chunk computes its ``[chunk, H]`` tiles of the whole edge MLP (first
layer from the per-node P and Q, the second linear and the coordinate MLP as GEMMs of ``chunk``
rows), adds its messages into ``m`` and drops the tiles: no ``[E, H]`` tensor exists, in forward
or backward, whose chunks recompute the forward tiles first (as FlashAttention recomputes the
attention matrix). The tiles live in a few preallocated ``[chunk, H]`` buffers reused by every
chunk (``_Buffers``): on the 2-core VMs a fresh 4 MiB tensor costs about a thousand page
faults, and the GEMMs write into the buffers with ``out=``. The chunks are spread over worker
threads, each with its own buffers and partial sums (``gnnmegatron.ops.dispatch.run_chunks``:
fixed assignment, sums added in worker order, so the results do not depend on timing); under
tensor parallelism (``tp``) they run in order on one thread, since each chunk all-reduces.

Per chunk the backward does the forward's two GEMMs again (``a1 W2^T``, ``a Wc^T``) and four of its
own (``dz3 Wc``, ``dz3^T a``, ``dz2^T a1``, ``dz2 W2``); gradients nobody asked for are skipped
(``needs``). Between the GEMMs each pass over a tile counts (at hidden 256 the elementwise work is a
large part of a step): the first layer's gathers and adds are one ``embedding_bag`` over the node
table ``[P + b1; Q]`` (``pair_rows``), and each activation's backward is torch's one-pass kernel
(``silu_backward`` and the like) applied to the incoming cotangent (``act_bwd_``), with no ``act'``
tile of its own. The double backward is in ``faithful_message_grad2``.

Shapes:
    N nodes, E edges, F1 first-layer width (P, Q, C, b1), F2 second-layer width (W2 [F2, F1]),
    F3 coordinate-MLP width (Wc [F3, F2], v [F3]), K radial functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gnnmegatron.ops.activations import act, act_and_grad
from gnnmegatron.ops.dispatch import compute_dtype, first_layer_grads_, rows_add_, run_chunks, settings


# ----------------------------------------------------------------------------- activations in place
def act_(name: str, z: torch.Tensor) -> torch.Tensor:
    """``act(z)`` written over ``z`` (returned)."""
    if name == "silu":
        return torch.nn.functional.silu(z, inplace=True)
    if name == "tanh":
        return z.tanh_()
    return z.copy_(act(name, z))


def act_out_(name: str, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``act(z)`` written into ``out`` (returned); ``z`` is kept (the backward reads it again)."""
    aten = torch.ops.aten
    if name == "silu":
        return aten.silu.out(z, out=out)
    if name == "gelu":
        return aten.gelu.out(z, out=out)
    if name == "tanh":
        return torch.tanh(z, out=out)
    if name == "softplus":
        return aten.softplus.out(z, 1.0, 20.0, out=out)
    return out.copy_(act(name, z))


def act_bwd_(name: str, g: torch.Tensor, z: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``g * act'(z)`` written into ``out`` (returned; it may be ``g`` or ``z``): torch's one-pass
    activation backward kernels (``a = act(z)``, read by tanh's). One pass where computing ``act'``
    into a buffer and multiplying took five."""
    aten = torch.ops.aten
    if name == "silu":
        return aten.silu_backward.grad_input(g, z, grad_input=out)
    if name == "gelu":
        return aten.gelu_backward.grad_input(g, z, grad_input=out)
    if name == "tanh":
        return aten.tanh_backward.grad_input(g, a, grad_input=out)
    if name == "softplus":
        return aten.softplus_backward.grad_input(g, z, 1.0, 20.0, grad_input=out)
    return torch.mul(g, act_and_grad(name, z)[1], out=out)


def act_grads2_(name: str, z: torch.Tensor, a: torch.Tensor | None, d: torch.Tensor, dd: torch.Tensor,
                tmp: torch.Tensor) -> None:
    """``act(z)``, ``act'(z)``, ``act''(z)`` into the buffers ``a`` (may be None: not wanted), ``d`` and
    ``dd``; ``tmp`` is scratch. ``z`` is read only."""
    if name == "silu":  # eight passes over the tile
        A = a if a is not None else tmp
        torch.sigmoid(z, out=d)                              # s
        torch.addcmul(d, d, d, value=-1.0, out=dd)           # s (1 - s)
        torch.mul(z, d, out=A)                               # silu = z s
        d.addcmul_(A, d, value=-1.0).add_(A)                 # silu' = s + silu (1 - s)
        dd.mul_(torch.add(z, A, alpha=-2.0, out=tmp).add_(2.0))  # silu'' = s (1 - s) (2 + z (1 - 2 s))
        return
    if name == "tanh":
        t = a if a is not None else tmp
        torch.tanh(z, out=t)
        torch.mul(t, t, out=d)
        d.neg_().add_(1.0)
        torch.mul(t, d, out=dd)
        dd.mul_(-2.0)
        return
    from gnnmegatron.ops.activations import act_grads2
    va, vd, vdd = act_grads2(name, z)
    if a is not None:
        a.copy_(va)
    d.copy_(vd)
    dd.copy_(vdd)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(1)`` (``linalg.vecdot``: a third of the time of the batched ``[1, F] x [F, 1]``
    products at F = 256, a quarter at 512 and 1024, on the 2-core CPU)."""
    return torch.linalg.vecdot(x, y)


class _Buffers:
    """Named ``[chunk, width]`` buffers, allocated once per call and sliced to each chunk."""

    def __init__(self, rows: int, widths: dict[str, int], dtype, device):
        self.rows = rows
        self.bufs = {k: torch.empty((rows, f), dtype=dtype, device=device) for k, f in widths.items()}

    def get(self, name: str, c: int) -> torch.Tensor:
        return self.bufs[name][:c]


def chunk_rows(E: int, *widths: int) -> int:
    return max(1, min(E, settings.edges_per_chunk(max(widths))))


def chunks(E: int, step: int, perm):
    """Slices (sorted edges) or edge-id tensors (through ``perm``) of ``step`` edges, in destination order."""
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        yield slice(e0, e1) if perm is None else perm[e0:e1]


def node_table(P, Q, b1=None):
    """``[P + b1; Q]``, ``[N + N_Q, F1]``: the first layer's per-node rows (or their tangents) in one
    table, so that a chunk gathers and adds its two rows per edge in one pass (``pair_rows``)."""
    return torch.cat([P + b1 if b1 is not None else P, Q])


def pair_rows(table, n_p: int, d, j):
    """``table[d] + table[n_p + j]`` (a new ``[chunk, F1]`` tensor): ``embedding_bag`` sums each edge's
    two rows in one pass, where two ``index_select`` and two ``add_`` took twice as long."""
    return F.embedding_bag(torch.stack([d, j + n_p], 1), table, mode="sum")


def _first_layer(table, n_p: int, d, j, Rc, C):
    """``z1 = P[d] + Q[j] + b1 + Rc C`` (a new ``[chunk, F1]`` tensor) from ``table = node_table(P, Q,
    b1)`` (``n_p`` rows of P)."""
    return pair_rows(table, n_p, d, j).addmm_(Rc, C)


def _cast(cdt, *tensors):
    return [t.to(cdt) if t is not None else None for t in tensors]


# ----------------------------------------------------------------------------- tensor parallelism
_TP_GROUPS: list = []


def tp_group_id(group) -> int:
    """An integer the custom ops can carry for a tensor-parallel process group (-1: none, or one rank)."""
    if group is None:
        return -1
    import torch.distributed as dist
    if dist.get_world_size(group) == 1:
        return -1
    for i, g in enumerate(_TP_GROUPS):
        if g is group:
            return i
    _TP_GROUPS.append(group)
    return len(_TP_GROUPS) - 1


class _PartialSum(torch.autograd.Function):
    """fwd: all-reduce (sum of the ranks' partial products), bwd: identity whose own backward
    all-reduces (Megatron's pairing, so that a derivative of the backward stays exact)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return _Replicated.apply(g, ctx.group), None


class _Replicated(torch.autograd.Function):
    """fwd: identity, bwd: all-reduce (the adjoint of ``_PartialSum``'s identity backward)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _PartialSum.apply(g, ctx.group), None


def tp_reducer(tp: int):
    """``reduce(x)`` summing a tensor over the ranks of group ``tp`` (in place when grad mode is off,
    differentiable when it is on), or ``None`` for ``tp == -1``."""
    if tp < 0:
        return None
    group = _TP_GROUPS[tp]

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _PartialSum.apply(x, group)
        import torch.distributed as dist
        dist.all_reduce(x, group=group)
        return x

    return reduce


def second_layer(Z2, a1, W2t, b2, reduce):
    """``Z2 = a1 W2^T + b2``; with ``reduce`` (tensor parallelism: ``a1`` and ``W2`` hold this rank's
    slice of the first layer's units) the partial product is summed over the ranks first."""
    if reduce is None:
        return torch.addmm(b2, a1, W2t, out=Z2)
    return reduce(torch.mm(a1, W2t, out=Z2)).add_(b2)


# ----------------------------------------------------------------------------- forward
def faithful_fwd_torch(P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tp: int = -1):
    """``(m [N, F2], s [E] or [0])``: inputs as in the ``gnnmegatron::faithful_message_fwd`` op."""
    reduce = tp_reducer(tp)
    N, F1 = P.shape
    F2 = W2.shape[0]
    E = dst.numel()
    dev = P.device
    cdt = compute_dtype(P.dtype)
    P, Q, R, C, b1, W2, b2, w, Wc, bc, v = _cast(cdt, P, Q, R, C, b1, W2, b2, w, Wc, bc, v)
    coord = v is not None
    F3 = Wc.shape[0] if coord else 1
    s = torch.empty(E if coord else 0, dtype=cdt, device=dev)
    if E == 0:
        return torch.zeros((N, F2), dtype=cdt, device=dev), s
    rows = chunk_rows(E, F1, F2, F3)
    W2t = W2.t()
    Wct = Wc.t() if coord else None

    table = node_table(P, Q, b1)

    def new_state():
        return dict(m=torch.zeros((N, F2), dtype=cdt, device=dev),
                    buf=_Buffers(rows, dict(Z2=F2, Z3=F3 if coord else 1), cdt, dev))

    def body(st, idx):
        buf = st["buf"]
        d, j = dst[idx], src[idx]
        c = d.numel()
        a1 = act_(activation, _first_layer(table, N, d, j, R[idx], C))
        a = act_(activation, second_layer(buf.get("Z2", c), a1, W2t, b2, reduce))
        if coord:
            a3 = act_(activation, torch.addmm(bc, a, Wct, out=buf.get("Z3", c)))
            s[idx] = torch.mv(a3, v)
        if w is not None:
            a.mul_(w[idx].unsqueeze(1))
        rows_add_(st["m"], d, a)

    with torch.no_grad():
        states = run_chunks(list(chunks(E, rows, perm)), body, new_state, parallel=reduce is None,
                            device=dev)
        m = states[0]["m"]
        for st in states[1:]:
            m.add_(st["m"])
    return m, s


# ----------------------------------------------------------------------------- backward
NEEDS = ("P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v")


def faithful_bwd_torch(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, needs, tp: int = -1):
    """Gradients ``[dP, dQ, dR, dC, db1, dW2, db2, dw, dWc, dbc, dv]`` (``NEEDS`` order) of
    ``sum(gm * m) + sum(gs * s)``; an entry not in ``needs`` (or of an absent input) is empty."""
    reduce = tp_reducer(tp)
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    dev = P.device
    odt = P.dtype
    cdt = compute_dtype(odt)
    originals = dict(P=P, Q=Q, R=R, C=C, b1=b1, W2=W2, b2=b2, w=w, Wc=Wc, bc=bc, v=v)
    gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v = _cast(cdt, gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v)
    coord = v is not None
    F3 = Wc.shape[0] if coord else 1
    need = {k: bool(n) and originals[k] is not None for k, n in zip(NEEDS, needs)}
    if not coord:
        need["Wc"] = need["bc"] = need["v"] = False
    first = need["P"] or need["Q"] or need["R"] or need["C"] or need["b1"]
    shapes = dict(P=((N, F1), need["P"] or need["b1"]), Q=(tuple(Q.shape), need["Q"]), C=((K, F1), need["C"]),
                  W2=((F2, F1), need["W2"]), b2=((F2,), need["b2"]), Wc=((F3, F2), need["Wc"]),
                  bc=((F3,), need["bc"]), v=((F3,), need["v"]))
    dR = torch.zeros((E, K), dtype=cdt, device=dev) if need["R"] else None
    dw = torch.zeros(E, dtype=cdt, device=dev) if need["w"] else None
    rows = chunk_rows(max(E, 1), F1, F2, F3)
    widths = dict(A1=F1, T1=F1, Z2=F2, A=F2, G=F2)
    if coord:
        widths.update(Z3=F3, A3=F3, T3=F3)
    W2t = W2.t()
    Wct = Wc.t() if coord else None
    table = node_table(P, Q, b1)

    def new_state():
        acc = {k: torch.zeros(shape, dtype=cdt, device=dev) for k, (shape, on) in shapes.items() if on}
        return dict(acc=acc, buf=_Buffers(rows, widths, cdt, dev))

    def body(st, idx):
        acc, buf = st["acc"], st["buf"]
        d, j = dst[idx], src[idx]
        c = d.numel()
        Rc = R[idx]
        z1 = _first_layer(table, N, d, j, Rc, C)
        a1 = act_out_(activation, z1, buf.get("A1", c))
        z2 = second_layer(buf.get("Z2", c), a1, W2t, b2, reduce)
        a = act_out_(activation, z2, buf.get("A", c))
        g = torch.index_select(gm, 0, d, out=buf.get("G", c))
        if need["w"]:
            dw[idx] = rowdot(g, a)
        if w is not None:
            g.mul_(w[idx].unsqueeze(1))
        if coord:
            gsc = gs[idx]
            z3 = torch.addmm(bc, a, Wct, out=buf.get("Z3", c))
            a3 = act_out_(activation, z3, buf.get("A3", c))
            if need["v"]:
                acc["v"].addmv_(a3.t(), gsc)
            gv = torch.mul(gsc.unsqueeze(1), v, out=buf.get("T3", c))
            dz3 = act_bwd_(activation, gv, z3, a3, out=z3)  # dz3 = gs v act'(z3)
            if need["Wc"]:
                acc["Wc"].addmm_(dz3.t(), a)
            if need["bc"]:
                acc["bc"].add_(dz3.sum(0))
            g.addmm_(dz3, Wc)  # da = gm w + dz3 Wc
        dz2 = act_bwd_(activation, g, z2, a, out=g)
        if need["W2"]:
            acc["W2"].addmm_(dz2.t(), a1)
        if need["b2"]:
            acc["b2"].add_(dz2.sum(0))
        if not first:
            return
        dz1 = act_bwd_(activation, torch.mm(dz2, W2, out=buf.get("T1", c)), z1, a1, out=z1)
        first_layer_grads_(dz1, acc, dR, idx, d, j, Rc, C)

    work = list(chunks(E, rows, perm)) if E > 0 and any(need.values()) else []
    with torch.no_grad():
        states = run_chunks(work, body, new_state, parallel=reduce is None, device=dev)
        acc = states[0]["acc"]
        for st in states[1:]:  # fixed order: results do not depend on the workers' timing
            for k, t in st["acc"].items():
                acc[k].add_(t)
    db1 = acc["P"].sum(0) if need["b1"] else None  # db1 = sum_e dz1_e = sum_i dP_i

    def out(t, like, on):
        # a fresh tensor per output: custom-op outputs must not alias each other
        return t.to(like.dtype) if (on and t is not None) else torch.empty(0, dtype=odt, device=dev)

    return [out(acc.get("P"), originals["P"], need["P"]), out(acc.get("Q"), originals["Q"], need["Q"]),
            out(dR, originals["R"], need["R"]), out(acc.get("C"), originals["C"], need["C"]),
            out(db1, originals["b1"], need["b1"]), out(acc.get("W2"), originals["W2"], need["W2"]),
            out(acc.get("b2"), originals["b2"], need["b2"]), out(dw, originals["w"], need["w"]),
            out(acc.get("Wc"), originals["Wc"], need["Wc"]), out(acc.get("bc"), originals["bc"], need["bc"]),
            out(acc.get("v"), originals["v"], need["v"])]
