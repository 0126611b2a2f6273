"""Chunked torch backend of ``fused_message_aggregate`` (the CPU path).

Edges are visited in destination-sorted order, ``chunk`` at a time; each chunk builds its
``[chunk, F]`` pre-activation, uses it, and drops it, so no ``[E, F]`` tensor exists in
forward or backward (backward recomputes ``z``). Memory beyond inputs and outputs is
``O(chunk * F)``.

The chunk bodies (gathers + small GEMM + activation + products) are plain functions; for
large problems they run through ``torch.compile`` (inductor fuses the gathers, adds,
activation and products into one C++ loop). Compilation is lazy, cached per body, and falls
back to eager if it fails (``gnnmegatron.ops.dispatch.settings`` has the knobs).

Shapes:
    N nodes, E edges, F features, K radial functions.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from gnnmegatron.ops.activations import act, act_and_grad
from gnnmegatron.ops.dispatch import compute_dtype, first_layer_grads_, rows_add_, run_chunks, settings


def _fwd_body(P, Q, dst, src, R, C, b, w, v, activation: str):
    """One chunk: ``(w * act(z) [c, F], act(z) . v [c] or None)``, z = P[dst] + Q[src] + R C + b."""
    cdt = C.dtype
    z = torch.addmm(b, R.to(cdt), C) + P[dst].to(cdt) + Q[src].to(cdt)
    a = act(activation, z)
    s = a @ v if v is not None else None
    msg = a * w.to(cdt).unsqueeze(1) if w is not None else a
    return msg, s


def _bwd_body(gm, gs, P, Q, dst, src, R, C, b, w, v, activation: str):
    """One chunk of backward: ``(dz [c, F], dw [c] or None, dv partial [F] or None)``."""
    cdt = C.dtype
    z = torch.addmm(b, R.to(cdt), C) + P[dst].to(cdt) + Q[src].to(cdt)
    a, da = act_and_grad(activation, z)
    gmr = gm[dst]
    g = gmr * w.to(cdt).unsqueeze(1) if w is not None else gmr
    if v is not None:
        g = g + gs.unsqueeze(1) * v
    dz = g * da
    dw = (gmr * a).sum(1) if w is not None else None
    dv = gs @ a if v is not None else None
    return dz, dw, dv


def _fwd_body_buffered(bufs, P, Q, dst, src, R, C, b, w, v, activation: str):
    """``_fwd_body`` writing into preallocated [chunk, F] buffers (no allocation per chunk).

    On the 2-core VMs a fresh 4 MiB tensor costs ~1000 page faults (10+ ms when the machine is
    busy); reusing two buffers made the headline forward several times faster than the
    allocating body, compiled or not."""
    c = dst.numel()
    z, t = bufs[0][:c], bufs[1][:c]
    torch.addmm(b, R, C, out=z)
    torch.index_select(P, 0, dst, out=t)
    z.add_(t)
    torch.index_select(Q, 0, src, out=t)
    z.add_(t)
    if activation == "silu":
        a = F.silu(z, inplace=True)
    elif activation == "tanh":
        a = z.tanh_()
    else:
        a = act(activation, z)
    s = torch.mv(a, v) if v is not None else None
    if w is not None:
        a.mul_(w.unsqueeze(1))
    return a, s


def _bwd_body_buffered(bufs, gm, gs, P, Q, dst, src, R, C, b, w, v, activation: str):
    """``_bwd_body`` writing into four preallocated [chunk, F] buffers."""
    c = dst.numel()
    z, a, t, da = bufs[0][:c], bufs[1][:c], bufs[2][:c], bufs[3][:c]
    torch.addmm(b, R, C, out=z)
    torch.index_select(P, 0, dst, out=t)
    z.add_(t)
    torch.index_select(Q, 0, src, out=t)
    z.add_(t)
    if activation == "silu":
        torch.sigmoid(z, out=da)
        torch.mul(z, da, out=a)
        torch.mul(a, da, out=z)
        da.add_(a).sub_(z)  # silu' = s + a - a s
    elif activation == "tanh":
        torch.tanh(z, out=a)
        torch.mul(a, a, out=da)
        da.neg_().add_(1.0)
    else:
        a_full, da_full = act_and_grad(activation, z)
        a.copy_(a_full)
        da.copy_(da_full)
    torch.index_select(gm, 0, dst, out=t)
    dw = None
    if w is not None:
        dw = torch.linalg.vecdot(t, a)  # row-wise gm_i . a_ij
        t.mul_(w.unsqueeze(1))
    if v is not None:
        t.addr_(gs, v)
    t.mul_(da)
    dv = torch.mv(a.t(), gs) if v is not None else None
    return t, dw, dv


_compiled: dict[str, object] = {}
_compile_failed = False


def _compiles(work: int) -> bool:
    """Whether the chunk bodies of a call of ``work`` = E x F run compiled: ``settings`` asks for it,
    compile has not failed, and the call is not itself being traced by ``torch.compile``."""
    return not _compile_failed and settings.want_compile(work) and not torch.compiler.is_compiling()


def _body(kind: str, work: int):
    """The eager body, or its compiled twin when the call compiles (``_compiles``)."""
    eager = _fwd_body if kind == "fwd" else _bwd_body
    if not _compiles(work):
        return eager
    if kind not in _compiled:
        _compiled[kind] = torch.compile(eager, dynamic=True, fullgraph=True)
    return _compiled[kind]


def _run(kind: str, work: int, bufs, *args):
    """Run one chunk body: compiled when asked for, else the buffered eager body (when
    ``bufs`` exist: fp32/fp64 inputs), else the allocating eager body."""
    global _compile_failed
    fn = _body(kind, work)
    if fn is _fwd_body or fn is _bwd_body:
        if bufs is not None:
            return (_fwd_body_buffered if kind == "fwd" else _bwd_body_buffered)(bufs, *args)
        return fn(*args)
    # Dynamo guards on what it sees of each argument, and every guard that fails recompiles until
    # the recompile limit fails the compile: chunks are slices of the edge arrays whose storage
    # offsets differ from chunk to chunk (a copy starts at offset 0: one chunk of indices and radial
    # features, small beside the chunk's [chunk, F] work), and the bodies run without autograd
    # whether or not an input requires grad (detached, one compiled graph serves both).
    args = tuple((a.detach().clone() if a.storage_offset() else a.detach()) if torch.is_tensor(a) else a
                 for a in args)
    try:
        return fn(*args)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        _compile_failed = True
        warnings.warn(f"torch.compile of the fused-message chunk body failed ({type(exc).__name__}: {exc}); "
                      f"falling back to eager chunks", RuntimeWarning, stacklevel=3)
        return (_fwd_body if kind == "fwd" else _bwd_body)(*args)


def _at_offset0(work: int, *tensors):
    """The whole-node and weight tensors for the compiled bodies, each starting at storage offset 0
    (``_run`` copies any other argument per chunk; node_split's P and Q are column slices of one
    ``[N, 2F]`` product, so they would be copied whole in every chunk): copied once here. Unchanged
    when the bodies run eager, which take any offset."""
    if not _compiles(work):
        return tensors
    return tuple(t.clone() if t is not None and t.storage_offset() else t for t in tensors)


def _buffers(count: int, E: int, F: int, like: torch.Tensor, inputs) -> list[torch.Tensor] | None:
    """Reusable [chunk, F] buffers for the eager bodies, or None (half inputs, or compiling)."""
    if E == 0 or any(t is not None and t.dtype != like.dtype for t in inputs):
        return None
    if settings.want_compile(E * F) and not _compile_failed:
        return None
    rows = min(E, settings.edges_per_chunk(F))
    return [torch.empty((rows, F), dtype=like.dtype, device=like.device) for _ in range(count)]


def _chunks(E: int, F: int, perm):
    step = settings.edges_per_chunk(F)
    bounds = list(range(0, E, step)) + [E]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1 and step > 2:
        bounds[-2] -= 1  # no one-edge last chunk: a compiled body would specialise (and recompile) for it
    for e0, e1 in zip(bounds[:-1], bounds[1:]):
        yield (slice(e0, e1) if perm is None else perm[e0:e1])


def fused_message_fwd_torch(P, Q, dst, src, perm, R, C, b, w, v, activation):
    """Forward: ``(m [N, F], s [E] or empty)``. Inputs as in ``fused_message_fwd`` (the op)."""
    N, F = P.shape
    E = dst.numel()
    cdt = compute_dtype(P.dtype)
    C, b = C.to(cdt), b.to(cdt)
    v = v.to(cdt) if v is not None else None
    m = torch.zeros((N, F), dtype=cdt, device=P.device)
    s = torch.empty(E if v is not None else 0, dtype=cdt, device=P.device)
    work = E * F
    eager = _buffers(2, E, F, C, (P, Q, R, w)) is not None  # buffered eager bodies: chunks over workers
    P, Q, C, b, v = _at_offset0(work, P, Q, C, b, v)

    def new_state():
        return dict(m=m if not eager else torch.zeros((N, F), dtype=cdt, device=P.device),
                    bufs=_buffers(2, E, F, C, (P, Q, R, w)) if eager else None)

    def body(st, idx):
        d = dst[idx]
        msg, s_c = _run("fwd", work, st["bufs"], P, Q, d, src[idx], R[idx], C, b,
                        w[idx] if w is not None else None, v, activation)
        rows_add_(st["m"], d, msg)
        if v is not None:
            s[idx] = s_c

    with torch.no_grad():
        states = run_chunks(list(_chunks(E, F, perm)), body, new_state, parallel=eager, device=P.device)
        if eager:
            m = states[0]["m"]
            for st in states[1:]:  # fixed order: results do not depend on the workers' timing
                m.add_(st["m"])
    return m.to(P.dtype), s.to(P.dtype)


def fused_message_bwd_torch(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, needs):
    """Backward: ``(dP, dQ, dR, dC, db, dw, dv)``; entries not in ``needs`` (and dw/dv without
    w/v) are empty tensors. ``needs`` = which of (P, Q, R, C, b, w, v) want a gradient."""
    N, F = P.shape
    E, K = R.shape
    cdt = compute_dtype(P.dtype)
    dev = P.device
    Cc, bc = C.to(cdt), b.to(cdt)
    vc = v.to(cdt) if v is not None else None
    gmc = gm.to(cdt)
    gsc = gs.to(cdt) if v is not None else None
    need_P, need_Q, need_R, need_C, need_b, need_w, need_v = needs
    dP = torch.zeros((N, F), dtype=cdt, device=dev) if (need_P or need_b) else None
    dQ = torch.zeros(Q.shape, dtype=cdt, device=dev) if need_Q else None
    dR = torch.empty((E, K), dtype=cdt, device=dev) if need_R else None
    dC = torch.zeros((K, F), dtype=cdt, device=dev) if need_C else None
    dw = torch.empty(E, dtype=cdt, device=dev) if (need_w and w is not None) else None
    dv = torch.zeros(F, dtype=cdt, device=dev) if (need_v and v is not None) else None
    work = E * F
    eager = _buffers(4, E, F, Cc, (P, Q, R, w, gm)) is not None  # buffered eager bodies: chunks over workers
    gmc, P, Q, Cc, bc, vc = _at_offset0(work, gmc, P, Q, Cc, bc, vc)
    sums = dict(P=dP, Q=dQ, C=dC, v=dv)

    def new_state():
        acc = {k: (t if not eager else torch.zeros_like(t)) for k, t in sums.items() if t is not None}
        return dict(acc=acc, bufs=_buffers(4, E, F, Cc, (P, Q, R, w, gm)) if eager else None)

    def body(st, idx):
        acc = st["acc"]
        d = dst[idx]
        dz, dw_c, dv_c = _run("bwd", work, st["bufs"], gmc, gsc[idx] if gsc is not None else None, P, Q, d,
                              src[idx], R[idx], Cc, bc, w[idx] if w is not None else None, vc, activation)
        first_layer_grads_(dz, acc, dR, idx, d, src[idx], R[idx].to(cdt), Cc)
        if dw is not None:
            dw[idx] = dw_c
        if "v" in acc:
            acc["v"].add_(dv_c)

    with torch.no_grad():
        states = run_chunks(list(_chunks(E, F, perm)), body, new_state, parallel=eager, device=P.device)
        if eager:
            for k, t in states[0]["acc"].items():  # the shared tensors: workers' sums in a fixed order
                sums[k].copy_(t)
                for st in states[1:]:
                    sums[k].add_(st["acc"][k])
    db = dP.sum(0) if need_b else None  # db = sum_e dz_e = sum_i dP_i

    def out(t, like):
        return t.to(like.dtype) if t is not None else torch.empty(0, dtype=P.dtype, device=dev)  # fresh: no aliasing

    return (out(dP if need_P else None, P), out(dQ, Q), out(dR, R), out(dC, C), out(db, b),
            out(dw, w if w is not None else P), out(dv, v if v is not None else P))
