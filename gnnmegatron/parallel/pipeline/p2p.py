"""Point-to-point channels between pipeline ranks (gloo and NCCL).

One process group per directed channel: ``("fwd", s, s+1)`` carries forward-direction sweeps
(``F``, ``B2a``) from stage rank ``s`` to the next, ``("bwd", s+1, s)`` the backward-direction
sweeps (``B``, ``B1``, ``B2b``); with virtual stages the ring closes (``p-1 -> 0`` forward,
``0 -> p-1`` backward). Traffic on a channel is one-directional and in schedule order (the
schedules are checked for it), so a receive always matches the oldest send. Separate groups
matter on NCCL, where each group has its own stream: a forward send and a backward send
between the same two ranks never queue behind each other. Sends are ``isend`` (the caller
never blocks on a send; handles are kept until :meth:`Channels.wait_sends`); receives block.
Messages also carry a tag derived from (sweep, virtual stage, micro-batch), which gloo checks.

Every rank must call :meth:`Channels.build` (group creation is collective over the world);
each rank keeps only its own channels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import ParallelLayout, rank_of

__all__ = ["Channels"]

_SWEEP_CODE = {"F": 0, "B": 1, "B1": 2, "B2a": 3, "B2b": 4}


def tag_of(sweep: str, stage: int, micro_batch: int) -> int:
    """A message tag unique per (sweep, sending virtual stage, micro-batch) within a step."""
    return (micro_batch * 4096 + stage) * 8 + _SWEEP_CODE[sweep]


class Channels:
    """This rank's pipeline channels (see the module docstring).

    Attributes:
        p: pipeline size; ``pp_rank``: this rank's stage position.
        groups: ``{(direction, from stage rank, to stage rank): process group}`` for the
            channels this rank is on.
        peers: global rank of each pipeline position of this rank's pipeline.
    """

    def __init__(self, layout: ParallelLayout, groups: dict, peers: tuple[int, ...]):
        self.p = layout.pp
        self.pp_rank = layout.pp_rank
        self.groups = groups
        self.peers = peers
        self._pending: list = []
        self.bytes_sent = 0

    @classmethod
    def build(cls, layout: ParallelLayout, ring: bool) -> "Channels":
        """Create every pipeline's channel groups (collective: all ranks, same order).

        Args:
            layout: the parallel layout (tp fastest, then dp, then pp).
            ring: also connect the last stage rank back to the first (virtual stages).
        """
        p = layout.pp
        mine: dict = {}
        if p > 1:
            links = [(s, (s + 1) % p) for s in range(p if ring else p - 1)]
            for d in range(layout.dp):
                for t in range(layout.tp):
                    pipe = [rank_of(t, d, s, layout.tp, layout.dp) for s in range(p)]
                    for a, b in links:
                        for key in (("fwd", a, b), ("bwd", b, a)):
                            group = dist.new_group([pipe[a], pipe[b]])
                            if layout.rank in (pipe[a], pipe[b]):
                                mine[key] = group
        return cls(layout, mine, tuple(layout.pp_ranks))

    def _group(self, direction: str, src: int, dst: int):
        key = (direction, src, dst)
        if key not in self.groups:
            raise RuntimeError(f"pipeline channel {key} does not exist on stage {self.pp_rank} "
                               f"(virtual stages need Channels.build(..., ring=True))")
        return self.groups[key]

    def send(self, tensor: torch.Tensor, direction: str, dst_stage_rank: int, tag: int) -> None:
        """Non-blocking send of ``tensor`` to pipeline position ``dst_stage_rank``."""
        tensor = tensor.detach().contiguous()
        group = self._group(direction, self.pp_rank, dst_stage_rank)
        work = dist.isend(tensor, dst=self.peers[dst_stage_rank], group=group, tag=tag)
        self._pending.append((work, tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, shape, dtype: torch.dtype, device, direction: str, src_stage_rank: int, tag: int) -> torch.Tensor:
        """Blocking receive of a ``shape`` tensor from pipeline position ``src_stage_rank``."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        group = self._group(direction, src_stage_rank, self.pp_rank)
        dist.irecv(buf, src=self.peers[src_stage_rank], group=group, tag=tag).wait()
        return buf

    def wait_sends(self) -> None:
        """Wait for every outstanding send (end of a step; frees their buffers)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
