"""Sharded, reshardable checkpoints in ``torch.distributed.checkpoint`` (DCP) format, committed atomically.

A checkpoint is a directory ``<run_dir>/checkpoints/step_XXXXXXXX/``:

* ``__<rank>_0.distcp`` -- each rank's own tensors (DCP's file-per-rank layout) and ``.metadata``
  (DCP's index: every global tensor's shape and which file holds which region);
* ``meta.json`` -- what the checkpoint is: format, step, layout, model config, keys (human
  readable; ``gnnmegatron checkpoint info`` prints it);
* the model card beside it (``step_XXXXXXXX.card.json`` / ``.md``).

DCP keys are the single-device names: ``model/<state-dict key>``,
``optim/<state-dict key>/{exp_avg, exp_avg_sq, step}`` (AdamW's state of that parameter),
``ema/<parameter key>`` (the moving average of the weights, ``train.ema_decay``),
``meta`` (step, epoch, counters, sampler position, config, statistics: pickled, written once)
and ``rng/rank<r>`` (each rank's RNG states). Each rank writes the regions its tensors hold
(``gnnmegatron.parallel.sharding``): tensor-parallel shards with their global offsets, a
pipeline stage its own blocks, ZeRO-1 the optimizer state of the parameters it owns; copies
held by several ranks (data-parallel replicas, replicated tensors) are written once. Nothing
is gathered. Loading reads, for each local tensor, the regions that overlap it from whichever
files hold them, so a checkpoint written under one (tp, pp, dp, ZeRO) layout loads under any
other, and into one process (``load_full_state``, ``export``).

Commit protocol (``save``): every rank writes into ``step_XXXXXXXX.partial/`` (files fsynced by
DCP); after DCP's final collective rank 0 writes ``meta.json``, fsyncs the directory, renames it
to ``step_XXXXXXXX`` (one ``rename``), fsyncs ``checkpoints/``, then replaces ``latest`` (also
by rename) and prunes. A save killed at any point leaves the previous checkpoint and
``latest`` intact; the next save removes the stale ``.partial`` directory. Pruning keeps the
``keep`` newest complete checkpoints by step plus the one just written, and the one
``checkpoints/best`` names (the best by validation, written by a save with ``best=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gnnmegatron.training.checkpoint import CheckpointError

__all__ = [
    "SHARDED_FORMAT", "checkpoint_info", "complete_checkpoints", "find_best", "find_resume", "is_sharded_checkpoint",
    "load_full_state", "load_sharded", "run_checkpoint", "save_sharded", "write_latest",
]

SHARDED_FORMAT = "gnnmegatron.dcp"
SHARDED_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{8})$")


# ------------------------------------------------------------------------------------------ DCP glue
class ShardedTensorPieces:
    """A global tensor seen through this rank's pieces of it (DCP's ``_Checkpointable`` protocol).

    Args:
        global_shape: shape of the single-device tensor.
        dtype: its dtype.
        chunks: ``[(offsets, view)]``: a view of a local tensor holding the region
            ``[offsets, offsets + view.shape)`` of the global tensor.
    """

    def __init__(self, global_shape: tuple[int, ...], dtype: torch.dtype, chunks: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.global_shape = torch.Size(global_shape)
        self.dtype = dtype
        self.chunks = chunks

    def size(self) -> torch.Size:
        return self.global_shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        items = []
        for offsets, view in self.chunks:
            off = torch.Size(offsets)
            items.append(WriteItem(
                index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=view.shape),
                                            properties=TensorProperties(dtype=self.dtype), size=self.global_shape)))
        return items

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=v.shape) for o, v in self.chunks]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        for offsets, view in self.chunks:
            if torch.Size(offsets) == index.offset:
                return view
        raise ValueError(f"{index.fqn}: no local piece at offsets {tuple(index.offset)}")


def _planners():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    class SavePlanner(DefaultSavePlanner):
        """Keys are flat already; ``meta`` and ``rng/*`` stay whole pickled values."""

        def __init__(self):
            super().__init__(flatten_state_dict=False)

        def lookup_object(self, index):
            obj = self.state_dict.get(index.fqn)
            if isinstance(obj, ShardedTensorPieces):
                return obj.__get_tensor_shard__(index).detach().contiguous().cpu()
            return super().lookup_object(index)

    class LoadPlanner(DefaultLoadPlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            # DefaultLoadPlanner's meta-tensor pass (_init_state_dict) replaces objects it does not
            # know (ours) with None; nothing here lives on the meta device, so it is skipped.
            self.original_state_dict = state_dict
            self.state_dict = state_dict
            self.metadata = metadata
            self.is_coordinator = is_coordinator

        def lookup_tensor(self, index):
            obj = self.state_dict.get(index.fqn)
            if isinstance(obj, ShardedTensorPieces):
                return obj.__get_tensor_shard__(index)
            return super().lookup_tensor(index)

    return SavePlanner, LoadPlanner


def pieces_state(tensors: Mapping[str, torch.Tensor], pieces: Mapping[str, list], prefix: str,
                 suffix: str = "") -> dict:
    """``{prefix + global key + suffix: ShardedTensorPieces}`` for local tensors and their pieces.

    Several local tensors (or several pieces of one) may cover one global key; they are joined.
    """
    out: dict[str, ShardedTensorPieces] = {}
    for name, t in tensors.items():
        for p in pieces[name]:
            key = f"{prefix}{p.key}{suffix}"
            entry = out.get(key)
            if entry is None:
                entry = out[key] = ShardedTensorPieces(p.global_shape, t.dtype, [])
            entry.chunks.append((p.offsets, t[p.local]))
    return out


# ------------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete sharded checkpoint directory (DCP ``.metadata`` and our ``meta.json``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.json").is_file()


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete sharded checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and is_sharded_checkpoint(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def write_latest(run_dir: Path, path: Path) -> None:
    """Point ``checkpoints/latest`` at ``path`` (atomic replace, fsynced)."""
    _write_atomic(Path(run_dir) / "checkpoints" / "latest", Path(path).name + "\n")


def find_best(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/best`` names (the best by validation), or None when there is none."""
    best = Path(run_dir) / "checkpoints" / "best"
    named = best.read_text().strip() if best.is_file() else ""
    path = best.parent / named if named else None
    return path if path is not None and is_sharded_checkpoint(path) else None


def run_checkpoint(path: str | Path, *, best: bool = False) -> Path | None:
    """The checkpoint a path means: a checkpoint (directory or file) itself; for a run directory (or its
    ``checkpoints/`` folder) the newest complete one (``latest``), or with ``best`` the one
    ``checkpoints/best`` names. None when a run directory holds none. Raises ``CheckpointError`` for
    ``best`` on a run without a best checkpoint, or on a single checkpoint."""
    from gnnmegatron.training.checkpoint import find_latest

    path = Path(path)
    if is_sharded_checkpoint(path) or path.is_file():
        if best:
            raise CheckpointError(f"{path} is one checkpoint; the best checkpoint is chosen from a run directory")
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    if best:
        found = find_best(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir} has no best checkpoint ({run_dir / 'checkpoints' / 'best'} is missing or "
                                  f"names no complete checkpoint): it was never validated, or was trained by an "
                                  f"earlier release; use its latest checkpoint")
        return found
    try:
        found, _ = find_resume(run_dir)  # newest complete sharded checkpoint
    except CheckpointError:  # single-file checkpoints of an earlier release, or none complete
        found = None
    return found if found is not None else find_latest(run_dir)  # or a single-file one


def find_resume(run_dir: Path) -> tuple[Path | None, str]:
    """The checkpoint a run resumes from, and a note when the ``latest`` pointer was not used.

    ``latest`` is followed when it names a complete checkpoint. Otherwise (missing, empty, or
    naming something gone or incomplete) the newest complete checkpoint by step is used and the
    note says so. Raises ``CheckpointError`` when the run holds checkpoint files but none is
    complete or loadable (a run never silently starts over).
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None, ""
    latest = folder / "latest"
    named = latest.read_text().strip() if latest.is_file() else ""
    if named and is_sharded_checkpoint(folder / named):
        return folder / named, ""
    complete = complete_checkpoints(run_dir)
    legacy = sorted(p.name for p in folder.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name))
    if named and (folder / named).is_file() and named in legacy:
        raise CheckpointError(
            f"{folder / named} is a single-file checkpoint of an earlier gnnmegatron release; it cannot be "
            f"resumed by this one. Start a new run_dir with train.init_from={folder / named} to continue from "
            f"its weights")
    if complete:
        step, path = complete[-1]
        why = "is missing" if not latest.exists() else ("is empty" if not named else f"names {named!r}, which is "
                                                          f"not a complete checkpoint")
        return path, f"{latest} {why}; resuming from the newest complete checkpoint {path.name} (step {step})"
    partial = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if partial or legacy:
        raise CheckpointError(
            f"{folder} holds {(partial + legacy)[:6]} but no complete checkpoint (a save was interrupted, or the "
            f"files come from an earlier release); nothing can be resumed. Pass --resume overwrite to start over "
            f"in this run_dir (deleting them), or choose another run_dir")
    return None, ""


# ------------------------------------------------------------------------------------------ save
def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cause(exc: BaseException) -> str:
    """The root errors of a DCP failure (its ``CheckpointException`` wraps one per rank), one line each."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, pair in sorted(failures.items()):
            inner = pair[0] if isinstance(pair, tuple) else pair
            text = str(inner).strip().splitlines()[0][:200] if str(inner).strip() else ""
            parts.append(f"rank {rank}: {type(inner).__name__}: {text}")
        return "; ".join(parts)
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def _is_coordinator(group) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def write_best(run_dir: Path, path: Path) -> None:
    """Point ``checkpoints/best`` at ``path`` (atomic replace, fsynced)."""
    _write_atomic(Path(run_dir) / "checkpoints" / "best", Path(path).name + "\n")


def save_sharded(run_dir: Path, step: int, state: dict[str, Any], info: dict[str, Any], *, keep: int = 2,
                 group=None, on_commit=None, best: bool = False) -> Path:
    """Write ``state`` (a DCP state dict from ``pieces_state`` & co.) as ``step_XXXXXXXX`` and commit it.

    Collective over ``group`` (default: the world). ``info`` is written to ``meta.json`` by the
    coordinator. ``on_commit(path)`` runs on the coordinator after the rename and before
    ``latest`` moves (model cards). ``best``: also point ``checkpoints/best`` at it (before pruning,
    which keeps it). Returns the committed checkpoint's path.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    final = step_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    if _is_coordinator(group):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("step_*.partial"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    _barrier(group)
    from torch.distributed.checkpoint.api import CheckpointException

    SavePlanner, _ = _planners()
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=FileSystemWriter(str(partial), sync_files=True), planner=SavePlanner(),
                     process_group=group, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as exc:  # disk full, permissions...: the last checkpoint is intact
        raise CheckpointError(f"writing checkpoint step {step} into {partial} failed ({_cause(exc)}); the previous "
                              f"checkpoint and 'latest' are untouched, and the next save removes the partial "
                              f"directory") from exc
    _barrier(group)
    if _is_coordinator(group):
        _write_atomic(partial / "meta.json", json.dumps(info, indent=1, default=str))
        _fsync_dir(partial)
        if final.exists():  # same step written again (a run stopped and resumed from an older save)
            aside = final.with_name(final.name + f".replaced-{os.getpid()}")
            final.rename(aside)
            partial.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            partial.rename(final)
        _fsync_dir(folder)
        if on_commit is not None:
            on_commit(final)
        write_latest(run_dir, final)
        if best:
            write_best(run_dir, final)
        prune(run_dir, keep, final)
    _barrier(group)
    return final


def prune(run_dir: Path, keep: int, current: Path) -> list[Path]:
    """Remove complete checkpoints beyond the ``keep`` newest by step, never ``current`` nor the one
    ``checkpoints/best`` names; returns the removed."""
    complete = complete_checkpoints(run_dir)
    keep_paths = {p for _, p in complete[-keep:]} | {Path(current)} | {p for p in [find_best(run_dir)] if p}
    removed = []
    for _, path in complete:
        if path not in keep_paths:
            for card in path.parent.glob(f"{path.name}.card.*"):
                card.unlink()
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------ load
def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a sharded checkpoint (``CheckpointError`` if absent or unreadable)."""
    path = Path(path)
    try:
        info = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a complete gnnmegatron checkpoint ({exc}); resume from an earlier "
                              f"one") from exc
    if info.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{path}/meta.json is not a {SHARDED_FORMAT} checkpoint (format={info.get('format')!r})")
    return info


def _metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{path}: DCP metadata unreadable ({type(exc).__name__}: {exc}); the checkpoint is "
                              f"damaged, resume from an earlier one") from exc


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it assumes a single process (which
    ``no_dist`` says already); inference loads print it once per checkpoint. Silenced there only."""
    if dist.is_initialized() or threading.current_thread() is not threading.main_thread():
        yield  # catch_warnings swaps the process-wide filters: not from the asynchronous saver's thread
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_sharded(path: Path, state: dict[str, Any], *, group=None, missing_ok: tuple[str, ...] = ()) -> dict:
    """Fill ``state`` (``ShardedTensorPieces``, tensors, ``None`` placeholders for pickled values)
    from checkpoint ``path``: each rank reads the regions its pieces cover. Collective.

    Keys starting with one of ``missing_ok`` may be absent from the checkpoint (they are
    dropped from ``state``); any other absent key is an error naming it. Returns ``state``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = _metadata(path).state_dict_metadata
    absent = [k for k in state if k not in md]
    bad = [k for k in absent if not k.startswith(missing_ok)]
    if bad:
        raise CheckpointError(f"{path} lacks {bad[:5]}{' ...' if len(bad) > 5 else ''}; it was written by another "
                              f"model or an incompatible release")
    for k in absent:
        state.pop(k)
    for k, v in state.items():
        saved = md[k]
        size = getattr(saved, "size", None)
        if size is not None and hasattr(v, "size") and tuple(v.size()) != tuple(size):
            raise CheckpointError(f"{path}: {k} has shape {tuple(size)} in the checkpoint but {tuple(v.size())} here; "
                                  f"it was written by another model")
    from torch.distributed.checkpoint.api import CheckpointException

    _, LoadPlanner = _planners()
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=FileSystemReader(str(path)), planner=LoadPlanner(),
                     process_group=group, no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        raise CheckpointError(f"{path} cannot be read ({_cause(exc)}); it may be truncated — resume from an "
                              f"earlier checkpoint") from exc
    return state


def load_full_state(path: Path, weights: str = "raw") -> dict[str, Any]:
    """One process: the single-device view of a sharded checkpoint (``model`` state dict, ``meta``).

    Args:
        weights: ``raw`` (the trained weights), ``ema`` (the moving average of the parameters where
            the checkpoint has one, buffers as trained; the trained weights otherwise) or ``both``
            (``model`` raw and ``ema`` the averaged parameters, for export).

    Returns a dict like the single-file format's (``model``, ``model_config``, ``stats``, ``step``,
    ``config``, ``seen``, ``best_val``, ``layout``, ``world_size``, ``optimizer``: None) with
    ``weights`` (``raw`` or ``ema``: what ``model`` holds) and ``ema`` (``both``: the averaged
    parameters, or None when the checkpoint has none).
    """
    if weights not in ("raw", "ema", "both"):
        raise ValueError(f"weights must be raw, ema or both, got {weights!r}")
    path = Path(path)
    read_meta(path)
    md = _metadata(path).state_dict_metadata
    has_ema = any(k.startswith("ema/") for k in md)
    use_ema = weights == "ema" and has_ema
    state: dict[str, Any] = {"meta": None}
    for key, m in md.items():
        wanted = key.startswith("model/") and not (use_ema and f"ema/{key[len('model/'):]}" in md)
        if wanted or (key.startswith("ema/") and (use_ema or weights == "both")):
            state[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    load_sharded(path, state, group=None)
    meta = state.pop("meta")
    model = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    ema = {k[len("ema/"):]: v for k, v in state.items() if k.startswith("ema/")}
    if use_ema:
        model.update(ema)
    return {"format_version": SHARDED_FORMAT, "model": model, "optimizer": None, **meta,
            "weights": "ema" if use_ema else "raw", "ema": ema if weights == "both" and has_ema else None}


def check_storage(path: Path, metadata=None) -> int:
    """Checks, without reading tensor data, that every byte range the DCP metadata points to lies in an
    existing shard file (a deleted or truncated ``.distcp`` file is found here, not at load time).
    Returns the number of storage items; raises ``CheckpointError`` naming the files otherwise."""
    metadata = metadata if metadata is not None else _metadata(path)
    sizes: dict[str, int | None] = {}
    problems: dict[str, str] = {}
    items = getattr(metadata, "storage_data", None) or {}
    for info in items.values():
        name = getattr(info, "relative_path", None)
        if name is None:
            continue
        if name not in sizes:
            f = Path(path) / name
            sizes[name] = f.stat().st_size if f.is_file() else None
        end = int(info.offset) + int(info.length)
        if sizes[name] is None:
            problems[name] = "missing"
        elif end > sizes[name] and name not in problems:
            problems[name] = f"truncated ({sizes[name]} bytes, data up to byte {end})"
    if problems:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(problems.items()))
        raise CheckpointError(f"{path}: shard file(s) damaged: {listed}; resume from an earlier checkpoint")
    return len(items)


def checkpoint_info(path: Path) -> dict[str, Any]:
    """What a sharded checkpoint holds: ``meta.json`` plus per-tensor shapes, chunk counts and bytes per file."""
    path = Path(path)
    info = read_meta(path)
    md_all = _metadata(path)
    md = md_all.state_dict_metadata
    tensors = {}
    for key, m in md.items():
        if hasattr(m, "chunks"):
            tensors[key] = {"shape": list(m.size), "dtype": str(m.properties.dtype).replace("torch.", ""),
                            "chunks": len(m.chunks)}
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.distcp"))}
    stored = check_storage(path, md_all)
    groups: dict[str, int] = {}
    for key, t in tensors.items():
        groups[key.split("/", 1)[0]] = groups.get(key.split("/", 1)[0], 0) + 1
    return {"path": str(path), **info, "tensors": tensors, "tensor_counts": groups, "files": files,
            "bytes": sum(files.values()), "stored_items": stored}


class AsyncSaver:
    """Background checkpoint writes: the caller stages CPU copies, a thread runs DCP and the commit.

    Uses its own gloo group (collectives from a second thread must not share the training
    group). ``wait()`` blocks until the previous save is committed (and re-raises its error).
    """

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, fn, *args, **kwargs) -> None:
        self.wait()

        def run():
            try:
                fn(*args, group=self.group, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="gnnmegatron-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
