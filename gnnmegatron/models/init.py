"""Layout-independent initialisation: the same global weights whatever rank holds which part.

A large model is built on the meta device (no memory), split into pipeline stages and
tensor-parallel shards (still on meta), and only then given memory: ``materialize`` allocates
this rank's tensors and fills each with its region of the single-device model's initial
weights. The values depend only on ``(seed, parameter name, position in the tensor)``, never
on the layout, so tp = 1, 2, 4 and any pipeline split start from the same global model.

How the global values are defined (``generate``): the tensor is seen as rows (dim 0) of
``prod(shape[1:])`` elements and cut into blocks of ``rows_per_block = max(1, 2**22 // row)``
rows; block k is drawn from its own ``torch.Generator`` seeded with a hash of
``(seed, name, k)``, in float64, then cast. A shard that covers rows ``[a, b)`` draws only the
blocks that overlap them; a column shard draws its rows block by block and keeps its columns,
so memory stays bounded by one block (32 MiB) whatever the tensor's size.

Distributions (``init_specs``, from the single-device module types; PyTorch's defaults):

* ``nn.Linear`` weight and bias: U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5));
  a linear with ``xavier_gain`` set: U(+-gain sqrt(6 / (in + out))) (EGNN's coordinate head);
* ``nn.Embedding``: N(0, 1); ``nn.LayerNorm``: weight 1, bias 0;
* a module's ``init_spec(name, tensor)`` for its own parameters (EGCL's grouped ``node_mix``);
* persistent buffers: a module's ``buffer_init`` dict of constants.

Non-persistent buffers (radial-basis constants) are recomputed by the module's
``reset_buffers()``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

__all__ = ["InitSpec", "generate", "init_specs", "materialize", "ROWS_BLOCK_ELEMENTS"]

ROWS_BLOCK_ELEMENTS = 1 << 22
"""Elements per random block (32 MiB in float64): bounds the memory of generating any tensor."""


@dataclass(frozen=True)
class InitSpec:
    """How one global tensor is initialised.

    Attributes:
        kind: ``"uniform"`` (U(a, b)), ``"normal"`` (N(a, b^2)) or ``"constant"`` (a).
        a, b: the distribution's parameters.
    """

    kind: str
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self):
        if self.kind not in ("uniform", "normal", "constant"):
            raise ValueError(f"InitSpec.kind must be uniform, normal or constant, got {self.kind!r}")


def _linear_specs(prefix: str, mod: nn.Linear) -> dict[str, InitSpec]:
    fan_in, fan_out = mod.in_features, mod.out_features
    gain = getattr(mod, "xavier_gain", None)
    if gain is not None:
        bound = gain * (6.0 / (fan_in + fan_out)) ** 0.5
    else:
        bound = 1.0 / fan_in ** 0.5 if fan_in > 0 else 0.0
    out = {f"{prefix}weight": InitSpec("uniform", -bound, bound)}
    if mod.bias is not None:
        b = 1.0 / fan_in ** 0.5 if fan_in > 0 else 0.0
        out[f"{prefix}bias"] = InitSpec("uniform", -b, b)
    return out


def init_specs(model: nn.Module) -> dict[str, InitSpec]:
    """``{state-dict name: InitSpec}`` for every parameter and persistent buffer of a single-device model.

    Works on a model built on the meta device. Raises ``ValueError`` naming any tensor whose
    initialisation is unknown (a custom module must give ``init_spec`` / ``buffer_init``).
    """
    specs: dict[str, InitSpec] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear):
            specs.update(_linear_specs(prefix, mod))
        elif isinstance(mod, nn.Embedding):
            specs[f"{prefix}weight"] = InitSpec("normal", 0.0, 1.0)
        elif isinstance(mod, nn.LayerNorm):
            if mod.weight is not None:
                specs[f"{prefix}weight"] = InitSpec("constant", 1.0)
            if mod.bias is not None:
                specs[f"{prefix}bias"] = InitSpec("constant", 0.0)
        own = getattr(mod, "init_spec", None)
        for name, p in mod.named_parameters(recurse=False):
            if own is not None and own(name, p) is not None:
                specs[f"{prefix}{name}"] = own(name, p)
        for name, value in getattr(mod, "buffer_init", {}).items():
            specs[f"{prefix}{name}"] = InitSpec("constant", float(value))
    wanted = set(model.state_dict().keys())
    missing = sorted(wanted - set(specs))
    if missing:
        raise ValueError(f"no initialisation is known for {missing[:5]}; give their module an init_spec(name, "
                         f"tensor) method (parameters) or a buffer_init dict (buffers)")
    return {k: v for k, v in specs.items() if k in wanted}


def _block_seed(seed: int, key: str, block: int) -> int:
    digest = hashlib.blake2b(f"{int(seed)}/{key}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generate(spec: InitSpec, key: str, global_shape: tuple[int, ...], seed: int,
             offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The region ``[offsets, offsets + sizes)`` of global tensor ``key`` as initialised with ``seed``.

    Drawing the region of a shard gives exactly the corresponding slice of drawing the whole
    tensor (tested), on CPU, in bounded memory.

    Shapes:
        -> ``sizes`` (default: ``global_shape``).
    """
    global_shape = tuple(int(n) for n in global_shape)
    offsets = (0,) * len(global_shape) if offsets is None else tuple(offsets)
    sizes = global_shape if sizes is None else tuple(int(n) for n in sizes)
    if any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, global_shape)):
        raise ValueError(f"region offsets={offsets} sizes={sizes} lies outside {key} of shape {global_shape}")
    if spec.kind == "constant":
        return torch.full(sizes, spec.a, dtype=dtype)
    if len(global_shape) == 0:
        global_shape, offsets, sizes, scalar = (1,), (0,), (1,), True
    else:
        scalar = False
    rows, row = global_shape[0], 1
    for n in global_shape[1:]:
        row *= n
    per_block = max(1, ROWS_BLOCK_ELEMENTS // max(row, 1))
    out = torch.empty(sizes, dtype=dtype)
    r0, r1 = offsets[0], offsets[0] + sizes[0]
    inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
    for block in range(r0 // per_block, (r1 - 1) // per_block + 1 if r1 > r0 else 0):
        b0, b1 = block * per_block, min((block + 1) * per_block, rows)
        gen = torch.Generator().manual_seed(_block_seed(seed, key, block))
        shape = (b1 - b0,) + global_shape[1:]
        if spec.kind == "uniform":
            values = torch.rand(shape, generator=gen, dtype=torch.float64).mul_(spec.b - spec.a).add_(spec.a)
        else:
            values = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(spec.b).add_(spec.a)
        lo, hi = max(b0, r0), min(b1, r1)
        out[lo - r0:hi - r0] = values[(slice(lo - b0, hi - b0),) + inner]
    return out.reshape(()) if scalar else out


@torch.no_grad()
def materialize(model: nn.Module, specs: Mapping[str, InitSpec], seed: int, *, device: torch.device | str = "cpu",
                pieces: Mapping[str, list] | None = None) -> nn.Module:
    """Gives a (meta-device) model memory on ``device`` and fills it with its part of the global init.

    Args:
        model: a model built on ``torch.device("meta")`` in its final dtype (``.to(dtype)`` on
            meta is free), possibly split into pipeline stages and tensor-parallel shards.
        specs: ``init_specs`` of the single-device model (global names).
        seed: the run's seed; equal seeds give equal global weights under every layout.
        device: where the tensors go.
        pieces: ``{local name: [Piece, ...]}`` (``gnnmegatron.parallel.sharding.local_pieces``);
            default: every tensor is its whole global tensor under its own name.

    Returns:
        ``model``, in place.
    """
    model.to_empty(device=device)
    tensors = dict(model.named_parameters())
    tensors.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tensors})
    for name, t in tensors.items():
        gen_dtype = t.dtype if t.is_floating_point() else torch.float64
        if pieces is None:
            if name not in specs:
                raise KeyError(f"{name} has no initialisation spec")
            t.copy_(generate(specs[name], name, tuple(t.shape), seed, dtype=gen_dtype).to(device))
            continue
        for p in pieces[name]:
            if p.key not in specs:
                raise KeyError(f"{name} holds part of {p.key}, which has no initialisation spec")
            values = generate(specs[p.key], p.key, p.global_shape, seed, p.offsets, p.sizes, dtype=gen_dtype)
            t[p.local].copy_(values.to(device))
    for mod in model.modules():
        reset = getattr(mod, "reset_buffers", None)
        if reset is not None:
            reset()
    return model
