"""Communication of one TPEGCL block, counted with CommCounter and pinned to the analytic volume.

Coordinate block with a scalar head (``scalar_vector``), float32, inputs h, x and edge weights
requiring grad (as inside a model trained on forces). N atoms, E edges, H hidden, tp ranks,
b = 4 bytes; payload = what each rank hands to the collective (CommRecord.bytes):

forward (first order)::

    node_mlp0     all-reduce  N x H                  row-parallel [h_sl ; m_loc] W0
    node_mlp2     all-reduce  N x H                  row-parallel act(y) W2
    edge_scalars  all-reduce  E x 2                  coordinate + head scalars (E x 1 without a head)
    fwd bytes = b (2 N H + 2 E)

backward (first order)::

    block_input_h     all-reduce  N x H              dL/dh partial sums (copy_to_tp_region)
    node_mlp2_input   all-gather  N x H / tp         dL/dact(y) shards (scatter_to_tp_region)
    edge_inputs       all-reduce  E x 2              dL/d|r| and dL/dw partial sums
    scalar_vector     all-gather  H / tp             the head vector's gradient shards
    bwd bytes = b (N H + N H / tp + 2 E + H / tp)

No collective ever carries E x H elements (forward, backward or double backward).

With grouped message mixing (``message_groups``; the tpegnn presets) the message slice and
W0h's output stay on their rank: forward ``node_mlp2`` N x H + ``edge_scalars`` E x 2, backward
``block_input_h`` N x H + ``edge_inputs`` E x 2 + ``scalar_vector`` H / tp.

The faithful E_GCL twin (TPEGCLFaithful), same sizes, for the comparison::

    forward : edge_mlp2 all-reduce E x H, node_mlp0 / node_mlp2 all-reduce N x H
              fwd bytes = b (E H + 2 N H)
    backward: block_input_h all-reduce N x H, edge_inputs all-reduce E,
              message_slice and node_mlp2_input all-gathers N x H / tp
              bwd bytes = b (N H + 2 N H / tp + E)
"""

from __future__ import annotations

import pytest
import torch
from test_egnn_tp import _block_inputs

from gnnmegatron.models.egnn import edge_vectors
from gnnmegatron.parallel.testing import run_distributed

H = 16


