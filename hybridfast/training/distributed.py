"""torchrun support for the native trainer (see docs/architecture.md).

One strategy, shared with the sentence-transformers integration: the encoder is wrapped
in torch's DistributedDataParallel (which broadcasts rank 0's weights at the start), and
of the backward passes of a step only the last reduces gradients
(hybridfast.gradcache.ddp_sync: no_sync elsewhere). `find_unused_parameters=True`
because a Hugging Face encoder carries parameters the embeddings never use (BERT's
pooler); they get no gradient on any rank, as in one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

def init(device: torch.device):
    """(rank, world_size, device, created): joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def shutdown(created: bool):
    if created:

        dist.destroy_process_group()


def barrier(world):
    if world > 1:

        dist.barrier()


def wrap(encoder, world, device):
    """The module to call for forward passes: DistributedDataParallel(encoder) under torchrun."""
    if world <= 1:
        return encoder
    return DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, broadcast_buffers=False)


def mean_over_ranks(value: float, world: int, device) -> float:
    if world <= 1:
        return value

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank when `flag` is true on some rank (all ranks stop together)."""
    if world <= 1:
        return flag

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)
