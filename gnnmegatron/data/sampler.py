"""Chunk-aware, budgeted, data-parallel, resumable batch sampling and a graph loader.

`ChunkAwareSampler` turns a set of graph indices into batches of graph indices:

* **Chunk-aware shuffle.** The store keeps graphs in storage chunks (``graph_chunks``). An
  epoch permutes the chunks that hold selected graphs, then the graphs inside each chunk, so
  consecutive batches read one chunk at a time and every chunk is decompressed about once
  per epoch. ``window_chunks=w`` groups w consecutive (already permuted) chunks into a window
  and shuffles across the whole window: batches then mix graphs of w chunks (better mixing
  when chunks hold correlated structures, e.g. one MD trajectory) at the cost of the reader
  keeping w chunks cached. ``window_chunks=1`` (default) is the most I/O-friendly;
  ``window_chunks >= number of chunks`` is a plain uniform shuffle.
* **Budgets.** Graphs are added to a batch in epoch order until the next one would exceed
  ``budget_atoms`` (sum of atoms), ``budget_edges`` (estimated as atoms x ``edges_per_atom``)
  or ``max_graphs``; a graph larger than the budget forms a batch of its own (warned once).
  Batch count therefore varies a little between epochs.
* **Data parallelism.** Batches are formed on the global order (identical on every rank);
  global batch b goes to rank ``b % dp_size``; a trailing round that cannot give every rank a
  batch is dropped, so all ranks run the same number of steps.
* **Determinism and resume.** The order depends only on (seed, epoch). ``state_dict()``
  records the epoch and batches consumed plus a fingerprint of the index set, graph sizes,
  chunking and budget config; ``load_state_dict()`` refuses a state from another dataset or
  config, and the next batch yielded is exactly the one an uninterrupted run would yield.

Iteration continues from ``batches_done`` (so a resumed sampler picks up mid-epoch); once an
epoch is exhausted a new iteration replays it from the start unless ``set_epoch`` moved on.
Call ``set_epoch(e)`` at the start of every epoch (it keeps progress when e is the current
epoch, so calling it after ``load_state_dict`` is safe).

`GraphLoader` reads the sampler's batches from a store (``store.get_many``) and collates
them (`gnnmegatron.data.batch.collate`), optionally prefetching in a background thread;
order and resume state are those of the sampler.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import warnings

import numpy as np
import torch

from gnnmegatron.data.batch import collate

__all__ = ["ChunkAwareSampler", "GraphLoader", "chunk_shuffle"]

_STATE_VERSION = 1


def _positive_or_none(name, value, kind=float):
    if value is None:
        return None
    if not value > 0:
        raise ValueError(f"{name} must be > 0 or None, got {value!r}")
    return kind(value)


def chunk_shuffle(sel, graph_chunks, window_chunks, rng):
    """Chunk-aware shuffle of graph indices ``sel``: storage chunks (grouped into windows of
    ``window_chunks``) in random order, graphs in random order inside each window.

    Shapes:
        sel [S] -> [S]; graph_chunks [C+1].
    """
    if len(sel) == 0:
        return sel
    chunk = np.searchsorted(graph_chunks, sel, side="right") - 1
    uniq, inv = np.unique(chunk, return_inverse=True)
    chunk_rank = rng.permutation(len(uniq))  # random position of each chunk in the epoch
    window = chunk_rank[inv] // window_chunks
    noise = rng.random(len(sel))
    return sel[np.lexsort((noise, window))]  # by window, then randomly inside it


class ChunkAwareSampler:
    """Batches of graph indices by atom/edge budget; see the module docstring.

    Args:
        atom_counts: atoms of every graph in the store.
        graph_chunks: storage-chunk boundaries (graph i is in chunk c iff
            ``graph_chunks[c] <= i < graph_chunks[c+1]``), from ``store.graph_chunks``.
        indices: graphs to sample (e.g. the train split); None means all graphs.
        seed: base seed (>= 0); the order is a function of (seed, epoch).
        shuffle: False keeps ``indices`` in the order given.
        budget_atoms: max atoms per batch.
        budget_edges: max estimated edges per batch (needs ``edges_per_atom``).
        edges_per_atom: average directed edges per atom, for the edge estimate.
        max_graphs: max graphs per batch.
        dp_rank, dp_size: data-parallel rank and world size.
        window_chunks: chunks shuffled together (1 = most I/O-friendly).

    Shapes:
        atom_counts: [G]; graph_chunks: [C+1]; indices: [S] (S selected graphs).
    """

    def __init__(self, atom_counts, graph_chunks, indices=None, *, seed, shuffle=True, budget_atoms=None,
                 budget_edges=None, edges_per_atom=None, max_graphs=None, dp_rank=0, dp_size=1,
                 window_chunks=1):
        self.atom_counts = np.asarray(atom_counts, dtype=np.int64).reshape(-1)
        self.graph_chunks = np.asarray(graph_chunks, dtype=np.int64).reshape(-1)
        num_graphs = len(self.atom_counts)
        gc = self.graph_chunks
        if len(gc) < 1 or gc[0] != 0 or gc[-1] != num_graphs or np.any(np.diff(gc) < 0):
            raise ValueError(f"graph_chunks must be non-decreasing boundaries from 0 to "
                             f"num_graphs={num_graphs}, "
                             f"got {gc[:3].tolist()}...{gc[-3:].tolist()} ({len(gc)} entries)")
        if np.any(self.atom_counts < 0):
            raise ValueError(f"atom_counts must be >= 0; graph {int(np.argmin(self.atom_counts))} has "
                             f"{int(self.atom_counts.min())}")
        if indices is None:
            idx = np.arange(num_graphs, dtype=np.int64)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= num_graphs):
            bad = idx[(idx < 0) | (idx >= num_graphs)][0]
            raise ValueError(f"index {int(bad)} is out of range for a store of {num_graphs} graphs")
        if len(np.unique(idx)) != len(idx):
            uniq, cnt = np.unique(idx, return_counts=True)
            raise ValueError(f"indices must be unique; graph {int(uniq[cnt > 1][0])} appears "
                             f"{int(cnt[cnt > 1][0])} times")
        self.indices = idx
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.budget_atoms = _positive_or_none("budget_atoms", budget_atoms, int)
        self.budget_edges = _positive_or_none("budget_edges", budget_edges)
        self.edges_per_atom = _positive_or_none("edges_per_atom", edges_per_atom)
        self.max_graphs = _positive_or_none("max_graphs", max_graphs, int)
        if self.budget_edges is not None and self.edges_per_atom is None:
            raise ValueError("budget_edges needs edges_per_atom (average directed edges per atom, e.g. 30 "
                             "for a 5 Å cutoff in dense solids) to estimate edges as atoms * edges_per_atom")
        if self.budget_atoms is None and self.budget_edges is None and self.max_graphs is None:
            raise ValueError("give at least one of budget_atoms, budget_edges (with edges_per_atom) "
                             "or max_graphs")
        if not (isinstance(dp_size, (int, np.integer)) and dp_size >= 1 and 0 <= dp_rank < dp_size):
            raise ValueError(f"need dp_size >= 1 and 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        if not (isinstance(window_chunks, (int, np.integer)) and window_chunks >= 1):
            raise ValueError(f"window_chunks must be an int >= 1, got {window_chunks!r}")
        self.window_chunks = int(window_chunks)
        self.epoch = 0
        self.batches_done = 0
        self._plan_cache = None  # (epoch, global batches)
        self._warned_oversize = False
        self._fingerprint = None

    @classmethod
    def from_store(cls, store, indices=None, **kwargs):
        """Sampler over a `GraphStore` (uses ``store.atom_counts`` and ``store.graph_chunks``)."""
        return cls(store.atom_counts, store.graph_chunks, indices, **kwargs)

    # ---------------------------------------------------------------- epoch plan
    def _epoch_order(self, epoch):
        sel = self.indices
        if not self.shuffle or len(sel) == 0:
            return sel
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch)]))
        return chunk_shuffle(sel, self.graph_chunks, self.window_chunks, rng)

    def _split(self, order):
        """Greedy budgeted batches over ``order`` (loop over batches, not graphs)."""
        n = len(order)
        atoms = self.atom_counts[order]
        cum_a = np.concatenate([[0], np.cumsum(atoms)])
        if self.budget_edges is not None:
            cum_e = np.concatenate([[0.0], np.cumsum(atoms * self.edges_per_atom)])
        bounds, s = [0], 0
        while s < n:
            e = n
            if self.budget_atoms is not None:
                e = min(e, int(np.searchsorted(cum_a, cum_a[s] + self.budget_atoms, side="right")) - 1)
            if self.budget_edges is not None:
                limit = cum_e[s] + self.budget_edges * (1 + 1e-12)
                e = min(e, int(np.searchsorted(cum_e, limit, side="right")) - 1)
            if self.max_graphs is not None:
                e = min(e, s + self.max_graphs)
            if e <= s:  # one graph over budget: a batch of its own
                e = s + 1
                if not self._warned_oversize:
                    self._warned_oversize = True
                    warnings.warn(
                        f"graph {int(order[s])} has {int(atoms[s])} atoms, over the batch budget "
                        f"(budget_atoms={self.budget_atoms}, budget_edges={self.budget_edges}, "
                        f"edges_per_atom={self.edges_per_atom}); it forms a batch of its own "
                        f"(further oversized graphs are not reported)", stacklevel=3)
            bounds.append(e)
            s = e
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def global_batches(self, epoch=None):
        """All global batches of an epoch (before DP sharding and dropping)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._split(self._epoch_order(epoch)))
        return self._plan_cache[1]

    def epoch_batches(self):
        """This rank's batches for the current epoch, as int64 arrays."""
        glob = self.global_batches()
        rounds = len(glob) // self.dp_size
        return glob[self.dp_rank: rounds * self.dp_size: self.dp_size]

    def epoch_summary(self):
        """Counts for logging: global batches, batches per rank, dropped batches and graphs."""
        glob = self.global_batches()
        rounds = len(glob) // self.dp_size
        dropped = glob[rounds * self.dp_size:]
        return {"epoch": self.epoch, "global_batches": len(glob), "batches_per_rank": rounds,
                "dropped_batches": len(dropped), "dropped_graphs": int(sum(len(b) for b in dropped))}

    def __len__(self):
        return len(self.global_batches()) // self.dp_size

    # ---------------------------------------------------------------- iteration
    def set_epoch(self, epoch):
        """Select the epoch; progress resets only when the epoch changes."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0

    def _begin(self):
        """Position the next iteration starts from (restarts a finished epoch)."""
        if self.batches_done >= len(self):
            self.batches_done = 0
        if len(self) == 0:
            warnings.warn(f"epoch {self.epoch} has no batches on rank {self.dp_rank}: "
                          f"{self.epoch_summary()} (fewer global batches than dp_size={self.dp_size}?)",
                          stacklevel=3)
        return self.batches_done

    def __iter__(self):
        batches = self.epoch_batches()
        for k in range(self._begin(), len(batches)):
            self.batches_done = k + 1
            yield batches[k].tolist()

    # ---------------------------------------------------------------- state
    def fingerprint(self):
        """Hash of the index set, graph sizes, chunking and batching config (not seed/epoch)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.indices.tobytes())
            h.update(self.atom_counts[self.indices].tobytes())
            h.update(self.graph_chunks.tobytes())
            cfg = [len(self.atom_counts), self.shuffle, self.budget_atoms, self.budget_edges,
                   self.edges_per_atom, self.max_graphs, self.window_chunks]
            h.update(json.dumps(cfg).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def state_dict(self):
        """Resume state; equal on every DP rank (each rank may save or load its own copy)."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
                "seed": self.seed, "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "num_selected": len(self.indices), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state):
        """Restore ``state_dict()``; raises ValueError if it came from another dataset/config."""
        missing = {"epoch", "batches_done", "seed", "dp_size", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks keys {sorted(missing)}; "
                             f"was it saved by ChunkAwareSampler?")
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(
                f"sampler state was saved for another dataset or batching config (fingerprint "
                f"{state['fingerprint']} with {state.get('num_selected', '?')} selected graphs; "
                f"this sampler: "
                f"{self.fingerprint()} with {len(self.indices)}); use the same store, split and "
                f"budget_atoms/budget_edges/edges_per_atom/max_graphs/shuffle/window_chunks to resume")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed={state['seed']} but this sampler has seed={self.seed}; "
                             f"create the sampler with seed={state['seed']} to resume")
        if state["dp_size"] != self.dp_size:
            raise ValueError(f"sampler state was saved with dp_size={state['dp_size']} but this sampler has "
                             f"dp_size={self.dp_size}; resuming mid-epoch needs the same data-parallel size")
        self.epoch = int(state["epoch"])
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(f"sampler state has batches_done={done} but epoch {self.epoch} has {len(self)} "
                             f"batches per rank")
        self.batches_done = done


_END = object()


class _CudaBatch:
    """A batch collated on a loader stream and the event that marks its copies done."""

    __slots__ = ("batch", "event")

    def __init__(self, batch, event):
        self.batch, self.event = batch, event


class GraphLoader:
    """Iterable of collated batch dicts, in the sampler's order.

    Args:
        store: object with ``get_many(indices) -> list[dict]`` (e.g. `GraphStore`).
        sampler: a `ChunkAwareSampler` (its progress is advanced only when a batch is
            handed to the caller, so ``state_dict()`` is exact even with prefetching).
        cutoff: neighbour-list radius (Å).
        dtype: float dtype of the batch.
        device: device of the batch tensors (and of the neighbour search).
        prefetch: batches read and collated ahead in a background thread (0: none).

    Shapes:
        Each item is a batch dict (see `gnnmegatron.data.batch`).
    """

    def __init__(self, store, sampler, *, cutoff, dtype=torch.float32, device="cpu", prefetch=2):
        if not hasattr(store, "get_many"):
            raise TypeError(f"store must have get_many(indices), got {type(store).__name__}")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be > 0 (Å), got {cutoff!r}")
        if not (isinstance(prefetch, int) and prefetch >= 0):
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.store, self.sampler = store, sampler
        self.cutoff, self.dtype, self.device, self.prefetch = float(cutoff), dtype, device, prefetch
        self._cuda = torch.device(device).type == "cuda"
        self._streams: dict[int, object] = {}

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)

    def _load(self, indices):
        """Read and collate one batch. On a CUDA device the host-to-device copies and the neighbour
        search run on a stream of the calling (prefetch) thread, and the batch comes with an event
        the consumer's stream waits for: the training stream never waits for data it does not use."""
        idx = indices.tolist()
        structures = self.store.get_many(idx)
        if len(structures) != len(idx):
            raise RuntimeError(f"store.get_many returned {len(structures)} structures for {len(idx)} indices")
        items = [dict(s, index=i) for s, i in zip(structures, idx)]
        if not self._cuda:
            return collate(items, self.cutoff, dtype=self.dtype, device=self.device)
        key = threading.get_ident()
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=self.device)
        stream = self._streams[key]
        with torch.cuda.stream(stream):
            out = collate(items, self.cutoff, dtype=self.dtype, device=self.device)
            event = torch.cuda.Event()
            event.record(stream)
        return _CudaBatch(out, event)

    @staticmethod
    def _ready(out):
        """The batch dict, once the consumer's CUDA stream has waited for its copies (no-op on CPU)."""
        if not isinstance(out, _CudaBatch):
            return out
        current = torch.cuda.current_stream()
        current.wait_event(out.event)
        for v in out.batch.values():
            if torch.is_tensor(v) and v.is_cuda:
                v.record_stream(current)  # the loader's stream allocated it; keep it alive for this stream
        return out.batch

    def __iter__(self):
        return self.iterate()

    def iterate(self, keep=None):
        """The epoch's batches in order; with ``keep(k)`` only the batches it accepts are read at all
        (validation: each data-parallel rank reads only the batches it evaluates)."""
        batches = self.sampler.epoch_batches()
        start = self.sampler._begin()
        wanted = [k for k in range(start, len(batches)) if keep is None or keep(k)]
        if self.prefetch == 0:
            for k in wanted:
                out = self._ready(self._load(batches[k]))
                self.sampler.batches_done = k + 1
                yield out
            if keep is not None:
                self.sampler.batches_done = len(batches)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def worker():
            try:
                for k in wanted:
                    if stop.is_set() or not put((k, self._load(batches[k]))):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, re-raised there
                put(err)

        thread = threading.Thread(target=worker, name="GraphLoader-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    if keep is not None:
                        self.sampler.batches_done = len(batches)
                    return
                if isinstance(item, BaseException):
                    raise item
                k, out = item
                self.sampler.batches_done = k + 1
                yield self._ready(out)
        finally:
            stop.set()
            thread.join()
