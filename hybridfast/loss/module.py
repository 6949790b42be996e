"""HybridContrastiveLoss: InfoNCE with hard negatives, group masks and a symmetric term.

Maths (docs/architecture.md, "The loss"): s_ij = sim(q_i, p_j) * scale with scale = min(1/temperature, 100);
passage j is left out of query i's denominator when both group tensors are given,
passage_groups[j] == query_groups[i] and j != labels[i];
loss_i = logsumexp_{kept j} s_ij - s_{i,labels[i]}. The symmetric term scores the
positive p[labels[i]] against every query k (same mask, read column-wise) and the
two directions are averaged.

The maths lives here twice:
- `reference_contrastive_loss`: float64, materialises B x N; the tests' yardstick.
- `_ContrastiveFunction`: gradients are computed in forward (one pass, no logits
  kept) and only rescaled in backward, skipped when grad_output is 1 (the loss is
  the last layer). It runs one of the engines of hybridfast/loss_engines.py per
  term: backend "torch" (chunked GEMMs + PyTorch row function), "chunked" (chunked
  cuBLAS GEMMs + the Triton row kernel), "triton" (fused tiles, never B x N).
  "auto" is "torch" off CUDA and, on CUDA, the fastest engine measured on the
  first call per shape bucket ($HYBRIDFAST_LOSS_BACKEND forces one).

With gather_across_devices=True each rank returns the loss over its *own* queries
against the passages of all ranks (and, for the symmetric term, all queries).
Summed over ranks (reduction "sum") it is the single-process loss on the
concatenated batch; with "mean" it is the rank-local mean, so DDP's gradient
averaging gives exactly the single-process gradient of the global mean.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybridfast.loss import engines
from hybridfast._backends import fallback_warning, triton_available_for, triton_version

MAX_SCALE = 100.0
SIMILARITIES = ("cos", "dot")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto",) + engines.ENGINE_BACKENDS


# ----------------------------------------------------------------------------- validation

def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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


def _check_index_tensor(name, t, length, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the embeddings are on {device}")
    return t.to(torch.int64).contiguous()


def _check_inputs(q, p, labels, query_groups, passage_groups):
    """Validate shapes, dtypes, devices and ranges; return int64 labels and groups."""
    for name, t in (("q", q), ("p", p)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, dim], got shape {list(t.shape)}")
    if q.dtype != p.dtype:
        raise TypeError(f"q and p must share a dtype, got q {q.dtype} and p {p.dtype}")
    if q.device != p.device:
        raise ValueError(f"q and p must be on one device, got q on {q.device} and p on {p.device}")
    B, D = q.shape
    N = p.shape[0]
    if B == 0:
        raise ValueError("q is empty: the batch needs at least one query")
    if D == 0:
        raise ValueError("q has embedding dimension 0")
    if p.shape[1] != D:
        raise ValueError(f"q and p embedding dimensions differ: q has D={D}, p has D={p.shape[1]}")
    if N < B:
        raise ValueError(f"p must have at least as many rows as q (N >= B), got N={N} < B={B}")
    if labels is None:
        labels = torch.arange(B, device=q.device)
    else:
        labels = _check_index_tensor("labels", labels, B, q.device)
        if bool(((labels < 0) | (labels >= N)).any()):
            raise ValueError(f"labels must lie in [0, N={N}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    if (query_groups is None) != (passage_groups is None):
        missing = "passage_groups" if passage_groups is None else "query_groups"
        raise ValueError(f"group masking needs both query_groups and passage_groups; {missing} is missing")
    if query_groups is not None:
        query_groups = _check_index_tensor("query_groups", query_groups, B, q.device)
        passage_groups = _check_index_tensor("passage_groups", passage_groups, N, q.device)
    return labels, query_groups, passage_groups


# ----------------------------------------------------------------------------- reference

def reference_contrastive_loss(q, p, labels=None, query_groups=None, passage_groups=None, temperature=0.05,
                               similarity="cos", symmetric=False, reduction="mean"):
    """The contract's maths in float64 with the whole B x N matrix (for tests; differentiable)."""
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("reduction", reduction, REDUCTIONS)
    labels, query_groups, passage_groups = _check_inputs(q, p, labels, query_groups, passage_groups)
    q, p = q.double(), p.double()
    if similarity == "cos":
        q, p = F.normalize(q, dim=1), F.normalize(p, dim=1)
    t = temperature.double() if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    scale = (1.0 / t.to(q.device).reshape(())).clamp(max=MAX_SCALE)
    z = scale * (q @ p.T)
    rows = torch.arange(q.shape[0], device=q.device)
    if query_groups is not None:
        kill = passage_groups[None, :] == query_groups[:, None]
        kill[rows, labels] = False
        z = z.masked_fill(kill, float("-inf"))
    pos = z[rows, labels]
    loss = torch.logsumexp(z, dim=1) - pos
    if symmetric:
        # column labels[i] of z, against every query k (the mask is already in z)
        loss = 0.5 * (loss + torch.logsumexp(z[:, labels], dim=0) - pos)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


