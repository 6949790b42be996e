"""HybridContrastiveLoss and hybrid_contrastive_loss: options, temperature, the all-gather.

Maths (docs/architecture.md, "The loss"): s_ij = sim(q_i, p_j) * scale with scale = min(1/temperature, 100);
passage j is left out of query i's denominator when both group tensors are given,
passage_groups[j] == query_groups[i] and j != labels[i];
loss_i = logsumexp_{kept j} s_ij - s_{i,labels[i]}. The symmetric term scores the
positive p[labels[i]] against every query k (same mask, read column-wise) and the
two directions are averaged.

Where things live: function.py (the autograd Function, input checks, the two terms,
the cosine normalisation backward), engines.py (the engines), dispatch.py (the one
place "auto" is decided), reference.py (the fp64 reference). Cosine similarity is
computed without normalised copies (the inverse norms are row/column scales).

With gather_across_devices=True each rank returns the loss over its *own* queries
against the passages of all ranks (and, for the symmetric term, all queries).
Summed over ranks (reduction "sum") it is the single-process loss on the
concatenated batch; with "mean" it is the rank-local mean, so DDP's gradient
averaging gives exactly the single-process gradient of the global mean.
"""
import math
from typing import Optional

import torch
from torch import nn

from hybridfast._backends import fallback_warning
from hybridfast.loss import dispatch
from hybridfast.loss.engines import ENGINE_BACKENDS
from hybridfast.loss.function import MAX_SCALE, REDUCTIONS, SIMILARITIES, ContrastiveFunction, check_choice, check_inputs

BACKENDS = ("auto",) + ENGINE_BACKENDS


