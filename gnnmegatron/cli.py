"""The ``gnnmegatron`` command.

    gnnmegatron data emt --out data/emt.zarr --num 3000        # embedded EMT dataset
    gnnmegatron data import a.extxyz b.db --out data/mine.zarr  # any ASE-readable files
    gnnmegatron data import MPtrj_2022.9_full.json --format mptrj --workers 8 --out data/mptrj.zarr
    gnnmegatron data info data/emt.zarr [--verify]
    gnnmegatron model info egnn-h800-l3                         # parameter counts (or --list)
    gnnmegatron predict runs/demo data/emt.zarr --source emt --split test   # batched inference, errors
    gnnmegatron evaluate runs/demo data/emt.zarr --split test   # validation metrics + baselines, parity plot
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


def _data_error(exc) -> int:
    """One line on stderr, exit code 2 (GNNMEGATRON_DEBUG=1 re-raises for the traceback)."""
    import os

    if os.environ.get("GNNMEGATRON_DEBUG"):
        raise exc
    text = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror or exc}: {exc.filename or ''}".strip()
    print(f"gnnmegatron: error: {text}", file=sys.stderr)
    return 2


def _cmd_data_import(args) -> int:
    from gnnmegatron.data.formats import DataImportError, ImportOptions
    from gnnmegatron.data.import_driver import import_dataset
    from gnnmegatron.data.import_report import format_summary
    from gnnmegatron.data.schema import StoreError

    try:
        opts = ImportOptions(format=args.format, energy=args.energy, lmdb_energy=args.lmdb_energy,
                             oc20_ref=args.oc20_ref, index=args.index, ase_format=args.ase_format,
                             workers=args.workers, on_bad=args.on_bad, skip_missing_energy=args.skip_missing_energy,
                             shard_bytes=int(args.shard_mb * 2**20), shard_structures=args.shard_structures,
                             source_names=args.source_name)
        summary = import_dataset(args.inputs, args.out, opts, overwrite=args.overwrite, restart=args.restart,
                                 progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"gnnmegatron: interrupted; run the same command again to continue ({args.out}.partial keeps the "
              "finished shards)", file=sys.stderr)
        return 130
    except (DataImportError, StoreError, OSError) as exc:
        return _data_error(exc)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
    return 0


def _cmd_data_info(args) -> int:
    from gnnmegatron.data.schema import StoreError
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.data.verify import check_store

    try:
        store = GraphStore(args.path)
        meta = dict(store.metadata)
        counts = store.atom_counts
        if len(counts):
            meta["atoms_per_graph"] = {"min": int(counts.min()), "mean": float(counts.mean()),
                                       "max": int(counts.max())}
        meta["storage_chunks"] = int(len(store.graph_chunks) - 1)
        if isinstance(meta.get("shards"), list):
            meta["shards"] = {"count": len(meta["shards"]), "first": meta["shards"][:3]}
        meta["check"] = check_store(args.path, full=args.verify)
    except (StoreError, OSError) as exc:
        return _data_error(exc)
    print(json.dumps(meta, indent=2, default=str, ensure_ascii=False))
    check = meta["check"]
    if not check["ok"]:
        more = "" if args.verify else "; run `gnnmegatron data info --verify` to decode every chunk"
        print(f"gnnmegatron: error: store {args.path} is damaged ({len(check['problems'])} problem(s), first: "
              f"{check['problems'][0]}){more}; re-import the data", file=sys.stderr)
        return 2
    return 0


def _cmd_data_join(args) -> int:
    from gnnmegatron.data.manifest import join_datasets
    from gnnmegatron.data.schema import StoreError

    try:
        attrs = join_datasets(args.inputs, args.out, overwrite=args.overwrite)
    except (StoreError, OSError) as exc:
        return _data_error(exc)
    print(json.dumps({"path": args.out, "num_graphs": attrs["num_graphs"], "num_atoms": attrs["num_atoms"],
                      "sources": attrs["sources"], "shards": len(attrs["shards"])}, indent=2))
    return 0


def _cmd_model_info(args) -> int:
    from gnnmegatron.models.presets import PRESETS, format_preset_table

    names = sorted(PRESETS) if args.list or not args.presets else args.presets
    print(format_preset_table(names))
    return 0


def _cmd_scaling_fit(args) -> int:
    from gnnmegatron.scaling.fit import fit_records, fit_records_per_source, load_records, summarize_fits

    if Path(args.out).resolve() == Path(args.runs).resolve():
        raise ValueError(f"--out {args.out} is the run records file itself; give another path for the fits")
    if args.n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0 (0: no intervals), got {args.n_boot}")
    fit = fit_records_per_source if args.per_source else fit_records
    records = load_records(args.runs)
    fits = fit(records, loss_key=args.loss_key, n_key=args.n_key, d_key=args.d_key, n_boot=args.n_boot,
               seed=args.seed)
    if not fits.get("n_used", 1):  # nothing to fit: say why, and keep what --out holds
        notes = "; ".join((fits.get("warnings") or [])[:3])
        raise ValueError(f"no usable run in {args.runs} ({len(records)} records; --loss-key {args.loss_key}, "
                         f"--n-key {args.n_key}, --d-key {args.d_key}): {notes or 'no records'}; "
                         f"{args.out} not written")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(fits, indent=1))
    for line in summarize_fits(fits):
        print(line)
    print(f"wrote {args.out}")
    return 0


def _cmd_scaling_report(args) -> int:
    from gnnmegatron.scaling.fit import load_fits, load_records
    from gnnmegatron.scaling.report import write_report

    fits = load_fits(args.fits) if args.fits else None
    records = load_records(args.runs)
    if not records:
        raise ValueError(f"{args.runs} holds no run records; nothing to report")
    paths = write_report(records, fits, args.out_dir, title=args.title,
                         **({} if fits else {"n_boot": args.n_boot, "loss_key": args.loss_key,
                                             "n_key": args.n_key, "d_key": args.d_key}))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_predict(args) -> int:
    from gnnmegatron.inference.predict import format_summary, predict

    summary = predict(args.model, args.inputs, args.out, batch_atoms=args.batch_atoms, split=args.split,
                      index=args.index, device=None if args.device == "auto" else args.device, dtype=args.dtype,
                      progress=not args.no_progress, source=args.source, weights=args.weights, best=args.best)
    print(format_summary(summary))
    return 0


def _cmd_evaluate(args) -> int:
    from gnnmegatron.inference.evaluate import evaluate_checkpoint, format_evaluation

    result = evaluate_checkpoint(args.model, args.stores or None, split=args.split, out=args.out, weights=args.weights,
                                 best=args.best, batch_atoms=args.batch_atoms,
                                 device=None if args.device == "auto" else args.device, dtype=args.dtype)
    print(format_evaluation(result))
    return 0


def _add_weight_choice(parser: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--best`` of ``predict`` and ``evaluate``."""
    parser.add_argument("--weights", choices=("ema", "raw"), default=None,
                        help="ema: the moving average of the weights (default when the checkpoint has one); raw: the "
                             "trained weights")
    parser.add_argument("--best", action="store_true",
                        help="a run directory's best checkpoint by validation (checkpoints/best), not its latest")


