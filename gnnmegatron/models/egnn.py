"""EGCL: the E(n)-equivariant graph convolution block (HydraGNN's ``E_GCL``) and its stack.

One block, with ``a`` the edge features, ``w`` the edge weight (smooth envelope) and
``r_ij = x_j - x_i + S_ij @ cell`` the edge vector from receiver i to neighbour j::

    a_ij = act(W2 act(W1 [h_i ; h_j ; rbf(|r_ij|)] + b1) + b2)            edge_messages
    m_i  = (1 / message_normalizer) * sum_j w_ij a_ij                      aggregate
    x_i <- x_i + (1 / coord_normalizer) * sum_j (-r_ij / (|r_ij| + 1)) s_ij,
          s_ij = w_ij * phi_x(a_ij)                                        coord_update
    h_i <- h_i + phi_h([h_i ; m_i])     (residual; optional LayerNorm)     node_update

This is Satorras et al.'s E(n)-GNN layer as HydraGNN implements it (edge MLP with a
trailing activation, edge-level coordinate MLP whose last linear has no bias and xavier
gain 0.001, node MLP on ``[h, m]``, sum aggregation on the receiver ``edge_index[0]``),
with the scalar ``|r|^2`` edge input replaced by a K-function radial basis and every edge
term multiplied by a smooth cutoff envelope.

Edge weight: ``w_ij = envelope(|r_ij|)`` is computed once on the *input* geometry and
shared by all blocks. Coordinate updates move the atoms, so a per-block envelope on the
moved distances would let an edge that has just entered the cutoff contribute at full
strength in deeper blocks (a jump in energy). With the input-geometry weight every
contribution of edge ij, in every block, vanishes smoothly as it leaves the cutoff. The
coordinate weight ``s_ij`` carries ``w_ij`` as well because ``phi_x(0) != 0``.

Periodic images: the image shift ``S_ij @ cell`` (``edge_offset``) stays fixed while the
coordinates move, so every image of an atom moves with it.

The edge computations are small separate methods with HydraGNN's parameter names
(``edge_mlp``, ``coord_mlp``, ``node_mlp``) so the fused / tensor-parallel twin in
``gnnmegatron.parallel`` can take this block's parameters by name and be compared with it.
The first edge linear's columns follow the input order: ``edge_mlp[0].weight[:, :H]`` acts
on the receiver ``h_i`` (``A`` in docs/architecture.md), ``[:, H:2H]`` on the neighbour ``h_j`` (``B``) and
``[:, 2H:]`` on the radial basis (``C``).

Variants and execution (``ModelConfig.message`` / ``ModelConfig.execution``):

* ``message="node_split"`` is the tensor-parallel-native EGNN of docs/architecture.md: ``a_ij =
  act(W1 [h_i ; h_j ; rbf_ij] + b1)`` (one linear), ``m_i = sum_j w_ij a_ij``, coordinate
  scalars ``phi_x(a_ij) = a_ij . v`` (``coord_mlp`` is one bias-free ``Linear(H, 1)``); the node
  MLP's first linear acts on ``m`` (it plays W2's role, applied per node, not per edge).
* ``execution="fused"`` runs the ``gnnmegatron.ops`` ops, with ``P = h A^T``, ``Q = h B^T`` per
  node and no [E, H] tensor (``EGCLOutput.edge_feat`` is then ``None``): node_split goes through
  ``fused_message_aggregate`` end to end, the faithful block through
  ``faithful_message_aggregate`` (the whole edge MLP, the envelope-weighted sum and the coordinate
  MLP's scalar, tile by tile, recomputed in backward and double backward), and both through
  ``edge_vector_aggregate`` for the coordinate update. Outputs and gradients equal the unfused mode
  (tests/models/test_egnn_fused.py). One exception: the faithful direct-force head reads the last
  block's ``edge_feat`` (``AtomisticModel.direct_forces``), so that block (``returns_edge_feat``,
  set by ``EGNNStack``), or a faithful block handed a ``scalar_vector``, still builds its [E, H]
  edge features, summed by ``segment_reduce``.

Shapes:
    N atoms, E directed edges, H hidden, K radial basis functions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.models.radial import build_radial_basis
from gnnmegatron.ops import (CSRPlan, csr_plan, edge_vector_aggregate, faithful_message_aggregate, fused_message_aggregate,
                             segment_reduce)

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by ``ModelConfig.activation`` name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def edge_vectors(positions: torch.Tensor, edge_index: torch.Tensor,
                 edge_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge vectors ``r_ij = x_j - x_i + offset_ij`` and their lengths (differentiable in x).

    Args:
        positions: [N, 3] atom positions (Å).
        edge_index: [2, E] int64; row 0 = receiver i (dst), row 1 = neighbour j (src).
        edge_offset: [E, 3] Cartesian image shift ``edge_shift @ cell[batch[dst]]`` (Å).

    Returns:
        (vectors [E, 3], distances [E]).
    """
    # index_select, not positions[idx]: its backward (index_add) is deterministic on CPU threads, while
    # advanced indexing's (index_put_ with accumulate) is not (runs differed by ~1e-7 at 2 threads)
    vec = positions.index_select(0, edge_index[1]) - positions.index_select(0, edge_index[0]) + edge_offset
    return vec, torch.linalg.vector_norm(vec, dim=-1)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[index[e]] += src[e]``: sums rows of ``src`` [E, ...] into [num_rows, ...]."""
    out = src.new_zeros((num_rows,) + tuple(src.shape[1:]))
    return out.index_add(0, index, src)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Block-diagonal linear map: channel group ``k`` of ``x`` times ``weight[k]^T``.

    Shapes:
        x [N, G * g], weight [G, g_out, g] -> [N, G * g_out].
    """
    G, g_out, g = weight.shape
    return torch.einsum("ngi,goi->ngo", x.reshape(x.shape[0], G, g), weight).reshape(x.shape[0], G * g_out)


