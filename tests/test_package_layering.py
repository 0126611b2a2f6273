"""The house: imports run down the layers, no import cycle, and every file the code cites exists.

Reads the source (``ast``), imports nothing. Layers, lowest first (docs/architecture.md, "Layers"):
kernels, ops, models, parallel, data, training, then inference and scaling (siblings: neither
imports the other), bench, and the command line (``cli.py``, ``doctor.py``). A module may import
its own layer and the layers below, at module level or inside a function alike; ``gnnmegatron``
itself (the package's ``__init__``: the version) is below everything.

Cycles are looked for between modules over every import, lazy ones included (a lazy import still
ties the two modules together). The few that exist inside one layer are listed in
``KNOWN_CYCLES`` with why they are there; a new one fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANK = {"gnnmegatron": 0, "kernels": 1, "ops": 2, "models": 3, "parallel": 4, "data": 5, "training": 6,
        "inference": 7, "scaling": 7, "bench": 8, "cli": 9, "doctor": 9}
TOOLS = {"cli", "doctor"}  # the command line and the backend self-check form one top layer

# Cycles inside one layer, through lazy (function-level) imports that break them at import time:
KNOWN_CYCLES = [
    # kernels/: the backward kernels reuse the forward module's workspace helpers, which re-exports them
    {"gnnmegatron.kernels.faithful_message", "gnnmegatron.kernels.faithful_message_bwd",
     "gnnmegatron.kernels.faithful_message_bwd2"},
    # data/: a store opens sharded datasets (manifest), a manifest describes stores, and joining
    # datasets (manifest) checks its inputs' shard files first (verify, which opens stores)
    {"gnnmegatron.data.manifest", "gnnmegatron.data.store", "gnnmegatron.data.verify"},
    # data/formats: the package registers every reader; a reader looks others up through the registry
    {"gnnmegatron.data.formats", "gnnmegatron.data.formats.ani1x", "gnnmegatron.data.formats.ase_files",
     "gnnmegatron.data.formats.aselmdb", "gnnmegatron.data.formats.base", "gnnmegatron.data.formats.extxyz",
     "gnnmegatron.data.formats.jsonscan", "gnnmegatron.data.formats.mptrj", "gnnmegatron.data.formats.oc20",
     "gnnmegatron.data.formats.qm7x", "gnnmegatron.data.formats.pyg_pickle"},
    # data/: the import driver, its per-frame reference path and its report share the shard naming
    {"gnnmegatron.data.import_driver", "gnnmegatron.data.import_reference", "gnnmegatron.data.import_report"},
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is a package __init__)}`` of gnnmegatron and kernels/ (gnnmegatron.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "gnnmegatron", ["gnnmegatron"]), (ROOT / "kernels", ["gnnmegatron", "kernels"])):
        for path in base.rglob("*.py"):
            parts = prefix + list(path.relative_to(base).with_suffix("").parts)
            package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def _imports(modules) -> dict[str, list[tuple[str, int]]]:
    """``{module: [(imported gnnmegatron module, line), ...]}`` over every import statement of each file."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, list[tuple[str, int]]] = {}
    for name, (path, package) in modules.items():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            for t in targets:
                if t == "gnnmegatron" or t.startswith("gnnmegatron."):
                    r = resolve(t)
                    if r and r != name:
                        found.append((r, node.lineno))
        edges[name] = sorted(set(found))
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gnnmegatron"


def _cycles(edges) -> list[set[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w, _ in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def upward_imports(edges) -> list[str]:
    bad = []
    for module, targets in edges.items():
        mine = _layer(module)
        for target, line in targets:
            theirs = _layer(target)
            if mine not in RANK or theirs not in RANK:
                bad.append(f"{module} (line {line}) -> {target}: layer {mine if mine not in RANK else theirs} is "
                           f"in no layer of this test; add it to RANK and docs/architecture.md")
                continue
            same = mine == theirs or (mine in TOOLS and theirs in TOOLS)
            if not same and (RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != "gnnmegatron")):
                bad.append(f"{module} (line {line}) imports {target}: {mine} may not import {theirs}")
    return bad


def test_imports_run_down_the_layers():
    bad = upward_imports(_imports(_modules()))
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycle_beyond_the_known_ones():
    cycles = _cycles(_imports(_modules()))
    new = [sorted(c) for c in cycles if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"import cycles: {new}; break them (move the shared helper down) or document them here"


def test_the_checks_catch_what_they_look_for():
    """An upward import, a sideways one and a cycle, on a made-up graph."""
    edges = {"gnnmegatron.training.a": [("gnnmegatron.inference.b", 3)], "gnnmegatron.inference.b":
             [("gnnmegatron.training.a", 5), ("gnnmegatron.scaling.c", 7)], "gnnmegatron.scaling.c": [],
             "gnnmegatron.ops.d": [("gnnmegatron.kernels.e", 1), ("gnnmegatron", 2)], "gnnmegatron.kernels.e": [],
             "gnnmegatron": []}
    bad = upward_imports(edges)
    assert len(bad) == 2 and "training may not import inference" in bad[0] and "inference may not import scaling" in bad[1]
    assert _cycles(edges) == [{"gnnmegatron.training.a", "gnnmegatron.inference.b"}]


# A reference to a file of another project, in the words of the line that cites it.
EXTERNAL = {"docs/core/datasets/oc20.md": "fairchem", "scripts/preprocess_ef.py": "fairchem"}
_PATH = re.compile(r"(?<![\w/.-])((?:docs|tests|benchmarks|scripts|gnnmegatron|kernels)/[\w./-]+\.(?:py|md|yaml|json|sh))")


def test_every_file_the_code_cites_exists():
    missing = []
    for folder in ("gnnmegatron", "kernels", "benchmarks", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for k, line in enumerate(path.read_text().splitlines(), 1):
                for ref in _PATH.findall(line):
                    if not (ROOT / ref).exists() and ref not in EXTERNAL:
                        missing.append(f"{path.relative_to(ROOT)}:{k}: {ref}")
    assert not missing, "references to files the repository does not have:\n" + "\n".join(missing)
    assert not [p for p in EXTERNAL if (ROOT / p).exists()], "an 'external' reference names a file of this repository"
    design = [f"{p.relative_to(ROOT)}" for folder in ("gnnmegatron", "kernels") for p in (ROOT / folder).rglob("*.py")
              if "DESIGN.md" in p.read_text()]
    assert not design, f"{design} cite a DESIGN.md the repository does not contain; cite docs/architecture.md"
