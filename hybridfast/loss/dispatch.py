"""The one place `backend="auto"` is decided, and the chunk budget of the chunked engine.

Rule, in order:
1. an explicit backend ("torch", "chunked", "triton") runs as asked or raises;
2. $HYBRIDFAST_LOSS_BACKEND forces an engine for "auto" (an engine that cannot run
   here raises an error naming the variable);
3. float64, or no CUDA: "torch" (the chunked engine with PyTorch rows);
4. CUDA without Triton: "torch", with one warning;
5. CUDA with Triton: every engine that fits (cost model below, against free plus
   cached-but-unused memory) is timed once per shape bucket (forward + backward on
   detached copies, under enable_grad) and the fastest is kept for the process.
   Nothing is timed under inference_mode, CUDA-graph capture or torch.compile: the
   cached choice or "chunked" is used and nothing is cached. An engine that fails
   while timed (out of memory, a compile error, anything) is left out with one warning.
   Ranks agree only where they are provably in lockstep (gather_across_devices with a
   process group: every rank has just entered the same size check), by all-gathering
   their timings and taking the engine fastest in the worst rank; elsewhere each rank
   chooses alone, so no collective is ever entered by only some ranks.
"""
import logging
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from hybridfast._backends import fallback_warning, triton_available_for, triton_version
from hybridfast.loss.engines import ENGINE_BACKENDS, HALF

logger = logging.getLogger(__name__)

ENV_BACKEND = "HYBRIDFAST_LOSS_BACKEND"
DEFAULT = "chunked"  # used where nothing may be timed
# Chunk budgets (bytes of S, plus G where it is a separate buffer). CPU: 48 MiB of fp32
# logits, tuned on the 2-core CPU case of bench/bench_loss.py (1536 query rows at
# N = 8192: naive 5.6 s / 1024 MiB; 1024 rows 4.6 s / 126 MiB, 1536 rows 3.9 s / 136 MiB,
# 2048 rows 4.1 s / 182 MiB). CUDA: a third of the fp32 accumulators, between 64 and
# 512 MiB: the chunk then adds at most a third to the memory every engine needs anyway
# (an ESTIMATE of what keeps cuBLAS GEMMs large; not tuned on a device).
DEFAULT_CHUNK_MEMORY_CPU = 48 << 20
CUDA_CHUNK_MIN, CUDA_CHUNK_MAX = 64 << 20, 512 << 20


# ----------------------------------------------------------------------------- which engine

def forced_backend() -> Optional[str]:
    """The engine $HYBRIDFAST_LOSS_BACKEND forces for backend="auto", or None."""
    value = os.environ.get(ENV_BACKEND, "").strip()
    if not value:
        return None
    if value not in ENGINE_BACKENDS:
        raise ValueError(f"${ENV_BACKEND} must be one of {ENGINE_BACKENDS}, got {value!r}")
    return value


def wants_timing(q) -> bool:
    """Is "auto" decided by timing here? (CUDA with Triton; the tests patch this on the CPU.)"""
    return q.device.type == "cuda" and triton_version() is not None


