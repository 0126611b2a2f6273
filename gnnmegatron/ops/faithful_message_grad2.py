"""Double backward of ``faithful_message_aggregate``: the ``gnnmegatron::faithful_message_bwd2`` op and
its chunked torch twin.

The backward op maps the cotangents ``(gm, gs)`` of ``(m, s)`` and the primal inputs to the gradients
``(dP, dQ, dR, dC, db1, dW2, db2, dw, dWc, dbc, dv)`` of ``L1 = sum(gm m) + sum(gs s)``. A force loss
differentiates that map once more, with cotangents ``t = (tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc,
tbc, tv)`` of those gradients. ``L2 = <t, dL1/d(inputs)>`` is the derivative of ``L1`` along the
direction ``t``, so the double backward is forward-over-reverse: push the tangent ``t`` through
each edge's MLP next to the primal values (dual numbers), and back-propagate
``L2 = sum_i gm_i . mdot_i + sum_e gs_e sdot_e``. With ``act'``/``act''`` the activation's
derivatives (``s1 = act'(z1)``, ``ss1 = act''(z1)`` and so on), per edge e = (i, j)::

    z1 = P_i + Q_j + R_e C + b1             z1' = tP_i + tQ_j + tR_e C + R_e tC + tb1
    a1 = act(z1)                            a1' = s1 z1'
    z2 = a1 W2^T + b2                       z2' = a1' W2^T + a1 tW2^T + tb2
    a  = act(z2)                            a'  = s2 z2'
    z3 = a Wc^T + bc                        z3' = a' Wc^T + a tWc^T + tbc
    a3 = act(z3)                            a3' = s3 z3'
    m_i = sum_e w_e a                       m'_i = sum_e (tw_e a + w_e a')          = dL2/dgm_i
    s_e = a3 . v                            s'_e = a3' . v + a3 . tv                = dL2/dgs_e

and the reverse sweep (``x~`` is the adjoint of ``x``; ``x'~`` that of the tangent ``x'``)::

    a'~ = gm_i w_e          a~ = gm_i tw_e          dw_e = gm_i . a'
    a3'~ = gs_e v           a3~ = gs_e tv           dv = sum_e gs_e a3'
    z3'~ = s3 a3'~          z3~ = ss3 z3' a3'~ + s3 a3~
    a'~ += z3'~ Wc          a~ += z3~ Wc + z3'~ tWc
    dWc = sum_e z3'~^T a' + z3~^T a                     dbc = sum_e z3~
    z2'~ = s2 a'~           z2~ = ss2 z2' a'~ + s2 a~
    a1'~ = z2'~ W2          a1~ = z2~ W2 + z2'~ tW2
    dW2 = sum_e z2'~^T a1' + z2~^T a1                   db2 = sum_e z2~
    z1'~ = s1 a1'~          z1~ = ss1 z1' a1'~ + s1 a1~
    dP_i = sum_e z1~        dQ_j = sum_e z1~            db1 = sum_e z1~
    dR_e = z1~ C^T + z1'~ tC^T                          dC = sum_e R_e^T z1~ + tR_e^T z1'~

Absent tangents drop their terms (a force loss gives tangents on P, Q, R and w only, since the
backward of a conservative-force pass asks for nothing else). Per chunk of edges that is the
forward's two GEMMs, the tangent's two and six in the reverse sweep: twelve ``[chunk, H] x
[H, H]`` products, nothing ``[E, H]`` kept. ``faithful_bwd2_torch`` evaluates it chunk by chunk
in plain torch ops, so with grad mode on it is differentiable once more (third order; then
autograd records the chunks). The triton kernel (``gnnmegatron.kernels.faithful_message_bwd2``)
evaluates the same formulas tile by tile.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gnnmegatron.ops.activations import act_grads2
from gnnmegatron.ops.dispatch import compute_dtype, first_layer_grads_, rows_add_, run_chunks
from gnnmegatron.ops.faithful_message_torch import (_Buffers, _first_layer, act_grads2_, chunk_rows, chunks, node_table,
                                                    pair_rows, rowdot, tp_reducer)

Tensor = torch.Tensor
OUTPUTS = ("gm", "gs", "P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v")
TANGENTS = ("P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v")


def _add(x, y):
    if y is None:
        return x
    return y if x is None else x + y


def _mul(x, y):
    return None if (x is None or y is None) else x * y


def faithful_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tangents,
                        need, tp: int = -1) -> dict:
    """``{name: gradient or None}`` for ``OUTPUTS`` (formulas in the module docstring).

    ``tangents``: the 11 cotangents (``TANGENTS`` order), ``None`` where absent; ``need``: name ->
    whether that gradient is wanted. In-place accumulation when grad mode is off, out-of-place
    (differentiable) when it is on. ``tp``: tensor-parallel group id (``tp_group_id``): the second
    layer's partial products (primal and tangent) are summed over its ranks.
    """
    reduce = tp_reducer(tp)
    tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc, tbc, tv = tangents
    coord = v is not None
    if not coord:
        tWc = tbc = tv = None
    if w is None:
        tw = None
    need = {k: bool(need.get(k)) for k in OUTPUTS}
    need["gs"] &= coord
    for k in ("Wc", "bc", "v"):
        need[k] &= coord
    need["w"] &= w is not None
    out = {k: None for k in OUTPUTS}
    if not any(need.values()):
        return out
    create = torch.is_grad_enabled()
    if not create and all(t is None for t in (tC, tb1, tW2, tb2, tWc, tbc, tv)):
        return _bwd2_geometry(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation,
                              (tP, tQ, tR, tw), need, reduce)
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    F3 = Wc.shape[0] if coord else 1
    cdt = compute_dtype(P.dtype)
    dev = P.device
    like = dict(gm=P, gs=P, P=P, Q=Q, R=R, C=C, b1=b1, W2=W2, b2=b2, w=w if w is not None else P,
                Wc=Wc if coord else P, bc=bc if coord else P, v=v if coord else P)
    like = {k: t.dtype for k, t in like.items()}

    def cast(t):
        return t.to(cdt) if t is not None else None

    C, b1, W2, b2, Wc, bc, v, tC, tb1, tW2, tb2, tWc, tbc, tv, gm = map(
        cast, (C, b1, W2, b2, Wc, bc, v, tC, tb1, tW2, tb2, tWc, tbc, tv, gm))

    def zeros(shape, on):
        return torch.zeros(shape, dtype=cdt, device=dev) if on else None

    acc = dict(gm=zeros((N, F2), need["gm"]), P=zeros((N, F1), need["P"] or need["b1"]), Q=zeros(Q.shape, need["Q"]),
               C=zeros((K, F1), need["C"]), W2=zeros((F2, F1), need["W2"]), b2=zeros(F2, need["b2"]),
               Wc=zeros((F3, F2), need["Wc"]), bc=zeros(F3, need["bc"]), v=zeros(F3, need["v"]))
    edge = {k: [] for k in ("gs", "R", "w")}  # per-edge results chunk by chunk (destination order)
    order = []

    def add(name, value, rows=None):
        if acc[name] is None or value is None:
            return
        if rows is None:
            acc[name] = acc[name] + value if create else acc[name].add_(value)
        else:
            acc[name] = acc[name].index_add(0, rows, value) if create else rows_add_(acc[name], rows, value)

    def take(t, rows):  # index_select: under autograd its backward is index_add (deterministic on CPU)
        return t.index_select(0, rows).to(cdt) if t is not None else None

    step = chunk_rows(E, F1, F2, F3)
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        idx = torch.arange(e0, e1, device=dev) if perm is None else perm[e0:e1]
        order.append(idx)
        d, j = dst[idx], src[idx]
        Rc = take(R, idx)
        # ---- primal and tangent forward
        z1 = torch.addmm(b1, Rc, C) + take(P, d) + take(Q, j)
        a1, s1, ss1 = act_grads2(activation, z1)
        dz1 = None  # the tangent z1'
        for term in (take(tP, d), take(tQ, j), take(tR, idx) @ C if tR is not None else None,
                     Rc @ tC if tC is not None else None, tb1):
            dz1 = _add(dz1, term)
        da1 = _mul(s1, dz1)
        if reduce is None:
            z2 = torch.addmm(b2, a1, W2.t())
        else:  # tensor parallelism: the partial products of this rank's units, summed over the ranks
            z2 = reduce(a1 @ W2.t()) + b2
        a, s2, ss2 = act_grads2(activation, z2)
        dz2 = da1 @ W2.t() if da1 is not None else None
        if tW2 is not None:
            dz2 = _add(dz2, a1 @ tW2.t())
        if reduce is not None:  # every rank takes part (a rank with a None tangent sends zeros)
            dz2 = reduce(dz2 if dz2 is not None else torch.zeros_like(z2))
        dz2 = _add(dz2, tb2)
        da = _mul(s2, dz2)
        gmr = take(gm, d)
        wv = take(w, idx).unsqueeze(1) if w is not None else None
        twv = take(tw, idx).unsqueeze(1) if tw is not None else None
        # ---- JVP outputs (dL2/dgm, dL2/dgs) and the adjoints of a' and a
        if need["gm"]:
            add("gm", _add(da * wv if (da is not None and wv is not None) else da, _mul(twv, a)), d)
        if need["w"]:
            edge["w"].append(rowdot(gmr, da) if da is not None else torch.zeros(e1 - e0, dtype=cdt, device=dev))
        bar_da = gmr * wv if wv is not None else gmr
        bar_a = gmr * twv if twv is not None else None
        if coord:
            gsc = take(gs, idx).unsqueeze(1)
            z3 = torch.addmm(bc, a, Wc.t())
            a3, s3, ss3 = act_grads2(activation, z3)
            dz3 = da @ Wc.t() if da is not None else None
            if tWc is not None:
                dz3 = _add(dz3, a @ tWc.t())
            dz3 = _add(dz3, tbc)
            da3 = _mul(s3, dz3)
            if need["gs"]:
                dgs = da3 @ v if da3 is not None else torch.zeros(e1 - e0, dtype=cdt, device=dev)
                if tv is not None:
                    dgs = dgs + a3 @ tv
                edge["gs"].append(dgs)
            if need["v"] and da3 is not None:
                add("v", gsc.squeeze(1) @ da3)
            bar_dz3 = s3 * (gsc * v)                      # z3'~
            bar_z3 = _mul(ss3 * dz3, gsc * v) if dz3 is not None else None
            if tv is not None:
                bar_z3 = _add(bar_z3, s3 * (gsc * tv))
            bar_da = bar_da + bar_dz3 @ Wc
            if bar_z3 is not None:
                bar_a = _add(bar_a, bar_z3 @ Wc)
            if tWc is not None:
                bar_a = _add(bar_a, bar_dz3 @ tWc)
            if need["Wc"]:
                if da is not None:
                    add("Wc", bar_dz3.t() @ da)
                if bar_z3 is not None:
                    add("Wc", bar_z3.t() @ a)
            if need["bc"] and bar_z3 is not None:
                add("bc", bar_z3.sum(0))
        # ---- second layer
        bar_dz2 = s2 * bar_da
        bar_z2 = _add(_mul(ss2 * dz2, bar_da) if dz2 is not None else None, _mul(s2, bar_a))
        bar_da1 = bar_dz2 @ W2
        bar_a1 = bar_z2 @ W2 if bar_z2 is not None else None
        if tW2 is not None:
            bar_a1 = _add(bar_a1, bar_dz2 @ tW2)
        if need["W2"]:
            if da1 is not None:
                add("W2", bar_dz2.t() @ da1)
            if bar_z2 is not None:
                add("W2", bar_z2.t() @ a1)
        if need["b2"] and bar_z2 is not None:
            add("b2", bar_z2.sum(0))
        # ---- first layer
        bar_dz1 = s1 * bar_da1
        bar_z1 = _add(_mul(ss1 * dz1, bar_da1) if dz1 is not None else None, _mul(s1, bar_a1))
        if bar_z1 is not None:
            add("P", bar_z1, d)
            add("Q", bar_z1, j)
            add("C", Rc.t() @ bar_z1)
        if tR is not None:
            add("C", take(tR, idx).t() @ bar_dz1)
        if need["R"]:
            dr = bar_z1 @ C.t() if bar_z1 is not None else torch.zeros((e1 - e0, K), dtype=cdt, device=dev)
            if tC is not None:
                dr = dr + bar_dz1 @ tC.t()
            edge["R"].append(dr)
    for name in ("gm", "P", "Q", "C", "W2", "b2", "Wc", "bc", "v"):
        if need[name]:
            out[name] = acc[name]
    if need["b1"]:
        out["b1"] = acc["P"].sum(0)  # db1 = sum_e z1~ = sum_i dP_i
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
    return {k: (t.to(like[k]) if t is not None else None) for k, t in out.items()}


def _bwd2_geometry(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tangents, need,
                   reduce=None):
    """The double backward of a force (and stress) loss: tangents on P, Q, R and w only, grad mode off.

    The same formulas as ``faithful_bwd2_torch``, in preallocated buffers, with each layer's primal and
    tangent rows stacked (``[a1; a1']`` one ``[2 chunk, F1]`` operand) so that a layer's six products
    are three GEMMs of twice the rows: ``[a1; a1'] W2^T``, ``[z2~; z2'~] W2`` and
    ``dW2 += [z2~; z2'~]^T [a1; a1']`` (and the same for Wc). ``reduce``: tensor parallelism (one
    all-reduce of the stacked ``[z2; z2']`` partial products per chunk).
    """
    tP, tQ, tR, tw = tangents
    if w is None:
        tw = None
    coord = v is not None
    like = dict(gm=P, gs=P, P=P, Q=Q, R=R, C=C, b1=b1, W2=W2, b2=b2, w=w if w is not None else P,
                Wc=Wc if coord else P, bc=bc if coord else P, v=v if coord else P)
    like = {k: t.dtype for k, t in like.items()}
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    F3 = Wc.shape[0] if coord else 1
    cdt = compute_dtype(P.dtype)
    dev = P.device

    def cast(t):
        return t.to(cdt) if t is not None else None

    gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v, tP, tQ, tR, tw = map(
        cast, (gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v, tP, tQ, tR, tw))

    def zeros(shape, on):
        return torch.zeros(shape, dtype=cdt, device=dev) if on else None

    shapes = dict(gm=((N, F2), need["gm"]), P=((N, F1), need["P"] or need["b1"]), Q=(tuple(Q.shape), need["Q"]),
                  C=((K, F1), need["C"]), W2=((F2, F1), need["W2"]), b2=((F2,), need["b2"]), Wc=((F3, F2), need["Wc"]),
                  bc=((F3,), need["bc"]), v=((F3,), need["v"]))
    dgs = torch.zeros(E, dtype=cdt, device=dev) if need["gs"] else None
    dR = torch.zeros((E, K), dtype=cdt, device=dev) if need["R"] else None
    dw = torch.zeros(E, dtype=cdt, device=dev) if need["w"] else None
    rows = chunk_rows(max(E, 1), F1, F2, F3)
    widths = dict(Z1=F1, T1=F1, S1=F1, SS1=F1, Z2=F2, T2=F2, S2=F2, SS2=F2, G=F2)
    stacked = dict(AA1=F1, ZZ2=F2, AA2=F2, GG2=F2, BB2=F2, GG1=F1)
    if coord:
        widths.update(T3=F3, S3=F3, SS3=F3)
        stacked.update(ZZ3=F3, BB3=F3)

    table = node_table(P, Q, b1)
    ttable = node_table(tP, tQ) if (tP is not None and tQ is not None) else None  # the tangent's

    def new_state():
        acc = {k: (torch.zeros(shape, dtype=cdt, device=dev) if on else None) for k, (shape, on) in shapes.items()}
        return dict(acc=acc, buf=_Buffers(rows, widths, cdt, dev), stk=_Buffers(2 * rows, stacked, cdt, dev))

    def body(st, idx):
        acc, buf, stk = st["acc"], st["buf"], st["stk"]
        d, j = dst[idx], src[idx]
        c = d.numel()
        Rc = R[idx]
        wc = w[idx].unsqueeze(1) if w is not None else None
        twc = tw[idx].unsqueeze(1) if tw is not None else None
        # ---- layer 1: z1, its tangent, a1 and a1' stacked in AA1
        z1 = _first_layer(table, N, d, j, Rc, C)
        AA1 = stk.get("AA1", 2 * c)
        a1, da1 = AA1[:c], AA1[c:]
        if tR is not None:
            torch.mm(tR[idx], C, out=da1)  # z1' (a1' after the product with s1 below)
        else:
            da1.zero_()
        T1 = buf.get("T1", c)
        if ttable is not None:
            da1.add_(pair_rows(ttable, N, d, j))
        else:
            for t, rows_ in ((tP, d), (tQ, j)):
                if t is not None:
                    da1.add_(torch.index_select(t, 0, rows_, out=T1))
        S1, SS1 = buf.get("S1", c), buf.get("SS1", c)
        act_grads2_(activation, z1, a1, S1, SS1, T1)
        SS1.mul_(da1)                                  # ss1 z1'
        da1.mul_(S1)                                   # a1'
        # ---- layer 2
        ZZ2 = torch.mm(AA1, W2.t(), out=stk.get("ZZ2", 2 * c))
        if reduce is not None:
            reduce(ZZ2)
        z2, dz2 = ZZ2[:c], ZZ2[c:]
        z2.add_(b2)
        AA2 = stk.get("AA2", 2 * c)
        a, da = AA2[:c], AA2[c:]
        S2, SS2 = buf.get("S2", c), buf.get("SS2", c)
        act_grads2_(activation, z2, a, S2, SS2, buf.get("T2", c))
        SS2.mul_(dz2)                                  # ss2 z2'
        torch.mul(dz2, S2, out=da)                     # a'
        G = torch.index_select(gm, 0, d, out=buf.get("G", c))
        if dw is not None:
            dw[idx] = rowdot(G, da)
        if acc["gm"] is not None:                      # m' = sum_e w a' + tw a
            T2 = torch.mul(da, wc, out=buf.get("T2", c)) if wc is not None else da
            if twc is not None:
                T2 = T2.addcmul(a, twc) if T2 is da else T2.addcmul_(a, twc)
            rows_add_(acc["gm"], d, T2)
        GG2 = stk.get("GG2", 2 * c)                    # [a~; a'~]
        bar_a, bar_da = GG2[:c], GG2[c:]
        # ---- layer 3 (coordinate MLP)
        if coord:
            gsc = gs[idx].unsqueeze(1)
            ZZ3 = torch.mm(AA2, Wc.t(), out=stk.get("ZZ3", 2 * c))
            z3, dz3 = ZZ3[:c], ZZ3[c:]
            z3.add_(bc)
            S3, SS3, T3 = buf.get("S3", c), buf.get("SS3", c), buf.get("T3", c)
            act_grads2_(activation, z3, None, S3, SS3, T3)
            da3 = torch.mul(S3, dz3, out=T3)           # a3'
            if dgs is not None:
                dgs[idx] = torch.mv(da3, v)
            if acc["v"] is not None:
                acc["v"].addmv_(da3.t(), gsc.squeeze(1))
            BB3 = stk.get("BB3", 2 * c)                # [z3~; z3'~]
            torch.mul(SS3, dz3, out=BB3[:c]).mul_(v).mul_(gsc)
            torch.mul(S3, v, out=BB3[c:]).mul_(gsc)
            torch.mm(BB3, Wc, out=GG2)
            if acc["Wc"] is not None:
                acc["Wc"].addmm_(BB3.t(), AA2)
            if acc["bc"] is not None:
                acc["bc"].add_(BB3[:c].sum(0))
            if twc is not None:
                bar_a.addcmul_(G, twc)
            bar_da.add_(G * wc if wc is not None else G)
        else:
            if twc is not None:
                torch.mul(G, twc, out=bar_a)
            else:
                bar_a.zero_()
            if wc is not None:
                torch.mul(G, wc, out=bar_da)
            else:
                bar_da.copy_(G)
        # ---- layer 2 reverse: [z2~; z2'~] = [ss2 z2' a'~ + s2 a~; s2 a'~]
        BB2 = stk.get("BB2", 2 * c)
        torch.mul(SS2, bar_da, out=BB2[:c]).addcmul_(S2, bar_a)
        torch.mul(S2, bar_da, out=BB2[c:])
        if acc["W2"] is not None:
            acc["W2"].addmm_(BB2.t(), AA1)
        if acc["b2"] is not None:
            acc["b2"].add_(BB2[:c].sum(0))
        GG1 = torch.mm(BB2, W2, out=stk.get("GG1", 2 * c))  # [a1~; a1'~]
        # ---- layer 1 reverse: z1~ = ss1 z1' a1'~ + s1 a1~, z1'~ = s1 a1'~
        bar_z1 = torch.mul(SS1, GG1[c:], out=buf.get("Z1", c)).addcmul_(S1, GG1[:c])
        first_layer_grads_(bar_z1, acc, dR, idx, d, j, Rc, C)
        if acc["C"] is not None:
            if tR is not None:
                acc["C"].addmm_(tR[idx].t(), torch.mul(S1, GG1[c:], out=T1))

    with torch.no_grad():
        states = run_chunks(list(chunks(E, rows, perm)) if E > 0 else [], body, new_state, parallel=reduce is None,
                            device=dev)
        acc = states[0]["acc"]
        for st in states[1:]:  # fixed order: results do not depend on the workers' timing
            for k, t in st["acc"].items():
                if t is not None:
                    acc[k].add_(t)
    out = {k: (acc[k] if (k in acc and need[k]) else None) for k in OUTPUTS}
    out["gs"], out["R"], out["w"] = dgs, dR, dw
    out["b1"] = acc["P"].sum(0) if need["b1"] else None
    return {k: (t.to(like[k]) if t is not None else None) for k, t in out.items()}


# ----------------------------------------------------------------------------- the custom op
@torch.library.custom_op("gnnmegatron::faithful_message_bwd2", mutates_args=())
def faithful_message_bwd2_op(gm: Tensor, gs: Optional[Tensor], P: Tensor, Q: Tensor, dst: Tensor, src: Tensor,
                             ptr: Tensor, perm: Optional[Tensor], R: Tensor, C: Tensor, b1: Tensor, W2: Tensor,
                             b2: Tensor, w: Optional[Tensor], Wc: Optional[Tensor], bc: Optional[Tensor],
                             v: Optional[Tensor], tP: Optional[Tensor], tQ: Optional[Tensor], tR: Optional[Tensor],
                             tC: Optional[Tensor], tb1: Optional[Tensor], tW2: Optional[Tensor],
                             tb2: Optional[Tensor], tw: Optional[Tensor], tWc: Optional[Tensor],
                             tbc: Optional[Tensor], tv: Optional[Tensor], activation: str, backend: str,
                             need: Sequence[bool], deterministic: bool, tp: int) -> list[Tensor]:
    """``[dgm, dgs, dP, dQ, dR, dC, db1, dW2, db2, dw, dWc, dbc, dv]``, empty where not in ``need``."""
    tangents = (tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc, tbc, tv)
    want = dict(zip(OUTPUTS, [bool(n) for n in need]))
    if backend == "triton" and tp < 0 and all(t is None for t in tangents[3:7] + tangents[8:]):
        # the kernel takes a force loss's tangents (P, Q, R, w); weight tangents go to the torch twin
        from gnnmegatron.kernels.faithful_message import faithful_message_bwd2 as launch
        res = launch(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tangents, want,
                     deterministic=deterministic)
    else:
        with torch.no_grad():
            res = faithful_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation,
                                      tangents, want, tp)
    return [res[k] if res[k] is not None else P.new_empty(0) for k in OUTPUTS]


@faithful_message_bwd2_op.register_fake
def _(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc, tbc,
      tv, activation, backend, need, deterministic, tp):
    like = [gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v]
    return [t.new_empty(t.shape) if (n and t is not None) else P.new_empty(0) for t, n in zip(like, need)]
