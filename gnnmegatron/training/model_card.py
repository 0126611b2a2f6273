"""Model cards: what a checkpoint is, what it saw, and how well it did, beside the checkpoint.

``write_model_card(checkpoint_path, state)`` writes ``<checkpoint stem>.card.json`` and a short
``<checkpoint stem>.card.md`` next to the checkpoint (``step_00000400.pt`` ->
``step_00000400.card.json``), from the trainer's checkpoint state (the dict it saves). Cards of
checkpoints that were pruned are removed at the same time. ``read_model_card`` reads one back
from the card, its checkpoint or a run directory.

JSON layout (``card_version`` 1)::

    format, card_version, created (ISO 8601, UTC), gnnmegatron_version, torch_version, checkpoint
    model:    family, preset, parameters, parameters_non_embedding, config (ModelConfig dict)
    training: step, epoch, dtype, seed, max_steps, loss (LossConfig dict)
    data:     store, producer, sources, store_graphs, store_atoms, splits, train_fraction, cutoff,
              seen {atoms, edges, graphs, flops}
    sources:  multi-source runs (``data.sources``), one entry per source in the model's source order:
              name, store, producer, store_graphs, splits, train_fraction, sampling_probability,
              train_graphs, elements, loss weights, and its last validation errors; ``heads`` says
              how the model's energy heads are shared (null for single-store runs)
    layout:   tp, pp, dp, world_size
    metrics:  last_val (metrics of the latest validation at or before this step, with its step),
              best_val (the best validation by train.best_metric so far, with its step; with
              train.ema_decay, validations are of the moving average of the weights)
    elements: [{symbol, Z}, ...] (elements of the training graphs; the calculator refuses others)
    units:    energy eV, forces eV/Å, stress eV/Å^3
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

CARD_FORMAT = "gnnmegatron.model_card"
CARD_VERSION = 1
MODEL_FAMILY = "gnnmegatron.models.AtomisticModel"

__all__ = ["CARD_FORMAT", "CARD_VERSION", "card_path", "find_model_card", "read_model_card", "write_model_card"]


def card_path(checkpoint_path: str | Path) -> Path:
    """``step_00000400.pt`` -> ``step_00000400.card.json`` (same folder); a directory gets ``<dir>.card.json``."""
    checkpoint_path = Path(checkpoint_path)
    stem = checkpoint_path.stem if checkpoint_path.suffix == ".pt" else checkpoint_path.name
    return checkpoint_path.with_name(stem + ".card.json")


def find_model_card(checkpoint_path: str | Path) -> Path | None:
    """The card beside a checkpoint, or None."""
    path = card_path(checkpoint_path)
    return path if path.is_file() else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _store_metadata(store: str | None) -> dict[str, Any]:
    """Group attributes of a graph store (no array is read: cheap at any size); {} if unreadable."""
    if not store:
        return {}
    try:
        import zarr

        return dict(zarr.open_group(str(store), mode="r").attrs)
    except Exception:
        return {}


def _last_val(checkpoint_path: Path, step: int | None) -> dict[str, Any] | None:
    """The last ``split == "val"`` record at or before ``step`` in ``<run_dir>/metrics.jsonl``."""
    metrics = checkpoint_path.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "val" and (step is None or record.get("step", 0) <= step):
            last = {k: v for k, v in record.items() if k != "split"}
    return last


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples -> lists, numpy/torch scalars -> numbers, other objects -> str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _layout(config: dict, world_size: int) -> dict[str, int]:
    par = config.get("parallel") or {}
    tp, pp = int(par.get("tp", 1) or 1), int(par.get("pp", 1) or 1)
    dp = par.get("dp")
    dp = int(dp) if dp else max(world_size // (tp * pp), 1)
    return {"tp": tp, "pp": pp, "dp": dp, "world_size": int(world_size)}


def _sources(config: dict, state: dict, model_cfg, last_val: dict | None) -> list[dict[str, Any]] | None:
    """The card's ``sources`` list (multi-source runs), None for a single-store run."""
    data_cfg = config.get("data") or {}
    entries = data_cfg.get("sources")
    if not entries:
        return None
    loss = config.get("loss") or {}
    mixture = state.get("mixture") or {}
    probs = dict(zip(mixture.get("names", []), mixture.get("probabilities", [])))
    train_graphs = dict(zip(mixture.get("names", []), mixture.get("train_graphs", [])))
    per_stats = (state.get("stats") or {}).get("sources") or {}
    per_val = (last_val or {}).get("sources") or {}
    from ase.data import chemical_symbols

    out = []
    for entry in entries:
        name = entry.get("name")
        md = _store_metadata(entry.get("store"))
        elements = per_stats.get(name, {}).get("elements", [])
        out.append({
            "name": name,
            "store": entry.get("store"),
            "producer": md.get("producer"),
            "store_sources": md.get("sources"),
            "store_graphs": md.get("num_graphs"),
            "splits": entry.get("splits") or data_cfg.get("splits"),
            "train_fraction": entry.get("train_fraction"),
            "sampling": data_cfg.get("sampling"),
            "sampling_probability": probs.get(name),
            "train_graphs": train_graphs.get(name),
            "elements": [chemical_symbols[int(z)] for z in elements],
            "loss_weights": {k: entry.get(f"{k}_weight") if entry.get(f"{k}_weight") is not None
                             else loss.get(f"{k}_weight") for k in ("energy", "force", "stress")},
            "last_val": per_val.get(name),
        })
    return out


