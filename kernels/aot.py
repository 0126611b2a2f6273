"""Ahead-of-time compile and resource audit of every Triton kernel, without a GPU.

``python -m gnnmegatron.kernels.aot [--out benchmarks/results/kernel_resources.json] [--jobs N]``

1. **Variants the launchers reach.** Every launcher is driven with tiny CPU tensors over its
   options (each dtype it accepts, K in each BLOCK_K class, sorted and unsorted edges, with and
   without w and v, each activation, all and one wanted gradients, present and absent
   double-backward cotangents, deterministic or not, narrow and wide rows, each reduction);
   ``TunedKernel.recorder`` receives the launches instead of running them. Each launch is
   specialised exactly as triton's JIT would on the target (its own binder: argument types,
   constexprs, pointer alignment and, on AMD, buffer-op ranges), and the distinct
   specialisations are kept. Flags and scalars are runtime ``int32`` arguments, so they add
   no variants (the test checks one variant per config, three for REDUCE); what remains is the
   dtype, BLOCK_K and REDUCE.
2. **Compile.** Each variant x each autotune config of its class x each target (sm_80, sm_90
   and AMD gfx942) goes through ``triton.compile`` in a process pool. Any error fails the audit.
3. **Resources.** NVIDIA: ``cuobjdump --dump-resource-usage`` (shipped with triton's NVIDIA
   backend) on the cubin gives registers, stack (spilled local memory) and static shared
   memory; the dynamic shared memory triton allocates at launch is the kernel's metadata.
   AMD: the amdgcn assembly's kernel descriptor (VGPR/SGPR counts, spill counts, scratch).
   A config that spills (stack/scratch > 0) or needs more shared memory than the target has
   (sm_80 163 KiB, sm_90 227 KiB, gfx942 64 KiB) fails the audit: autotuning could pick it.

Exit status 0 only when every variant compiles and none spills or overflows shared memory.
``tests/ops/test_aot_compile.py`` runs it in CI; the committed JSON is its output.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448, "gfx942": 65536}  # bytes of shared memory (LDS) per block
KERNEL_MODULES = ("fused_message", "fused_message_bwd", "fused_message_bwd2", "segment_reduce", "edge_vector",
                  "faithful_message", "faithful_message_bwd", "faithful_message_bwd2")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kernel_resources.json"


# ----------------------------------------------------------------------------- 1. variants
def _tuned_kernels() -> dict:
    from ._common import TunedKernel
    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for value in vars(module).values():
            if isinstance(value, TunedKernel):
                found[value.name] = (name, value)
    return found


def drive_launchers(kind: str = "cuda") -> list[tuple]:
    """Call every launcher over its options as it would for a ``kind`` ("cuda" or "hip") GPU;
    returns the recorded (kernel, cls, args, kwargs)."""
    import torch

    from . import _common
    from ._common import TunedKernel
    from .codes import ACTIVATIONS, REDUCE_CODE
    from .edge_vector import edge_vector_aggregate_fwd
    from .faithful_message import faithful_message_bwd, faithful_message_bwd2, faithful_message_fwd
    from .fused_message import fused_message_bwd, fused_message_bwd2, fused_message_fwd
    from .segment_reduce import segment_reduce_fwd

    calls = []
    TunedKernel.recorder = lambda kernel, cls, grid, args, kwargs: calls.append((kernel, cls, args, kwargs))
    _common.AOT_TARGET_KIND = kind
    g = torch.Generator().manual_seed(0)
    N, E, F = 5, 11, 20
    dst = torch.sort(torch.randint(0, N, (E,), generator=g)).values
    src = torch.randint(0, N, (E,), generator=g)
    ptr = torch.searchsorted(dst, torch.arange(N + 1))
    perm = torch.randperm(E, generator=g)
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            def rnd(*shape):
                return torch.randn(*shape, generator=g).to(dtype)

            for K in (8, 24, 64):  # BLOCK_K 16, 32, 64
                P, Q, R, C, b, w, v = rnd(N, F), rnd(N, F), rnd(E, K), rnd(K, F), rnd(F), rnd(E), rnd(F)
                gm, gs = rnd(N, F), rnd(E)
                gg_all = (rnd(N, F), rnd(N, F), rnd(E, K), rnd(K, F), rnd(F), rnd(E), rnd(F))
                for p in (None, perm):
                    for wv in ((w, v), (None, None), (w, None)):
                        for act in ACTIVATIONS:
                            for det in (False, True):
                                fused_message_fwd(P, Q, src, ptr, p, R, C, b, *wv, act, det)
                                for needs in ([True] * 7, [True, False, False, False, False, False, False]):
                                    fused_message_bwd(gm, gs if wv[1] is not None else None, P, Q, dst, src, ptr, p,
                                                      R, C, b, *wv, act, needs, deterministic=det)
                                for gg in (gg_all, (None, gg_all[1], None, None, None, None, None)):
                                    need = dict.fromkeys(("gm", "gs", "P", "Q", "R", "C", "b", "w", "v"), True)
                                    fused_message_bwd2(gm, gs if wv[1] is not None else None, P, Q, dst, src, ptr, p,
                                                       R, C, b, *wv, act, gg, need, deterministic=det)
            drive_faithful(dtype, rnd, dst, src, ptr, perm, N, E, ACTIVATIONS, faithful_message_fwd,
                           faithful_message_bwd, faithful_message_bwd2)
            for width in (3, 100):  # narrow and wide rows
                x = rnd(E, width)
                for p in (None, perm):
                    for reduce in REDUCE_CODE:
                        segment_reduce_fwd(x, ptr, p, reduce)
                    edge_vector_aggregate_fwd(x, rnd(E), ptr, p)
    finally:
        TunedKernel.recorder = None
        _common.AOT_TARGET_KIND = "cuda"
    return calls


def drive_faithful(dtype, rnd, dst, src, ptr, perm, N, E, activations, fwd, bwd, bwd2) -> None:
    """The fused faithful launchers over their options (half inputs run in the fp32 class)."""
    F1, F2, F3 = 20, 24, 12
    for K in (8, 64):
        P, Q, R, C, b1 = rnd(N, F1), rnd(N, F1), rnd(E, K), rnd(K, F1), rnd(F1)
        W2, b2, w, Wc, bc, v = rnd(F2, F1), rnd(F2), rnd(E), rnd(F3, F2), rnd(F3), rnd(F3)
        gm, gs = rnd(N, F2), rnd(E)
        geometry = (rnd(N, F1), rnd(N, F1), rnd(E, K), None, None, None, None, rnd(E), None, None, None)
        for p in (None, perm):
            for coord in ((Wc, bc, v), (None, None, None)):
                for wt in (w, None):
                    for act in activations:
                        for det in (False, True):
                            fwd(P, Q, src, ptr, p, R, C, b1, W2, b2, wt, *coord, act, det, dst=dst)
                            for needs in ([True] * 11, [False, False, True] + [False] * 8):
                                bwd(gm, gs if coord[2] is not None else None, P, Q, dst, src, ptr, p, R, C, b1, W2,
                                    b2, wt, *coord, act, needs, deterministic=det)
                            need = dict.fromkeys(("gm", "gs", "P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc",
                                                  "v"), True)
                            bwd2(gm, gs if coord[2] is not None else None, P, Q, dst, src, ptr, p, R, C, b1, W2, b2,
                                 wt, *coord, act, geometry, need, deterministic=det)


def _key(value):
    return value.cache_key if hasattr(value, "cache_key") else repr(value)


def variants(calls: list[tuple], target_name: str) -> list[dict]:
    """Distinct specialisations (triton's own binder for ``target_name``) x configs of the class."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*TARGETS[target_name]))
    kind = TARGETS[target_name][0]
    binders, seen, out = {}, set(), []
    for kernel, cls, args, kwargs in calls:
        fn = kernel.fn
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        for cfg in kernel.candidates(cls, kind):
            full = {**kwargs, **cfg.all_kwargs()}
            bound, spec, options = binders[fn](*args, **full)
            options, signature, constexprs, attrs = fn._pack_args(backend, full, bound, spec, options)
            key = (fn.__name__, tuple(sorted(signature.items())),
                   tuple(sorted((k, _key(v)) for k, v in constexprs.items())), repr(sorted(attrs.items())),
                   repr(sorted(cfg.all_kwargs().items())))
            if key in seen:
                continue
            seen.add(key)
            out.append(dict(kernel=fn.__name__, module=fn.__module__, target=target_name, cls=list(cls),
                            config=cfg.all_kwargs(), signature=signature, constexprs=constexprs, attrs=attrs))
    return out


# ----------------------------------------------------------------------------- 2-3. compile + resources
def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _nvidia_resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output: {text[-400:]}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(registers=regs, stack_bytes=stack, shared_static_bytes=shared, local_bytes=local,
                spill_bytes=stack + local)


def _amd_resources(asm: str) -> dict:
    def field(name):
        m = re.search(rf"\.{name}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0

    # SGPR spills go to VGPR lanes (v_writelane), not memory; scratch (private segment) is what
    # spills to memory, and VGPR spills always land there.
    scratch = field("private_segment_fixed_size")
    return dict(registers=field("vgpr_count"), agpr=field("agpr_count"), sgpr=field("sgpr_count"),
                vgpr_spills=field("vgpr_spill_count"), sgpr_spills_to_vgpr_lanes=field("sgpr_spill_count"),
                scratch_bytes=scratch, shared_static_bytes=field("group_segment_fixed_size"),
                spill_bytes=max(scratch, 4 * field("vgpr_spill_count")))


def compile_one(job: dict) -> dict:
    """Compile one variant for its target and read its resources (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(job["module"])
    fn = getattr(module, job["kernel"])
    rec = {k: job[k] for k in ("kernel", "target", "cls", "config")}
    rec["dtype"] = job["cls"][0]
    rec["constexprs"] = {fn.arg_names[k[0]]: (str(v) if not isinstance(v, (int, float, bool)) else v)
                         for k, v in job["constexprs"].items() if fn.arg_names[k[0]] not in job["config"]}
    t0 = time.perf_counter()
    try:
        opts = {k: v for k, v in job["config"].items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
        kernel = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                target=GPUTarget(*TARGETS[job["target"]]), options=opts)
        if job["target"].startswith("sm_"):
            rec.update(_nvidia_resources(kernel.asm["cubin"]))
        else:
            rec.update(_amd_resources(kernel.asm["amdgcn"]))
        rec["shared_dynamic_bytes"] = int(kernel.metadata.shared)
        rec["shared_bytes"] = rec["shared_dynamic_bytes"] + rec["shared_static_bytes"]
        rec["shared_limit_bytes"] = SHARED_LIMIT[job["target"]]
        rec["error"] = None
    except Exception as exc:  # recorded; the audit fails on it
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    rec["compile_s"] = round(time.perf_counter() - t0, 3)
    return rec


def _init_worker():
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def audit(jobs: int | None = None, targets=tuple(TARGETS), progress=None) -> dict:
    """Run the audit; returns {"rows": [...], "summary": {...}} (see the module docstring)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise RuntimeError("the audit compiles the GPU configs: run it without TRITON_INTERPRET")
    t0 = time.perf_counter()
    calls = {kind: drive_launchers(kind) for kind in {TARGETS[t][0] for t in targets}}
    todo = [v for t in targets for v in variants(calls[TARGETS[t][0]], t)]
    jobs = jobs or os.cpu_count() or 1
    rows = []
    # longest first: the pool finishes together
    order = sorted(todo, key=lambda j: {"_faithful_message_bwd2_kernel": 0, "_faithful_message_bwd_kernel": 1,
                                        "_fused_message_bwd2_kernel": 2, "_fused_message_bwd_kernel": 3}.get(
        j["kernel"], 4))
    with cf.ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool:
        for i, rec in enumerate(pool.map(compile_one, order, chunksize=1)):
            rows.append(rec)
            if progress and (i + 1) % 50 == 0:
                progress(f"{i + 1}/{len(order)} compiled")
    rows.sort(key=lambda r: (r["kernel"], r["target"], str(r["cls"]), json.dumps(r["config"], sort_keys=True)))
    return {"rows": rows, "summary": summarize(rows, sum(map(len, calls.values())), time.perf_counter() - t0, jobs),
            "kernels": sorted({name for name in _tuned_kernels()})}


def summarize(rows: list[dict], launches: int, seconds: float, jobs: int) -> dict:
    errors = [r for r in rows if r["error"]]
    ok = [r for r in rows if not r["error"]]
    spills = [r for r in ok if r["spill_bytes"] > 0]
    over = [r for r in ok if r["shared_bytes"] > r["shared_limit_bytes"]]

    def name(r):
        return f"{r['kernel']} {r['target']} {r['cls']} {r['config']}"

    per_kernel = {}
    for r in ok:
        k = per_kernel.setdefault(r["kernel"], {"variants": 0, "max_registers": 0, "max_shared_bytes": 0})
        k["variants"] += 1
        k["max_registers"] = max(k["max_registers"], r["registers"])
        k["max_shared_bytes"] = max(k["max_shared_bytes"], r["shared_bytes"])
    return dict(compiled=len(rows), launches_recorded=launches, compile_errors=len(errors),
                spilling_configs=len(spills), shared_memory_overflows=len(over),
                targets=sorted({r["target"] for r in rows}), per_kernel=per_kernel,
                errors=[f"{name(r)}: {r['error']}" for r in errors][:20],
                spilling=[f"{name(r)}: {r['spill_bytes']} B" for r in spills][:50],
                overflows=[f"{name(r)}: {r['shared_bytes']} B" for r in over][:20],
                passed=not (errors or spills or over), wall_s=round(seconds, 1), jobs=jobs)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(result: dict, out: Path) -> None:
    """JSON (machine, command, versions, date, rows, summary) and a CSV beside it."""
    import csv
    from importlib.metadata import version

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "kernel_resources",
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores (no GPU used: ahead-of-time compile for "
                   f"{', '.join(result['summary']['targets'])})",
        "command": "python -m gnnmegatron.kernels.aot " + " ".join(sys.argv[1:]),
        "versions": {d: version(d) for d in ("triton", "torch")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": ("every launcher driven over its options; each distinct specialisation x each autotune config of "
                   "its class compiled with triton.compile for each target; NVIDIA resources from cuobjdump "
                   "--dump-resource-usage (STACK = spilled local memory), AMD from the amdgcn kernel descriptor; "
                   "shared_bytes = static + triton's dynamic shared memory"),
        "kernels": result["kernels"],
        "summary": result["summary"],
        "rows": result["rows"],
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    keys = ["kernel", "target", "dtype", "cls", "config", "registers", "spill_bytes", "shared_bytes",
            "shared_limit_bytes", "compile_s", "error"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: (json.dumps(r.get(k)) if isinstance(r.get(k), (dict, list)) else r.get(k))
                             for k in keys})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path (a CSV is written beside it)")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    args = ap.parse_args(argv)
    result = audit(args.jobs, tuple(args.targets.split(",")), progress=lambda s: print(s, flush=True))
    write(result, Path(args.out))
    s = result["summary"]
    print(json.dumps({k: s[k] for k in ("compiled", "compile_errors", "spilling_configs", "shared_memory_overflows",
                                          "passed", "wall_s")}))
    for line in s["errors"] + s["spilling"] + s["overflows"]:
        print("  " + line)
    print(f"wrote {args.out}")
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
