"""torchrun support for the native trainer: one strategy (see docs/architecture.md).

Every rank embeds its share of the global batch; the loss gathers passages across
ranks with gradient (`gather_across_devices`); after the backward pass(es) the
gradients are averaged with one flat all-reduce per bucket. This hand-written
all-reduce is kept instead of wrapping the model in DistributedDataParallel
because GradCache runs several backward passes per step and a BERT pooler gets no
gradient at all: averaging once, after everything, is exact and needs neither
no_sync bookkeeping nor find_unused_parameters.
"""
from __future__ import annotations

import os

import torch

ALLREDUCE_BUCKET = 1 << 24  # elements per gradient all-reduce (64 MiB fp32)


def init(device: torch.device):
    """(rank, world_size, device, created): joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist

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
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_parameters(model, world):
    """Start every rank from rank 0's weights (a randomly initialised head would differ)."""
    if world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)


def average_gradients(params, world):
    """Average gradients over ranks, in flat buckets. Parameters without a gradient
    (unused, e.g. a pooler) have none on every rank and are skipped alike."""
    if world <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= ALLREDUCE_BUCKET):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def mean_over_ranks(value: float, world: int, device) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank when `flag` is true on some rank (all ranks stop together)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)