def analytic(N: int, E: int, H: int, tp: int, b: int = 4) -> dict:
    """{(name, op, direction): (calls, bytes)} of one block's forward + first-order backward."""
    return {
        ("node_mlp0", "all_reduce", "fwd"): (1, b * N * H),
        ("node_mlp2", "all_reduce", "fwd"): (1, b * N * H),
        ("edge_scalars", "all_reduce", "fwd"): (1, b * 2 * E),
        ("block_input_h", "all_reduce", "bwd"): (1, b * N * H),
        ("node_mlp2_input", "all_gather", "bwd"): (1, b * N * H // tp),
        ("edge_inputs", "all_reduce", "bwd"): (1, b * 2 * E),
        ("scalar_vector", "all_gather", "bwd"): (1, b * H // tp),
    }


def analytic_faithful(N: int, E: int, H: int, tp: int, b: int = 4) -> dict:
    """Same for the faithful E_GCL twin (no scalar head: its direct head reads replicated a_ij)."""
    return {
        ("edge_mlp2", "all_reduce", "fwd"): (1, b * E * H),
        ("node_mlp0", "all_reduce", "fwd"): (1, b * N * H),
        ("node_mlp2", "all_reduce", "fwd"): (1, b * N * H),
        ("block_input_h", "all_reduce", "bwd"): (1, b * N * H),
        ("message_slice", "all_gather", "bwd"): (1, b * N * H // tp),
        ("node_mlp2_input", "all_gather", "bwd"): (1, b * N * H // tp),
        ("edge_inputs", "all_reduce", "bwd"): (1, b * E),
    }


def analytic_grouped(N: int, E: int, H: int, tp: int, b: int = 4) -> dict:
    """Same for the block with grouped message mixing (``message_groups``): the message slice and
    W0h's output stay on their rank, so one N x H all-reduce per direction."""
    return {
        ("node_mlp2", "all_reduce", "fwd"): (1, b * N * H),
        ("edge_scalars", "all_reduce", "fwd"): (1, b * 2 * E),
        ("block_input_h", "all_reduce", "bwd"): (1, b * N * H),
        ("edge_inputs", "all_reduce", "bwd"): (1, b * 2 * E),
        ("scalar_vector", "all_gather", "bwd"): (1, b * H // tp),
    }


def _inputs(tp, message="node_split", groups=None):
    from gnnmegatron.parallel import init_layout
    from gnnmegatron.parallel.egnn_tp import TPEGCL, TPEGCLFaithful

    torch.set_num_threads(1)
    layout = init_layout(tp=tp, groups="torch")
    block, x0, h0, ei, offset, env, sv = _block_inputs(0, hidden=H, message=message, message_groups=groups)
    block, x0, h0, offset, sv = block.float(), x0.float(), h0.float(), offset.float(), sv.float()
    twin = TPEGCL if message == "node_split" else TPEGCLFaithful
    return twin.from_egcl(block, layout), x0, h0, ei, offset, env, (sv if message == "node_split" else None)


def _forward(tpb, x0, h0, ei, offset, env, sv):
    x = x0.clone().requires_grad_(True)
    h = h0.clone().requires_grad_(True)
    svp = None if sv is None else sv.clone().requires_grad_(True)
    _, d0 = edge_vectors(x, ei, offset)
    out = tpb(h, x, ei, offset, env(d0), scalar_vector=svp)
    energy = out.h.pow(2).sum() + out.x.pow(2).sum()
    if out.edge_scalar is not None:
        energy = energy + out.edge_scalar.pow(2).sum()
    return energy, x


def _count(tp: int, message: str = "node_split", groups=None) -> dict:
    from gnnmegatron.parallel import CommCounter

    tpb, x0, h0, ei, offset, env, sv = _inputs(tp, message, groups)
    N, E = h0.shape[0], ei.shape[1]
    with CommCounter() as first:
        energy, _ = _forward(tpb, x0, h0, ei, offset, env, sv)
        energy.backward()
    with CommCounter() as double:  # conservative-force training: forces by autograd, loss on forces
        energy, x = _forward(tpb, x0, h0, ei, offset, env, sv)
        forces = -torch.autograd.grad(energy, x, create_graph=True)[0]
        (energy + forces.pow(2).sum()).backward()
    shapes = sorted({(r.name, r.op, r.direction, r.shape) for r in double.records})
    return {"N": N, "E": E, "first": first.summary(),
                "first_seconds": [r.seconds for r in first.records], "first_total_seconds": first.total_seconds(),
                "first_records": [(r.name, r.shape) for r in first.records],
                "double_numel": [int(torch.Size(r.shape).numel()) for r in double.records],
                "double_bytes": {d: double.total_bytes(direction=d) for d in ("fwd", "bwd")},
                "double_shapes": shapes}


@pytest.mark.parametrize("tp", [2, 4])
def test_block_communication_volume(tp):
    res = run_distributed(_count, tp, tp)
    for rank, r in enumerate(res):
        N, E = r["N"], r["E"]
        assert E * H not in {N * H, N * H // tp, 2 * E, E, H // tp}, "sizes must tell E x H apart"
        expected = analytic(N, E, H, tp)
        assert r["first"] == expected, (
            f"tp={tp} rank {rank} N={N} E={E} H={H}: measured {r['first']}\nexpected {expected}")
        fwd = sum(v[1] for k, v in r["first"].items() if k[2] == "fwd")
        assert fwd == 4 * (2 * N * H + 2 * E)
        # gloo collectives block: each record carries the seconds its call took
        assert all(t > 0 for t in r["first_seconds"])
        assert r["first_total_seconds"] == pytest.approx(sum(r["first_seconds"]))
        # double backward: still node-sized or edge-scalar-sized only
        assert r["double_numel"], "double backward recorded nothing"
        assert all(n != E * H and n <= max(N * H, 2 * E) for n in r["double_numel"]), (
            f"tp={tp}: a collective moved an edge-sized feature tensor: {r['double_shapes']}")


def test_faithful_block_pays_edge_sized_all_reduce():
    tp = 2
    r = run_distributed(_count, tp, tp, "faithful")[0]
    N, E = r["N"], r["E"]
    expected = analytic_faithful(N, E, H, tp)
    assert r["first"] == expected, f"N={N} E={E} H={H}: measured {r['first']}\nexpected {expected}"
    node_split_fwd = 4 * (2 * N * H + 2 * E)
    faithful_fwd = sum(v[1] for k, v in r["first"].items() if k[2] == "fwd")
    assert faithful_fwd == 4 * (E * H + 2 * N * H) > node_split_fwd


@pytest.mark.parametrize("tp", [2, 4])
def test_grouped_block_communication_volume(tp):
    """message_groups=4: one N x H all-reduce forward and one backward (half the dense block's)."""
    res = run_distributed(_count, tp, tp, "node_split", 4)
    for rank, r in enumerate(res):
        N, E = r["N"], r["E"]
        expected = analytic_grouped(N, E, H, tp)
        assert r["first"] == expected, (
            f"tp={tp} rank {rank} N={N} E={E} H={H}: measured {r['first']}\nexpected {expected}")
        assert all(n != E * H and n <= max(N * H, 2 * E) for n in r["double_numel"]), (
            f"tp={tp}: a collective moved an edge-sized feature tensor: {r['double_shapes']}")
