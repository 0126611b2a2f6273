"""The pipeline executor: runs a schedule's actions on one rank's stage model, first and second order.

Energy-only and direct-force training are the usual forward (``F``) and backward (``B``)
sweeps, in any schedule of ``schedules.py``. Conservative forces (``F = -dE/dx``, a force loss
trained through a double backward) need four sweeps per micro-batch; with ``y_s`` the outputs
``(h, x)`` of virtual stage ``s``, ``g`` the geometry leaves (positions, strain) that every
stage holds a copy of, and ``E`` the energy of the last stage:

1. ``F``   (0 -> S-1): ``y_s = f_s(y_{s-1}, g)``.
2. ``B1``  (S-1 -> 0): stage ``s`` receives ``c_s = dE/dy_s`` (a leaf that requires grad) and
   computes, with ``create_graph``, ``c_{s-1} = (df_s/dy_{s-1})^T c_s`` (sent back) and its
   share ``q_s = (df_s/dg)^T c_s`` of ``dE/dg`` (the last stage starts from ``E`` itself).
3. ``SYNC``: one all-reduce over the pipeline group gives ``dE/dg = sum_s q_s`` (and ``E``)
   on every stage; each stage evaluates the loss on leaves of the totals, so
   ``F = -dE/dx``, stress, the loss and ``dL/d(dE/dg)`` are known everywhere.
4. ``B2a`` (0 -> S-1): stage ``s`` backpropagates ``dL/dq_s`` (= ``dL/d(dE/dg)``) and the
   gradient of the cotangent it sent back, ``dL/dc_{s-1}`` (received from stage ``s-1``), through
   its B1 graph: parameter gradients, ``dL/dc_s`` (sent on to stage ``s+1``: ``c_s`` was computed
   there) and the first part of ``dL/dy_{s-1}``. The last stage adds ``dL/dE`` through its F graph.
5. ``B2b`` (S-1 -> 0): stage ``s`` receives ``dL/dy_s`` from stage ``s+1`` and backpropagates it
   through its F graph: parameter gradients and the rest of ``dL/dy_{s-1}``, sent back.

Stage ``s+1``'s gradient for ``y_s`` is complete only after its own ``B2a``, which needs
stage ``s``'s ``B2a`` first: hence two sweeps. The geometry leaves are per stage, so each
stage's edge weights and offsets are differentiated where they are used and only node-sized
tensors ever cross a stage. Every micro-batch's F and B1 graphs stay alive until its B2b
(GPipe memory); the result equals the single-device model to rounding (tests, float64).

Loss normalisation: the caller's ``loss_fn(out, batch)`` is evaluated per micro-batch and the
losses are summed; normalising each by the whole step's counts (``gnnmegatron.training.losses``)
makes the sum the loss of one big batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gnnmegatron.models.potential import stress_and_forces

from ..layout import ParallelLayout
from .p2p import Channels, tag_of
from .schedules import Action, Schedule, build_schedule
from .stage import PipelineStageModel

__all__ = ["PipelineEngine", "StepResult"]

LossFn = Callable[[dict, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    """What a pipeline step returns.

    Attributes:
        loss: sum of the micro-batch losses (a float64 tensor) on the ranks that know it (the
            last stage; every stage under conservative forces), else None.
        parts: summed detached loss terms (same ranks).
        outputs: per micro-batch, detached outputs known on this rank: the last stage has
            ``energy``/``node_energy`` (and direct forces); under conservative forces every
            stage has ``energy``, ``forces`` and ``stress``; other ranks get empty dicts.
    """

    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class _MB:
    """One micro-batch's state on this rank."""

    batch: Mapping[str, torch.Tensor]
    geom: Any = None
    plan: Any = None
    inputs: dict = field(default_factory=dict)    # chunk -> (h_in, x_in) leaves
    outputs: dict = field(default_factory=dict)   # chunk -> (h_out, x_out) or head dict
    cot_recv: dict = field(default_factory=dict)  # chunk -> (ch, cx) received cotangent leaves
    cot_sent: dict = field(default_factory=dict)  # chunk -> (dh_in, dx_in) graph tensors (B1)
    shares: dict = field(default_factory=dict)    # chunk -> [dE/dg_j] graph tensors (B1)
    loss: torch.Tensor | None = None
    totals: dict = field(default_factory=dict)    # SYNC: gradients of the loss w.r.t. E and dE/dg


