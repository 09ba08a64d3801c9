"""Data parallelism with ``torchrun`` (issue 15): one process per GPU (or CPU worker), prompts
sharded statically, each rank writing its own files, rank 0 merging.

``torchrun --nproc-per-node N -m adag run CONFIG`` (or ``adag trace ...``) starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`context` reads them and initialises :mod:`torch.distributed` once: NCCL when CUDA is
available, gloo otherwise (how it is tested here, on CPU processes). Without ``WORLD_SIZE`` (or
with 1) it is a single process and nothing is initialised.

The contract the stages follow:

- **static shards**: rank ``r`` of ``w`` owns the items ``i`` with ``i % w == r`` (prompts of the
  trace stage), so a rerun gives each rank the same items;
- **own files, atomic**: a rank writes only the files of its items (each graph is its own pair
  of files, :meth:`adag.graphs.graph.Graph.save`), each atomically, so a killed rank leaves its
  finished items complete and a rerun reuses them (the resume keys decide, as in one process);
- **rank 0 merges**: whatever reads every item (the viewer index, the profiles table, clustering,
  descriptions, steering, the report) runs on rank 0 after a barrier, from the files; the other
  ranks return after the sharded stages. The files are the ones a single process writes.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from adag.errors import AdagError

logger = logging.getLogger(__name__)

TIMEOUT_S = 6 * 3600
"""How long a barrier waits for the slowest rank (``ADAG_DIST_TIMEOUT`` seconds overrides):
rank 0 waits there while the others trace their shards."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a ``torchrun`` group (``rank`` 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    """Ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that merges."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def owns(self, i: int) -> bool:
        """Whether item ``i`` is this rank's (static sharding: ``i % world == rank``)."""
        return i % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def done(self) -> None:
        """The command's work is over on this rank: wait for every rank, then leave the group.
        A rank that finished early (its shard was reused) must not tear its process group down
        while the others still use theirs: gloo aborts the process ("terminate called without
        an active exception")."""
        if self.active:
            self.barrier()
            finish()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
        if not self.active:
            return flag
        return any(self.gather(bool(flag)))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (a collective)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def device(
        self, device: str, *, gpus_per_model: int | None = None, n_gpus: int | None = None
    ) -> str:
        """``device`` for this rank. A bare ``"cuda"`` becomes this rank's GPU,
        ``cuda:LOCAL_RANK``. ``"auto"`` (a model spread with ``device_map``) becomes this rank's
        share of the machine's ``n_gpus`` GPUs (default: all CUDA devices), ``auto:I,J,...``:
        ``gpus_per_model`` GPUs each (default ``n_gpus // local_world``), rank ``r`` on this
        machine taking GPUs ``r·K .. r·K + K − 1``. Anything else is kept."""
        if gpus_per_model is not None and device != "auto":
            raise AdagError("--gpus-per-model K spreads each model with --device auto")
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        if device != "auto" or (not self.active and gpus_per_model is None):
            return device
        if n_gpus is None:
            import torch

            n_gpus = torch.cuda.device_count()
        k = gpus_per_model or n_gpus // self.local_world
        if k < 1 or (self.local_rank + 1) * k > n_gpus:
            raise AdagError(
                f"{self.local_world} rank(s) of {k or 0} GPU(s) each need "
                f"{self.local_world * max(k, 1)} GPUs and this machine has {n_gpus}; lower "
                "--gpus-per-model or --nproc-per-node"
            )
        first = self.local_rank * k
        return "auto:" + ",".join(str(g) for g in range(first, first + k))


def context() -> Dist:
    """This process's :class:`Dist`, initialising :mod:`torch.distributed` (once) when started
    by ``torchrun`` with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        timeout = timedelta(seconds=float(os.environ.get("ADAG_DIST_TIMEOUT", TIMEOUT_S)))
        td.init_process_group(backend=backend, timeout=timeout)
        atexit.register(finish)
        logger.info("rank %d of %d (%s)", td.get_rank(), td.get_world_size(), backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return Dist(td.get_rank(), td.get_world_size(), local, local_world)


def finish() -> None:
    """Leave the process group (a no-op when there is none)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


__all__ = ["Dist", "context", "finish"]