def build_model_card(checkpoint_path: str | Path, state: dict, *, last_val: dict | None = None) -> dict[str, Any]:
    """The card as a dict (what ``write_model_card`` writes). See the module docstring for the layout."""
    import torch
    from ase.data import chemical_symbols

    import gnnmegatron
    from gnnmegatron.models import ModelConfig, count_parameters

    checkpoint_path = Path(checkpoint_path)
    if "model_config" not in state:
        raise ValueError("write_model_card needs the checkpoint state with 'model_config' "
                         "(the dict the trainer saves, e.g. Trainer._state() plus 'step')")
    model_cfg = ModelConfig.from_dict(state["model_config"])
    counts = count_parameters(model_cfg)
    config = state.get("config") or {}
    data_cfg = config.get("data") or {}
    train_cfg = config.get("train") or {}
    stats = state.get("stats") or {}
    step = state.get("step")
    store_md = _store_metadata(data_cfg.get("store"))
    elements = sorted(int(z) for z in stats.get("elements", []))
    if last_val is None:
        last_val = _last_val(checkpoint_path, step)
    card = {
        "format": CARD_FORMAT,
        "card_version": CARD_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gnnmegatron_version": gnnmegatron.__version__,
        "torch_version": torch.__version__,
        "checkpoint": checkpoint_path.name,
        "model": {
            "family": MODEL_FAMILY,
            "preset": (config.get("model") or {}).get("preset"),
            "parameters": counts["total"],
            "parameters_non_embedding": counts["non_embedding"],
            "config": model_cfg.to_dict(),
        },
        "training": {
            "step": step,
            "epoch": state.get("epoch"),
            "dtype": train_cfg.get("dtype"),
            "seed": config.get("seed"),
            "max_steps": train_cfg.get("max_steps"),
            "loss": config.get("loss"),
        },
        "data": {
            "store": data_cfg.get("store"),
            "producer": store_md.get("producer"),
            "sources": store_md.get("sources"),
            "store_graphs": store_md.get("num_graphs"),
            "store_atoms": store_md.get("num_atoms"),
            "splits": data_cfg.get("splits"),
            "train_fraction": data_cfg.get("train_fraction"),
            "cutoff": model_cfg.cutoff,
            "seen": dict(state.get("seen") or {}),
        },
        "sources": _sources(config, state, model_cfg, last_val),
        "heads": model_cfg.heads if data_cfg.get("sources") else None,
        "layout": _layout(config, int(state.get("world_size", 1) or 1)),
        "metrics": {"last_val": last_val, "best_val": state.get("best_val")},
        "elements": [{"symbol": chemical_symbols[z], "Z": z} for z in elements],
        "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3", "positions": "Å"},
    }
    return _jsonable(card)