class EGCLOutput(NamedTuple):
    """What one block returns.

    Attributes:
        h: [N, H] updated node features.
        x: [N, 3] updated positions (the input positions when the block does not update them).
        edge_feat: [E, H] edge features ``a_ij`` of this block (before the envelope).
        edge_vec: [E, 3] edge vectors ``r_ij`` this block saw.
        edge_scalar: [E] ``a_ij . v`` for the ``scalar_vector`` handed to the block (fused
            node_split direct-force head), else ``None``. ``edge_feat`` is ``None`` in fused
            mode (no [E, H] tensor exists), except for a faithful block that ``returns_edge_feat``.
    """

    h: torch.Tensor
    x: torch.Tensor
    edge_feat: Optional[torch.Tensor]
    edge_vec: torch.Tensor
    edge_scalar: Optional[torch.Tensor] = None


class EGCL(nn.Module):
    """One E(n)-equivariant graph convolution block (see module docstring for the equations).

    Args:
        cfg: model configuration (hidden, num_rbf, cutoff, activation, coordinate options...).
        update_coords: give this block a coordinate MLP and let it move the atoms.

    Shapes:
        h [N, H], x [N, 3], edge_index [2, E], edge_offset [E, 3], edge_weight [E]
        -> EGCLOutput(h [N, H], x [N, 3], edge_feat [E, H], edge_vec [E, 3]).
    """

    def __init__(self, cfg: ModelConfig, *, update_coords: bool):
        super().__init__()
        H, K = cfg.hidden, cfg.num_rbf
        self.hidden = H
        self.residual = cfg.residual
        self.coord_tanh = cfg.coord_tanh
        self.coords_range = cfg.coords_range
        self.coord_clamp = cfg.coord_clamp
        self.coord_normalizer = cfg.coord_normalizer
        self.message_normalizer = cfg.message_normalizer
        self.message = cfg.message
        self.fused = cfg.execution == "fused"
        self.ops_backend = cfg.ops_backend
        self.activation = cfg.activation
        self.radial = build_radial_basis(cfg.radial_basis, K, cfg.cutoff)
        if cfg.message == "faithful":
            self.edge_mlp = nn.Sequential(
                nn.Linear(2 * H + K, H), make_activation(cfg.activation),
                nn.Linear(H, H), make_activation(cfg.activation))
        else:
            self.edge_mlp = nn.Sequential(nn.Linear(2 * H + K, H), make_activation(cfg.activation))
        if update_coords:
            last = nn.Linear(H, 1, bias=False)
            last.xavier_gain = 0.001  # read by gnnmegatron.models.init (layout-independent init)
            nn.init.xavier_uniform_(last.weight, gain=last.xavier_gain)
            self.coord_mlp = nn.Sequential(nn.Linear(H, H), make_activation(cfg.activation), last) \
                if cfg.message == "faithful" else nn.Sequential(last)
        else:
            self.coord_mlp = None
        self.message_groups = cfg.message_groups
        self.node_mlp = nn.Sequential(
            nn.Linear(H if cfg.message_groups else 2 * H, H), make_activation(cfg.activation), nn.Linear(H, H))
        if cfg.message_groups:
            # block-diagonal W0m: message_groups blocks [out, in] = [H/G, H/G], nn.Linear's init
            g = H // cfg.message_groups
            self.node_mix = nn.Parameter(torch.empty(cfg.message_groups, g, g).uniform_(-g ** -0.5, g ** -0.5))
        else:
            self.node_mix = None
        self.norm = nn.LayerNorm(H) if cfg.layer_norm else None
        # fused faithful: build the [E, H] edge features anyway (a head reads them; EGNNStack sets it)
        self.returns_edge_feat = False

    @property
    def update_coords(self) -> bool:
        return self.coord_mlp is not None

    def init_spec(self, name: str, param: torch.Tensor):
        """Initialisation of this block's own parameters (``gnnmegatron.models.init``)."""
        if name == "node_mix":
            from gnnmegatron.models.init import InitSpec

            bound = param.shape[-1] ** -0.5
            return InitSpec("uniform", -bound, bound)
        return None

    def edge_messages(self, h: torch.Tensor, edge_index: torch.Tensor, rbf: torch.Tensor) -> torch.Tensor:
        """``a_ij = phi_e([h_i ; h_j ; rbf_ij])``.

        Shapes:
            h [N, H], edge_index [2, E], rbf [E, K] -> [E, H].
        """
        return self.edge_mlp(torch.cat([h.index_select(0, edge_index[0]), h.index_select(0, edge_index[1]), rbf], dim=-1))

    def aggregate(self, edge_feat: torch.Tensor, edge_weight: torch.Tensor, dst: torch.Tensor,
                  num_nodes: int, plan: CSRPlan | None = None) -> torch.Tensor:
        """``m_i = sum_j w_ij a_ij / message_normalizer`` over the edges received by i.

        Shapes:
            edge_feat [E, H], edge_weight [E], dst [E] -> [N, H].
        """
        msg = edge_feat * edge_weight.unsqueeze(-1)
        if self.fused:
            m = segment_reduce(msg, dst, num_nodes, "sum", plan=plan, backend=self.ops_backend)
        else:
            m = scatter_sum(msg, dst, num_nodes)
        return m / self.message_normalizer if self.message_normalizer != 1.0 else m

    def coord_weights(self, edge_feat: torch.Tensor | None, edge_weight: torch.Tensor,
                      raw: torch.Tensor | None = None) -> torch.Tensor:
        """Invariant per-edge scalars ``s_ij = w_ij * phi_x(a_ij)`` (tanh-squashed if configured).

        ``raw`` = ``phi_x(a_ij)`` when already computed (fused node_split: ``a_ij . v``).

        Shapes:
            edge_feat [E, H], edge_weight [E] -> [E].
        """
        s = self.coord_mlp(edge_feat).squeeze(-1) if raw is None else raw
        if self.coord_tanh:
            s = torch.tanh(s) * self.coords_range
        return s * edge_weight

    def coord_update(self, x: torch.Tensor, edge_vec: torch.Tensor, distances: torch.Tensor,
                     edge_feat: torch.Tensor | None, edge_weight: torch.Tensor, dst: torch.Tensor,
                     raw: torch.Tensor | None = None, plan: CSRPlan | None = None) -> torch.Tensor:
        """``x_i + sum_j (-r_ij / (|r_ij| + 1)) s_ij / coord_normalizer`` (equivariant).

        ``coord_clamp`` clamps each Cartesian component of each edge translation, as
        EGNN's ``clamp`` option does (this is not exactly rotation-equivariant once active).

        Shapes:
            x [N, 3], edge_vec [E, 3], distances [E], edge_feat [E, H], edge_weight [E],
            dst [E] -> [N, 3].
        """
        s = self.coord_weights(edge_feat, edge_weight, raw)
        g = -s / (distances + 1.0)
        if self.fused and self.coord_clamp is None:
            delta = edge_vector_aggregate(edge_vec, g, dst, x.shape[0], plan=plan, backend=self.ops_backend)
        else:
            trans = edge_vec * g.unsqueeze(-1)
            if self.coord_clamp is not None:
                trans = trans.clamp(-self.coord_clamp, self.coord_clamp)
            if self.fused:
                delta = segment_reduce(trans, dst, x.shape[0], "sum", plan=plan, backend=self.ops_backend)
            else:
                delta = scatter_sum(trans, dst, x.shape[0])
        if self.coord_normalizer != 1.0:
            delta = delta / self.coord_normalizer
        return x + delta

    def node_update(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``h + phi_h([h ; m])`` (or without the residual), then the optional LayerNorm.

        Shapes:
            h [N, H], m [N, H] -> [N, H].
        """
        if self.node_mix is None:
            out = self.node_mlp(torch.cat([h, m], dim=-1))
        else:
            y = self.node_mlp[0](h) + grouped_linear(m, self.node_mix)
            out = self.node_mlp[2](self.node_mlp[1](y))
        if self.residual:
            out = h + out
        if self.norm is not None:
            out = self.norm(out)
        return out

    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor,
                edge_offset: torch.Tensor, edge_weight: torch.Tensor, plan: CSRPlan | None = None,
                scalar_vector: torch.Tensor | None = None) -> EGCLOutput:
        """One block. ``plan``: CSR plan of ``edge_index[0]`` shared by the fused ops (built here
        when ``None``); ``scalar_vector`` [H]: also return ``edge_scalar = a_ij . scalar_vector``
        (the node_split direct-force head; the last block has no coordinate MLP)."""
        vec, dist = edge_vectors(x, edge_index, edge_offset)
        dst = edge_index[0]
        num_nodes = h.shape[0]
        if self.fused and plan is None:
            plan = csr_plan(dst, num_nodes)
        rbf = self.radial(dist)
        if self.fused and self.message == "node_split":
            return self._fused_node_split(h, x, edge_index, vec, dist, rbf, edge_weight, plan, scalar_vector)
        if self.fused and scalar_vector is None and not self.returns_edge_feat:
            return self._fused_faithful(h, x, edge_index, vec, dist, rbf, edge_weight, plan)
        edge_feat = self.edge_messages(h, edge_index, rbf)
        m = self.aggregate(edge_feat, edge_weight, dst, num_nodes, plan)
        if self.coord_mlp is not None:
            x = self.coord_update(x, vec, dist, edge_feat, edge_weight, dst, plan=plan)
        edge_scalar = edge_feat @ scalar_vector if scalar_vector is not None else None
        return EGCLOutput(self.node_update(h, m), x, edge_feat, vec, edge_scalar)

    def _fused_faithful(self, h, x, edge_index, vec, dist, rbf, edge_weight, plan) -> EGCLOutput:
        """The faithful block through ``faithful_message_aggregate``: P, Q per node, the rest of the edge
        MLP, the sum and the coordinate scalar tile by tile, no [E, H] tensor."""
        H = self.hidden
        lin, lin2 = self.edge_mlp[0], self.edge_mlp[2]
        P = F.linear(h, lin.weight[:, :H])
        Q = F.linear(h, lin.weight[:, H:2 * H])
        C = lin.weight[:, 2 * H:].t()
        coord = () if self.coord_mlp is None else (self.coord_mlp[0].weight, self.coord_mlp[0].bias,
                                                   self.coord_mlp[2].weight[0])
        out = faithful_message_aggregate(P, Q, edge_index, rbf, C, lin.bias, lin2.weight, lin2.bias, edge_weight,
                                         *coord, activation=self.activation, plan=plan, backend=self.ops_backend)
        m, s = out if coord else (out, None)
        if self.message_normalizer != 1.0:
            m = m / self.message_normalizer
        if self.coord_mlp is not None:
            x = self.coord_update(x, vec, dist, None, edge_weight, edge_index[0], raw=s, plan=plan)
        return EGCLOutput(self.node_update(h, m), x, None, vec, None)

    def _fused_node_split(self, h, x, edge_index, vec, dist, rbf, edge_weight, plan, scalar_vector) -> EGCLOutput:
        """node_split through ``fused_message_aggregate``: P, Q per node, no [E, H] tensor."""
        H = self.hidden
        lin = self.edge_mlp[0]
        P = F.linear(h, lin.weight[:, :H])
        Q = F.linear(h, lin.weight[:, H:2 * H])
        C = lin.weight[:, 2 * H:].t()
        v = self.coord_mlp[-1].weight[0] if self.coord_mlp is not None else scalar_vector
        out = fused_message_aggregate(P, Q, edge_index, rbf, C, lin.bias, edge_weight, v,
                                      activation=self.activation, plan=plan, backend=self.ops_backend)
        m, s = out if v is not None else (out, None)
        if self.message_normalizer != 1.0:
            m = m / self.message_normalizer
        edge_scalar = None
        if self.coord_mlp is not None:
            x = self.coord_update(x, vec, dist, None, edge_weight, edge_index[0], raw=s, plan=plan)
            if scalar_vector is not None:  # a second scalar head on a coordinate block: one more pass
                _, edge_scalar = fused_message_aggregate(P, Q, edge_index, rbf, C, lin.bias, edge_weight,
                                                         scalar_vector, activation=self.activation, plan=plan,
                                                         backend=self.ops_backend)
        else:
            edge_scalar = s
        return EGCLOutput(self.node_update(h, m), x, None, vec, edge_scalar)


class EGNNStack(nn.Module):
    """``cfg.layers`` EGCL blocks; all but the last update coordinates when ``cfg.update_coords``.

    The last block never owns a coordinate MLP: its moved coordinates would feed nothing,
    and its parameters would get no gradient (HydraGNN's EGCLStack does the same).

    Shapes:
        h [N, H], x [N, 3], edge_index [2, E], edge_offset [E, 3], edge_weight [E]
        -> EGCLOutput of the last block.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            EGCL(cfg, update_coords=cfg.update_coords and i < cfg.layers - 1) for i in range(cfg.layers))
        # the faithful direct-force head reads the last block's [E, H] edge features
        self.blocks[-1].returns_edge_feat = cfg.force_mode == "direct" and cfg.message == "faithful"

    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor,
                edge_offset: torch.Tensor, edge_weight: torch.Tensor,
                scalar_vector: torch.Tensor | None = None) -> EGCLOutput:
        """``scalar_vector`` [H] goes to the last block (see ``EGCL.forward``)."""
        out = None
        plan = csr_plan(edge_index[0], h.shape[0]) if self.blocks[0].fused else None  # one CSR plan per graph
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = block(h, x, edge_index, edge_offset, edge_weight, plan=plan,
                        scalar_vector=scalar_vector if i == last else None)
            h, x = out.h, out.x
        return out


def block_container(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The container of a model's message-passing blocks: ``model.backbone.blocks`` or ``model.blocks``.

    A ``ModuleList`` for single-device models, a ``ModuleDict`` keyed by the global block index for
    a pipeline stage (which holds only some blocks). Used by ``parallelize`` and activation
    checkpointing, so that both find the same blocks.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "blocks"):
        return backbone.blocks
    if hasattr(model, "blocks") and isinstance(model.blocks, (nn.ModuleList, nn.ModuleDict)):
        return model.blocks
    raise TypeError(f"{type(model).__name__} has neither .backbone.blocks nor .blocks")


def named_blocks(model: nn.Module) -> list[tuple[int | str, nn.Module]]:
    """``[(key, block)]`` of ``block_container(model)``: list indices or ``ModuleDict`` keys."""
    blocks = block_container(model)
    return list(blocks.items()) if isinstance(blocks, nn.ModuleDict) else list(enumerate(blocks))