def pick(backend, q):
    """The engine for an explicit backend, or "measure" where "auto" must time them."""
    source = f"backend={backend!r}"
    if backend == "auto" and forced_backend():
        backend, source = forced_backend(), f"${ENV_BACKEND}={forced_backend()!r}"
    if backend == "torch" or q.dtype == torch.float64 and backend == "auto":
        return "torch"
    if backend in ("triton", "chunked") and q.dtype == torch.float64:
        raise TypeError(f"{source} supports float32/bfloat16/float16 q and p, got float64")
    if backend == "triton" and not triton_available_for(q):
        raise RuntimeError(f"{source} needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           f"use 'chunked', 'torch' or 'auto'" + (f" (unset ${ENV_BACKEND})" if "$" in source else ""))
    if backend != "auto":
        return backend  # "chunked" without Triton runs its PyTorch row function
    if wants_timing(q):
        return "measure"
    if q.device.type == "cuda":
        fallback_warning("loss-triton", "Triton is not installed: HybridContrastiveLoss uses the chunked "
                         "engine with its PyTorch row function on CUDA (slower)")
    return "torch"


# ----------------------------------------------------------------------------- memory

def chunk_budget(q, n_rows_all, n_cols, chunk_memory=None, cuda=None) -> int:
    """Bytes one chunk may hold: the user's, else derived from the problem (see the module docstring).
    `cuda`: budget as for a CUDA tensor (default: whether q is one)."""
    if chunk_memory:
        return chunk_memory
    if not (q.is_cuda if cuda is None else cuda):
        return DEFAULT_CHUNK_MEMORY_CPU
    accumulators = (n_rows_all + n_cols) * q.shape[1] * 4
    return int(min(CUDA_CHUNK_MAX, max(CUDA_CHUNK_MIN, accumulators // 3)))


def chunk_rows_for(n_cols: int, S_bytes: int, G_bytes: int, chunk_memory: int) -> int:
    """Rows per chunk so that S (and a separate G) fit in `chunk_memory` bytes."""
    return max(1, chunk_memory // max(1, n_cols * (S_bytes + G_bytes)))


def chunk_rows(backend, q, n_rows_all, n_cols, compute_dtype, chunk_size=None, chunk_memory=None) -> int:
    """Rows per chunk of the chunked engine: S in the compute dtype, plus G in the input dtype
    wherever G is a separate half-precision buffer (CUDA half, both row functions)."""
    if chunk_size:
        return chunk_size
    budget = chunk_budget(q, n_rows_all, n_cols, chunk_memory)
    separate_g = q.is_cuda and q.dtype in HALF
    elt = torch.finfo(compute_dtype).bits // 8
    return chunk_rows_for(n_cols, elt, q.element_size() if separate_g else 0, budget)


def estimated_extra_bytes(name, B, N, D, symmetric, element_size, chunk_memory, cuda=True) -> int:
    """The cost model (kernels/contrastive.py): bytes an engine holds beyond its inputs and the
    gradient buffers it returns, at its peak. Accumulators are fp32 unless the inputs are fp32
    themselves, where the accumulators become the returned gradients."""
    acc = (B + N) * D * 4 if element_size != 4 else 0
    if name == "triton":
        return acc
    half_g = cuda and element_size == 2
    C = chunk_rows_for(N, 4, element_size if half_g else 0, chunk_memory)
    C = min(C, max(B, N))
    chunk = C * N * (4 + (element_size if half_g else 0))
    rows = C * D * 8  # per chunk: the scaled A_c (fp32, then its GEMM copy) and dA_c in fp32
    db_temp = min(N, 8192) * D * 4 if half_g else 0
    return acc + chunk + rows + db_temp


def free_bytes(device) -> float:
    """Free device memory plus what the caching allocator holds but does not use."""
    if device.type != "cuda":
        return math.inf
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def candidates(q, p, symmetric, chunk_memory) -> Tuple[str, ...]:
    names = ("chunked", "triton", "torch") if triton_available_for(q) else ("torch",)
    B, N, D = q.shape[0], p.shape[0], q.shape[1]
    room = 0.9 * free_bytes(q.device)
    return tuple(n for n in names
                 if estimated_extra_bytes(n, B, N, D, symmetric, q.element_size(), chunk_memory, q.is_cuda) < room)


# ----------------------------------------------------------------------------- timing once per bucket

_choices: Dict[tuple, str] = {}
_timings: Dict[tuple, Dict[str, float]] = {}


def backend_choices() -> Dict[str, dict]:
    """What `backend="auto"` chose in this process, per shape bucket, with the timings."""
    return {"/".join(map(str, key)): {"backend": b, "seconds": _timings.get(key, {})} for key, b in _choices.items()}


def shape_key(q, p, symmetric: bool, groups: bool, agreed: bool = False) -> tuple:
    """Bucket of a call: device, dtype, D, power-of-two B and N, flags (and whether ranks agreed)."""
    bucket = lambda n: 1 << max(0, (int(n) - 1).bit_length())  # noqa: E731
    key = (str(q.device), str(q.dtype).replace("torch.", ""), q.shape[1], bucket(q.shape[0]), bucket(p.shape[0]),
           "sym" if symmetric else "one", "groups" if groups else "nogroups")
    return key + ("ranks",) if agreed else key


def tracing() -> bool:
    """Inside CUDA-graph capture or torch.compile tracing nothing may be timed or synchronised."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return bool(compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def time_candidates(names: Iterable[str], run: Callable[[str], None], sync: Callable[[], None],
                    repeats: int = 3) -> Dict[str, float]:
    """Median seconds of run(name) per candidate after one warm-up; any that fails is left out."""
    seconds = {}
    for name in names:
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
        except Exception as exc:  # OOM, a Triton CompilationError/OutOfResources, a driver error...
            if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"HybridContrastiveLoss: backend {name!r} failed while timed and is left out "
                          f"({type(exc).__name__}: {str(exc)[:200]})", RuntimeWarning, stacklevel=2)
    return seconds


def agree(seconds: Dict[str, float], device) -> Dict[str, float]:
    """Every rank's timings -> the worst time of each engine that ran on every rank (one
    all-reduce on `device`). Call only where every rank is known to be here (module docstring)."""
    import torch.distributed as dist

    t = torch.tensor([seconds.get(n, math.inf) for n in ENGINE_BACKENDS], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {n: v for n, v in zip(ENGINE_BACKENDS, t.tolist()) if math.isfinite(v)}


def choose(key, names, run, sync, ranks_in_lockstep=False, device=None) -> str:
    """The process-wide choice for this shape bucket: cached, else timed (see the module docstring)."""
    if key in _choices:
        return _choices[key]
    if tracing() or torch.is_inference_mode_enabled():
        return DEFAULT  # cannot time (or take gradients) here; decided on a later, ordinary call
    with torch.enable_grad():
        seconds = time_candidates(names, run, sync)
    if ranks_in_lockstep:
        seconds = agree(seconds, device)
    choice = min(seconds, key=seconds.get) if seconds else DEFAULT
    _choices[key], _timings[key] = choice, seconds
    logger.info("HybridContrastiveLoss backend for %s: %s (seconds %s)", key, choice,
                {k: round(v, 6) for k, v in seconds.items()})
    return choice


def measure(args, symmetric, groups, chunk_memory, compute_dtype, chunk_size, lockstep=False):
    """backend="auto" where it is timed: every engine that fits, on detached copies, once per bucket.

    `args`: the Function's first ten arguments and the cosine flag, as module.py builds them."""
    from hybridfast.loss.function import ContrastiveFunction  # function.py -> engines; no cycle at import
    q_all, p, scale = args[0], args[1], args[2]
    key = shape_key(q_all, p, symmetric, groups, agreed=lockstep)

    def run(name):
        qq, pp = q_all.detach().requires_grad_(True), p.detach().requires_grad_(True)
        rows = chunk_rows(name, q_all, q_all.shape[0], p.shape[0], compute_dtype, chunk_size,
                                   chunk_memory)
        ContrastiveFunction.apply(qq, pp, scale.detach(), *args[3:10], name, rows, True, args[10]).sum().backward()

    def sync():
        if q_all.is_cuda:
            torch.cuda.synchronize(q_all.device)

    budget = chunk_budget(q_all, q_all.shape[0], p.shape[0], chunk_memory)
    names = candidates(q_all, p, symmetric, budget)
    return choose(key, names, run, sync, ranks_in_lockstep=lockstep, device=q_all.device)