def _check_temperature(temperature):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise TypeError("temperature must be a float or a one-element floating tensor")
        if temperature.device.type == "cpu":  # checking a CUDA value would force a sync
            value = float(temperature.detach())
            if math.isnan(value) or value <= 0:
                raise ValueError(f"temperature must be > 0, got {value}")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if math.isnan(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ----------------------------------------------------------------------------- distributed

def _dist_world():
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        fallback_warning("loss-gather", "gather_across_devices=True but torch.distributed is not "
                         "initialised: computing the loss on this process's batch only")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _gather(x):
    """Concatenation of x over ranks. Float tensors go through torch.distributed.nn's all_gather,
    whose backward sums every rank's gradient into this rank's slice (reduce-scatter on NCCL)."""
    import torch.distributed as dist

    if x.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _gather_sizes_equal(B, N, device):
    import torch.distributed as dist

    if dispatch.tracing():
        raise RuntimeError("gather_across_devices=True compares batch sizes across ranks on the host, which "
                           "CUDA-graph capture and torch.compile cannot trace; gather outside the captured region")
    mine = torch.tensor([B, N], device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    if any(not torch.equal(s, mine) for s in sizes):
        raise ValueError("gather_across_devices needs the same q and p sizes on every rank, got "
                         f"(B, N) = {[tuple(s.tolist()) for s in sizes]}")


# ----------------------------------------------------------------------------- the call

def _contrastive(q, p, labels, query_groups, passage_groups, scale, similarity, symmetric, reduction,
                 gather_across_devices, backend, chunk_size, chunk_memory=None):
    labels, query_groups, passage_groups = check_inputs(q, p, labels, query_groups, passage_groups)
    backend = dispatch.pick(backend, q)
    B, N = q.shape[0], p.shape[0]
    q_all, offset, labels_all, q_grp_all, lockstep = q, 0, labels, query_groups, False
    if gather_across_devices:
        rank, world = _dist_world()
        if world > 1:
            _gather_sizes_equal(B, N, q.device)
            lockstep = True  # every rank has just passed the same collective with the same sizes
            p = _gather(p)
            labels = labels + rank * N
            labels_all = labels
            if passage_groups is not None:
                passage_groups = _gather(passage_groups)
            if symmetric:  # the passage->query term needs every query
                q_all, offset = _gather(q), rank * B
                labels_all = _gather(labels)
                if query_groups is not None:
                    q_grp_all = _gather(query_groups)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = scale.to(device=q.device, dtype=compute_dtype).reshape(())
    need_grad = torch.is_grad_enabled() and (q_all.requires_grad or p.requires_grad or scale.requires_grad)
    # Under autocast the inputs keep their dtype here: the engines pick their own
    # accumulation precision and write into fp32 buffers in place.
    with torch.autocast(device_type="cuda" if q.is_cuda else "cpu", enabled=False):
        args = [q_all.contiguous(), p.contiguous(), scale, labels_all, q_grp_all, passage_groups, offset, B,
                symmetric, reduction, similarity == "cos"]
        if backend == "measure":
            backend = dispatch.measure(args, symmetric, query_groups is not None, chunk_memory, compute_dtype,
                                        chunk_size, lockstep)
        rows = dispatch.chunk_rows(backend, q, q_all.shape[0], p.shape[0], compute_dtype, chunk_size,
                                   chunk_memory)
        return ContrastiveFunction.apply(*args[:10], backend, rows, need_grad, args[10])


def _scale_from_temperature(temperature, device):
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.reshape(())).clamp(max=MAX_SCALE)
    # torch.full writes the value on the device with a kernel: no host-to-device copy, no sync
    return torch.full((), min(1.0 / float(temperature), MAX_SCALE), dtype=torch.float32, device=device)


def _check_options(similarity, reduction, backend, chunk_size, chunk_memory=None):
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    for name, value in (("chunk_size", chunk_size), ("chunk_memory", chunk_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def hybrid_contrastive_loss(q, p, labels=None, query_groups=None, passage_groups=None, *, temperature=0.05,
                            similarity="cos", symmetric=False, reduction="mean", gather_across_devices=False,
                            backend="auto", chunk_size: Optional[int] = None, chunk_memory: Optional[int] = None):
    """Functional form of HybridContrastiveLoss (same maths and options).

    `temperature` may be a one-element tensor with requires_grad=True: its
    gradient flows (the logit scale 1/temperature is capped at 100).
    `chunk_size`: rows per chunk of the chunked engine ("torch", "chunked"); None
    derives it from `chunk_memory`, the bytes one chunk may hold (None: on CUDA a third
    of the fp32 gradient accumulators, between 64 and 512 MiB; 48 MiB on the CPU).
    Returns a float32 loss for fp32/bf16/fp16 inputs, float64 for float64.
    """
    _check_temperature(temperature)
    _check_options(similarity, reduction, backend, chunk_size, chunk_memory)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    scale = _scale_from_temperature(temperature, q.device)
    return _contrastive(q, p, labels, query_groups, passage_groups, scale, similarity, symmetric, reduction,
                        gather_across_devices, backend, chunk_size, chunk_memory)


class HybridContrastiveLoss(nn.Module):
    """InfoNCE for hybrid batches; see the module docstring and docs/architecture.md.

    With learn_temperature=True the parameter is `log_scale` = log(1/temperature)
    (as in CLIP), so the temperature stays positive; the scale is capped at 100.
    """

    def __init__(self, temperature=0.05, learn_temperature=False, similarity="cos", symmetric=False,
                 reduction="mean", gather_across_devices=False, backend="auto", chunk_size: Optional[int] = None,
                 chunk_memory: Optional[int] = None):
        super().__init__()
        _check_temperature(temperature)
        _check_options(similarity, reduction, backend, chunk_size, chunk_memory)
        self.chunk_memory = chunk_memory
        self.learn_temperature = bool(learn_temperature)
        self.similarity, self.symmetric, self.reduction = similarity, bool(symmetric), reduction
        self.gather_across_devices, self.backend, self.chunk_size = bool(gather_across_devices), backend, chunk_size
        if self.learn_temperature:
            self.log_scale = nn.Parameter(torch.tensor(-math.log(float(temperature))))
        else:
            self._temperature = float(temperature)

    @property
    def temperature(self) -> float:
        """The temperature in use (1 / capped scale when learnt)."""
        if self.learn_temperature:
            return 1.0 / min(math.exp(float(self.log_scale.detach())), MAX_SCALE)
        return self._temperature

    def logit_scale(self, device=None) -> torch.Tensor:
        if self.learn_temperature:
            return self.log_scale.exp().clamp(max=MAX_SCALE)
        return _scale_from_temperature(self._temperature, device)

    def forward(self, q, p, labels=None, query_groups=None, passage_groups=None):
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        return _contrastive(q, p, labels, query_groups, passage_groups, self.logit_scale(q.device),
                            self.similarity, self.symmetric, self.reduction, self.gather_across_devices,
                            self.backend, self.chunk_size, self.chunk_memory)

    def extra_repr(self):
        return (f"temperature={self.temperature:g}, learn_temperature={self.learn_temperature}, "
                f"similarity={self.similarity!r}, symmetric={self.symmetric}, reduction={self.reduction!r}, "
                f"gather_across_devices={self.gather_across_devices}, backend={self.backend!r}"
                + (f", chunk_size={self.chunk_size}" if self.chunk_size else "")
                + (f", chunk_memory={self.chunk_memory}" if self.chunk_memory else ""))
