"""Tensor-parallel EGNN blocks: ``TPEGCL`` (node_split, node-granularity comm), ``TPEGCLFaithful`` and
``TPEGCLFaithfulFused`` (the faithful E_GCL, unfused and fused).

``TPEGCL`` is the tensor-parallel twin of the node_split ``EGCL`` (docs/architecture.md, "Message passing
at node granularity"); ``TPEGCLFaithful`` is the faithful E_GCL's twin, kept to measure what
node granularity saves (it all-reduces an ``[E, H]`` tensor per block).

Every rank holds ``H / tp`` of the block's hidden units (slice ``sl`` = this rank's contiguous
chunk). With ``W1 = [A, B, C]`` the first edge linear (``edge_mlp[0]``), ``v`` the coordinate
vector (``coord_mlp[0]``), ``W0 = [W0h, W0m]`` the node MLP's first linear acting on ``[h ; m]``
and ``W2`` its second linear, one block is::

    h_tp = copy_to_tp_region(h)                                    fwd -,          bwd all-reduce N x H
    d_tp, w_tp = copy_to_tp_region([|r_ij| ; w_ij])                fwd -,          bwd all-reduce E x 2
    P, Q = h_tp A[sl]^T, h_tp B[sl]^T                              column-parallel GEMMs, no comm
    m_loc, s_loc = fused_message_aggregate(P, Q, rbf(d_tp) C[sl]^T + b[sl], w_tp, v[sl])   no comm
    s = all_reduce_sum_scalars(s_loc)                              fwd all-reduce E (E x 2 with a
                                                                   scalar head), bwd -
    x <- x + sum_j (-r_ij / (|r_ij| + 1)) s_ij w_ij                replicated (E x 3 work)
    y = reduce_from([h_tp[:, sl] ; m_loc] [W0h[:, sl] ; W0m[:, sl]]^T) + b0
                                                                   row-parallel, fwd all-reduce N x H
    u = reduce_from(scatter(act(y)) W2[:, sl]^T) + b2              row-parallel, fwd all-reduce N x H,
                                                                   bwd all-gather of N x H/tp shards
    h <- norm(h + u)                                               replicated

With grouped message mixing (``ModelConfig.message_groups = G``, tp dividing G; the tpegnn
presets) the node MLP's first linear is ``W0h h + blockdiag(W0m_1..W0m_G) m``, and this rank's
message columns only feed this rank's output columns::

    y_sl = h_tp W0h[sl]^T + b0[sl] + grouped(m_loc, W0m blocks of sl)  column-parallel + local, no comm
    u = reduce_from(act(y_sl) W2[:, sl]^T) + b2                    row-parallel, fwd all-reduce N x H

so a block moves one ``N x H`` all-reduce forward (``node_mlp2``) and one backward
(``block_input_h``, shared by P, Q and W0h), plus the E-scalar traffic — as a transformer's
attention sub-layer: 2 NH elements per block instead of the dense node MLP's 3 NH + NH/tp.

Sums over edges commute with the feature split, so ``m_loc`` is exactly this rank's columns of
the single-device ``m``; ``s_loc`` is a partial dot product, completed by an all-reduce of E
scalars. No collective moves an ``[E, H]`` tensor (``[E]`` and ``[E, 2]`` only): the block's
node-sized traffic is two all-reduces of ``N x H`` forward, one all-reduce of ``N x H`` plus
one all-gather of ``N x H / tp`` shards backward, like a transformer layer.

Why ``|r_ij|`` and ``w_ij`` enter through ``copy_to_tp_region``: the radial basis and the
envelope feed every rank's slice, so their gradients are partial sums over ranks (E scalars
each), while the coordinate update's own uses of ``|r_ij|`` and ``w_ij`` are replicated and
must not be summed: those read the un-copied tensors.

The collectives are the double-backward-correct Functions of :mod:`.collectives`, so
conservative forces (``F = -dE/dx`` with ``create_graph``) and a force loss train exactly.

Measured with ``CommCounter`` (payload bytes per rank, fp32, one coordinate block, forward +
first-order backward; Cu fcc 4x4x4, N=256, E=4608, H=128, tp=2): node_split forward 280,576 B
(= 4 (2NH + E)), backward 233,472 B (= 4 (NH + NH/tp + 2E)); faithful forward 2,621,440 B
(= 4 (EH + 2NH), 9.3x more), backward 280,576 B. tests/parallel/test_comm_volume.py pins the
formulas.

Shapes:
    N atoms, E directed edges, H hidden, K radial basis functions, tp ranks in the TP group.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gnnmegatron.models.egnn import (
    EGCL,
    EGCLOutput,
    edge_vectors,
    grouped_linear,
    make_activation,
    scatter_sum,
)
from gnnmegatron.ops import (
    CSRPlan,
    csr_plan,
    edge_vector_aggregate,
    faithful_message_aggregate,
    fused_message_aggregate,
)

from .collectives import (
    all_gather_along_dim,
    all_reduce_sum_scalars,
    copy_to_tp_region,
    group_rank,
    scatter_to_tp_region,
)
from .layout import ParallelLayout
from .linear import ColumnParallelLinear, RowParallelLinear, shard
from .sharding import Piece, sharded_piece, whole_piece

__all__ = ["TPEGCL", "TPEGCLFaithful", "TPEGCLFaithfulFused", "deinterleave_node_weight", "interleave_node_weight"]


def interleave_node_weight(w0: torch.Tensor, tp: int) -> torch.Tensor:
    """Reorder ``W0 = [W0h | W0m]`` ([H, 2H]) so rank r's contiguous chunk is ``[W0h[:, sl_r] | W0m[:, sl_r]]``.

    Then ``RowParallelLinear`` (contiguous input-column shards) holds exactly the columns that
    act on this rank's ``[h[:, sl] ; m_loc]``.
    """
    H = w0.shape[1] // 2
    wh, wm = w0[:, :H].chunk(tp, dim=1), w0[:, H:].chunk(tp, dim=1)
    return torch.cat([torch.cat([a, b], dim=1) for a, b in zip(wh, wm)], dim=1)


def deinterleave_node_weight(w: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of :func:`interleave_node_weight`."""
    parts = [c.chunk(2, dim=1) for c in w.chunk(tp, dim=1)]
    return torch.cat([p[0] for p in parts] + [p[1] for p in parts], dim=1)