class PipelineEngine:
    """Runs pipeline steps for one rank.

    Args:
        model: this rank's ``PipelineStageModel``.
        layout: the parallel layout (its ``pp_group``; tensor parallelism inside the stage is the
            model's business).
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"`` for energy-only and direct-force steps;
            conservative forces always run the conservative GPipe schedule.
        autocast_dtype: run the stage's forward under ``torch.autocast`` with this dtype
            (``torch.bfloat16``); outputs and boundary tensors are cast back to ``dtype``.
        dtype: parameter dtype; the dtype of every tensor crossing a stage and of the outputs.
    """

    def __init__(self, model: PipelineStageModel, layout: ParallelLayout, schedule: str = "1f1b",
                 autocast_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None):
        self.model = model
        self.layout = layout
        self.p = layout.pp
        self.S = model.num_stages
        self.v = self.S // self.p
        self.schedule_name = schedule
        self.autocast_dtype = autocast_dtype
        self.dtype = dtype or next(model.parameters()).dtype
        self.hidden = model.cfg.hidden
        self.chunks = {c.chunk: c for c in model.chunks}
        self.channels = Channels.build(layout, ring=self.v > 1)
        self._schedules: dict[tuple, Schedule] = {}
        self.device = next(model.parameters()).device
        self.profile = False
        self.trace: list[tuple[str, int, int, float, float, float]] = []
        """With ``profile = True``: per action (sweep, chunk, micro-batch, start, seconds blocked in
        receives, end), ``time.perf_counter`` seconds (benchmarks: busy = end - start - blocked)."""
        self._waited = 0.0

    # ---------------------------------------------------------------------------- helpers
    def schedule(self, m: int, conservative: bool) -> Schedule:
        key = (m, conservative)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(self.schedule_name, self.p, m, self.v, conservative=conservative)
        return self._schedules[key]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _stage(self, chunk: int) -> int:
        return chunk * self.p + self.layout.pp_rank

    def _send(self, tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], direction: str,
              sweep: str, stage: int, mb: int) -> None:
        parts = [torch.zeros_like(ref) if t is None else t.detach() for t, ref in zip(tensors, like)]
        flat = torch.cat([t.to(self.dtype).reshape(t.shape[0], -1) for t in parts], dim=-1)
        dst = (stage + 1) % self.p if direction == "fwd" else (stage - 1) % self.p
        self.channels.send(flat, direction, dst, tag_of(sweep, stage, mb))

    def _recv(self, n: int, direction: str, sweep: str, stage: int, mb: int, requires_grad: bool):
        src_stage = stage - 1 if direction == "fwd" else stage + 1
        t0 = time.perf_counter() if self.profile else 0.0
        flat = self.channels.recv((n, self.hidden + 3), self.dtype, self.device, direction, src_stage % self.p,
                                  tag_of(sweep, src_stage, mb))
        if self.profile:
            self._waited += time.perf_counter() - t0
        h, x = flat[:, :self.hidden].clone(), flat[:, self.hidden:].clone()
        return h.requires_grad_(requires_grad), x.requires_grad_(requires_grad)

    def _prepare(self, st: _MB, positions_grad: bool, stress: bool) -> None:
        if st.geom is None:
            st.geom = self.model.geometry(st.batch, positions_grad, stress)
            st.plan = self.model.plan(st.batch)

    def _to_dtype(self, out: dict) -> dict:
        return {k: (v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}

    # ---------------------------------------------------------------------------- sweeps
    def _forward(self, st: _MB, chunk: int, mb: int, direct: bool, grad: bool) -> None:
        spec = self.chunks[chunk]
        stage = self._stage(chunk)
        n = st.batch["atomic_numbers"].shape[0]
        h = x = None
        if not spec.first:
            h, x = self._recv(n, "fwd", "F", stage, mb, requires_grad=grad)
            st.inputs[chunk] = (h, x)
        with self._autocast():
            out = self.model.chunk_forward(spec, st.batch, st.geom, st.plan, h, x, direct)
        if spec.last:
            st.outputs[chunk] = self._to_dtype(out)
        else:
            h_out, x_out = out[0].to(self.dtype), out[1].to(self.dtype)
            st.outputs[chunk] = (h_out, x_out)
            self._send((h_out, x_out), (h_out, x_out), "fwd", "F", stage, mb)

    def _backward(self, st: _MB, chunk: int, mb: int) -> None:
        """First-order backward of one chunk (energy-only and direct forces)."""
        spec = self.chunks[chunk]
        stage = self._stage(chunk)
        if spec.last:
            st.loss.backward()
        else:
            n = st.batch["atomic_numbers"].shape[0]
            gh, gx = self._recv(n, "bwd", "B", stage, mb, requires_grad=False)
            _backward(st.outputs[chunk], (gh, gx), retain=False)
        if not spec.first:
            h, x = st.inputs[chunk]
            self._send((h.grad, x.grad), (h, x), "bwd", "B", stage, mb)
        st.inputs.pop(chunk, None)
        st.outputs.pop(chunk, None)

    def _b1(self, st: _MB, chunk: int, mb: int, create_graph: bool) -> None:
        """Force pass of one chunk: cotangent of its inputs (sent back) and its share of dE/dg."""
        spec = self.chunks[chunk]
        stage = self._stage(chunk)
        if spec.last:
            outputs, cots = [st.outputs[chunk]["energy"].sum()], None
        else:
            n = st.batch["atomic_numbers"].shape[0]
            ch, cx = self._recv(n, "bwd", "B1", stage, mb, requires_grad=create_graph)
            st.cot_recv[chunk] = (ch, cx)
            outputs, cots = list(st.outputs[chunk]), [ch, cx]
        inputs = ([] if spec.first else list(st.inputs[chunk])) + list(st.geom.inputs)
        grads = _grad(outputs, inputs, cots, create_graph)
        if not spec.first:
            st.cot_sent[chunk] = grads[:2]
            h, x = st.inputs[chunk]
            self._send(grads[:2], (h, x), "bwd", "B1", stage, mb)
            grads = grads[2:]
        st.shares[chunk] = grads

    def _b2a(self, st: _MB, chunk: int, mb: int) -> None:
        spec = self.chunks[chunk]
        stage = self._stage(chunk)
        tensors, grads = [], []
        for share, g in zip(st.shares[chunk], st.totals["geometry"]):
            tensors.append(share)
            grads.append(g)
        if not spec.first:
            n = st.batch["atomic_numbers"].shape[0]
            ah, ax = self._recv(n, "fwd", "B2a", stage, mb, requires_grad=False)
            tensors += list(st.cot_sent[chunk])
            grads += [ah, ax]
        if spec.last:
            tensors.append(st.outputs[chunk]["energy"])
            grads.append(st.totals["energy"])
        _backward(tensors, grads, retain=True)
        if not spec.last:
            ch, cx = st.cot_recv[chunk]
            self._send((ch.grad, cx.grad), (ch, cx), "fwd", "B2a", stage, mb)

    def _b2b(self, st: _MB, chunk: int, mb: int) -> None:
        spec = self.chunks[chunk]
        stage = self._stage(chunk)
        if not spec.last:
            n = st.batch["atomic_numbers"].shape[0]
            ah, ax = self._recv(n, "bwd", "B2b", stage, mb, requires_grad=False)
            _backward(st.outputs[chunk], (ah, ax), retain=True)
        if not spec.first:
            h, x = st.inputs[chunk]
            self._send((h.grad, x.grad), (h, x), "bwd", "B2b", stage, mb)

    def _sync(self, states: list[_MB], loss_fn: LossFn | None, compute_forces: bool, stress: bool,
              create_graph: bool) -> list[dict]:
        """All-reduce the dE/dg shares (and E) over the pipeline; loss and its gradients on every stage."""
        flats, sizes = [], []
        for st in states:
            g = st.geom.inputs
            total = [torch.zeros_like(t) for t in g]
            for shares in st.shares.values():
                for j, s in enumerate(shares):
                    total[j] = total[j] + s.detach()
            B = st.batch["cell"].shape[0]
            last = next((c for c, spec in self.chunks.items() if spec.last), None)
            energy = st.outputs[last]["energy"].detach() if last is not None else torch.zeros(B, dtype=self.dtype,
                                                                                               device=self.device)
            parts = [t.reshape(-1) for t in total] + [energy.reshape(-1)]
            sizes.append([t.shape for t in total] + [energy.shape])
            flats.append(torch.cat(parts))
        flat = torch.cat(flats) if flats else torch.zeros(0, dtype=self.dtype, device=self.device)
        if self.p > 1:
            dist.all_reduce(flat, group=self.layout.pp_group)
        results, offset = [], 0
        for st, shapes in zip(states, sizes):
            leaves = []
            for shape in shapes:
                k = 1
                for d in shape:
                    k *= d
                leaves.append(flat[offset:offset + k].reshape(shape).clone().requires_grad_(create_graph))
                offset += k
            energy = leaves[-1]
            out = {"energy": energy}
            out.update(stress_and_forces(leaves[:-1], st.batch, compute_forces, stress))
            results.append({k: v.detach() for k, v in out.items()})
            if loss_fn is not None and create_graph:
                loss, parts = loss_fn(out, st.batch)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
                st.totals = {"geometry": grads[:-1], "energy": grads[-1]}
                st.loss = loss.detach()
                st.totals["parts"] = parts
        return results

    # ---------------------------------------------------------------------------- public
    def train_step(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], loss_fn: LossFn, *,
                   compute_forces: bool = True, compute_stress: bool = False) -> StepResult:
        """Forward and backward of ``micro_batches`` (gradients accumulate in the parameters' ``.grad``).

        Every rank of the pipeline must pass the same micro-batches (the sampler is sharded by
        data-parallel rank only). ``loss_fn(out, batch)`` returns ``(loss, parts)``; it runs on
        the last stage (every stage for conservative forces, on the all-reduced forces).
        """
        conservative = self.model.cfg.force_mode == "conservative" and (compute_forces or compute_stress)
        if compute_stress and not conservative:
            raise ValueError("stress needs force_mode='conservative'")
        direct = compute_forces and not conservative
        sched = self.schedule(len(micro_batches), conservative)
        states = [_MB(b) for b in micro_batches]
        result = StepResult()
        self.model.train()
        try:
            for a in sched.actions[self.layout.pp_rank]:
                if self.profile:
                    t0, self._waited = time.perf_counter(), 0.0
                st = states[a.micro_batch] if a.micro_batch >= 0 else None
                if a.sweep == "F":
                    self._prepare(st, conservative and compute_forces, compute_stress)
                    self._forward(st, a.chunk, a.micro_batch, direct, grad=True)
                    spec = self.chunks[a.chunk]
                    if spec.last and not conservative:
                        out = st.outputs[a.chunk]
                        st.loss, parts = loss_fn(out, st.batch)
                        st.totals["parts"] = parts
                        st.totals["outputs"] = {k: v.detach() for k, v in out.items()}
                elif a.sweep == "B":
                    self._backward(st, a.chunk, a.micro_batch)
                elif a.sweep == "B1":
                    self._b1(st, a.chunk, a.micro_batch, create_graph=True)
                elif a.sweep == "SYNC":
                    outs = self._sync(states, loss_fn, compute_forces, compute_stress, create_graph=True)
                    result.outputs = outs
                elif a.sweep == "B2a":
                    self._b2a(st, a.chunk, a.micro_batch)
                elif a.sweep == "B2b":
                    self._b2b(st, a.chunk, a.micro_batch)
                if self.profile:
                    self.trace.append((a.sweep, a.chunk, a.micro_batch, t0, self._waited, time.perf_counter()))
            self.channels.wait_sends()
        finally:
            self.channels.wait_sends()
        losses = [st.loss for st in states if st.loss is not None]
        if losses:
            result.loss = torch.stack([l.detach().to(torch.float64) for l in losses]).sum()
            keys = states[0].totals.get("parts", {}).keys()
            result.parts = {k: sum(st.totals["parts"][k].detach().to(torch.float64) for st in states) for k in keys}
        if not conservative:
            result.outputs = [st.totals.get("outputs", {}) for st in states]
        del states
        return result

    def forward(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], *, compute_forces: bool = True,
                compute_stress: bool = False) -> list[dict[str, torch.Tensor]]:
        """Outputs of ``micro_batches`` without training (validation, inference).

        Returns:
            per micro-batch the detached outputs this rank knows: on the last stage ``energy``,
            ``node_energy`` and forces (direct or conservative) and stress; on other stages
            conservative forces and stress (empty dicts otherwise).
        """
        conservative = self.model.cfg.force_mode == "conservative" and (compute_forces or compute_stress)
        direct = compute_forces and not conservative
        m = len(micro_batches)
        states = [_MB(b) for b in micro_batches]
        self.model.eval()
        fwd = [(c, mb) for c in range(self.v) for mb in range(m)]
        try:
            with torch.set_grad_enabled(conservative):
                for c, mb in fwd:
                    self._prepare(states[mb], conservative and compute_forces, compute_stress)
                    self._forward(states[mb], c, mb, direct, grad=conservative)
                if conservative:
                    for c, mb in reversed(fwd):
                        self._b1(states[mb], c, mb, create_graph=False)
                    synced = self._sync(states, None, compute_forces, compute_stress, create_graph=False)
            self.channels.wait_sends()
        finally:
            self.channels.wait_sends()
        outs = []
        last = next((c for c, spec in self.chunks.items() if spec.last), None)
        for k, st in enumerate(states):
            o = {} if last is None else {key: v.detach() for key, v in st.outputs[last].items()}
            if conservative:  # forces, stress (and the energy) are known on every stage after the sync
                o.update(synced[k])
            outs.append(o)
        return outs


def _grad(outputs, inputs, grad_outputs, create_graph: bool) -> list[torch.Tensor]:
    """``autograd.grad`` with zeros for inputs that the outputs do not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs or [None] * len(outputs)) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    outs = [o for o, _ in pairs]
    gos = None if grad_outputs is None else [g for _, g in pairs]
    # retain: the chunks of one rank share the micro-batch's geometry graph (freed with the state)
    grads = torch.autograd.grad(outs, inputs, gos, create_graph=create_graph, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _backward(tensors, grads, retain: bool) -> None:
    """``torch.autograd.backward`` over the tensors that have a graph (others contribute nothing)."""
    pairs = [(t, g) for t, g in zip(tensors, grads) if t is not None and t.requires_grad and g is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs], retain_graph=retain)
