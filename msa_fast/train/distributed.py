"""Data-parallel training under ``torchrun`` (contract §7, distributed).

``torchrun --nproc_per_node=N -m msa_fast train ...`` (or ``msa-fast train`` started by
torchrun) sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; :func:`init` then joins the
process group: NCCL when the run's device is CUDA (one process per GPU,
``cuda:LOCAL_RANK``), gloo on the CPU. Multi-node runs use torchrun's own ``--nnodes`` /
``--rdzv-*`` flags; nothing here depends on them.

How N ranks reproduce one process (fp32: the same weights within 1e-5):

- every rank draws the same global batch (same sampler, same ``(seed, epoch)``, the
  missing-modality protocol applied to the whole batch), pads it as one process would,
  and keeps its rows :meth:`Dist.shard` (contiguous, sizes within one);
- its loss is weighted by ``N * b_rank / B`` so that DDP's gradient average is the
  gradient of the mean over the global batch (a rank with no rows runs one row at
  weight 0, so every rank joins every all-reduce);
- evaluation and dataset-level passes give batch ``j`` to rank ``j % N`` and gather the
  outputs in batch order (:meth:`Dist.gather_batches`): the same batches as one process,
  no padding duplicates, every rank ends with every prediction, so metrics and early
  stopping are identical on all ranks (the stop decision is still broadcast from rank 0);
- rank 0 alone writes checkpoints, ``results.json`` and the progress bar; each rank's RNG
  state is saved, and restored on resume.

:class:`Dist` with ``world == 1`` (no torchrun) is the one-process case: every method is
the identity, and the trainer runs exactly the single-process code.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist


class Dist:
    """The run's process group (``world`` ranks, this one ``rank``) or the trivial one."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0):
        self.world, self.rank, self.local_rank = world, rank, local_rank

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> torch.Tensor:
        """This rank's rows of a global batch of ``n`` (contiguous; may be empty if n < world)."""
        return torch.tensor_split(torch.arange(n), self.world)[self.rank]

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` (a CPU tensor) over ranks; NCCL reduces a copy on this rank's GPU."""
        if not self.active:
            return t
        if dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            return on_gpu.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_batches(self, batches: Iterable, run: Callable) -> list:
        """``[run(b) for b in batches]`` with batch ``j`` run on rank ``j % world`` only, the
        results gathered in batch order on every rank. Every rank still iterates every batch,
        so a loader's missing-modality generator stays in step."""
        mine = []
        for j, batch in enumerate(batches):
            if j % self.world == self.rank:
                mine.append((j, run(batch)))
        if not self.active:
            return [r for _, r in mine]
        parts = self.all_gather_object([(j, _to_cpu(r)) for j, r in mine])
        return [r for _, r in sorted((p for part in parts for p in part), key=lambda p: p[0])]


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cpu(o) for o in obj)
    return obj


_CURRENT = Dist()


def current() -> Dist:
    """The :class:`Dist` of this process (set by :func:`init`, or a user's process group)."""
    if not _CURRENT.active and dist.is_available() and dist.is_initialized():
        return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    return _CURRENT


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (else the one-process
    :class:`Dist`): NCCL for a CUDA ``device`` (``auto`` with a GPU), gloo otherwise."""
    global _CURRENT
    if not launched_by_torchrun():
        return _CURRENT
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    _CURRENT = Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    if not _CURRENT.is_main:  # the other ranks log nothing but errors
        logging.getLogger("msa_fast").setLevel(logging.ERROR)
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()


def shard_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The rows ``rows`` of a global batch dict (padding as in the global batch), with
    ``global_rows`` (their positions) and ``global_size`` so that a model can draw per-row
    randomness for the whole batch and keep its rows (FD-CMDIE's partner sampling)."""
    n = batch["labels"].shape[0]
    take = rows if len(rows) else torch.zeros(1, dtype=torch.long)  # see module doc: weight 0
    out = {k: (v[take] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v)
           for k, v in batch.items()}
    out["global_rows"], out["global_size"] = take, n
    return out