def _markdown(card: dict[str, Any]) -> str:
    m, d, lay, met = card["model"], card["data"], card["layout"], card["metrics"]

    def mae(v):
        if not v:
            return "n/a"
        return (f"energy {1000 * v.get('energy_mae_per_atom', float('nan')):.2f} meV/atom, "
                f"forces {1000 * v.get('force_mae', float('nan')):.1f} meV/Å (step {v.get('step')})")

    seen = d.get("seen") or {}
    lines = [
        f"# Model card: {m['preset']} — {card['checkpoint']}",
        "",
        f"- model: {m['family']}, preset `{m['preset']}`, {m['parameters']:,} parameters "
        f"(H={m['config']['hidden']}, L={m['config']['layers']}, cutoff {d['cutoff']} Å, "
        f"{m['config']['force_mode']} forces)",
        (f"- data: `{d['store']}` (producer {d['producer']}, sources {d['sources']}), train fraction "
         f"{d['train_fraction']}; seen {seen.get('graphs', 0):,} graphs / {seen.get('atoms', 0):,} atoms"
         if not card.get("sources") else
         f"- data: a mixture of {len(card['sources'])} stores (below); seen {seen.get('graphs', 0):,} graphs / "
         f"{seen.get('atoms', 0):,} atoms"),
        f"- training: step {card['training']['step']}, {card['training']['dtype']}; layout tp={lay['tp']} "
        f"pp={lay['pp']} dp={lay['dp']} (world size {lay['world_size']})",
        f"- validation, last: {mae(met['last_val'])}",
        f"- validation, best: {mae(met['best_val'])}",
        f"- elements: {', '.join(e['symbol'] for e in card['elements']) or 'unknown'}",
        *_source_md(card),
        f"- gnnmegatron {card['gnnmegatron_version']}, torch {card['torch_version']}, written {card['created']}",
        "",
    ]
    return "\n".join(lines)


def _source_md(card: dict[str, Any]) -> list[str]:
    sources = card.get("sources")
    if not sources:
        return []
    lines = [f"- sources ({len(sources)}, heads: {card.get('heads')}); pick one by name at inference "
             f"(`GNNMegatronCalculator(..., source=NAME)`, `gnnmegatron predict --source NAME`):"]
    for s in sources:
        v = s.get("last_val") or {}
        err = (f"; last validation energy {1000 * v['energy_mae_per_atom']:.2f} meV/atom"
               + (f", forces {1000 * v['force_mae']:.1f} meV/Å" if v.get("force_components") else "")
               if v else "")
        p = s.get("sampling_probability")
        lines.append(f"  - `{s['name']}`: `{s['store']}` ({s.get('store_graphs')} graphs, producer {s.get('producer')}), "
                     f"sampling probability {p if p is None else round(p, 4)}, elements "
                     f"{', '.join(s.get('elements') or []) or 'unknown'}{err}")
    return lines


def _prune_orphans(folder: Path) -> None:
    """Removes cards whose checkpoint is gone (the trainer keeps only the newest checkpoints)."""
    for path in folder.glob("*.card.json"):
        try:
            name = json.loads(path.read_text()).get("checkpoint")
        except (OSError, json.JSONDecodeError):
            continue
        if name and not (folder / name).exists():
            path.unlink(missing_ok=True)
            path.with_name(path.name[: -len(".json")] + ".md").unlink(missing_ok=True)


def write_model_card(checkpoint_path: str | Path, state: dict, *, last_val: dict | None = None) -> Path:
    """Writes ``<checkpoint>.card.json`` and ``.card.md`` beside a checkpoint; returns the JSON path.

    Args:
        checkpoint_path: the checkpoint just written (``save_checkpoint``'s return value).
        state: the checkpoint state dict (``Trainer._state()`` with ``step`` added, or a loaded
            checkpoint): ``model_config``, ``config``, ``stats``, ``seen``, ``best_val``,
            ``world_size``, ``step``, ``epoch``.
        last_val: metrics of the latest validation; by default read from ``<run_dir>/metrics.jsonl``.
    """
    checkpoint_path = Path(checkpoint_path)
    card = build_model_card(checkpoint_path, state, last_val=last_val)
    path = card_path(checkpoint_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(path.with_name(path.name[: -len(".json")] + ".md"), _markdown(card))
    _prune_orphans(path.parent)
    return path


def read_model_card(path: str | Path) -> dict[str, Any]:
    """Reads a card from its JSON file, from the checkpoint it describes, or from a run directory.

    Raises:
        FileNotFoundError: no card there (the message says where it was looked for).
        ValueError: the file is not a gnnmegatron model card.
    """
    path = Path(path)
    if not path.name.endswith(".card.json"):
        if path.is_dir():
            from gnnmegatron.training.sharded_checkpoint import run_checkpoint

            path = run_checkpoint(path) or path
        path = card_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}; write one with "
                                f"gnnmegatron.inference.write_model_card(checkpoint, state)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it is not a gnnmegatron model card") from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path} is not a gnnmegatron model card (format {card.get('format') if isinstance(card, dict) else None!r})")
    if card.get("card_version", 0) > CARD_VERSION:
        raise ValueError(f"{path} is a model card of version {card['card_version']}; this gnnmegatron reads "
                         f"version {CARD_VERSION} and older")
    return card
