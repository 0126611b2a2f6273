"""A model of your own built from gnnmegatron's blocks, run tensor-parallel, checked against one device.

    torchrun --standalone --nproc_per_node=2 scripts/custom_tp_model.py [--hidden 64] [--groups 4]

``MyPotential`` is not gnnmegatron's ``AtomisticModel``: its own species embedding, a stack of
``EGCL`` blocks (the TP-native node_split form, grouped message mixing), a different readout (an
MLP on the concatenated outputs of every block, summed over atoms) and forces by autograd. To make
it tensor-parallel, only the message-passing blocks change: each ``EGCL`` becomes its
``TPEGCL`` twin (``TPEGCL.from_egcl``, same global weights, this rank's H/tp slice); embedding and
readout stay replicated. The script builds the model on every rank from the same seed, keeps a
single-device copy, and compares energy, forces and every gradient of an energy + force loss
(a double backward) between the two. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from gnnmegatron.data.batch import collate
from gnnmegatron.models import AtomisticModel, ModelConfig
from gnnmegatron.models.egnn import EGCL, edge_vectors
from gnnmegatron.models.radial import PolynomialEnvelope
from gnnmegatron.parallel import destroy_layout, init_layout
from gnnmegatron.parallel.egnn_tp import TPEGCL


class MyPotential(nn.Module):
    """Embedding -> EGCL blocks -> MLP on all blocks' features (jumping knowledge) -> sum over atoms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden
        self.embed = nn.Embedding(cfg.max_z + 1, H)
        self.envelope = PolynomialEnvelope(cfg.cutoff, cfg.envelope_exponent)
        self.blocks = nn.ModuleList(EGCL(cfg, update_coords=i < cfg.layers - 1) for i in range(cfg.layers))
        self.readout = nn.Sequential(nn.Linear(cfg.layers * H, H), nn.SiLU(), nn.Linear(H, 1))

    def forward(self, batch: dict) -> dict:
        pos = batch["positions"].requires_grad_(True)
        ei = batch["edge_index"]
        offset = AtomisticModel.edge_offsets(ei, batch["edge_shift"], batch["cell"], batch["batch"])
        _, dist_ij = edge_vectors(pos, ei, offset)
        w = self.envelope(dist_ij)
        h, x, feats = self.embed(batch["atomic_numbers"]), pos, []
        for block in self.blocks:
            out = block(h, x, ei, offset, w)
            h, x = out.h, out.x
            feats.append(h)
        energy = self.readout(torch.cat(feats, dim=-1)).sum()
        forces = -torch.autograd.grad(energy, pos, create_graph=self.training)[0]
        return {"energy": energy, "forces": forces}


def tensor_parallel(model: MyPotential, layout) -> MyPotential:
    """Swap each block for its tensor-parallel twin, in place (weights from the single-device blocks)."""
    model.blocks = nn.ModuleList(TPEGCL.from_egcl(b, layout) for b in model.blocks)
    return model


def full_grads(model: MyPotential) -> dict[str, torch.Tensor]:
    """Gradients under single-device names: replicated parameters as they are, blocks gathered."""
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("blocks.")}
    for i, block in enumerate(model.blocks):
        grads.update({f"blocks.{i}.{k}": v for k, v in block.full_grads().items()})
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4, help="message_groups (tp must divide it); 0: dense")
    args = parser.parse_args()

    device = torch.device("cpu")
    if torch.cuda.is_available():  # one GPU per rank, NCCL
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(1)
    layout = init_layout(tp=dist.get_world_size())
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=1)
    batch = collate([{"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell[:],
                      "pbc": atoms.pbc}], cutoff=4.5, dtype=torch.float64)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    torch.manual_seed(0)  # same weights on every rank
    cfg = ModelConfig(hidden=args.hidden, layers=args.layers, num_rbf=8, cutoff=4.5, message="node_split",
                      message_groups=args.groups or None)
    single = MyPotential(cfg).double().to(device)
    parallel = tensor_parallel(copy.deepcopy(single), layout)

    results = {}
    for name, model in (("single", single), ("parallel", parallel)):
        b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = model(b)
        loss = out["energy"] ** 2 / 100 + out["forces"].pow(2).sum()
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()} if name == "single" else full_grads(model)
        results[name] = (out, grads)

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    (o1, g1), (o2, g2) = results["single"], results["parallel"]
    worst = max([(rel(o2[k].detach(), o1[k].detach()), k) for k in o1]
                + [(rel(g2[k], g1[k]), f"grad {k}") for k in g1])
    if dist.get_rank() == 0:
        print(f"tp={layout.tp}: energy {o2['energy'].item():.6f} eV (single device {o1['energy'].item():.6f}); "
              f"{len(g1)} gradients; max relative difference {worst[0]:.2e} ({worst[1]})", flush=True)
    assert set(g1) == set(g2), sorted(set(g1) ^ set(g2))
    assert worst[0] < 1e-10, f"tensor-parallel model differs from the single-device one: {worst}"
    # Every rank is done with every group before any is torn down, and the layout's groups go before
    # the default one: a gloo group destroyed while its peer still uses it (or left to the interpreter's
    # exit) can abort the process ("terminate called without an active exception").
    dist.barrier()
    destroy_layout(layout)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