class _TPBlock(nn.Module):
    """What both TP twins share: config, replicated radial basis / norm, the row-parallel node
    MLP on ``[h[:, sl] ; m_loc]``, the coordinate update on reduced scalars, and gathering."""

    fused = True  # EGNNStack builds one CSR plan per graph and hands it to every block
    tp_sharded_parameters = ("node_mix",)  # split over the TP group; the parallel linears mark their own

    def __init__(self, egcl: EGCL, layout: ParallelLayout):
        super().__init__()
        H = egcl.hidden
        self.hidden = H
        self.local_hidden = layout.check_divisible(H, "hidden")
        self.tp = layout.tp
        self.tp_rank = layout.tp_rank
        self.tp_group = layout.tp_group
        self.message = egcl.message
        for name in ("residual", "coord_tanh", "coords_range", "coord_clamp", "coord_normalizer",
                     "message_normalizer", "ops_backend", "activation"):
            setattr(self, name, getattr(egcl, name))
        self.radial = copy.deepcopy(egcl.radial)
        self.act = make_activation(egcl.activation)
        self.edge_mlp0 = ColumnParallelLinear.from_linear(egcl.edge_mlp[0], layout, name="edge_mlp0")
        n0 = egcl.node_mlp[0]
        self.message_groups = getattr(egcl, "message_groups", None)
        if self.message_groups:
            # grouped message mixing: W0h column-parallel, this rank's blocks of W0m, W2 row-parallel
            layout.check_divisible(self.message_groups, "message_groups")
            self.node_mlp0 = ColumnParallelLinear.from_linear(n0, layout, name="node_mlp0")
            self.node_mix = nn.Parameter(shard(egcl.node_mix.detach(), 0, layout.tp_group, rank=layout.tp_rank,
                                                size=layout.tp))
        else:
            self.node_mlp0 = RowParallelLinear.from_full_weight(
                interleave_node_weight(n0.weight.detach(), layout.tp), n0.bias.detach(), layout, name="node_mlp0")
            self.node_mix = None
        self.node_mlp2 = RowParallelLinear.from_linear(egcl.node_mlp[2], layout, name="node_mlp2")
        self.norm = copy.deepcopy(egcl.norm)

    @classmethod
    def from_egcl(cls, egcl: EGCL, layout: ParallelLayout):
        """This rank's twin of a single-device ``EGCL`` (same global weights)."""
        return cls(egcl, layout)

    # ------------------------------------------------------------------ gathering
    def _full_edge(self, grad: bool) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def _edge_layers(self) -> dict[str, tuple[str, nn.Module]]:
        """{local module name: (EGCL module name, module)} of the edge-side layers (subclasses)."""
        raise NotImplementedError

    def shard_pieces(self) -> dict[str, list[Piece]]:
        """Where each local tensor sits in the single-device ``EGCL``'s state dict (keys relative to
        the block; ``gnnmegatron.parallel.sharding``). The dense node MLP's interleaved
        ``[W0h[:, sl] | W0m[:, sl]]`` weight is two pieces: columns ``sl`` and ``H + sl``."""
        H, hl, r = self.hidden, self.local_hidden, self.tp_rank
        out: dict[str, list[Piece]] = {}

        def linear(local: str, layer: nn.Module, egcl_name: str) -> None:
            for k, plist in layer.shard_pieces().items():
                out[f"{local}.{k}"] = [p.renamed(f"{egcl_name}.{p.key}") for p in plist]

        linear("edge_mlp0", self.edge_mlp0, "edge_mlp.0")
        for local, (egcl_name, layer) in self._edge_layers().items():
            if hasattr(layer, "shard_pieces"):
                linear(local, layer, egcl_name)
            else:  # replicated
                for k, t in layer.named_parameters():
                    out[f"{local}.{k}"] = [whole_piece(f"{egcl_name}.{k}", t.shape)]
        if self.node_mix is None:
            w = self.node_mlp0.weight  # [H, 2H/tp] = [W0h[:, sl] | W0m[:, sl]]
            shape = (H, 2 * H)
            out["node_mlp0.weight"] = [
                Piece("node_mlp.0.weight", shape, (slice(0, H), slice(0, hl)), (0, r * hl)),
                Piece("node_mlp.0.weight", shape, (slice(0, H), slice(hl, 2 * hl)), (0, H + r * hl)),
            ]
            assert tuple(w.shape) == (H, 2 * hl)
            out["node_mlp0.bias"] = [whole_piece("node_mlp.0.bias", self.node_mlp0.bias.shape)]
        else:
            linear("node_mlp0", self.node_mlp0, "node_mlp.0")
            out["node_mix"] = [sharded_piece("node_mix", self.node_mix.shape, 0, r, self.tp)]
        linear("node_mlp2", self.node_mlp2, "node_mlp.2")
        if self.norm is not None:
            for k, t in self.norm.named_parameters():
                out[f"norm.{k}"] = [whole_piece(f"norm.{k}", t.shape)]
        return out

    def _full(self, grad: bool) -> dict[str, torch.Tensor | None]:
        """EGCL-named full tensors (weights, or their gradients; ``None`` where no gradient)."""
        def w(layer):
            return layer.full_weight_grad() if grad else layer.full_weight()

        def b(layer):
            return layer.full_bias_grad() if grad else layer.full_bias()

        out: dict[str, torch.Tensor | None] = {}
        if self.node_mix is not None:  # EGCL's own parameter: first in its state dict
            mix = self.node_mix.grad if grad else self.node_mix.detach()
            out["node_mix"] = None if mix is None else all_gather_along_dim(mix, 0, self.tp_group, name="full_weight")
        out["edge_mlp.0.weight"] = w(self.edge_mlp0)
        out["edge_mlp.0.bias"] = b(self.edge_mlp0)
        out.update(self._full_edge(grad))
        n0 = w(self.node_mlp0)
        if self.node_mix is None:
            out["node_mlp.0.weight"] = None if n0 is None else deinterleave_node_weight(n0, self.tp)
        else:
            out["node_mlp.0.weight"] = n0
        out["node_mlp.0.bias"] = b(self.node_mlp0)
        out["node_mlp.2.weight"] = w(self.node_mlp2)
        out["node_mlp.2.bias"] = b(self.node_mlp2)
        if self.norm is not None:
            for k, p in self.norm.named_parameters():
                out[f"norm.{k}"] = (p.grad if grad else p.detach())
        return out

    def to_egcl_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device ``EGCL.state_dict()`` (full weights gathered over the TP group).

        Collective: every rank of the TP group must call it.
        """
        return {k: v.clone() for k, v in self._full(grad=False).items()}

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full-shape gradients under the EGCL's parameter names (collective, like the above)."""
        return self._full(grad=True)

    # ------------------------------------------------------------------ shared pieces
    def _node_update(self, h: torch.Tensor, h_tp: torch.Tensor, m_loc: torch.Tensor) -> torch.Tensor:
        """``norm(h + W2 act(W0 [h ; m] + b0) + b2)``: row-parallel, two N x H all-reduces.

        ``h_tp``: the block input after ``copy_to_tp_region``; ``m_loc`` [N, H/tp] this rank's
        message columns.
        """
        if self.node_mix is None:
            lo = group_rank(self.tp_group) * self.local_hidden
            y = self.node_mlp0(torch.cat([h_tp[:, lo:lo + self.local_hidden], m_loc], dim=-1))
            out = self.node_mlp2(scatter_to_tp_region(self.act(y), self.tp_group, "node_mlp2_input"))
        else:
            # grouped: y[:, sl] = h W0h[sl]^T + b0[sl] + (this rank's message groups), all local;
            # h_tp is already the copy_to_tp_region of h, so P, Q and W0h share one bwd all-reduce
            y = F.linear(h_tp, self.node_mlp0.weight, self.node_mlp0.bias) + grouped_linear(m_loc, self.node_mix)
            out = self.node_mlp2(self.act(y))
        if self.residual:
            out = h + out
        if self.norm is not None:
            out = self.norm(out)
        return out

    def _coord_update(self, x, vec, dist, raw, edge_weight, dst, plan) -> torch.Tensor:
        """``EGCL.coord_update`` on replicated per-edge scalars ``raw`` (E x 3 work)."""
        s = raw
        if self.coord_tanh:
            s = torch.tanh(s) * self.coords_range
        s = s * edge_weight
        gain = -s / (dist + 1.0)
        if self.coord_clamp is None:
            delta = edge_vector_aggregate(vec, gain, dst, x.shape[0], plan=plan, backend=self.ops_backend)
        else:
            trans = (vec * gain.unsqueeze(-1)).clamp(-self.coord_clamp, self.coord_clamp)
            delta = scatter_sum(trans, dst, x.shape[0])
        if self.coord_normalizer != 1.0:
            delta = delta / self.coord_normalizer
        return x + delta


