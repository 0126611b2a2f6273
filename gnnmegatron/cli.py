"""The ``gnnmegatron`` command.

    gnnmegatron data emt --out data/emt.zarr --num 3000        # embedded EMT dataset
    gnnmegatron data import a.extxyz b.db --out data/mine.zarr  # any ASE-readable files
    gnnmegatron data info data/emt.zarr
    gnnmegatron model info egnn-h800-l3                         # parameter counts (or --list)
    gnnmegatron predict runs/demo data/emt.zarr --split test    # batched inference with errors
    torchrun --standalone --nproc_per_node=1 -m gnnmegatron.cli pretrain --config CONFIG.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _cmd_data_emt(args) -> int:
    from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

    cfg = EMTConfig(num_structures=args.num, seed=args.seed, max_atoms=args.max_atoms)
    summary = generate_emt_dataset(args.out, cfg, workers=args.workers, progress=True, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
    return 0


def _cmd_data_import(args) -> int:
    from gnnmegatron.data.importers import import_ase

    summary = import_ase(args.inputs, args.out, index=args.index, overwrite=args.overwrite,
                         skip_missing_energy=args.skip_missing_energy)
    print(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
    return 0


def _cmd_data_info(args) -> int:
    from gnnmegatron.data.store import GraphStore

    store = GraphStore(args.path)
    meta = dict(store.metadata)
    counts = store.atom_counts
    meta["atoms_per_graph"] = {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())}
    meta["storage_chunks"] = int(len(store.graph_chunks) - 1)
    print(json.dumps(meta, indent=2, default=str, ensure_ascii=False))
    return 0


def _cmd_model_info(args) -> int:
    from gnnmegatron.models.presets import PRESETS, format_preset_table

    names = sorted(PRESETS) if args.list or not args.presets else args.presets
    print(format_preset_table(names))
    return 0


def _cmd_scaling_fit(args) -> int:
    from gnnmegatron.scaling.fit import fit_records, load_records

    fits = fit_records(load_records(args.runs), loss_key=args.loss_key, n_key=args.n_key, d_key=args.d_key,
                       n_boot=args.n_boot, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(fits, indent=1))
    print(f"wrote {args.out}")
    return 0


def _cmd_scaling_report(args) -> int:
    from gnnmegatron.scaling.fit import load_records
    from gnnmegatron.scaling.report import write_report

    fits = json.loads(Path(args.fits).read_text()) if args.fits else None
    paths = write_report(load_records(args.runs), fits, args.out_dir, title=args.title,
                         **({} if fits else {"n_boot": args.n_boot, "loss_key": args.loss_key,
                                             "n_key": args.n_key, "d_key": args.d_key}))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_predict(args) -> int:
    from gnnmegatron.inference.predict import format_summary, predict

    summary = predict(args.model, args.inputs, args.out, batch_atoms=args.batch_atoms, split=args.split,
                      index=args.index, device=None if args.device == "auto" else args.device, dtype=args.dtype,
                      progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def _cmd_pretrain(args) -> int:
    from gnnmegatron.training.config import load_config
    from gnnmegatron.training.trainer import Trainer, format_report

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg, resume=args.resume)
    report = trainer.fit()
    if trainer.rank == 0:
        print(format_report(report, cfg.run_dir), flush=True)
    return 0


def _add_fit_keys(parser: argparse.ArgumentParser) -> None:
    """``--n-key`` / ``--d-key`` of ``scaling fit`` and ``scaling report``."""
    parser.add_argument("--n-key", default="params", help="record field used as N (default: non-embedding parameters)")
    parser.add_argument("--d-key", default="atoms_seen", choices=["atoms_seen", "train_atoms"],
                        help="record field used as D: atoms_seen (atoms processed in training, the epochs rule) or "
                             "train_atoms (atoms in the training subset, for iso-data sweeps under the atoms rule)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gnnmegatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build and inspect Zarr graph stores").add_subparsers(dest="data_cmd", required=True)
    emt = data.add_parser("emt", help="generate the embedded EMT dataset (Al, Cu, Ag, Au, Ni, Pd, Pt)")
    emt.add_argument("--out", required=True, help="store path to create")
    emt.add_argument("--num", type=int, default=3000, help="number of structures")
    emt.add_argument("--seed", type=int, default=0)
    emt.add_argument("--max-atoms", type=int, default=32)
    emt.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    emt.add_argument("--overwrite", action="store_true")
    emt.set_defaults(func=_cmd_data_emt)

    imp = data.add_parser("import", help="import ASE-readable files (extxyz, ASE db, ...) into a store")
    imp.add_argument("inputs", nargs="+", help="input files; each becomes its own data source")
    imp.add_argument("--out", required=True)
    imp.add_argument("--index", default=":", help="ASE frame selection for each file (default: all)")
    imp.add_argument("--skip-missing-energy", action="store_true", help="skip (and count) frames without energy")
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(func=_cmd_data_import)

    info = data.add_parser("info", help="print a store's metadata")
    info.add_argument("path")
    info.set_defaults(func=_cmd_data_info)

    model = sub.add_parser("model", help="model presets").add_subparsers(dest="model_cmd", required=True)
    minfo = model.add_parser("info", help="parameter counts, weight memory and FLOPs of presets")
    minfo.add_argument("presets", nargs="*")
    minfo.add_argument("--list", action="store_true", help="all presets")
    minfo.set_defaults(func=_cmd_model_info)

    scaling = sub.add_parser("scaling", help="scaling-law fits and reports").add_subparsers(dest="scaling_cmd", required=True)
    from gnnmegatron.scaling.sweep import add_sweep_arguments, cmd_sweep

    ssw = scaling.add_parser("sweep", help="run a scaling sweep (models x data fractions), resumable")
    add_sweep_arguments(ssw)
    ssw.set_defaults(func=cmd_sweep)
    sfit = scaling.add_parser("fit", help="fit L(N), L(D) and L(N, D) with bootstrap intervals")
    sfit.add_argument("runs", help="run records (JSON list, {'runs': [...]} or JSON lines)")
    sfit.add_argument("--out", default="fits.json")
    sfit.add_argument("--loss-key", default="val_loss")
    _add_fit_keys(sfit)
    sfit.add_argument("--n-boot", type=int, default=200)
    sfit.add_argument("--seed", type=int, default=0)
    sfit.set_defaults(func=_cmd_scaling_fit)
    srep = scaling.add_parser("report", help="Markdown table and PNG plots of runs and fits")
    srep.add_argument("runs")
    srep.add_argument("--fits", help="fits.json from `scaling fit` (fitted anew when absent)")
    srep.add_argument("--out-dir", default="scaling-report")
    srep.add_argument("--title", default="Scaling-law fits")
    srep.add_argument("--loss-key", default="val_loss")
    _add_fit_keys(srep)
    srep.add_argument("--n-boot", type=int, default=200)
    srep.set_defaults(func=_cmd_scaling_report)

    pred = sub.add_parser("predict", help="batched inference over a graph store or ASE file; writes .npz + .json")
    pred.add_argument("model", help="checkpoint file or run directory (latest checkpoint)")
    pred.add_argument("inputs", help="graph store directory or ASE-readable file")
    pred.add_argument("--out", default="predictions.npz")
    pred.add_argument("--split", choices=("train", "val", "test"), help="that split of the model's run (store inputs)")
    pred.add_argument("--index", default=":", help="ASE frame selection for files")
    pred.add_argument("--batch-atoms", type=int, default=4096)
    pred.add_argument("--device", default="auto")
    pred.add_argument("--dtype", choices=("float32", "float64"), default=None)
    pred.add_argument("--no-progress", action="store_true")
    pred.set_defaults(func=_cmd_predict)

    pre = sub.add_parser("pretrain", help="pretrain on energies and forces (run under torchrun or alone)")
    pre.add_argument("--config", default=str(DEMO_CONFIG), help=f"YAML config (default: {DEMO_CONFIG.name})")
    pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    pre.add_argument("--resume", default="auto", help="auto (default), never, or a checkpoint path")
    pre.set_defaults(func=_cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        # Bad input gets its message, not a traceback; set GNNMEGATRON_DEBUG=1 for the traceback.
        import os

        if os.environ.get("GNNMEGATRON_DEBUG"):
            raise
        print(f"gnnmegatron: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
