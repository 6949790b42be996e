"""Dense search for evaluation: exact ranks of the relevant candidates, and top-k lists.

Metrics over the FULL ranking (mAP, rank distance) need the rank of every
relevant candidate, however deep. Sorting each query's whole candidate list
would cost O(C log C) per query and an O(Q x C) result; instead a query chunk
is scored against all candidates at once (one matmul) and, for each relevant
candidate r of a query,

    rank(r) = 1 + #{c : s_c > s_r} + #{c : s_c == s_r and id_c > id_r}

is counted (trec_eval's order: score descending, then id descending, see
hybridfast.evaluation.metrics). Candidates are grouped in contiguous column blocks (one
per language); the counts are kept per block, so ONE scoring pass gives both
the rank of r inside its own block (the pair x -> lang(r)) and inside the pool
of all blocks (the multilingual setting). Memory is bounded by the chunk size,
independent of Q x C.

Ties: on CPU a second compare counts candidates with exactly s_r; the rare rows
where one besides r exists are resolved with the tie priority
(hybridfast.evaluation.metrics.tie_priority); on CUDA the compare is directly
``s_c > s_r or (s_c == s_r and prio_c > prio_r)``. Comparisons are on the float32
scores, so -0.0 == +0.0 as for trec_eval's doubles.

Backends:
- ``torch``: matmul on the chosen device. On CUDA the counting is a batched
  compare + cumulative sum on the GPU. On the CPU, two engines (``engine=``):
  ``tiles`` (the default; hybridfast.evaluation.tiles) scores a query tile against
  one candidate tile at a time and counts ranks and keeps the running top-k while
  the tile is in cache, one pass, no full score row; ``rows`` (the plain reference
  the tests hold it to) scores whole rows and counts them with numpy, whose compares
  and uint8 row sums are several times faster than torch's on CPU. Both use
  numpy's sgemm into a reused buffer. ``precision="bf16"`` (tiles) keeps the
  candidates as bfloat16; candidates may also be a folder of shards on disk
  (hybridfast.evaluation.shards.ShardedTiles), streamed tile by tile.
- ``faiss``: faiss-gpu when present, else faiss-cpu. Exact (``ivf_lists=None``):
  an IndexFlatIP answers the top-k lists; ranks of relevant candidates are
  counted as above (faiss has no rank-count primitive), from a BLAS matmul of
  the same float32 vectors. Approximate (``ivf_lists=N``): IndexIVFFlat with
  ``nprobe`` lists probed, one index per block plus one for the pool; ranks come
  from the top-k lists only, so a relevant candidate outside the top k counts as
  not retrieved (exactly as trec_eval treats a truncated run) and
  ``SearchResult.exact`` is False.
- ``auto``: torch (on CUDA when the device is CUDA, else on CPU), or faiss when
  ``ivf_lists`` is given. Exact ranks need whole score rows, which the torch
  matmul gives directly; faiss earns its place for approximate search.

The top-k lists (over the whole pool) are in trec_eval order too: candidates
tied with the k-th score are taken by id, descending.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hybridfast._backends import fallback_warning, faiss_has_gpu, faiss_module, resolve_device
from hybridfast.evaluation.counting import _count_numpy, _count_torch, trec_topk  # noqa: F401 (tests, trec.py)
from hybridfast.evaluation.faiss_lists import faiss_index, faiss_topk, ranks_from_lists
from hybridfast.evaluation.tiles import ArrayTiles, bf16_bits, sweep_count, tile_chunk_scores, tiled_search

BACKENDS = ("auto", "torch", "faiss")
ENGINES = ("tiles", "rows")   # CPU exact search: one pass over cached tiles | whole rows (the reference)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class SearchResult:
    """Per query: ranks of its relevant candidates (0 = padding / not retrieved) and top-k.

    ranks:       int64 [Q, R] rank in the whole candidate set (the pool of all blocks)
    block_ranks: int64 [Q, R] rank inside the relevant candidate's own block
    topk_ids:    int64 [Q, k] candidate columns, best first (None when k == 0)
    topk_scores: float32 [Q, k]
    exact:       False when ranks come from approximate top-k lists (IVF)
    """

    ranks: np.ndarray
    block_ranks: np.ndarray
    topk_ids: Optional[np.ndarray]
    topk_scores: Optional[np.ndarray]
    exact: bool = True


def _as_matrix(x, name, keep_bf16=False):
    """float32 numpy [n, D] (a bfloat16 tensor stays bfloat16 with keep_bf16: no float32 copy)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if not (keep_bf16 and x.dtype == torch.bfloat16):
            x = x.to(torch.float32).numpy()
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, D], got shape {tuple(x.shape)}")
    # in row blocks: a whole-array isfinite would be a temporary as large as the input
    step = max(1, (64 << 20) // max(1, x.shape[1] * 4))
    for s in range(0, x.shape[0], step):
        if not _all_finite(x[s:s + step]):
            raise ValueError(f"{name} holds NaN or infinite values")
    return x


_BF16_EXPONENT = np.uint16(0x7F80)


def _all_finite(block):
    """No NaN or inf in a float32 array or a bfloat16 tensor. bfloat16 through its bits (an
    all-ones exponent is inf or NaN): torch.isfinite on CPU bfloat16 took 1.1 s for 800k x 384,
    the bit test 0.07 s."""
    if isinstance(block, torch.Tensor) and block.dtype != torch.bfloat16:
        return bool(torch.isfinite(block).all())
    if isinstance(block, torch.Tensor):
        bits = bf16_bits(block)
        return bits.size == 0 or (bits & _BF16_EXPONENT).max() < _BF16_EXPONENT
    return bool(np.isfinite(block).all())


def _distinct(values):
    """Are the non-negative ints distinct? A count per value when they are dense (tie_priority's
    are a permutation of 0..C-1): O(C), where np.unique took 0.23 s at C = 400k, a third of the
    search at Q = 512; a sort otherwise."""
    if values.max() < 4 * values.size:
        return np.bincount(values).max() <= 1
    return bool((np.diff(np.sort(values)) != 0).all())


def _check_inputs(queries, candidates, relevant, offsets, tie_priority, k, keep_bf16=False):
    q = _as_matrix(queries, "queries")
    c = candidates if is_tile_source(candidates) else _as_matrix(candidates, "candidates", keep_bf16)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but candidates {c.shape[1]}")
    if c.shape[0] == 0:
        raise ValueError("candidates is empty")
    rel = np.asarray(relevant, dtype=np.int64)
    if rel.ndim != 2 or rel.shape[0] != q.shape[0]:
        raise ValueError(f"relevant must be int [{q.shape[0]}, R] (-1 = padding), got shape {rel.shape}")
    if (rel >= c.shape[0]).any() or (rel < -1).any():
        raise ValueError(f"relevant holds column indices outside [-1, {c.shape[0]})")
    offsets = np.asarray([0, c.shape[0]] if offsets is None else offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != c.shape[0] or (np.diff(offsets) < 0).any():
        raise ValueError(f"offsets must rise from 0 to {c.shape[0]} (block boundaries), got {offsets.tolist()}")
    if tie_priority is None:
        # without ids: later column wins ties (the order of ids 0..C-1, descending)
        tie_priority = np.arange(c.shape[0], dtype=np.int64)
    prio = np.asarray(tie_priority, dtype=np.int64)
    if prio.shape != (c.shape[0],):
        raise ValueError(f"tie_priority must have shape ({c.shape[0]},), got {prio.shape}")
    if prio.size and (prio.min() < 0 or prio.max() >= 1 << 32 or not _distinct(prio)):
        raise ValueError("tie_priority must hold distinct integers in [0, 2**32) (see metrics.tie_priority)")
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    return q, c, rel, offsets, prio, int(min(k, c.shape[0]))


def _chunk_rows(n_cand, n_rel, device, chunk_size):
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    # CPU: the scores (4 B) and a compare mask per thread;
    # CUDA: the [b, R, C] compare mask and int32 cumsum dominate
    per_row = n_cand * (4 + 2) if device.type != "cuda" else n_cand * (4 + 9 * max(1, n_rel))
    budget = (1 << 30) if device.type == "cuda" else (48 << 20)
    return max(1, budget // per_row)


def _progress(total, show, desc, unit="query", plural="queries"):
    """A bar on a terminal, plain lines in a log (hybridfast.progress), or None."""
    if not show:
        return None
    from hybridfast.progress import Progress

    return Progress(total, desc, unit, plural=plural)


# ---------------------------------------------------------------------------
# backends


def _score_chunk(q_chunk, c, ct, on_gpu, work):
    """Scores of a query chunk: torch matmul on the GPU; on CPU numpy's BLAS sgemm into a
    reused buffer (cheaper here than torch's). The one place scores are computed."""
    if on_gpu:
        return torch.from_numpy(q_chunk).to(ct.device) @ ct.T
    buf = work.get("scores")
    if buf is None or buf.shape != (q_chunk.shape[0], c.shape[0]):
        buf = work["scores"] = np.empty((q_chunk.shape[0], c.shape[0]), np.float32)
    return torch.from_numpy(np.matmul(q_chunk, c.T, out=buf))


def chunk_scores(queries, candidates, device="auto", n_relevant=1, chunk_size=None, engine="auto",
                 precision="auto"):
    """Yield (start, end, float32 numpy [end - start, C]) score chunks computed exactly as
    search() computes them (same device, engine, precision, chunking and matmul calls, hence
    the same float32 values and ties); used to write TREC run files. The array may be reused
    by the next chunk: consume it before advancing."""
    dev = resolve_device(device)
    engine = resolve_engine(engine, dev, "torch")
    source = is_tile_source(candidates)
    precision = (_source_precision(candidates, precision, engine) if source
                 else resolve_precision(precision, dev, engine))
    q = _as_matrix(queries, "queries")
    c = candidates if source else _as_matrix(candidates, "candidates", keep_bf16=precision == "bf16")
    if engine == "tiles":
        if precision == "bf16":
            q = _bf16_rounded(q)
        yield from tile_chunk_scores(q, c if source else ArrayTiles(c, precision), chunk_size)
        return
    chunk = _chunk_rows(c.shape[0], max(1, int(n_relevant)), dev, chunk_size)
    ct = torch.from_numpy(c).to(dev)
    work = {}
    with torch.no_grad():
        for s in range(0, q.shape[0], chunk):
            e = min(q.shape[0], s + chunk)
            yield s, e, _score_chunk(q[s:e], c, ct, dev.type == "cuda", work).cpu().numpy()


def is_tile_source(candidates):
    """A candidate source streamed tile by tile (shards.ShardedTiles), not an array."""
    return hasattr(candidates, "tile") and hasattr(candidates, "rows")


def _source_precision(candidates, precision, engine):
    """A tile source's precision is the stored one: 'auto' takes it, another is refused."""
    if engine != "tiles":
        raise ValueError("candidates from shards need the CPU engine 'tiles' (device='cpu', backend 'torch')")
    if precision not in ("auto", candidates.precision):
        raise ValueError(f"precision={precision!r}, but the candidate shards hold {candidates.precision}")
    return candidates.precision


def _bf16_rounded(x):
    """x rounded to bfloat16, held as float32: products of two bf16 values are exact in fp32."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


def _exact_torch(q, c, rel, offsets, prio, k, device, chunk, show, topk_fn=None):
    Q = q.shape[0]
    block_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    ranks = np.zeros(rel.shape, dtype=np.int64)
    block_ranks = np.zeros(rel.shape, dtype=np.int64)
    topk_ids = np.zeros((Q, k), dtype=np.int64) if k else None
    topk_scores = np.zeros((Q, k), dtype=np.float32) if k else None
    on_gpu = device.type == "cuda"
    counter = "torch" if on_gpu else "numpy"  # _count_torch == _count_numpy is tested on CPU directly
    ct = torch.from_numpy(c).to(device)
    if counter == "torch":
        offsets_t = torch.from_numpy(offsets).to(device)
        block_of_t = torch.from_numpy(block_of).to(device)
        prio_t = torch.from_numpy(prio).to(device)
    bar = _progress(Q, show, "search")
    threads = max(1, min(rel.shape[1], torch.get_num_threads()))
    pool = ThreadPoolExecutor(threads) if counter != "torch" and threads > 1 else None
    work = {}
    with torch.no_grad():
        for s in range(0, Q, chunk):
            e = min(Q, s + chunk)
            scores = _score_chunk(q[s:e], c, ct, on_gpu, work)  # float32 [b, C]
            cols = rel[s:e]
            if counter == "torch":
                own, total = _count_torch(scores, torch.from_numpy(cols).to(device), offsets_t, block_of_t, prio_t)
            scores_np = scores.cpu().numpy() if (counter != "torch" or k) else None
            if counter != "torch":
                own, total = _count_numpy(scores_np, cols, offsets, block_of, prio, pool, work)
            valid = cols >= 0
            ranks[s:e] = np.where(valid, total + 1, 0)
            block_ranks[s:e] = np.where(valid, own + 1, 0)
            if k:
                if topk_fn is not None:
                    ids, vals = topk_fn(scores_np, k, prio, s, e)
                else:
                    ids, vals = trec_topk(scores_np, k, prio)
                topk_ids[s:e], topk_scores[s:e] = ids, vals
            if bar is not None:
                bar.update(e - s)
    if bar is not None:
        bar.close()
    if pool is not None:
        pool.shutdown()
    return SearchResult(ranks, block_ranks, topk_ids, topk_scores, exact=True)


def _faiss(q, c, rel, offsets, prio, k, device, chunk, show, ivf_lists, nprobe):
    faiss = faiss_module()
    if faiss is None:
        raise ImportError("search='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu-cu12)")
    use_gpu = device.type == "cuda" and faiss_has_gpu()
    if device.type == "cuda" and not use_gpu:
        fallback_warning("faiss-gpu", "search='faiss' on CUDA: faiss has no GPU support here "
                         "(pip install faiss-gpu-cu12); using faiss-cpu")
    if ivf_lists is None:
        index = faiss_index(faiss, c, None, nprobe, use_gpu)

        def topk_fn(scores_np, kk, prio_, s, e):
            return faiss_topk(index, q[s:e], kk, prio_)

        # exact ranks: counted from a CPU BLAS matmul of the same vectors
        return _exact_torch(q, c, rel, offsets, prio, k, torch.device("cpu"), chunk, show, topk_fn=topk_fn)
    # approximate: top-k lists per block and over the pool; ranks from the lists
    depth = max(k, 1)
    pool_ids, pool_vals = faiss_topk(faiss_index(faiss, c, ivf_lists, nprobe, use_gpu), q, depth, prio)
    ranks = ranks_from_lists(pool_ids, rel)
    block_ranks = np.zeros(rel.shape, dtype=np.int64)
    for s, e in zip(offsets[:-1], offsets[1:]):
        if e == s:
            continue
        in_block = (rel >= s) & (rel < e)
        rows = np.nonzero(in_block.any(1))[0]
        if not len(rows):
            continue
        lists, _ = faiss_topk(faiss_index(faiss, c[s:e], ivf_lists, nprobe, use_gpu), q[rows],
                               min(depth, e - s), prio[s:e])
        lists = np.where(lists >= 0, lists + s, -1)
        sub = np.where(in_block[rows], rel[rows], -1)
        block_ranks[rows] = np.where(in_block[rows], ranks_from_lists(lists, sub), block_ranks[rows])
    return SearchResult(ranks, block_ranks, pool_ids if k else None, pool_vals if k else None, exact=False)


def resolve_backend(search="auto", ivf_lists=None):
    """The backend `search` will use: 'torch' or 'faiss' (see the module docstring)."""
    if search not in BACKENDS:
        raise ValueError(f"search must be one of {BACKENDS}, got {search!r}")
    if search == "auto":
        return "faiss" if ivf_lists is not None else "torch"
    if search == "torch" and ivf_lists is not None:
        raise ValueError("ivf_lists needs search='faiss' (or 'auto')")
    return search


def resolve_engine(engine, device, backend):
    """'tiles' (CPU, torch backend) or 'rows' (CUDA, faiss, or asked for)."""
    if engine not in ("auto",) + ENGINES:
        raise ValueError(f"engine must be one of {('auto',) + ENGINES}, got {engine!r}")
    if engine == "auto":
        return "tiles" if device.type == "cpu" and backend == "torch" else "rows"
    if engine == "tiles" and (device.type != "cpu" or backend != "torch"):
        raise ValueError(f"engine='tiles' is the CPU engine of backend 'torch' (device={device.type!r}, "
                         f"backend={backend!r}); use engine='auto'")
    return engine


def resolve_precision(precision, device, engine):
    """'fp32' or 'bf16' for in-memory candidates; "auto" is fp32.

    Why not bf16 by default where the CPU has AVX512-BF16: PyTorch 2.13 has no CPU GEMM from
    bf16 inputs to fp32 scores (aten::mm.dtype is CUDA-only; a bf16 matmul returns bf16 scores,
    8 mantissa bits, i.e. mass ties), so the tiles are widened to fp32 and the GEMM is the fp32
    one: no faster (measured 1.64x vs 1.59x the matmul at C = 200k), and the caller's fp32 array
    still lives beside the bf16 copy. bf16 pays where the candidates are stored, not held:
    shards (shard_precision) halve the disk and the page cache the stream reads through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and engine != "tiles":
        raise ValueError("precision='bf16' needs the CPU engine 'tiles' (engine='auto' on device='cpu')")
    return "fp32" if precision == "auto" else precision


def shard_precision(precision="auto"):
    """Precision of candidate shards: "auto" is bf16 where the CPU computes bf16 natively
    (hybridfast.models.packed.cpu_bf16_native; $HYBRIDFAST_CPU_BF16 overrides), else fp32."""
    from hybridfast.models.packed import cpu_bf16_native

    if precision not in PRECISIONS:
        raise ValueError(f"shard_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_bf16_native() else "fp32"
    return precision


def search(queries, candidates, relevant, *, offsets=None, tie_priority=None, k=0, backend="auto",
           device="auto", chunk_size=None, ivf_lists=None, nprobe=16, show_progress=False, engine="auto",
           precision="auto") -> SearchResult:
    """Rank the relevant candidates of every query (and optionally return top-k lists).

    queries [Q, D], candidates [C, D]: float arrays or tensors (scores = dot products), or a
      hybridfast.evaluation.shards.ShardedTiles (a folder of shards streamed tile by tile).
    relevant: int [Q, R] candidate columns relevant to each query, -1 = padding.
    offsets: block boundaries over candidate columns, e.g. [0, C_en, C_en + C_de, ...]
      (None: one block). block_ranks are ranks inside each relevant column's block.
    tie_priority: int [C], distinct, larger = ranked first among equal scores
      (metrics.tie_priority(ids)); default: later column first.
    k: length of the top-k lists over the pool (0: none). ivf_lists / nprobe: approximate faiss IVF.
    engine: CPU exact search, "tiles" (one pass over cached score tiles, hybridfast.evaluation.tiles)
      or "rows" (whole score rows, the plain reference); "auto": tiles on the CPU.
    precision: "bf16" stores the candidates in bfloat16 (half the memory) and scores bf16-rounded
      vectors with fp32 accumulation, compared in fp32 (tiles engine only); "auto": fp32 for arrays
      (see resolve_precision), the stored precision for shards. chunk_size: query rows per chunk / tile.
    """
    dev = resolve_device(device)
    backend = resolve_backend(backend, ivf_lists)
    engine = resolve_engine(engine, dev, backend)
    source = is_tile_source(candidates)
    precision = (_source_precision(candidates, precision, engine) if source
                 else resolve_precision(precision, dev, engine))
    q, c, rel, offsets, prio, k = _check_inputs(queries, candidates, relevant, offsets, tie_priority, k,
                                                keep_bf16=precision == "bf16")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available (use device='auto' or 'cpu')")
    chunk = _chunk_rows(c.shape[0], rel.shape[1], dev, chunk_size)
    if q.shape[0] == 0:
        empty = np.zeros(rel.shape, dtype=np.int64)
        return SearchResult(empty, empty.copy(), np.zeros((0, k), np.int64) if k else None,
                            np.zeros((0, k), np.float32) if k else None)
    # order each row's relevant slots by block, so a slot mostly falls in one block
    block_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    key = np.where(rel >= 0, block_of[np.maximum(rel, 0)] * c.shape[0] + rel, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(rel, order, 1)
    if backend == "faiss":
        res = _faiss(q, c, rel_sorted, offsets, prio, k, dev, chunk, show_progress, ivf_lists, nprobe)
    elif engine == "tiles":
        # counted in score tiles (query tile x candidate tile): one tile of queries against a
        # large corpus would otherwise sit at 0% until the end
        bar = _progress(sweep_count(q.shape[0], c.n if source else c.shape[0], chunk_size), show_progress,
                        "search", "tile", "tiles")
        res = SearchResult(*tiled_search(_bf16_rounded(q) if precision == "bf16" else q,
                                         c if source else ArrayTiles(c, precision), rel_sorted, offsets, prio, k,
                                         chunk_size, bar))
        if bar is not None:
            bar.close()
    else:
        res = _exact_torch(q, c, rel_sorted, offsets, prio, k, dev, chunk, show_progress)
    for name in ("ranks", "block_ranks"):  # back to the caller's slot order
        out = np.empty_like(getattr(res, name))
        np.put_along_axis(out, order, getattr(res, name), 1)
        setattr(res, name, out)
    return res