class TPEGCL(_TPBlock):
    """Tensor-parallel node_split EGCL (see the module docstring for the plan and its traffic).

    Build it with :meth:`from_egcl`; it is a drop-in replacement for an ``EGCL`` inside
    ``EGNNStack`` (same ``forward`` signature and ``EGCLOutput``; ``edge_feat`` is ``None``:
    no ``[E, H]`` tensor exists). Input ``h`` / ``x`` are replicated over the TP group and so
    are the outputs.

    Parameters (this rank's shards):
        edge_mlp0: ``ColumnParallelLinear(2H + K, H)`` holding ``W1[sl, :]`` and ``b1[sl]``
            (used through its weight slices A, B, C, never as a dense ``[E, 2H + K]`` GEMM).
        coord_v: ``RowParallelLinear(H, 1, bias=False)`` holding ``v[sl]`` (coordinate blocks only).
        node_mlp0: ``RowParallelLinear(2H, H)`` holding ``[W0h[:, sl] | W0m[:, sl]]``, bias replicated.
        node_mlp2: ``RowParallelLinear(H, H)`` holding ``W2[:, sl]``, bias replicated.
        norm: replicated ``LayerNorm(H)`` or ``None``.

    Shapes:
        h [N, H], x [N, 3], edge_index [2, E], edge_offset [E, 3], edge_weight [E]
        -> EGCLOutput(h [N, H], x [N, 3], None, edge_vec [E, 3], edge_scalar [E] or None).
    """

    def __init__(self, egcl: EGCL, layout: ParallelLayout):
        if egcl.message != "node_split":
            raise ValueError(
                f"TPEGCL needs a message='node_split' EGCL, got message={egcl.message!r}; the faithful "
                f"E_GCL has no node-granularity TP layout (use message='node_split', or TPEGCLFaithful "
                f"for the comparison, which all-reduces E x H per block)")
        super().__init__(egcl, layout)
        self.coord_v = None
        if egcl.coord_mlp is not None:
            self.coord_v = RowParallelLinear.from_linear(egcl.coord_mlp[0], layout, name="coord_v")

    @property
    def update_coords(self) -> bool:
        return self.coord_v is not None

    def _edge_layers(self) -> dict[str, tuple[str, nn.Module]]:
        return {} if self.coord_v is None else {"coord_v": ("coord_mlp.0", self.coord_v)}

    def _full_edge(self, grad: bool) -> dict[str, torch.Tensor | None]:
        if self.coord_v is None:
            return {}
        return {"coord_mlp.0.weight": self.coord_v.full_weight_grad() if grad else self.coord_v.full_weight()}

    # ------------------------------------------------------------------ forward
    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor,
                edge_offset: torch.Tensor, edge_weight: torch.Tensor, plan: CSRPlan | None = None,
                scalar_vector: torch.Tensor | None = None) -> EGCLOutput:
        """One block; ``plan`` and ``scalar_vector`` [H] (replicated) as in ``EGCL.forward``."""
        H = self.hidden
        g = self.tp_group
        vec, dist = edge_vectors(x, edge_index, edge_offset)
        dst = edge_index[0]
        num_nodes = h.shape[0]
        if plan is None:
            plan = csr_plan(dst, num_nodes)

        # Replicated inputs entering this rank's slice: backward sums the partial gradients.
        h_tp = copy_to_tp_region(h, g, "block_input_h")
        dw_tp = copy_to_tp_region(torch.stack([dist, edge_weight], dim=-1), g, "edge_inputs")
        # contiguous: the triton launcher reads w with unit stride
        dist_tp, weight_tp = dw_tp[:, 0].contiguous(), dw_tp[:, 1].contiguous()
        rbf = self.radial(dist_tp)

        W1 = self.edge_mlp0.weight  # [H/tp, 2H + K]
        P = F.linear(h_tp, W1[:, :H])
        Q = F.linear(h_tp, W1[:, H:2 * H])
        C = W1[:, 2 * H:].t()
        vs = []
        if self.coord_v is not None:
            vs.append(self.coord_v.weight[0])
        if scalar_vector is not None:
            vs.append(scatter_to_tp_region(scalar_vector, g, "scalar_vector"))
        kw = {"activation": self.activation, "plan": plan, "backend": self.ops_backend}
        if not vs:
            m, s_loc = fused_message_aggregate(P, Q, edge_index, rbf, C, self.edge_mlp0.bias, weight_tp, **kw), None
        else:
            m, s0 = fused_message_aggregate(P, Q, edge_index, rbf, C, self.edge_mlp0.bias, weight_tp, vs[0], **kw)
            parts = [s0]
            if len(vs) == 2:  # coordinate block that also feeds a scalar head: one more pass
                parts.append(fused_message_aggregate(P, Q, edge_index, rbf, C, self.edge_mlp0.bias, weight_tp,
                                                     vs[1], **kw)[1])
            s_loc = torch.stack(parts, dim=-1)
        if self.message_normalizer != 1.0:
            m = m / self.message_normalizer

        edge_scalar = None
        if s_loc is not None:
            s_all = all_reduce_sum_scalars(s_loc, g)  # [E, 1 or 2]: the only edge-sized forward comm
            if self.coord_v is not None:
                x = self._coord_update(x, vec, dist, s_all[:, 0], edge_weight, dst, plan)
                if s_all.shape[1] == 2:
                    edge_scalar = s_all[:, 1]
            else:
                edge_scalar = s_all[:, 0]

        # Node MLP: [h_sl ; m_loc] row-parallel -> act -> row-parallel; two N x H all-reduces.
        out = self._node_update(h, h_tp, m)
        return EGCLOutput(out, x, None, vec, edge_scalar)


