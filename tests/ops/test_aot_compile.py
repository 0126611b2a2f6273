"""Ahead-of-time compile of every Triton kernel variant for sm_80, sm_90 and AMD gfx942, on a
machine without a GPU (``python -m gnnmegatron.kernels.aot``): no compile error, no config that
spills or needs more shared memory than the target has, every autotune config of every class of
every kernel compiled on every target, and the committed resource table is this pass's output.

Set ``GNNMEGATRON_KERNEL_RESOURCES_OUT=benchmarks/results/kernel_resources.json`` to let the
test (re)write the committed table; by default it writes to a temporary directory. About two
minutes on 2 cores with a cold triton cache (318 compiles), seconds with a warm one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "kernel_resources.json"


def _key(row):
    return (row["kernel"], row["target"], json.dumps(row["cls"]), json.dumps(row["config"], sort_keys=True),
            json.dumps(row["constexprs"], sort_keys=True))


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_every_kernel_variant_compiles_without_spills(tmp_path):
    pytest.importorskip("triton")
    out = Path(os.environ.get("GNNMEGATRON_KERNEL_RESOURCES_OUT") or tmp_path / "kernel_resources.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gnnmegatron.kernels.aot", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"the audit wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["compile_errors"] == 0, "\n".join(s["errors"])
    assert s["spilling_configs"] == 0, "\n".join(s["spilling"])
    assert s["shared_memory_overflows"] == 0, "\n".join(s["overflows"])
    assert proc.returncode == 0 and s["passed"], proc.stdout[-3000:]
    assert s["targets"] == ["gfx942", "sm_80", "sm_90"]

    # coverage: every candidate config of every class of every kernel, on every target
    from gnnmegatron.kernels import aot

    kernels = aot._tuned_kernels()
    assert sorted(kernels) == doc["kernels"] and len(kernels) == 8
    compiled = {(r["kernel"], r["target"], json.dumps(r["cls"]), json.dumps(r["config"], sort_keys=True))
                for r in doc["rows"]}
    expected = set()
    for name, (_, kernel) in kernels.items():
        for cls in kernel.configs:
            for target, (kind, *_) in aot.TARGETS.items():
                for cfg in kernel.candidates(cls, kind):
                    expected.add((name, target, json.dumps(list(cls)), json.dumps(cfg.all_kwargs(), sort_keys=True)))
    assert expected == compiled, f"not compiled: {sorted(expected - compiled)[:5]}; unexpected: " \
                                 f"{sorted(compiled - expected)[:5]}"
    # one variant per (kernel, target, class, config), three for segment_reduce (REDUCE): the
    # presence flags, the activation and the wanted gradients are runtime arguments and fork none
    per_config = {}
    for r in doc["rows"]:
        key = (r["kernel"], r["target"], json.dumps(r["cls"]), json.dumps(r["config"], sort_keys=True))
        per_config.setdefault(key, []).append(r["constexprs"].get("REDUCE"))
    for key, reduces in per_config.items():
        want = [0, 1, 2] if key[0] == "_segment_reduce_fwd_kernel" else [None]
        assert sorted(reduces, key=str) == want, (key, reduces)
    assert all(r["shared_bytes"] <= r["shared_limit_bytes"] and r["spill_bytes"] == 0 for r in doc["rows"])

    # the committed table is this pass's output (same triton: same registers, stack, shared memory)
    committed = json.loads(COMMITTED.read_text())
    assert committed["summary"]["passed"] and committed["summary"]["spilling_configs"] == 0
    if committed["versions"]["triton"] != doc["versions"]["triton"]:
        pytest.skip(f"committed table is for triton {committed['versions']['triton']}, this is "
                    f"{doc['versions']['triton']}: resources not compared")
    fields = ("registers", "spill_bytes", "shared_bytes")
    mine = {_key(r): tuple(r[f] for f in fields) for r in doc["rows"]}
    theirs = {_key(r): tuple(r[f] for f in fields) for r in committed["rows"]}
    stale = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    assert not stale, (f"{len(stale)} rows of {COMMITTED.name} are stale (e.g. {stale[0]}: committed "
                       f"{theirs.get(stale[0])}, now {mine.get(stale[0])}); regenerate with "
                       f"python -m gnnmegatron.kernels.aot")
