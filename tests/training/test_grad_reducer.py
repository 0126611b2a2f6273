"""GradReducer: bucketed data-parallel gradient averaging overlapped with the backward (gloo, 2 ranks)."""

import torch

from gnnmegatron.parallel.testing import run_distributed


def _worker():
    import torch.distributed as dist
    from torch import nn

    from gnnmegatron.training.distributed import GradReducer, TrainGroups

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    unused = nn.Parameter(torch.zeros(3))          # no rank has a gradient for it
    lonely = nn.Parameter(torch.ones(5))           # only rank 0 has one
    params = list(model.parameters()) + [unused, lonely]
    groups = TrainGroups(tp=1, dp=2, dp_rank=rank, dp_group=dist.group.WORLD)
    reducer = GradReducer(params, groups, bucket_bytes=64 * 1024)  # several buckets
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(rank))
    launched_during_backward = []

    original = reducer._launch

    def spy(k):
        launched_during_backward.append(k)
        original(k)

    reducer._launch = spy
    reducer.arm()
    loss = model(x).pow(2).sum() + (lonely.sum() * 2 if rank == 0 else 0.0)
    loss.backward()
    during = list(launched_during_backward)
    reducer.finish()
    mine = {n: p.grad.clone() for n, p in model.named_parameters()}
    lonely_avg = None if lonely.grad is None else lonely.grad.clone()
    unused_grad = unused.grad
    # reference: the per-tensor average of the same local gradients
    model.zero_grad()
    lonely.grad = None
    x2 = x.clone()
    (model(x2).pow(2).sum() + (lonely.sum() * 2 if rank == 0 else 0.0)).backward()
    ref = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        ref[n] = g / 2
    return {"during": during, "buckets": len(reducer.buckets), "mine": mine, "ref": ref,
            "unused": unused_grad, "lonely": lonely_avg}


def test_buckets_start_during_the_backward_and_average_like_per_tensor():
    results = run_distributed(_worker, 2, timeout=120)
    for r in results:
        assert r["buckets"] > 2
        # every bucket whose parameters all got a gradient was launched by the hooks, before finish()
        assert len(r["during"]) >= r["buckets"] - 1, (r["during"], r["buckets"])
        for n, g in r["ref"].items():
            assert torch.allclose(r["mine"][n], g, rtol=1e-6, atol=1e-7), n
        assert r["unused"] is None  # no rank had a gradient: stays None for the optimizer
        assert torch.allclose(r["lonely"], torch.full((5,), 1.0))  # (2 + 0) / 2