def _cmd_pretrain(args) -> int:
    from gnnmegatron.training.config import load_config
    from gnnmegatron.training.runtime import format_report
    from gnnmegatron.training.trainer import ExitSignal, Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg, resume=args.resume)
    report = trainer.fit()
    if trainer.stopped_by_signal:  # checkpoint saved; exit as a process the signal ended (job scripts tell)
        return ExitSignal.exit_code(trainer.stopped_by_signal)
    if trainer.rank == 0:
        print(format_report(report, cfg.run_dir), flush=True)
    return 0


def _cmd_checkpoint_info(args) -> int:
    from gnnmegatron.training.export import checkpoint_summary

    print(checkpoint_summary(args.path, tensors=args.tensors))
    return 0


def _cmd_checkpoint_export(args) -> int:
    from gnnmegatron.training.export import export_checkpoint

    out = export_checkpoint(args.path, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_doctor(args) -> int:
    from gnnmegatron.doctor import main as doctor_main

    return doctor_main(quick=args.quick, devices=args.device, json_path=args.json)


def _cmd_plan(args) -> int:
    from gnnmegatron.bench.memory import Workload
    from gnnmegatron.bench.perf import LINKS, Device
    from gnnmegatron.bench.plan import format_plan, parse_memory, plan, with_tp_default
    from gnnmegatron.models.presets import get_preset

    positive = {"--gpus": args.gpus, "--atoms-per-gpu": args.atoms_per_gpu, "--edges-per-atom": args.edges_per_atom,
                "--tflops": args.tflops, "--per-node": args.per_node, "--limit": args.limit}
    bad = [f"{k} {v}" for k, v in positive.items() if not v > 0]
    if bad:
        raise ValueError(f"plan: {', '.join(bad)}: must be > 0")
    if not 0 <= args.tp_serial_fraction < 1:
        raise ValueError(f"plan: --tp-serial-fraction {args.tp_serial_fraction} must be in [0, 1)")
    try:
        memory = parse_memory(args.gpu_mem)
    except ValueError:
        raise ValueError(f"plan: --gpu-mem {args.gpu_mem!r} is not a size (e.g. 80GB, 141GB, 96GiB)") from None
    if not memory > 0:
        raise ValueError(f"plan: --gpu-mem {args.gpu_mem!r} must be > 0")
    cfg = with_tp_default(get_preset(args.preset))
    device = Device(args.device_name, args.tflops * 1e12, memory, per_node=args.per_node,
                    intra=LINKS[args.intra], inter=LINKS[args.inter], tp_serial_fraction=args.tp_serial_fraction)
    workload = Workload(args.atoms_per_gpu, args.edges_per_atom, conservative=cfg.force_mode == "conservative")
    rows = plan(cfg, args.gpus, device, workload, limit=args.limit)
    print(format_plan(args.preset, rows, args.gpus, device, workload))
    return 0 if rows else 1


def _cmd_bench(args) -> int:
    from gnnmegatron.bench.harness import run_config

    if args.out and not Path(args.out).resolve().parent.is_dir():  # checked before the run, not after it
        raise ValueError(f"--out {args.out}: its folder does not exist")
    result = run_config(args.config, args.nproc, overrides=args.set, steps=args.steps, warmup=args.warmup,
                        memory=args.memory)
    text = json.dumps(result, indent=1)
    print(text)  # first: the measurement is on screen even if writing --out fails
    if args.out:
        Path(args.out).write_text(text)
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

    from gnnmegatron.data.formats import FORMATS

    imp = data.add_parser("import", help="import a data release (MPtrj, ANI-1x, OC20/OC22, QM7-X, OMat24, "
                                         "Alexandria) or ASE-readable files into a sharded store",
                          description="Parallel, resumable import into a sharded store; units are converted to "
                                      "eV, Å, eV/Å, eV/Å^3 (see the per-format notes in gnnmegatron.data.formats).")
    imp.add_argument("inputs", nargs="+", help="input files or release folders (--format ase: each file is a source)")
    imp.add_argument("--out", required=True, help="dataset directory to create")
    imp.add_argument("--format", default="ase", choices=sorted(FORMATS), help="source release format (default: ase)")
    imp.add_argument("--energy", default=None, help="which energy to take (per format; default: the documented one, "
                                                    "e.g. corrected_total_energy for mptrj, total for oc20)")
    imp.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    imp.add_argument("--on-bad", default="refuse", choices=("refuse", "skip"),
                     help="bad records (NaN, missing labels, degenerate cell, overlapping atoms): stop (refuse, "
                          "default) or skip and log them to <out>/rejections.jsonl")
    imp.add_argument("--index", default=":", help="--format ase: ASE frame selection for each file (default: all)")
    imp.add_argument("--ase-format", default=None, help="--format ase: ASE format name for ambiguous suffixes")
    imp.add_argument("--skip-missing-energy", action="store_true", help="skip (and log) frames without energy")
    imp.add_argument("--lmdb-energy", default="adsorption", choices=("adsorption", "total"),
                     help="OC20 LMDBs: what their energy is (fairchem's S2EF LMDBs: adsorption)")
    imp.add_argument("--oc20-ref", default=None, help="fairchem's oc20_ref.pkl, for total energies from OC20 LMDBs")
    imp.add_argument("--shard-mb", type=float, default=512, help="input MB per shard for text releases (default 512)")
    imp.add_argument("--shard-structures", type=int, default=100_000,
                     help="structures per shard for HDF5/LMDB releases (default 100000)")
    imp.add_argument("--source-name", action="append", default=None, help="source name(s) (default: the format name)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    imp.add_argument("--restart", action="store_true", help="discard an interrupted import instead of continuing it")
    imp.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=_cmd_data_import)

    info = data.add_parser("info", help="print a store's metadata and check its files")
    info.add_argument("path")
    info.add_argument("--verify", action="store_true",
                      help="read and decode every chunk (checksums, truncation, never-written data, infinite "
                           "values); exit 2 if anything is wrong")
    info.set_defaults(func=_cmd_data_info)

    join = data.add_parser("join", help="one dataset over several stores/datasets (a manifest, no copying)")
    join.add_argument("inputs", nargs="+")
    join.add_argument("--out", required=True)
    join.add_argument("--overwrite", action="store_true")
    join.set_defaults(func=_cmd_data_join)

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
    sfit.add_argument("--per-source", action="store_true",
                      help="also fit each source of multi-source runs on its own validation loss (records' val_sources)")
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
    pred.add_argument("--source", default=None, help="source name of a multi-source model: its energy reference and "
                                                     "head (and, with --split, its split); required for such models")
    pred.add_argument("--no-progress", action="store_true")
    _add_weight_choice(pred)
    pred.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="a checkpoint's validation metrics and baselines on graph stores; JSON + "
                                         "parity plot")
    ev.add_argument("model", help="run directory (latest or --best checkpoint) or checkpoint")
    ev.add_argument("stores", nargs="*", help="graph stores, each one of the model's sources (default: the run's)")
    ev.add_argument("--split", choices=("val", "test", "train", "all"), default="val",
                    help="val: the trainer's validation set (default); test, train: those splits of the run; all")
    ev.add_argument("--out", default="evaluation.json", help="JSON to write; the parity plot goes beside it (.png)")
    ev.add_argument("--batch-atoms", type=int, default=None, help="default: the run's data.val_budget_atoms")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the training dtype")
    _add_weight_choice(ev)
    ev.set_defaults(func=_cmd_evaluate)

    pre = sub.add_parser("pretrain", help="pretrain on energies and forces (run under torchrun or alone)")
    pre.add_argument("--config", default=str(DEMO_CONFIG), help=f"YAML config (default: {DEMO_CONFIG.name})")
    pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    pre.add_argument("--resume", default="auto",
                     help="auto (default: the run's newest complete checkpoint, written under any layout), never "
                          "(refuse a run_dir holding checkpoints), overwrite (delete them and start over), or a "
                          "checkpoint directory")
    pre.set_defaults(func=_cmd_pretrain)

    pl = sub.add_parser("plan", help="layouts (tp, pp, dp, checkpointing, ZeRO, micro-batches) that fit, best first")
    pl.add_argument("--preset", required=True)
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--gpu-mem", default="80GB", help="memory per device, e.g. 80GB, 141GB (default 80GB)")
    pl.add_argument("--atoms-per-gpu", type=int, default=512, help="atoms per micro-batch and replica (default 512)")
    pl.add_argument("--edges-per-atom", type=float, default=30.0)
    pl.add_argument("--tflops", type=float, default=200.0,
                    help="sustained TFLOP/s per device on this model (default 200: ~20%% of an H100's bf16 peak)")
    pl.add_argument("--per-node", type=int, default=8, help="devices per node (the tensor-parallel domain)")
    pl.add_argument("--tp-serial-fraction", type=float, default=0.0,
                    help="fraction of the compute every tensor-parallel rank repeats (default 0; measure it with "
                         "gnnmegatron.bench.harness.measure_tp_shard)")
    pl.add_argument("--intra", default="nvlink4", choices=["nvlink4", "ib-ndr", "slingshot11"])
    pl.add_argument("--inter", default="ib-ndr", choices=["nvlink4", "ib-ndr", "slingshot11"])
    pl.add_argument("--device-name", default="GPU")
    pl.add_argument("--limit", type=int, default=10)
    pl.set_defaults(func=_cmd_plan)

    be = sub.add_parser("bench", help="time a pretraining config under a layout in fresh processes")
    be.add_argument("config")
    be.add_argument("--nproc", type=int, default=1, help="processes (tp*pp*dp)")
    be.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    be.add_argument("--steps", type=int, default=5)
    be.add_argument("--warmup", type=int, default=2)
    be.add_argument("--out", default=None, help="also write the summary JSON here")
    be.add_argument("--memory", choices=["resident", "live"], default="resident",
                    help="CPU peak memory: the resident set (default) or the live tensors (glibc returns freed "
                         "blocks >= 128 KiB at once; slower steps, for memory checks)")
    be.set_defaults(func=_cmd_bench)

    ck = sub.add_parser("checkpoint", help="inspect and export sharded checkpoints").add_subparsers(
        dest="checkpoint_cmd", required=True)
    cinfo = ck.add_parser("info", help="what a checkpoint holds: step, layout, tensors, files")
    cinfo.add_argument("path", help="checkpoint directory or run directory (its newest complete checkpoint)")
    cinfo.add_argument("--tensors", action="store_true", help="list every tensor with its shape and chunk count")
    cinfo.set_defaults(func=_cmd_checkpoint_info)
    cexp = ck.add_parser("export", help="write the single-file single-device checkpoint inference loads")
    cexp.add_argument("path", help="run directory or checkpoint directory")
    cexp.add_argument("--out", required=True, help="file to write (e.g. model.pt)")
    cexp.set_defaults(func=_cmd_checkpoint_export)

    doc = sub.add_parser("doctor", help="check every op's backends against the reference on the devices present")
    doc.add_argument("--quick", action="store_true", help="small shapes only")
    doc.add_argument("--device", action="append", default=None, help="cpu or cuda (repeatable; default: all present)")
    doc.add_argument("--json", default=None, help="also write the rows to this JSON file")
    doc.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line; pretraining and sweeps resume from their last checkpoint
        print("gnnmegatron: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from gnnmegatron.training.errors import user_errors
        from gnnmegatron.training.faults import RankLost

        if not isinstance(exc, user_errors()):
            raise
        if isinstance(exc, RankLost):  # another rank died: exit 3 so that a job script can tell
            print(f"gnnmegatron: error: {exc}", file=sys.stderr, flush=True)
            return 3
        # Bad input gets its message, not a traceback; set GNNMEGATRON_DEBUG=1 for the traceback.
        import os

        if os.environ.get("GNNMEGATRON_DEBUG"):
            raise
        print(f"gnnmegatron: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
