"""Named model sizes: small CPU presets and the scaling study's width x depth grid.

* ``egnn-tiny`` / ``egnn-small`` / ``egnn-base``: H = 32 / 64 / 128, L = 2 / 3 / 4, for CPU
  demos and tests.
* Study grid (Li et al. 2025): ``egnn-h{H}-l{L}`` for H in 800, 1100, 1700, 2500, 5400
  and L in 3..6; the large end H = 10000 at L in 3..6; depth series L in 10, 15, 20, 25,
  30 at H = 800, 2500, 10000 (``egnn-h10000-l30`` has about 2.1e10 parameters).

* The TP-native EGNN family ``tpegnn-*``: ``message="node_split"`` with grouped message mixing
  (``message_groups``), the model whose tensor-parallel block moves only node-sized tensors and
  one N x H all-reduce per direction (``gnnmegatron.parallel.egnn_tp``): ``tpegnn-small`` (H 256,
  L 4, 8 groups), ``-base`` (512, 6, 16), ``-large`` (1024, 12, 16), ``-xl`` (2048, 24, 32) and
  ``-1b`` (4096, 16, 32; about 1.1e9 parameters). tp must divide the group count.

Parameter counts build the model on ``torch.device("meta")`` (no memory, instant even for
tens of billions of parameters). FLOPs are analytic (see ``forward_flops``).
"""

from __future__ import annotations

import dataclasses
import difflib

import torch

from gnnmegatron.models.config import ModelConfig, ModelConfigError
from gnnmegatron.models.potential import AtomisticModel

SMALL_PRESETS = {"egnn-tiny": (32, 2), "egnn-small": (64, 3), "egnn-base": (128, 4)}
STUDY_HIDDEN = (800, 1100, 1700, 2500, 5400)
STUDY_LAYERS = (3, 4, 5, 6)
LARGE_HIDDEN = (10000,)
DEEP_HIDDEN = (800, 2500, 10000)
DEEP_LAYERS = (10, 15, 20, 25, 30)


def preset_name(hidden: int, layers: int) -> str:
    """Grid naming: ``egnn-h{hidden}-l{layers}``."""
    return f"egnn-h{hidden}-l{layers}"


def _grid() -> list[tuple[int, int]]:
    pairs = [(h, l) for h in STUDY_HIDDEN + LARGE_HIDDEN for l in STUDY_LAYERS]
    pairs += [(h, l) for h in DEEP_HIDDEN for l in DEEP_LAYERS]
    return pairs


STUDY_GRID: list[str] = [preset_name(h, l) for h, l in _grid()]
"""Names of the scaling-study presets, width-major."""

TP_NATIVE_PRESETS = {"tpegnn-small": (256, 4, 8), "tpegnn-base": (512, 6, 16), "tpegnn-large": (1024, 12, 16),
                     "tpegnn-xl": (2048, 24, 32), "tpegnn-1b": (4096, 16, 32)}
"""The TP-native EGNN family: name -> (hidden, layers, message_groups)."""

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(hidden=h, layers=l) for name, (h, l) in SMALL_PRESETS.items()}
PRESETS.update({preset_name(h, l): ModelConfig(hidden=h, layers=l) for h, l in _grid()})
PRESETS.update({name: ModelConfig(hidden=h, layers=l, message="node_split", message_groups=g)
                for name, (h, l, g) in TP_NATIVE_PRESETS.items()})


class PresetNotFoundError(KeyError):
    """``get_preset`` was given a name that is not in ``PRESETS``."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def list_presets() -> list[str]:
    """All preset names: the small ones, the study grid, then the TP-native family."""
    return list(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset ``name`` with ``overrides`` applied (and validated).

    Raises:
        PresetNotFoundError: unknown name; the message lists the closest names.
        ModelConfigError: unknown override field or invalid value.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=6, cutoff=0.6)
        hint = f"closest: {close}" if close else f"small ones: {list(SMALL_PRESETS)}, study grid like {STUDY_GRID[0]!r}"
        raise PresetNotFoundError(f"unknown model preset {name!r} ({hint}); "
                                  f"`gnnmegatron model info --list` shows all {len(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelConfigError(f"unknown ModelConfig field(s) {unknown} in overrides of preset {name!r}; "
                               f"valid fields are {sorted(known)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def count_parameters(cfg: ModelConfig | str) -> dict:
    """Parameter counts of ``AtomisticModel(cfg)``, built on the meta device (no memory).

    Returns:
        dict(total, non_embedding (total minus the embedding table), embedding,
        per_block (list, one count per EGCL block; the last block has no coordinate MLP),
        heads (energy and, in direct mode, force head)).
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    with torch.device("meta"):
        model = AtomisticModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embedding.weight.numel()
    per_block = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    return dict(total=total, non_embedding=total - embedding, embedding=embedding,
                per_block=per_block, heads=total - embedding - sum(per_block))


