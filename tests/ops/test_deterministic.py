"""Deterministic mode (switch, CPU backends' run-to-run bits) and the bounded dC partial buffer.

The triton side of deterministic mode (source-sorted dQ, no autotuning) is tested in the
interpreter with shuffled program order: tests/ops/test_triton_views_determinism.py.
"""

import pytest
import torch

from gnnmegatron.ops import fused_message_aggregate, settings
from gnnmegatron.ops.dispatch import ENV_DETERMINISTIC, deterministic
from ops_cases import fused_inputs, make_graph


def test_switches(monkeypatch):
    monkeypatch.delenv(ENV_DETERMINISTIC, raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert not deterministic()
        torch.use_deterministic_algorithms(True)
        assert deterministic()
        torch.use_deterministic_algorithms(False)
        monkeypatch.setenv(ENV_DETERMINISTIC, "1")
        assert deterministic()
        monkeypatch.setenv(ENV_DETERMINISTIC, "0")
        assert not deterministic()
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_backends_are_bit_identical_from_run_to_run(backend, monkeypatch):
    """Shuffled (unsorted) edges, 2 threads, several chunks: first and second order, three runs."""
    monkeypatch.setattr(settings, "chunk_edges", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    ei, n = make_graph("hub", False, hub_edges=400)
    inputs = fused_inputs(ei.shape[1], n, 48, 8, torch.float32)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        P, Q, R, C, b, w, v = leaves
        m, s = fused_message_aggregate(P, Q, ei, R, C, b, w, v, backend=backend)
        grads = torch.autograd.grad((m ** 2).sum() + (s ** 3).sum(), leaves, create_graph=True)
        return [m, s] + list(grads) + list(torch.autograd.grad(sum((g ** 2).sum() for g in grads), leaves))

    try:
        runs = [run() for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for i, (a, e) in enumerate(zip(other, runs[0])):
            assert torch.equal(a, e), f"{backend}: output {i} differs between runs"


def test_dc_partial_buffer_is_bounded_independently_of_n(monkeypatch):
    """The backward's per-program dC partials: programs x K x F x 4 B. With one program per
    16 destinations (the old grid) they grew with N (1 GiB at N = 64k, K = 32, F = 2048); the
    persistent grid caps them at max(PARTIAL_BYTES, one program per SM)."""
    pytest.importorskip("triton")
    from gnnmegatron.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    K, F = 32, 2048
    row = K * F * 4
    sizes = {}
    for N in (100, 10_000, 65_536, 10_000_000):
        programs = _common.persistent_programs(N, cuda, partial_row_bytes=row)
        assert 1 <= programs <= N
        sizes[N] = programs * row
    assert sizes[10_000_000] == sizes[65_536], sizes  # no growth with N
    assert sizes[65_536] <= max(_common.PARTIAL_BYTES, 132 * row), sizes
    old = (65_536 // 16) * row
    assert old == 1 << 30 and sizes[65_536] <= old // 8, (old, sizes)
    # a small K x F keeps the full parallelism of PROGRAMS_PER_SM programs per SM
    assert _common.persistent_programs(10_000_000, cuda, partial_row_bytes=16 * 64 * 4) == \
        _common.PROGRAMS_PER_SM * 132


def test_gpu_launch_path_picks_audited_configs(monkeypatch):
    """TunedKernel on a GPU (faked): deterministic launches take the class's first config without
    autotuning; others autotune over exactly the audited candidates of the GPU kind (NVIDIA ones
    with maxnreg, AMD ones without)."""
    pytest.importorskip("triton")
    from gnnmegatron.kernels import _common

    launches, tuners = [], []

    class FakeJit:
        __name__ = "_fake_kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    def fake_autotune(configs, key, reset_to_zero):
        tuners.append((configs, key, reset_to_zero))
        return lambda fn: fn

    kind = {"value": "cuda"}
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "target_kind", lambda device: kind["value"])
    monkeypatch.setattr(_common.triton, "autotune", fake_autotune)
    configs = {("fp32",): _common.per_kind([_common.config(BLOCK_E=16), _common.config(BLOCK_E=32, num_warps=8)])}
    kernel = _common.TunedKernel(FakeJit(), configs, key=["F"], interpret=None, reset_to_zero=["DY"])
    x = torch.zeros(4)
    kernel.launch(("fp32",), (3,), (x, 5), {"ACC": "acc"}, deterministic=True)
    grid, args, kwargs = launches[-1]
    assert grid == (3,) and args == (x, 5) and not tuners
    assert kwargs["BLOCK_E"] == 16 and kwargs["maxnreg"] == _common.NV_MAXNREG and kwargs["ACC"] == "acc"
    kernel.launch(("fp32",), (3,), (x, 5), {"ACC": "acc"}, deterministic=False)
    assert len(tuners) == 1 and [c.kwargs["BLOCK_E"] for c in tuners[0][0]] == [16, 32]
    assert all(c.maxnreg == _common.NV_MAXNREG for c in tuners[0][0]) and tuners[0][2] == ["DY"]
    assert "BLOCK_E" not in launches[-1][2]  # the autotuner supplies the config
    kind["value"] = "hip"
    kernel.launch(("fp32",), (3,), (x, 5), {}, deterministic=True)
    assert "maxnreg" not in launches[-1][2] and launches[-1][2]["BLOCK_E"] == 16


def test_large_k_falls_back_to_torch_only_when_the_backend_was_not_asked_for(monkeypatch):
    """K > 64: the triton kernels cannot take it; a device-chosen triton becomes torch, an
    explicit one is refused by name."""
    import importlib

    module = importlib.import_module("gnnmegatron.ops.fused_message")
    monkeypatch.setattr(module, "resolve_backend", lambda backend, device: backend or "triton")  # as on a GPU
    ei, n = make_graph("ragged", True)
    P, Q, R, C, b, w, v = fused_inputs(ei.shape[1], n, 6, 70, torch.float64)
    m, s = fused_message_aggregate(P, Q, ei, R, C, b, w, v)  # chosen by device: runs the torch path
    m_ref, s_ref = fused_message_aggregate(P, Q, ei, R, C, b, w, v, backend="reference")
    assert torch.allclose(m, m_ref) and torch.allclose(s, s_ref)
    with pytest.raises(ValueError, match="K <= 64"):
        fused_message_aggregate(P, Q, ei, R, C, b, w, v, backend="triton")


def test_chunk_loops_run_on_the_calling_thread_for_gpu_tensors(monkeypatch):
    """``run_chunks`` spreads CPU chunks over its workers; for tensors on a GPU the calling thread
    queues every chunk's kernels itself (no worker threads, one state)."""
    import threading

    from gnnmegatron.ops import dispatch

    monkeypatch.setattr(dispatch.settings, "chunk_workers", 2)

    def body(state, item):
        state.append((item, threading.get_ident()))

    cpu = dispatch.run_chunks(list(range(6)), body, list, device=torch.device("cpu"))
    assert [[i for i, _ in s] for s in cpu] == [[0, 2, 4], [1, 3, 5]]
    gpu = dispatch.run_chunks(list(range(6)), body, list, device=torch.device("cuda"))
    assert gpu == [[(i, threading.get_ident()) for i in range(6)]]
