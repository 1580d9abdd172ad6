"""torch.distributed, when a job runs under torchrun; every helper is a no-op in one process.

Ranks take disjoint batches (batch ``i`` belongs to rank ``i % world``), sums are all-reduced,
and work that is per layer (eigendecompositions) is shared out by layer and broadcast. Gloo on
the CPU, NCCL on CUDA devices; nothing here depends on the rank count's arithmetic beyond that,
so N processes compute what one does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process that torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo for CPU, NCCL for CUDA); no-op alone."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # long timeout: rank 0 alone builds what the others wait for (data stages, the demo's training)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))


def local_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under torchrun when ``device`` is CUDA."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def finish() -> None:
    """Leave the process group (end of a torchrun job); no-op alone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (returned for chaining)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """``tensor`` (contiguous) as rank ``source`` holds it, on every rank (in place)."""
    if not tensor.is_contiguous():
        raise ValueError("broadcast needs a contiguous tensor (collectives send memory, not strides)")
    if active():
        dist.broadcast(tensor, src=source)
    return tensor


def owner(index: int) -> int:
    """The rank that computes per-item work number ``index`` (layers, shards)."""
    return index % world_size()


def my_batches(loader: Iterable[Any], limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(global index, batch) for this rank's batches of ``loader`` (the first ``limit`` only).

    An indexable loader (a list, or any Sequence) is indexed, so a rank encodes only its own
    batches; any other iterable is walked and the other ranks' batches are skipped.
    """
    me, world = rank(), world_size()
    if isinstance(loader, Sequence):
        n = len(loader) if limit is None else min(limit, len(loader))
        for index in range(me, n, world):
            yield index, loader[index]
        return
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        if index % world == me:
            yield index, batch