def forward_flops(cfg: ModelConfig) -> dict[str, int]:
    """Analytic matmul FLOPs of one forward pass (energies only), per atom and per edge.

    A linear layer with ``i`` inputs and ``o`` outputs costs ``2 i o`` FLOPs per row
    (multiply + add); bias adds, activations, the radial basis, gathers and scatter-sums
    are memory-bound and not counted. With H hidden, K radial functions, L blocks,
    L_x = L - 1 blocks with a coordinate MLP (0 if ``update_coords`` is off)::

        per_edge = L (2 (2H + K) H + 2 H^2) + L_x (2 H^2 + 2 H) + [direct] (2 H^2 + 2 H) + 18
        per_atom = L (2 (2H) H + 2 H^2) + (2 H^2 + 2 H)           # node MLPs + energy head

    (the 18 is the image offset ``edge_shift @ cell``, a 1x3 by 3x3 product per edge),
    i.e. about (6 + 2 L_x/L) L H^2 per edge and 6 L H^2 per atom; with 20-60 edges per
    atom the edge MLPs dominate. For ``message="node_split"`` the node-split formulation is
    counted: per edge ``L 2 K H + L_x 2 H (+ 2 H direct) + 18``, per atom
    ``L (4 H^2 + 4 H^2 + 2 H^2) + 2 H^2 + 2 H`` (P and Q, then the node MLP; with
    ``message_groups = G`` the node MLP's first linear costs ``2 H^2 + 2 H^2 / G``). ``torch.utils.flop_counter.FlopCounterMode`` reproduces
    these numbers exactly (tests/models/test_presets.py).
    """
    H, K, L = cfg.hidden, cfg.num_rbf, cfg.layers
    if cfg.message == "node_split":
        # counted as the node-split formulation (what execution="fused" runs): P, Q = h [A, B]^T
        # per atom; per edge only the radial product R C and the scalar heads a . v
        per_edge = L * 2 * K * H + cfg.coord_blocks * 2 * H + 18
        if cfg.force_mode == "direct":
            per_edge += 2 * H
        # node MLP's first linear: W0 on [h ; m] (2 (2H) H), or W0h h + grouped W0m m (2 H^2 + 2 H^2 / G)
        node0 = 2 * 2 * H * H if not cfg.message_groups else 2 * H * H + 2 * H * (H // cfg.message_groups)
        per_atom = L * (2 * 2 * H * H + node0 + 2 * H * H) + 2 * H * H + 2 * H
        return dict(per_atom=per_atom, per_edge=per_edge)
    per_edge = L * (2 * (2 * H + K) * H + 2 * H * H) + cfg.coord_blocks * (2 * H * H + 2 * H) + 18
    if cfg.force_mode == "direct":
        per_edge += 2 * H * H + 2 * H
    per_atom = L * (2 * 2 * H * H + 2 * H * H) + 2 * H * H + 2 * H
    return dict(per_atom=per_atom, per_edge=per_edge)


def flops_per_step(cfg: ModelConfig, num_atoms: int, num_edges: int, conservative: bool | None = None,
                   training: bool = True) -> float:
    """Analytic matmul FLOPs of one step on a batch of ``num_atoms`` atoms and ``num_edges`` edges.

    With ``F = per_atom * num_atoms + per_edge * num_edges`` (``forward_flops``), every
    matmul's backward costs two matmuls (input grad + weight grad) and a backward that only
    needs input grads costs one::

        inference, direct forces          1 F
        inference, conservative forces    2 F   (forward + input-grad backward for -dE/dx)
        training,  direct forces          3 F   (forward + full backward)
        training,  conservative forces    6 F   (F + F for forces, then the loss backward
                                                 through both graphs: 2 F + 2 F)

    Args:
        cfg: model configuration.
        num_atoms, num_edges: batch size in atoms and directed edges.
        conservative: forces by autograd; ``None`` takes ``cfg.force_mode``.
        training: count the parameter-gradient backward as well.
    """
    if conservative is None:
        conservative = cfg.force_mode == "conservative"
    f = forward_flops(cfg)
    forward = float(f["per_atom"]) * num_atoms + float(f["per_edge"]) * num_edges
    factor = {(False, False): 1, (True, False): 2, (False, True): 3, (True, True): 6}[(bool(conservative),
                                                                                       bool(training))]
    return factor * forward


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _human(n: float, suffixes: tuple[str, ...] = ("T", "G", "M", "k")) -> str:
    for div, suffix in zip((1e12, 1e9, 1e6, 1e3), suffixes):
        if abs(n) >= div:
            return _num(n / div) + suffix
    return _num(n)


def _gib(num_bytes: float) -> str:
    return f"{_num(num_bytes / 2**30)} GiB" if num_bytes >= 2**30 else f"{_num(num_bytes / 2**20)} MiB"


def preset_info(name: str) -> dict:
    """One row of ``format_preset_table`` as numbers (params, weight bytes, forward FLOPs)."""
    cfg = get_preset(name)
    counts = count_parameters(cfg)
    flops = forward_flops(cfg)
    return dict(preset=name, hidden=cfg.hidden, layers=cfg.layers, params=counts["total"],
                non_embedding=counts["non_embedding"], fp32_bytes=4 * counts["total"],
                bf16_bytes=2 * counts["total"], fwd_flops_per_atom=flops["per_atom"],
                fwd_flops_per_edge=flops["per_edge"])


def format_preset_table(names: list[str] | None = None) -> str:
    """Text table for ``gnnmegatron model info [PRESET ...]`` (all presets when ``names`` is None).

    Columns: preset, hidden, layers, parameters (total / without the embedding table),
    weight memory in fp32 and bf16 (weights only, no gradients or optimizer state),
    forward matmul FLOPs per atom and per edge (``forward_flops``; a training step with
    conservative forces costs about 6x the forward, see ``flops_per_step``).
    """
    names = list(PRESETS) if names is None else list(names)
    header = ("preset", "hidden", "layers", "params", "non-emb", "fp32", "bf16", "fwd FLOP/atom", "fwd FLOP/edge")
    rows = [header]
    for name in names:
        r = preset_info(name)
        params = ("T", "B", "M", "k")
        rows.append((name, str(r["hidden"]), str(r["layers"]), _human(r["params"], params),
                     _human(r["non_embedding"], params),
                     _gib(r["fp32_bytes"]), _gib(r["bf16_bytes"]), _human(r["fwd_flops_per_atom"]),
                     _human(r["fwd_flops_per_edge"])))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
