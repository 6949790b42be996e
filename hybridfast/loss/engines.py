"""The engines behind HybridContrastiveLoss, and how `backend="auto"` picks one.

One *term* of the loss (kernels/contrastive.py has the maths) is computed by:

- the chunked engine (`chunked_term`): per chunk of C rows of A, S = A_c @ B^T as
  a GEMM with fp32 output, a *row function* that turns S into lse, the positive
  logit and G*s = s * w * (softmax - onehot), then two GEMMs dA_c = (G*s) @ B and
  dB += (G*s)^T @ A_c. Extra memory is one chunk, never B x N. Two row functions:
  `rows_torch` (in-place PyTorch ops; CPU and the "torch" backend) and the Triton
  `_chunk_rows_kernel` (backend "chunked" on CUDA, and under TRITON_INTERPRET=1).
  Backends "torch" and "chunked" are therefore one engine with two row functions.
- the fused engine (`fused_term`, backend "triton"): tiled online log-sum-exp
  forward and a recompute-and-scatter backward, all in Triton.

On CUDA, "auto" times the engines that fit in memory on the first call per shape
bucket and keeps the fastest for the process (`choose_backend`); the choices are
listed by `backend_choices()` and `hybridfast info`.
"""
import logging
import math
import os
import statistics
import time
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

ENV_BACKEND = "HYBRIDFAST_LOSS_BACKEND"
ENGINE_BACKENDS = ("torch", "chunked", "triton")
# Chunk budgets of the chunked engine (bytes of S, plus G where it is a separate buffer).
# CPU: 48 MiB of fp32 logits, tuned on the 2-core CPU case of bench/bench_loss.py
# (1536 query rows at N = 8192: naive 5.6 s / 1024 MiB; 1024 rows 4.6 s / 126 MiB,
# 1536 rows 3.9 s / 136 MiB, 2048 rows 4.1 s / 182 MiB). CUDA: 512 MiB, the budget
# issue 10 sets (an ESTIMATE of what keeps cuBLAS GEMMs large; not tuned on a device).
DEFAULT_CHUNK_MEMORY_CPU = 48 << 20
DEFAULT_CHUNK_MEMORY_CUDA = 512 << 20


class Term:
    """Rows A[a_idx] (or A) scored against all rows of B; see kernels/contrastive.py."""

    def __init__(self, A, B, a_pos, a_idx=None, a_key=None, a_grp=None, b_key=None, b_grp=None):
        self.A, self.B, self.a_pos, self.a_idx = A, B, a_pos, a_idx
        self.a_key, self.a_grp, self.b_key, self.b_grp = a_key, a_grp, b_key, b_grp

    @property
    def rows(self) -> int:
        return self.a_pos.shape[0]


# ----------------------------------------------------------------------------- chunked engine

_mm_dtype_supported = None  # does torch.mm(..., out_dtype=float32) run on this build's CUDA?


def mm_fp32(a, b):
    """a @ b with an fp32 (or fp64) result: cuBLAS accumulates half inputs in fp32
    anyway, so asking for an fp32 output costs nothing and loses nothing."""
    global _mm_dtype_supported
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if a.is_cuda and _mm_dtype_supported is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _mm_dtype_supported = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_dtype_supported = False
    return torch.mm(a.float(), b.float())


def rows_torch(S, s, term, start, stop, w):
    """Row function in PyTorch, in place on S: returns (lse, pos, G*s or None, None).

    Scaled once, masked, exponentiated and turned into the gradient in the same
    [C, N] buffer (no second copy), so its memory is S alone. ds is left to the
    engine (None): it equals sum((G*s) @ B * A_c) / s.
    """
    z = S.mul_(s)
    a_pos = term.a_pos[start:stop, None]
    if term.a_grp is not None:
        b_key = term.b_key if term.b_key is not None else torch.arange(S.shape[1], device=S.device)
        kill = term.b_grp[None, :] == term.a_grp[start:stop, None]
        kill &= b_key[None, :] != term.a_key[start:stop, None]
        z.masked_fill_(kill, float("-inf"))
        del kill
    pos = z.gather(1, a_pos).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    total = z.sub_(m).exp_().sum(dim=1, keepdim=True)
    lse = (m + total.log()).squeeze(1)
    if w is None:
        return lse, pos, None, None
    ws = w[:, None].to(z.dtype) * s
    z.mul_(ws / total)  # s * w * softmax over kept entries, one pass
    z.scatter_add_(1, a_pos, -ws)  # now s * dL/dz
    return lse, pos, z, None


