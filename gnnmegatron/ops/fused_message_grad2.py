"""Double backward of ``fused_message_aggregate``: the ``gnnmegatron::fused_message_bwd2`` op and
its torch twin.

The backward op maps ``(gm, gs)`` and the primal inputs to ``(dP, dQ, dR, dC, db, dw, dv)``; a
force loss differentiates that map once more. With cotangents ``gg = (ggP, ggQ, ggR, ggC, ggb,
ggw, ggv)`` of the backward's outputs and, per edge e = (i, j), ``a``, ``a'``, ``a''`` the
activation and its derivatives at z, ``g = gm_i w_e + gs_e v`` and ``dz = g a'``::

    G = ggP_i + ggQ_j + ggR_e C + R_e ggC + ggb          H = a' G
    T = g a'' G + (ggw_e gm_i + gs_e ggv) a'
    dgm_i = sum_e w_e H + ggw_e a      dgs_e = v . H + a . ggv      dw_e = gm_i . H
    dP_i = sum_e T    dQ_j = sum_e T   dR_e = T C^T + dz ggC^T      db = sum_e T
    dC = sum_e R_e^T T + ggR_e^T dz    dv = sum_e gs_e H

``fused_message_bwd2_torch`` evaluates these chunk by chunk (memory ``O(chunk * F)``); written
with plain torch ops, it is differentiable once more when grad mode is on (third order). The
triton kernel (``gnnmegatron.kernels.fused_message_bwd2``) evaluates the same formulas tile by
tile.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gnnmegatron.ops.activations import act_grads2
from gnnmegatron.ops.dispatch import compute_dtype, first_layer_grads_, rows_add_, run_chunks, settings

Tensor = torch.Tensor
OUTPUTS = ("gm", "gs", "P", "Q", "R", "C", "b", "w", "v")


def fused_message_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, gg, need) -> dict:
    """``{name: gradient or None}`` for ``OUTPUTS`` (see the module docstring for the formulas).

    Chunks of ``settings.edges_per_chunk(F)`` edges in destination order (through ``perm``).
    In-place accumulation when grad mode is off, out-of-place (differentiable) when it is on.
    """
    ggP, ggQ, ggR, ggC, ggb, ggw, ggv = gg
    ggw = ggw if w is not None else None
    ggv = ggv if v is not None else None
    need = {k: bool(need.get(k)) for k in OUTPUTS}
    need["gs"] &= v is not None
    need["v"] &= v is not None
    need["w"] &= w is not None
    out = {k: None for k in OUTPUTS}
    if not any(need.values()):
        return out
    create = torch.is_grad_enabled()
    if not create and ggC is None and ggb is None and ggv is None:
        return _bwd2_geometry(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, (ggP, ggQ, ggR, ggw), need)
    N, F = P.shape
    E, K = R.shape
    cdt = compute_dtype(P.dtype)
    dev = P.device

    def cast(t):
        return t.to(cdt) if t is not None else None

    Cc, bc, vc, ggCc, ggbc, ggvc = map(cast, (C, b, v, ggC, ggb, ggv))
    gmc = cast(gm)

    def zeros(shape, on):
        return torch.zeros(shape, dtype=cdt, device=dev) if on else None

    acc = dict(gm=zeros((N, F), need["gm"]), P=zeros((N, F), need["P"]), Q=zeros(Q.shape, need["Q"]),
               C=zeros((K, F), need["C"]), b=zeros(F, need["b"]), v=zeros(F, need["v"]))
    edge = {k: [] for k in ("gs", "R", "w")}  # per-edge results, chunk by chunk (destination order)
    order = []

    def add(name, value, rows=None):
        if acc[name] is None or value is None:
            return
        if rows is None:
            acc[name] = acc[name] + value if create else acc[name].add_(value)
        else:
            acc[name] = acc[name].index_add(0, rows, value) if create else rows_add_(acc[name], rows, value)

    def take(t, rows):  # index_select: under autograd its backward is index_add (deterministic on CPU)
        return t.index_select(0, rows)

    step = settings.edges_per_chunk(F)
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        idx = torch.arange(e0, e1, device=dev) if perm is None else perm[e0:e1]
        order.append(idx)
        d, j = dst[idx], src[idx]
        Rc = take(R, idx).to(cdt)
        z = torch.addmm(bc, Rc, Cc) + take(P, d).to(cdt) + take(Q, j).to(cdt)
        a, a1, a2 = act_grads2(activation, z)
        gmr = take(gmc, d)
        wv = take(w, idx).to(cdt).unsqueeze(1) if w is not None else None
        gsv = take(gs, idx).to(cdt).unsqueeze(1) if v is not None else None
        g = gmr * wv if wv is not None else gmr
        if gsv is not None:
            g = g + gsv * vc
        dz = g * a1
        G = None
        ggr = take(ggR, idx).to(cdt) if ggR is not None else None
        ggwv = take(ggw, idx).to(cdt).unsqueeze(1) if ggw is not None else None
        for term in (take(ggP, d) if ggP is not None else None, take(ggQ, j) if ggQ is not None else None,
                     ggr @ Cc if ggr is not None else None, Rc @ ggCc if ggC is not None else None, ggbc):
            if term is not None:
                G = term.to(cdt) if G is None else G + term.to(cdt)
        H = a1 * G if G is not None else None
        coef = None
        if ggw is not None:
            coef = ggwv * gmr
        if ggv is not None:
            coef = gsv * ggvc if coef is None else coef + gsv * ggvc
        T = None
        if G is not None:
            T = g * a2 * G
        if coef is not None:
            T = coef * a1 if T is None else T + coef * a1
        if T is not None:
            add("P", T, d)
            add("Q", T, j)
            add("b", T.sum(0))
            add("C", Rc.T @ T)
        if ggR is not None:
            add("C", ggr.T @ dz)
        if need["gm"]:
            gm_term = None
            if H is not None:
                gm_term = H * wv if wv is not None else H
            if ggw is not None:
                gm_term = ggwv * a if gm_term is None else gm_term + ggwv * a
            add("gm", gm_term, d)
        if need["v"] and H is not None:
            add("v", gsv.squeeze(1) @ H)
        if need["gs"]:
            dgs = H @ vc if H is not None else torch.zeros(e1 - e0, dtype=cdt, device=dev)
            if ggv is not None:
                dgs = dgs + a @ ggvc
            edge["gs"].append(dgs)
        if need["w"]:
            edge["w"].append((gmr * H).sum(1) if H is not None else torch.zeros(e1 - e0, dtype=cdt, device=dev))
        if need["R"]:
            dr = T @ Cc.T if T is not None else torch.zeros((e1 - e0, K), dtype=cdt, device=dev)
            if ggC is not None:
                dr = dr + dz @ ggCc.T
            edge["R"].append(dr)
    for name in ("gm", "P", "Q", "C", "b", "v"):
        if need[name]:
            out[name] = acc[name]
    if E == 0:
        for name, shape in (("gs", (0,)), ("w", (0,)), ("R", (0, K))):
            if need[name]:
                out[name] = torch.zeros(shape, dtype=cdt, device=dev)
    else:
        rows = torch.cat(order)
        for name in ("gs", "w", "R"):
            if need[name]:
                vals = torch.cat(edge[name])
                out[name] = vals.new_zeros(vals.shape).index_put((rows,), vals)  # back to the caller's edge order
    like = dict(gm=P, gs=P, P=P, Q=Q, R=R, C=C, b=b, w=w if w is not None else P, v=v if v is not None else P)
    return {k: (t.to(like[k].dtype) if t is not None else None) for k, t in out.items()}


def _bwd2_geometry(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, tangents, need) -> dict:
    """The double backward of a force (and stress) loss: cotangents on dP, dQ, dR and dw only, grad
    mode off. The formulas of ``fused_message_bwd2_torch`` without its ggC, ggb and ggv terms, in
    preallocated ``[chunk, F]`` buffers (no allocation per chunk)."""
    from gnnmegatron.ops.faithful_message_torch import (_Buffers, _first_layer, act_grads2_, chunks, node_table,
                                                        pair_rows, rowdot)

    ggP, ggQ, ggR, ggw = tangents
    if w is None:
        ggw = None
    N, F = P.shape
    E, K = R.shape
    cdt = compute_dtype(P.dtype)
    dev = P.device
    like = dict(gm=P, gs=P, P=P, Q=Q, R=R, C=C, b=b, w=w if w is not None else P, v=v if v is not None else P)
    like = {k: t.dtype for k, t in like.items()}

    def cast(t):
        return t.to(cdt) if t is not None else None

    gm, gs, P, Q, R, C, b, w, v, ggP, ggQ, ggR, ggw = map(cast, (gm, gs, P, Q, R, C, b, w, v, ggP, ggQ, ggR, ggw))

    def zeros(shape, on):
        return torch.zeros(shape, dtype=cdt, device=dev) if on else None

    shapes = dict(gm=((N, F), need["gm"]), P=((N, F), need["P"] or need["b"]), Q=(tuple(Q.shape), need["Q"]),
                  C=((K, F), need["C"]), v=((F,), need["v"]))
    dgs = zeros(E, need["gs"])
    dR = zeros((E, K), need["R"])
    dw = zeros(E, need["w"])
    rows = max(1, min(max(E, 1), settings.edges_per_chunk(F)))

    table = node_table(P, Q, b)
    gtable = node_table(ggP, ggQ) if (ggP is not None and ggQ is not None) else None

    def new_state():
        acc = {k: (torch.zeros(shape, dtype=cdt, device=dev) if on else None) for k, (shape, on) in shapes.items()}
        return dict(acc=acc, buf=_Buffers(rows, dict(A=F, D=F, DD=F, G=F, GM=F, H=F, g=F, T=F, tmp=F), cdt, dev))

    def body(st, idx):
        acc, buf = st["acc"], st["buf"]
        gsc = None
        d, j = dst[idx], src[idx]
        c = d.numel()
        Rc = R[idx]
        tmp = buf.get("tmp", c)
        z = _first_layer(table, N, d, j, Rc, C)
        a, a1, a2 = buf.get("A", c), buf.get("D", c), buf.get("DD", c)
        act_grads2_(activation, z, a, a1, a2, tmp)
        # the direction: ggP_i + ggQ_j + ggR_e C
        if gtable is not None:
            G = pair_rows(gtable, N, d, j)
            if ggR is not None:
                G.addmm_(ggR[idx], C)
        else:
            G = buf.get("G", c)
            if ggR is not None:
                torch.mm(ggR[idx], C, out=G)
            else:
                G.zero_()
            for t, rows_ in ((ggP, d), (ggQ, j)):
                if t is not None:
                    G.add_(torch.index_select(t, 0, rows_, out=tmp))
        gmr = torch.index_select(gm, 0, d, out=buf.get("GM", c))
        H = torch.mul(a1, G, out=buf.get("H", c))
        g = torch.mul(gmr, w[idx].unsqueeze(1), out=buf.get("g", c)) if w is not None else \
            buf.get("g", c).copy_(gmr)
        if v is not None:
            gsc = gs[idx]
            g.addr_(gsc, v)
        T = torch.mul(g, a2, out=buf.get("T", c)).mul_(G)  # g a'' G (+ ggw gm a')
        if ggw is not None:
            ggwc = ggw[idx].unsqueeze(1)
            T.addcmul_(torch.mul(gmr, ggwc, out=tmp), a1)
            if acc["gm"] is not None:
                rows_add_(acc["gm"], d, torch.mul(a, ggwc, out=tmp))
        if acc["gm"] is not None:
            rows_add_(acc["gm"], d, torch.mul(H, w[idx].unsqueeze(1), out=tmp) if w is not None else H)
        if dgs is not None:
            dgs[idx] = torch.mv(H, v)
        if dw is not None:
            dw[idx] = rowdot(gmr, H)
        if acc["v"] is not None:
            acc["v"].addmv_(H.t(), gsc)
        first_layer_grads_(T, acc, dR, idx, d, j, Rc, C)
        if acc["C"] is not None:
            if ggR is not None:
                acc["C"].addmm_(ggR[idx].t(), g.mul_(a1))  # dz = g a'

    with torch.no_grad():
        states = run_chunks(list(chunks(E, rows, perm)) if E > 0 else [], body, new_state, device=dev)
        acc = states[0]["acc"]
        for st in states[1:]:  # fixed order: results do not depend on the workers' timing
            for k, t in st["acc"].items():
                if t is not None:
                    acc[k].add_(t)
    out = {k: acc.get(k) if need[k] else None for k in OUTPUTS}
    out.update(gs=dgs, R=dR, w=dw, b=acc["P"].sum(0) if need["b"] else None)
    return {k: (t.to(like[k]) if t is not None else None) for k, t in out.items()}


# ----------------------------------------------------------------------------- the custom op
@torch.library.custom_op("gnnmegatron::fused_message_bwd2", mutates_args=())
def fused_message_bwd2_op(gm: Tensor, gs: Optional[Tensor], P: Tensor, Q: Tensor, dst: Tensor, src: Tensor,
                          ptr: Tensor, perm: Optional[Tensor], R: Tensor, C: Tensor, b: Tensor, w: Optional[Tensor],
                          v: Optional[Tensor], ggP: Optional[Tensor], ggQ: Optional[Tensor], ggR: Optional[Tensor],
                          ggC: Optional[Tensor], ggb: Optional[Tensor], ggw: Optional[Tensor], ggv: Optional[Tensor],
                          src_ptr: Optional[Tensor], src_perm: Optional[Tensor], activation: str, backend: str,
                          need: Sequence[bool], deterministic: bool) -> list[Tensor]:
    """``[dgm, dgs, dP, dQ, dR, dC, db, dw, dv]``, empty where not in ``need`` (same order)."""
    gg = (ggP, ggQ, ggR, ggC, ggb, ggw, ggv)
    want = dict(zip(OUTPUTS, [bool(n) for n in need]))
    if backend == "triton":
        from gnnmegatron.kernels.fused_message import fused_message_bwd2 as launch
        res = launch(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, gg, want, src_ptr, src_perm,
                     deterministic)
    else:
        with torch.no_grad():
            res = fused_message_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, gg, want)
    return [res[k] if res[k] is not None else P.new_empty(0) for k in OUTPUTS]


@fused_message_bwd2_op.register_fake
def _(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, ggP, ggQ, ggR, ggC, ggb, ggw, ggv, src_ptr, src_perm,
      activation, backend, need, deterministic):
    like = [gm, gs, P, Q, R, C, b, w, v]
    return [t.new_empty(t.shape) if (n and t is not None) else P.new_empty(0) for t, n in zip(like, need)]