class TPEGCLFaithful(_TPBlock):
    """Tensor-parallel twin of the faithful E_GCL (``message="faithful"``), for the comparison.

    HydraGNN's edge MLP ``act(W2 act(W1 [h_i ; h_j ; rbf] + b1) + b2)`` has an activation after
    its second linear, so the sum over edges cannot move in front of ``W2``: with ``W1``
    column-parallel (``[E, H/tp]`` per rank) and ``W2`` row-parallel, the second edge linear's
    partial products are **all-reduced as an [E, H] tensor** in every block's forward. The
    edge features ``a_ij`` are then replicated: messages, the edge-level coordinate MLP (and a
    direct-force head on ``edge_feat``) run replicated, and the node MLP is the same
    row-parallel pair as in :class:`TPEGCL` on ``[h[:, sl] ; m[:, sl]]``.

    Traffic per block: forward one all-reduce of ``E x H`` plus two of ``N x H``; backward one
    all-reduce of ``N x H``, all-gathers of ``N x H/tp`` shards (``m`` and ``act(y)``) and an
    all-reduce of ``E`` scalars (``|r_ij|``).

    Its fused variant is :class:`TPEGCLFaithfulFused`.

    Shapes:
        as :class:`TPEGCL`, but ``edge_feat`` is the replicated [E, H] ``a_ij``.
    """

    fused_edges = False

    def __init__(self, egcl: EGCL, layout: ParallelLayout):
        if egcl.message != "faithful":
            raise ValueError(f"TPEGCLFaithful needs a message='faithful' EGCL, got {egcl.message!r}; "
                             f"use TPEGCL for node_split")
        super().__init__(egcl, layout)
        self.edge_mlp2 = RowParallelLinear.from_linear(egcl.edge_mlp[2], layout, name="edge_mlp2")
        self.coord_mlp = copy.deepcopy(egcl.coord_mlp)  # replicated: acts on replicated a_ij
        self.returns_edge_feat = bool(getattr(egcl, "returns_edge_feat", False))

    @property
    def update_coords(self) -> bool:
        return self.coord_mlp is not None

    def _edge_layers(self) -> dict[str, tuple[str, nn.Module]]:
        out = {"edge_mlp2": ("edge_mlp.2", self.edge_mlp2)}
        if self.coord_mlp is not None:
            out["coord_mlp"] = ("coord_mlp", self.coord_mlp)
        return out

    def _full_edge(self, grad: bool) -> dict[str, torch.Tensor | None]:
        out = {"edge_mlp.2.weight": self.edge_mlp2.full_weight_grad() if grad else self.edge_mlp2.full_weight(),
               "edge_mlp.2.bias": self.edge_mlp2.full_bias_grad() if grad else self.edge_mlp2.full_bias()}
        if self.coord_mlp is not None:
            for k, p in self.coord_mlp.named_parameters():
                out[f"coord_mlp.{k}"] = p.grad if grad else p.detach()
        return out

    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor,
                edge_offset: torch.Tensor, edge_weight: torch.Tensor, plan: CSRPlan | None = None,
                scalar_vector: torch.Tensor | None = None) -> EGCLOutput:
        """One block, same signature as ``EGCL.forward`` (``scalar_vector`` is unused: the
        faithful direct-force head reads the replicated ``edge_feat``)."""
        H = self.hidden
        g = self.tp_group
        vec, dist = edge_vectors(x, edge_index, edge_offset)
        dst, src = edge_index[0], edge_index[1]
        num_nodes = h.shape[0]
        h_tp = copy_to_tp_region(h, g, "block_input_h")
        rbf = self.radial(copy_to_tp_region(dist, g, "edge_inputs"))
        W1 = self.edge_mlp0.weight  # [H/tp, 2H + K]
        if self.fused_edges and scalar_vector is None and not self.returns_edge_feat:
            return self._fused_forward(h, h_tp, x, edge_index, vec, dist, rbf, edge_weight, plan)
        z = F.linear(h_tp, W1[:, :H]).index_select(0, dst) + F.linear(h_tp, W1[:, H:2 * H]).index_select(0, src) \
            + F.linear(rbf, W1[:, 2 * H:], self.edge_mlp0.bias)  # [E, H/tp]
        a = self.act(self.edge_mlp2(self.act(z)))  # all-reduce of [E, H]: the cost of the faithful layout
        m = scatter_sum(a * edge_weight.unsqueeze(-1), dst, num_nodes)
        if self.message_normalizer != 1.0:
            m = m / self.message_normalizer
        if self.coord_mlp is not None:
            x = self._coord_update(x, vec, dist, self.coord_mlp(a).squeeze(-1), edge_weight, dst, None)
        m_loc = scatter_to_tp_region(m, g, "message_slice")
        out = self._node_update(h, h_tp, m_loc)
        return EGCLOutput(out, x, a, vec, None)

    def _fused_forward(self, h, h_tp, x, edge_index, vec, dist, rbf, edge_weight, plan) -> EGCLOutput:
        """The fused twin: P, Q column-parallel per node, the edge MLP chunk by chunk with the partial
        second-layer products all-reduced inside ``faithful_message_aggregate``; m, s replicated."""
        H = self.hidden
        W1 = self.edge_mlp0.weight  # [H/tp, 2H + K]
        dst = edge_index[0]
        if plan is None:
            plan = csr_plan(dst, h.shape[0])
        coord = () if self.coord_mlp is None else (self.coord_mlp[0].weight, self.coord_mlp[0].bias,
                                                   self.coord_mlp[2].weight[0])
        out = faithful_message_aggregate(
            F.linear(h_tp, W1[:, :H]), F.linear(h_tp, W1[:, H:2 * H]), edge_index, rbf, W1[:, 2 * H:].t(),
            self.edge_mlp0.bias, self.edge_mlp2.weight, self.edge_mlp2.bias, edge_weight, *coord,
            activation=self.activation, plan=plan, backend="reference" if self.ops_backend == "reference" else "torch",
            tp_group=self.tp_group)
        m, s = out if coord else (out, None)
        if self.message_normalizer != 1.0:
            m = m / self.message_normalizer
        if self.coord_mlp is not None:
            x = self._coord_update(x, vec, dist, s, edge_weight, dst, plan)
        m_loc = scatter_to_tp_region(m, self.tp_group, "message_slice")
        return EGCLOutput(self._node_update(h, h_tp, m_loc), x, None, vec, None)