class _ContrastiveFunction(torch.autograd.Function):
    """Loss of the own query rows q_all[offset:offset+n_own] (see module docstring).

    For "mean"/"sum" the input gradients are computed during forward and backward
    only rescales them; for "none" backward recomputes with per-row weights.
    """

    @staticmethod
    def forward(ctx, q_all, p, scale, labels_all, q_grp_all, p_grp, offset, n_own, symmetric, reduction,
                backend, chunk_rows, need_grad):
        compute_dtype = torch.float64 if q_all.dtype == torch.float64 else torch.float32
        ctx.meta = (offset, n_own, symmetric, reduction, backend, chunk_rows, compute_dtype)
        ctx.dtypes = (q_all.dtype, p.dtype, scale.dtype)
        w = None
        if need_grad and reduction != "none":
            c = 0.5 if symmetric else 1.0
            w = torch.full((n_own,), c / n_own if reduction == "mean" else c,
                           dtype=compute_dtype, device=q_all.device)
        rows, dq, dp, ds = _run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, *ctx.meta)
        if w is not None:
            # keep the gradients in the inputs' dtype: half the memory of fp32 buffers for bf16/fp16
            ctx.save_for_backward(dq.to(q_all.dtype), dp.to(p.dtype), ds)
        elif need_grad:
            ctx.save_for_backward(q_all, p, scale, labels_all, q_grp_all, p_grp)
        return rows.sum() if reduction == "sum" else rows.mean() if reduction == "mean" else rows

    @staticmethod
    def backward(ctx, grad_out):
        offset, n_own, symmetric, reduction, backend, chunk_rows, compute_dtype = ctx.meta
        if reduction != "none":
            dq, dp, ds = ctx.saved_tensors
            # The loss is usually the last layer: grad_out == 1, nothing to rescale.
            if not bool(grad_out == 1):
                dq, dp, ds = dq * grad_out.to(dq.dtype), dp * grad_out.to(dp.dtype), ds * grad_out.to(ds.dtype)
        else:
            q_all, p, scale, labels_all, q_grp_all, p_grp = ctx.saved_tensors
            w = grad_out.to(compute_dtype) * (0.5 if symmetric else 1.0)
            _, dq, dp, ds = _run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, *ctx.meta)
        return (dq.to(ctx.dtypes[0]), dp.to(ctx.dtypes[1]), ds.to(ctx.dtypes[2])) + (None,) * 10


def _run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, offset, n_own, symmetric, reduction,
               backend, chunk_rows, compute_dtype):
    """Both directions for the own rows; returns per-row losses and (dq, dp, ds) when w is given."""
    own = slice(offset, offset + n_own)
    labels = labels_all[own]
    groups = q_grp_all is not None
    if backend == "triton":
        engine, acc_dtype, s = engines.fused_term, torch.float32, scale  # fp32 atomics
    else:
        triton_rows = backend == "chunked" and compute_dtype == torch.float32 and triton_available_for(q_all)
        row_fn = engines.rows_triton if triton_rows else engines.rows_torch

        def engine(*args):
            return engines.chunked_term(*args, row_fn=row_fn)
        # the Triton row kernel reads the scale on the device; the torch rows take a float (one sync)
        acc_dtype, s = compute_dtype, scale if triton_rows else float(scale.detach())
    dq = dp = None
    if w is not None:
        dq = torch.zeros(q_all.shape, dtype=acc_dtype, device=q_all.device)
        dp = torch.zeros(p.shape, dtype=acc_dtype, device=p.device)
    row = engines.Term(q_all[own], p, labels, a_key=labels, a_grp=q_grp_all[own] if groups else None, b_grp=p_grp)
    lse, pos, ds = engine(row, s, w, dq[own] if dq is not None else None, dp, chunk_rows, compute_dtype)
    rows = lse.to(compute_dtype) - pos.to(compute_dtype)
    if symmetric:
        own_idx = torch.arange(offset, offset + n_own, device=q_all.device)
        col = engines.Term(p, q_all, own_idx, a_idx=labels, a_key=labels, a_grp=p_grp[labels] if groups else None,
                           b_key=labels_all, b_grp=q_grp_all)
        lse_c, _, ds_c = engine(col, s, w, dp, dq, chunk_rows, compute_dtype)
        rows = 0.5 * (rows + lse_c.to(compute_dtype) - pos.to(compute_dtype))
        ds = ds + ds_c
    return rows, dq, dp, ds


# ----------------------------------------------------------------------------- distributed

