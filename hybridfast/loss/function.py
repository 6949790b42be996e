"""The autograd Function of HybridContrastiveLoss, its input checks and its two terms.

Gradients are computed in forward (one pass, no B x N kept) for "mean"/"sum" and
multiplied by grad_output in backward (always: a test of grad_output == 1 would read
the device); "none" recomputes with per-row weights in backward.

Cosine similarity without normalised copies: the engines take the raw q and p plus
the inverse norms r = 1/|x| as row and column scales, accumulate r * g_u (g_u the
gradient w.r.t. the unit vector u = r x), and `project_rows` applies the
normalisation backward once at the end: dL/dx = acc - r^2 <acc, x> x.
"""
import torch

from hybridfast._backends import triton_available_for
from hybridfast.loss import engines

MAX_SCALE = 100.0
SIMILARITIES = ("cos", "dot")
REDUCTIONS = ("mean", "sum", "none")
# rows per step of the elementwise finishing passes: bounds their fp32 temporaries
FINISH_ROWS = 4096


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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


def _check_labels_range(labels, N):
    bad = (labels < 0) | (labels >= N)
    if labels.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, N={N}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    else:  # reading a device value would stall the stream (and break graph capture): assert on the device
        torch._assert_async(~bad.any(), f"labels must lie in [0, N={N})")


def check_inputs(q, p, labels, query_groups, passage_groups):
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
        _check_labels_range(labels, N)
    if (query_groups is None) != (passage_groups is None):
        missing = "passage_groups" if passage_groups is None else "query_groups"
        raise ValueError(f"group masking needs both query_groups and passage_groups; {missing} is missing")
    if query_groups is not None:
        query_groups = _check_index_tensor("query_groups", query_groups, B, q.device)
        passage_groups = _check_index_tensor("passage_groups", passage_groups, N, q.device)
    return labels, query_groups, passage_groups