def rows_triton(S, s, term, start, stop, w):
    """Row function as one Triton kernel (kernels/contrastive.py `_chunk_rows_kernel`)."""
    # imported here: `import hybridfast.loss.module` must not import Triton (slow, optional, and on a
    # CUDA machine it would initialise the driver's tools before the user asked for a kernel)
    from hybridfast.kernels.contrastive import chunk_rows

    half = term.A.is_cuda and term.A.dtype in (torch.float16, torch.bfloat16)
    # G in the input dtype feeds the two cuBLAS GEMMs at tensor-core speed; fp32 reuses S
    G = torch.empty(S.shape, dtype=term.A.dtype, device=S.device) if half and w is not None else S
    sl = slice(start, stop)
    lse, pos, ds = chunk_rows(
        S, G, s.detach().float().reshape(()), term.a_pos[sl].contiguous(), w,
        a_key=term.a_key[sl].contiguous() if term.a_grp is not None else None,
        a_grp=term.a_grp[sl].contiguous() if term.a_grp is not None else None,
        b_key=term.b_key, b_grp=term.b_grp)
    return lse, pos, (G if w is not None else None), (ds.sum() if ds is not None else None)


def chunk_rows_for(n_cols: int, S_bytes: int, G_bytes: int, chunk_memory: int) -> int:
    """Rows per chunk so that S (and a separate G) fit in `chunk_memory` bytes."""
    return max(1, chunk_memory // max(1, n_cols * (S_bytes + G_bytes)))


def chunked_term(term, s, w, dA, dB, chunk_rows, compute_dtype, row_fn=rows_torch):
    """The chunked engine for one term: returns lse, pos, ds (and adds into dA, dB when w is given)."""
    A, n_a = term.A, term.rows
    # GEMM operands: the input dtype on CUDA (tensor cores, fp32 output); the compute dtype elsewhere
    gemm_dtype = A.dtype if A.is_cuda and A.dtype in (torch.float16, torch.bfloat16) else compute_dtype
    B = term.B.to(gemm_dtype)
    lse = torch.empty(n_a, dtype=compute_dtype, device=A.device)
    pos = torch.empty_like(lse)
    ds = torch.zeros((), dtype=compute_dtype, device=A.device)
    for start in range(0, n_a, chunk_rows):
        stop = min(start + chunk_rows, n_a)
        idx = term.a_idx[start:stop] if term.a_idx is not None else None
        Ac = (A[idx] if idx is not None else A[start:stop]).to(gemm_dtype)
        S = mm_fp32(Ac, B.T)
        wc = w[start:stop] if w is not None else None
        lse_c, pos_c, Gs, ds_c = row_fn(S, s, term, start, stop, wc)
        lse[start:stop], pos[start:stop] = lse_c, pos_c
        del S
        if w is None:
            continue
        Gs = Gs.to(gemm_dtype)
        gA = torch.mm(Gs, B)  # s * dL/dA_c
        ds += ds_c if ds_c is not None else (gA.to(compute_dtype) * Ac).sum() / s
        if idx is not None:
            dA.index_put_((idx,), gA.to(dA.dtype), accumulate=True)  # repeated labels add up
        else:
            dA[start:stop] += gA
        if Gs.dtype == dB.dtype:
            dB.addmm_(Gs.T, Ac)
        else:
            dB += mm_fp32(Gs.T, Ac)
    return lse, pos, ds


# ----------------------------------------------------------------------------- fused engine

def fused_term(term, scale, w, dA, dB, chunk_rows, compute_dtype):
    """The fused Triton engine for one term (chunk_rows and compute_dtype unused: it tiles itself)."""
    from hybridfast.kernels.contrastive import contrastive_grads, contrastive_lse  # lazy, as in rows_triton

    kw = dict(a_idx=term.a_idx, a_key=term.a_key, a_grp=term.a_grp, b_key=term.b_key, b_grp=term.b_grp)
    A, B = term.A.contiguous(), term.B.contiguous()
    scale32 = scale.detach().float().reshape(())
    lse, pos = contrastive_lse(A, B, scale32, term.a_pos, **kw)
    ds = torch.zeros((), dtype=torch.float32, device=A.device)
    if w is not None:
        ds = contrastive_grads(A, B, scale32, lse, w, dA, dB, term.a_pos, **kw)
    return lse, pos, ds


# ----------------------------------------------------------------------------- choosing on CUDA

_choices: Dict[tuple, str] = {}
_timings: Dict[tuple, Dict[str, float]] = {}


def backend_choices() -> Dict[str, dict]:
    """What `backend="auto"` chose in this process, per shape bucket, with the timings."""
    return {"/".join(map(str, key)): {"backend": b, "seconds": _timings.get(key, {})} for key, b in _choices.items()}


def forced_backend() -> Optional[str]:
    """The engine $HYBRIDFAST_LOSS_BACKEND forces for backend="auto", or None."""
    value = os.environ.get(ENV_BACKEND, "").strip()
    if not value:
        return None
    if value not in ENGINE_BACKENDS:
        raise ValueError(f"${ENV_BACKEND} must be one of {ENGINE_BACKENDS}, got {value!r}")
    return value


def shape_key(q, p, symmetric: bool, groups: bool) -> tuple:
    """Bucket of a call: device, dtype, D, power-of-two B and N, flags."""
    bucket = lambda n: 1 << max(0, (int(n) - 1).bit_length())  # noqa: E731
    return (str(q.device), str(q.dtype).replace("torch.", ""), q.shape[1], bucket(q.shape[0]), bucket(p.shape[0]),
            "sym" if symmetric else "one", "groups" if groups else "nogroups")


def _tracing() -> bool:
    """Inside CUDA-graph capture or torch.compile tracing nothing may be timed."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return bool(compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def time_candidates(candidates: Iterable[str], run: Callable[[str], None], sync: Callable[[], None],
                    repeats: int = 3) -> Dict[str, float]:
    """Median seconds of run(name) per candidate after one warm-up; out-of-memory ones are left out."""
    seconds = {}
    for name in candidates:
        try:
            run(name)  # warm-up: compile, autotune, allocator
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(name)
                sync()
                times.append(time.perf_counter() - t0)
            seconds[name] = statistics.median(times)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            logger.info("loss backend %s does not fit in memory here; not a candidate", name)
    return seconds


def estimated_extra_bytes(name, B, N, D, symmetric, chunk_memory) -> int:
    """Extra memory of an engine beyond its inputs and outputs (the cost model's column)."""
    terms = 2 if symmetric else 1
    grads = (B + N) * D * 4  # fp32 accumulators, both engines
    if name == "triton":
        return grads
    return grads + chunk_memory + N * D * 4 * terms


def choose_backend(key, candidates, run, sync, default="chunked") -> str:
    """The process-wide choice for this shape bucket: cached, else timed (rank 0's under torch.distributed)."""
    if key in _choices:
        return _choices[key]
    if _tracing():
        return default
    seconds = time_candidates(candidates, run, sync)
    choice = min(seconds, key=seconds.get) if seconds else default
    choice = _agree_across_ranks(choice)
    _choices[key], _timings[key] = choice, seconds
    logger.info("HybridContrastiveLoss backend for %s: %s (seconds %s)", key, choice,
                {k: round(v, 6) for k, v in seconds.items()})
    return choice


def _agree_across_ranks(choice: str) -> str:
    """Every rank must run the same engine (same numerics): take rank 0's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return choice


def fits(name: str, B: int, N: int, D: int, symmetric: bool, chunk_memory: int, device) -> bool:
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else math.inf
    return estimated_extra_bytes(name, B, N, D, symmetric, chunk_memory) < 0.9 * free


def available_candidates(q, p, symmetric, chunk_memory, triton_ok) -> Tuple[str, ...]:
    names = ("chunked", "triton", "torch") if triton_ok else ("torch",)
    B, N, D = q.shape[0], p.shape[0], q.shape[1]
    return tuple(n for n in names if fits(n, B, N, D, symmetric, chunk_memory, q.device))