class TPEGCLFaithfulFused(TPEGCLFaithful):
    """Tensor-parallel twin of the *fused* faithful E_GCL (``faithful_message_aggregate``): the layout of
    :class:`TPEGCLFaithful` (first edge linear column-parallel and split per node, second row-parallel,
    coordinate MLP and messages replicated) with the edge MLP run chunk by chunk inside the op, which
    all-reduces each chunk's ``[chunk, H]`` partial second-layer product (``tp_group``). No ``[E, H]``
    tensor is kept for backward (``edge_feat`` is ``None``), as on one device.

    What it costs under TP: recomputing instead of keeping repeats the edge-sized all-reduce. Per block,
    first order: ``E x H`` forward (as the unfused twin) and ``E x H`` more in the backward's recompute
    (the unfused twin's backward moves no ``E x H``); a force loss (double backward) adds the force
    backward's recompute (``E x H``) and the double backward's stacked primal and tangent products
    (``2 E x H``). So it trades activation memory (``O(E H)`` -> ``O(chunk H)``) for two to three times
    the faithful twin's ``E x H`` traffic -- which ``TPEGCL`` (node_split) does not pay at all. Torch
    backend only (the collectives sit between a chunk's GEMMs); a direct-force last block
    (``returns_edge_feat``) or a ``scalar_vector`` takes the unfused path. ``parallelize`` keeps
    :class:`TPEGCLFaithful` for faithful models; build this one with :meth:`from_egcl`.
    """

    fused_edges = True