def inverse_norms(x):
    """1 / max(|x_i|, 1e-12) per row in fp32 (fp64 for fp64), without an fp32 copy of x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype).clamp_min(1e-12).reciprocal()


def project_rows(acc, x, r, out_dtype):
    """The normalisation backward: acc - r^2 <acc, x> x per row (r None: acc as is), in out_dtype.

    Row blocks keep the fp32 temporaries small; the result may reuse acc's memory.
    """
    if r is None:
        return acc.to(out_dtype)
    out = acc if acc.dtype == out_dtype else torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    for start in range(0, acc.shape[0], FINISH_ROWS):
        sl = slice(start, start + FINISH_ROWS)
        a, xc = acc[sl], x[sl].to(acc.dtype)
        k = (a * xc).sum(dim=1, keepdim=True) * r[sl, None].to(acc.dtype) ** 2
        out[sl] = a - k * xc
    return out


def times_upstream(g, grad_out):
    """g * grad_out computed in fp32 (g is 2-D): a GradScaler factor of 2**16 is inf in fp16."""
    if g.dtype not in (torch.float16, torch.bfloat16):
        return g * grad_out.to(g.dtype)
    out = torch.empty_like(g)
    for start in range(0, g.shape[0], FINISH_ROWS):
        sl = slice(start, start + FINISH_ROWS)
        out[sl] = (g[sl].float() * grad_out.float()).to(g.dtype)
    return out


class ContrastiveFunction(torch.autograd.Function):
    """Loss of the own query rows q_all[offset:offset+n_own] (see hybridfast/loss/module.py).

    `cosine`: the similarity is cosine (q_all, p raw; inverse norms computed here, detached:
    the normalisation backward is `project_rows`, part of this Function's gradient).
    """

    @staticmethod
    def forward(ctx, q_all, p, scale, labels_all, q_grp_all, p_grp, offset, n_own, symmetric, reduction,
                backend, chunk_rows, need_grad, cosine):
        compute_dtype = torch.float64 if q_all.dtype == torch.float64 else torch.float32
        norms = (inverse_norms(q_all), inverse_norms(p)) if cosine else None
        ctx.meta = (offset, n_own, symmetric, reduction, backend, chunk_rows, compute_dtype, norms)
        ctx.dtypes = (q_all.dtype, p.dtype, scale.dtype)
        w = None
        if need_grad and reduction != "none":
            c = 0.5 if symmetric else 1.0
            w = torch.full((n_own,), c / n_own if reduction == "mean" else c,
                           dtype=compute_dtype, device=q_all.device)
        rows, dq, dp, ds = run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, *ctx.meta)
        if w is not None:
            # gradients in the inputs' dtype, projected through the normalisation; the fp32
            # accumulators are freed here, before anything else is allocated
            dq = project_rows(dq, q_all, norms[0] if norms else None, q_all.dtype)
            dp = project_rows(dp, p, norms[1] if norms else None, p.dtype)
            ctx.save_for_backward(dq, dp, ds)
        elif need_grad:
            ctx.save_for_backward(q_all, p, scale, labels_all, q_grp_all, p_grp)
        return rows.sum() if reduction == "sum" else rows.mean() if reduction == "mean" else rows

    @staticmethod
    def backward(ctx, grad_out):
        offset, n_own, symmetric, reduction, backend, chunk_rows, compute_dtype, norms = ctx.meta
        if reduction != "none":
            dq, dp, ds = ctx.saved_tensors
            dq, dp, ds = times_upstream(dq, grad_out), times_upstream(dp, grad_out), ds * grad_out.to(ds.dtype)
        else:
            q_all, p, scale, labels_all, q_grp_all, p_grp = ctx.saved_tensors
            w = grad_out.to(compute_dtype) * (0.5 if symmetric else 1.0)
            _, dq, dp, ds = run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, *ctx.meta)
            dq = project_rows(dq, q_all, norms[0] if norms else None, q_all.dtype)
            dp = project_rows(dp, p, norms[1] if norms else None, p.dtype)
        return (dq.to(ctx.dtypes[0]), dp.to(ctx.dtypes[1]), ds.to(ctx.dtypes[2])) + (None,) * 11


def _engine_for(backend, q_all, compute_dtype):
    if backend == "triton":
        return engines.fused_term, torch.float32  # fp32 atomics
    triton_rows = backend == "chunked" and compute_dtype == torch.float32 and triton_available_for(q_all)
    row_fn = engines.rows_triton if triton_rows else engines.rows_torch

    def engine(*args):
        return engines.chunked_term(*args, row_fn=row_fn)
    return engine, compute_dtype


def run_terms(q_all, p, scale, labels_all, q_grp_all, p_grp, w, offset, n_own, symmetric, reduction,
              backend, chunk_rows, compute_dtype, norms):
    """Both directions for the own rows; returns per-row losses and (dq, dp, ds) when w is given.

    dq, dp are accumulators of r * g_u (cos) or of the gradient itself (dot): fp32 (fp64 for fp64).
    """
    own = slice(offset, offset + n_own)
    labels = labels_all[own]
    groups = q_grp_all is not None
    rq, rp = norms if norms else (None, None)
    engine, acc_dtype = _engine_for(backend, q_all, compute_dtype)
    dq = dp = None
    if w is not None:
        dq = torch.zeros(q_all.shape, dtype=acc_dtype, device=q_all.device)
        dp = torch.zeros(p.shape, dtype=acc_dtype, device=p.device)
    with engines.loss_precision():
        row = engines.Term(q_all[own], p, labels, a_key=labels, a_grp=q_grp_all[own] if groups else None,
                           b_grp=p_grp, a_scale=rq[own] if rq is not None else None, b_scale=rp)
        lse, pos, ds = engine(row, scale, w, dq[own] if dq is not None else None, dp, chunk_rows, compute_dtype)
        rows = lse.to(compute_dtype) - pos.to(compute_dtype)
        if symmetric:
            own_idx = torch.arange(offset, offset + n_own, device=q_all.device)
            col = engines.Term(p, q_all, own_idx, a_idx=labels, a_key=labels,
                               a_grp=p_grp[labels] if groups else None, b_key=labels_all, b_grp=q_grp_all,
                               a_scale=rp, b_scale=rq)
            lse_c, _, ds_c = engine(col, scale, w, dp, dq, chunk_rows, compute_dtype)
            rows = 0.5 * (rows + lse_c.to(compute_dtype) - pos.to(compute_dtype))
            ds = ds + ds_c
    return rows, dq, dp, ds
