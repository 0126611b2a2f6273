"""Several graph stores read as one mixture: sampling weights, a joint index space, a sampler.

Multi-source pretraining (the study trained on MPtrj, ANI-1x, OC20, OC22 and QM7-X at once) reads
S stores, each with its own split, and mixes their training graphs by sampling weight.

* :class:`MixtureStore` joins the stores into one index space: graph ``offsets[k] + i`` is graph
  ``i`` of store ``k``. ``get_many`` returns each structure with ``source = k`` (the mixture's
  source id, which the model's heads and reference energies use) and reads every store through
  its own chunk cache. Its ``atom_counts`` and ``graph_chunks`` are the stores' ones
  concatenated, so a ``ChunkAwareSampler`` works over it unchanged (validation does).
* :func:`mixture_weights` turns the sources' training sizes into sampling probabilities:
  ``proportional`` (p_k ∝ n_k graphs), ``uniform``, ``temperature`` (p_k ∝ n_k^(1/T)) or ``given``.
* :class:`MixtureSampler` is a ``ChunkAwareSampler`` whose epoch order is a mixture: an epoch has
  ``epoch_graphs`` slots; each slot's source is drawn from the probabilities (independently,
  seeded by (seed, epoch)) and filled with that source's next graph in a chunk-aware shuffle of
  its own training graphs (a source drawn more often than it has graphs starts a new shuffle, so
  small sources are repeated and large ones sub-sampled). Batches are then cut by the atom budget
  and dealt to data-parallel ranks exactly like the single-store sampler (global batch b ->
  rank b % dp), so the order depends only on (seed, epoch) and ``state_dict`` resumes mid-epoch
  exactly; its fingerprint covers the sources and their weights.

Batches mix sources: a batch may hold structures of several sources, with and without energy,
force or stress labels (``gnnmegatron.data.batch`` masks them).

Shapes:
    S sources, G = sum of the stores' graphs, C = sum of their storage chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from gnnmegatron.data.sampler import ChunkAwareSampler, chunk_shuffle

__all__ = ["MixtureSampler", "MixtureStore", "mixture_weights"]

MODES = ("proportional", "uniform", "temperature", "given")


def mixture_weights(sizes: Sequence[int], mode: str = "proportional", *, temperature: float = 1.0,
                    weights: Sequence[float] | None = None) -> np.ndarray:
    """Sampling probabilities of S sources.

    Args:
        sizes: training graphs of each source (S,).
        mode: ``proportional`` (p ∝ sizes), ``uniform``, ``temperature`` (p ∝ sizes^(1/temperature))
            or ``given`` (p ∝ ``weights``).
        temperature: > 0, for ``temperature``.
        weights: S non-negative numbers, for ``given``.

    Returns:
        (S,) float64 probabilities summing to 1; a source with no training graphs gets 0.

    Raises:
        ValueError: unknown mode, mismatched lengths (names both), negative or all-zero weights.
    """
    n = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if len(n) == 0 or np.any(n < 0):
        raise ValueError(f"mixture_weights needs one non-negative size per source, got {list(sizes)}")
    if mode == "proportional":
        w = n.copy()
    elif mode == "uniform":
        w = (n > 0).astype(np.float64)
    elif mode == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = np.where(n > 0, n ** (1.0 / temperature), 0.0)
    elif mode == "given":
        if weights is None or len(weights) != len(n):
            got = None if weights is None else len(weights)
            raise ValueError(f"sampling 'given' needs one weight per source: {len(n)} sources, {got} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"sampling weights must be finite and >= 0, got {list(weights)}")
        w = np.where(n > 0, w, 0.0)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {MODES}")
    if w.sum() <= 0:
        raise ValueError(f"no source can be sampled (sizes {list(sizes)}, mode {mode!r}, weights {weights})")
    return w / w.sum()


class MixtureStore:
    """S graph stores as one read-only store (see the module docstring).

    Args:
        stores: objects with ``atom_counts``, ``graph_chunks``, ``get_many`` and ``len`` (``GraphStore``).
        names: one name per store (the sources' names).
    """

    def __init__(self, stores: Sequence, names: Sequence[str]):
        if len(stores) != len(names):
            raise ValueError(f"MixtureStore got {len(stores)} stores but {len(names)} names")
        if not stores:
            raise ValueError("MixtureStore needs at least one store")
        self.stores = list(stores)
        self.names = [str(n) for n in names]
        sizes = [len(s) for s in self.stores]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._atom_counts = np.concatenate([np.asarray(s.atom_counts, dtype=np.int64) for s in self.stores])
        chunks = [np.zeros(1, np.int64)]
        for k, s in enumerate(self.stores):
            chunks.append(np.asarray(s.graph_chunks, dtype=np.int64)[1:] + self.offsets[k])
        self._graph_chunks = np.concatenate(chunks)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"MixtureStore({dict(zip(self.names, (len(s) for s in self.stores)))})"

    @property
    def atom_counts(self) -> np.ndarray:
        """[G] atoms per graph, stores concatenated."""
        return self._atom_counts

    @property
    def graph_chunks(self) -> np.ndarray:
        """[C+1] storage-chunk boundaries in the joint index space."""
        return self._graph_chunks.copy()

    @property
    def sources(self) -> np.ndarray:
        """[G] int32 mixture source id of every graph."""
        return np.repeat(np.arange(len(self.stores), dtype=np.int32), np.diff(self.offsets))

    def to_global(self, k: int, local) -> np.ndarray:
        """Joint indices of graphs ``local`` of store ``k``."""
        return np.asarray(local, dtype=np.int64) + self.offsets[k]

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(store id, index in that store) of joint indices."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"graph index {int(bad)} out of range for a mixture of {len(self)} graphs "
                             f"({dict(zip(self.names, np.diff(self.offsets).tolist()))})")
        k = np.searchsorted(self.offsets, idx, side="right") - 1
        return k, idx - self.offsets[k]

    def describe(self, indices) -> list[str]:
        """``"name:local index"`` of joint indices (for messages)."""
        k, local = self.locate(indices)
        return [f"{self.names[a]}:{int(b)}" for a, b in zip(k, local)]

    def get_many(self, indices) -> list[dict]:
        """Structures for joint ``indices`` (in that order), ``source`` set to the mixture's id and
        ``index`` to the joint index."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        k, local = self.locate(idx)
        out: list = [None] * idx.size
        for store_id in np.unique(k):
            pos = np.flatnonzero(k == store_id)
            for p, s in zip(pos.tolist(), self.stores[store_id].get_many(local[pos])):
                s["source"] = int(store_id)
                s["index"] = int(idx[p])
                out[p] = s
        return out

    def __getitem__(self, i) -> dict:
        return self.get_many([i])[0]


class MixtureSampler(ChunkAwareSampler):
    """A ``ChunkAwareSampler`` whose epoch is a weighted mixture of sources (module docstring).

    Args:
        atom_counts, graph_chunks: of the joint index space (``MixtureStore``).
        source_indices: S arrays, the joint training indices of each source.
        probabilities: (S,) sampling probabilities (``mixture_weights``).
        epoch_graphs: graphs per epoch (slots); default the sum of the sources' graphs.
        seed, budget_atoms, budget_edges, edges_per_atom, max_graphs, dp_rank, dp_size,
            window_chunks: as ``ChunkAwareSampler`` (shuffle is always on).
    """

    def __init__(self, atom_counts, graph_chunks, source_indices: Sequence, probabilities, *, seed,
                 epoch_graphs: int | None = None, **kwargs):
        if kwargs.pop("shuffle", True) is not True:
            raise ValueError("MixtureSampler always shuffles; use ChunkAwareSampler(shuffle=False) for a fixed order")
        srcs = [np.sort(np.asarray(s, dtype=np.int64).reshape(-1)) for s in source_indices]
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        if len(p) != len(srcs):
            raise ValueError(f"MixtureSampler got {len(srcs)} sources but {len(p)} probabilities")
        if np.any(p < 0) or abs(p.sum() - 1) > 1e-9:
            raise ValueError(f"probabilities must be >= 0 and sum to 1, got {p.tolist()}")
        empty = [k for k, s in enumerate(srcs) if len(s) == 0 and p[k] > 0]
        if empty:
            raise ValueError(f"sources {empty} have no training graphs but a sampling probability > 0")
        everything = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
        super().__init__(atom_counts, graph_chunks, everything, seed=seed, shuffle=True, **kwargs)
        self.source_indices = srcs
        self.probabilities = p
        total = int(sum(len(s) for s in srcs))
        self.epoch_graphs = int(epoch_graphs) if epoch_graphs else total
        if self.epoch_graphs < 1:
            raise ValueError(f"epoch_graphs must be >= 1, got {epoch_graphs}")

    def epoch_sources(self, epoch: int | None = None) -> np.ndarray:
        """(epoch_graphs,) source id of every slot of an epoch (iid draws from the probabilities)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x6D6978]))  # "mix"
        return rng.choice(len(self.probabilities), size=self.epoch_graphs, p=self.probabilities)

    def _source_stream(self, k: int, epoch: int, count: int) -> np.ndarray:
        """The first ``count`` graphs of source k's stream in an epoch: chunk-aware shuffles, one per pass."""
        sel = self.source_indices[k]
        parts, have, rep = [], 0, 0
        while have < count:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, k, rep]))
            parts.append(chunk_shuffle(sel, self.graph_chunks, self.window_chunks, rng))
            have += len(sel)
            rep += 1
        return np.concatenate(parts)[:count] if parts else np.zeros(0, np.int64)

    def _epoch_order(self, epoch):
        labels = self.epoch_sources(epoch)
        order = np.empty(len(labels), dtype=np.int64)
        for k in range(len(self.source_indices)):
            slots = np.flatnonzero(labels == k)
            order[slots] = self._source_stream(k, int(epoch), len(slots))
        return order

    def fingerprint(self):
        """Hash of the sources' index sets, graph sizes, chunking, probabilities, epoch size and
        batching config (not seed/epoch)."""
        if self._fingerprint is None:
            h = hashlib.sha256(super().fingerprint().encode())
            for s in self.source_indices:
                h.update(np.int64(len(s)).tobytes())
                h.update(s.tobytes())
            h.update(json.dumps([self.probabilities.round(12).tolist(), self.epoch_graphs]).encode())
            self._fingerprint = "mix-" + h.hexdigest()[:28]
        return self._fingerprint