def _dist_world():
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        fallback_warning("loss-gather", "gather_across_devices=True but torch.distributed is not "
                         "initialised: computing the loss on this process's batch only")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks; backward sums the gradients and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather_sizes_equal(B, N, device):
    import torch.distributed as dist

    mine = torch.tensor([B, N], device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    if any(not torch.equal(s, mine) for s in sizes):
        raise ValueError("gather_across_devices needs the same q and p sizes on every rank, got "
                         f"(B, N) = {[tuple(s.tolist()) for s in sizes]}")


# ----------------------------------------------------------------------------- public API

def _normalize(x):
    """Differentiable L2 normalisation; half precision gets an fp32 norm and product.

    Only the input and the [rows, 1] norm are saved for backward (no fp32 copy of x
    stays alive), which matters at B = 65536.
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        return F.normalize(x, dim=1)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    return (x * norm.clamp_min(1e-12).reciprocal()).to(x.dtype)


def _pick_backend(backend, q):
    """The engine for an explicit backend, or "measure" where "auto" must time them (CUDA + Triton)."""
    if backend == "auto":
        backend = engines.forced_backend() or "auto"
    if backend == "torch" or q.dtype == torch.float64 and backend == "auto":
        return "torch"
    if backend in ("triton", "chunked") and q.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} supports float32/bfloat16/float16 q and p, got float64")
    if backend == "triton" and not triton_available_for(q):
        raise RuntimeError("backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           "use backend='chunked', 'torch' or 'auto'")
    if backend != "auto":
        return backend  # "chunked" without Triton runs its PyTorch row function
    if q.device.type == "cuda":
        if triton_version() is not None:
            return "measure"
        fallback_warning("loss-triton", "Triton is not installed: HybridContrastiveLoss uses the chunked "
                         "engine with its PyTorch row function on CUDA (slower)")
    return "torch"


def _chunk_rows(backend, q, n_cols, compute_dtype, chunk_size, chunk_memory):
    if chunk_size:
        return chunk_size
    budget = chunk_memory or (engines.DEFAULT_CHUNK_MEMORY_CUDA if q.is_cuda else engines.DEFAULT_CHUNK_MEMORY_CPU)
    separate_g = backend == "chunked" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    elt = torch.finfo(compute_dtype).bits // 8
    return engines.chunk_rows_for(n_cols, elt, q.element_size() if separate_g else 0, budget)


def _measured_backend(args, symmetric, groups, chunk_memory, compute_dtype, chunk_size):
    """backend="auto" on CUDA: time every engine that fits on detached copies, once per shape bucket."""
    q_all, p, scale = args[0], args[1], args[2]
    budget = chunk_memory or engines.DEFAULT_CHUNK_MEMORY_CUDA
    key = engines.shape_key(q_all, p, symmetric, groups)

    def run(name):
        qq, pp = q_all.detach().requires_grad_(True), p.detach().requires_grad_(True)
        rows = _chunk_rows(name, q_all, max(p.shape[0], q_all.shape[0]), compute_dtype, chunk_size, chunk_memory)
        _ContrastiveFunction.apply(qq, pp, scale.detach(), *args[3:10], name, rows, True).sum().backward()

    def sync():
        if q_all.is_cuda:
            torch.cuda.synchronize(q_all.device)

    candidates = engines.available_candidates(q_all, p, symmetric, budget, triton_ok=triton_available_for(q_all))
    return engines.choose_backend(key, candidates, run, sync)


def _contrastive(q, p, labels, query_groups, passage_groups, scale, similarity, symmetric, reduction,
                 gather_across_devices, backend, chunk_size, chunk_memory=None):
    labels, query_groups, passage_groups = _check_inputs(q, p, labels, query_groups, passage_groups)
    backend = _pick_backend(backend, q)
    if similarity == "cos":
        q, p = _normalize(q), _normalize(p)
    B, N = q.shape[0], p.shape[0]
    q_all, offset, labels_all, q_grp_all = q, 0, labels, query_groups
    if gather_across_devices:
        rank, world = _dist_world()
        if world > 1:
            _gather_sizes_equal(B, N, q.device)
            p = _AllGather.apply(p)
            labels = labels + rank * N
            labels_all = labels
            if passage_groups is not None:
                passage_groups = _AllGather.apply(passage_groups)
            if symmetric:  # the passage->query term needs every query
                q_all, offset = _AllGather.apply(q), rank * B
                labels_all = _AllGather.apply(labels)
                if query_groups is not None:
                    q_grp_all = _AllGather.apply(query_groups)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = scale.to(device=q.device, dtype=compute_dtype).reshape(())
    need_grad = torch.is_grad_enabled() and (q_all.requires_grad or p.requires_grad or scale.requires_grad)
    # Under autocast the inputs keep their dtype here: the engines pick their own
    # accumulation precision and write into fp32 buffers in place.
    with torch.autocast(device_type=q.device.type, enabled=False):
        args = [q_all.contiguous(), p.contiguous(), scale, labels_all, q_grp_all, passage_groups, offset, B,
                symmetric, reduction]
        if backend == "measure":
            backend = _measured_backend(args, symmetric, query_groups is not None, chunk_memory, compute_dtype,
                                        chunk_size)
        rows = _chunk_rows(backend, q, max(p.shape[0], q_all.shape[0]), compute_dtype, chunk_size, chunk_memory)
        return _ContrastiveFunction.apply(*args, backend, rows, need_grad)


def _scale_from_temperature(temperature, device):
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature), device=device)
    return (1.0 / t.reshape(())).clamp(max=MAX_SCALE)


def _check_options(similarity, reduction, backend, chunk_size, chunk_memory=None):
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
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
    derives it from `chunk_memory`, the bytes one chunk may hold (None: 512 MiB on
    CUDA, 48 MiB on the CPU).
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
