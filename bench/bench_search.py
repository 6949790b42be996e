"""Exact search at corpus scale: hybridfast.evaluation.search.search against a bare matmul of
the same scores, measured in the same run (issue 23).

Problem (synthetic, seeded): Q random unit queries, C random unit candidates of dimension D,
R = 3 relevant columns per query drawn at random, k = 10 top-k lists; one block (the pool).
Random vectors put every relevant candidate near the middle of the ranking, the worst case for
counting (about C/2 candidates above each one) and a dense band of near-equal scores.

Baseline: the bare float32 matmul of the same Q x C scores (numpy sgemm, the tiles engine's tiles:
query tiles of TILE_ROWS x candidate tiles of TILE_COLS into one reused buffer, the fastest
tiling measured on the development CPU), nothing else. Every record holds both timings from the same run, their ratio, the peak
resident memory of the search (the process high-water mark, reset before the call) beside the
candidates' stored bytes, the 1-minute load average before and after, and Q (fewer queries at
the largest C keep one point within a few minutes: the ratio does not depend on Q once a query
tile is full).

Run explicitly (CI does not collect bench/):

    python -m pytest bench/bench_search.py --benchmark-only -s -p no:cacheprovider
    HYBRIDFAST_BENCH_SEARCH=50000x384x2000,200000x768x500 python -m pytest bench/bench_search.py ...

HYBRIDFAST_BENCH_SEARCH: comma-separated CxDxQ points (default: POINTS below).
HYBRIDFAST_BENCH_SEARCH_ENGINES: comma-separated engines of search() (default: every engine; the
  "rows" engine, today's reference, only up to ROWS_MAX_C candidates: beyond, its chunks shrink to
  a few query rows and one point takes many minutes);
  Beside the tiles engine with its C++ counting pass (hybridfast._C.count_tile), its numpy
  counting pass runs in the same sweep (fp32, C <= ROWS_MAX_C; records say counting="numpy"),
  and the ranks and top-k of both are asserted equal;
HYBRIDFAST_BENCH_SEARCH_PRECISIONS: comma-separated candidate precisions (default: fp32,bf16; bf16
  with the tiles engine only);
HYBRIDFAST_BENCH_SEARCH_SHARDS: comma-separated CxDxQ points also searched from bf16/fp32 shards
  on disk (default: SHARD_POINTS), their ranks asserted equal to the in-memory search's;
HYBRIDFAST_BENCH_SEARCH_10M=1 (run without --benchmark-only, which skips it): the 10M x 384 corpus from bf16 shards (generated shard by shard,
  never whole in memory), 2000 queries: seconds and absolute peak RSS; its matmul baseline is
  measured on the first 1M candidates and scaled by 10 (an estimate, labelled so).
HYBRIDFAST_BENCH_RESULTS_DIR: write the JSON there instead of bench/results (trial runs).
"""
import os
import time

import numpy as np
import pytest
import torch

from bench.utils import _rss_kib, peak_memory_bytes, save_results
from hybridfast.evaluation import search as search_mod
from hybridfast.evaluation import tiles as tiles_mod
from hybridfast.evaluation.tiles import TILE_COLS, TILE_ROWS

CPU = torch.device("cpu")
R, K, SEED = 3, 10, 0
BASE_ROWS, BASE_COLS = TILE_ROWS, TILE_COLS
ROWS_MAX_C = 800_000
SHARD_POINTS = [(800_000, 384, 1000)]
# (C, D, Q): Q shrinks with C so that one point stays within a few minutes on 2 cores
POINTS = [(50_000, 384, 2000), (200_000, 384, 2000), (800_000, 384, 1000), (3_200_000, 384, 512),
          (50_000, 768, 2000), (200_000, 768, 1000), (800_000, 768, 512), (1_600_000, 768, 512)]
RECORDS = []
RECORDS_10M = []  # saved under their own key, so that a 10M-only run keeps the sweep's figures


def _points(env="HYBRIDFAST_BENCH_SEARCH", default=None):
    spec = os.environ.get(env, "").strip()
    if not spec:
        return POINTS if default is None else default
    out = []
    for item in spec.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{env}: expected CxDxQ items, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def _listed(env, default):
    spec = os.environ.get(env, "").strip()
    return [s.strip() for s in spec.split(",")] if spec else list(default)


def _unit_rows(rng, n, d, block=65536):
    """Seeded unit vectors, generated in blocks so that no float64 temporary of n x d exists."""
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        out[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] /= np.linalg.norm(out[s:e], axis=1, keepdims=True)
    return out


_PROBLEMS = {}


def _problem(C, D, Q):
    key = (C, D)
    if key not in _PROBLEMS:
        _PROBLEMS.clear()  # one corpus at a time: the largest is 4.9 GB
        rng = np.random.default_rng(SEED)
        _PROBLEMS[key] = (_unit_rows(rng, C, D), _unit_rows(rng, 2000, D), rng.integers(0, C, (2000, R)))
    c, q, rel = _PROBLEMS[key]
    return c, q[:Q], rel[:Q]


def bare_matmul(q, c):
    """All Q x C float32 scores, tile by tile into one reused buffer; nothing else."""
    buf = np.empty((BASE_ROWS, BASE_COLS), dtype=np.float32)
    for s in range(0, q.shape[0], BASE_ROWS):
        qs = q[s:s + BASE_ROWS]
        for t in range(0, c.shape[0], BASE_COLS):
            ct = c[t:t + BASE_COLS]
            np.matmul(qs, ct.T, out=buf[:qs.shape[0], :ct.shape[0]])


def _seconds(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cases():
    engines = _listed("HYBRIDFAST_BENCH_SEARCH_ENGINES", search_mod.ENGINES)
    precisions = _listed("HYBRIDFAST_BENCH_SEARCH_PRECISIONS", ["fp32", "bf16"])
    native = "c++" if tiles_mod._native() is not None else "numpy"
    out = [(c, d, q, e, p, "memory", native if e == "tiles" else "-") for (c, d, q) in _points() for e in engines
           for p in precisions
           if not (e == "rows" and (p != "fp32" or c > ROWS_MAX_C))]
    # the numpy counting pass of the tiles engine beside the C++ one, same run (fp32, up to ROWS_MAX_C)
    out += [(c, d, q, "tiles", "fp32", "memory", "numpy") for (c, d, q) in _points()
            if native == "c++" and "tiles" in engines and "fp32" in precisions and c <= ROWS_MAX_C]
    shard_points = _points("HYBRIDFAST_BENCH_SEARCH_SHARDS", SHARD_POINTS)
    return out + [(c, d, q, "tiles", p, "shards", native) for (c, d, q) in shard_points for p in precisions]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for op, records in (("search", RECORDS), ("search_10m", RECORDS_10M)):
        if not records:
            continue
        # a trial run can write elsewhere: HYBRIDFAST_BENCH_RESULTS_DIR=/tmp/x
        path = save_results(op, CPU, records, os.environ.get("HYBRIDFAST_BENCH_RESULTS_DIR") or None)
        print(f"\n{op} results -> {path}")
        for r in records:
            print({k: r.get(k) for k in ("engine", "counting", "precision", "source", "C", "D", "Q", "search_s", "matmul_s",
                                         "ratio", "peak_rss_bytes", "load_before")})


_MEMORY_RANKS = {}  # (C, D, Q, precision) -> ranks of the in-memory tiles search, for the shards check


def _candidates(c, precision, source, tmp_dir):
    """What the search is handed: the float32 array, a bfloat16 tensor (bf16 candidates as an
    encoder returns them, converted outside the timing), or shards on disk."""
    if source == "memory":
        return torch.from_numpy(c).to(torch.bfloat16) if precision == "bf16" else c
    from hybridfast.evaluation.shards import ShardedTiles, ShardWriter

    folder = tmp_dir / f"shards-{precision}"
    w = ShardWriter(folder, len(c), precision, shard_rows=1 << 18)
    for s in range(0, len(c), 1 << 18):
        w.append(c[s:s + (1 << 18)])
    w.close()
    return ShardedTiles(folder)


@pytest.mark.parametrize("C,D,Q,engine,precision,source,counting", _cases())
def test_search_vs_matmul(benchmark, tmp_path, monkeypatch, C, D, Q, engine, precision, source, counting):
    torch.set_num_threads(2)
    if counting == "numpy":
        monkeypatch.setattr(tiles_mod, "_native", lambda: None)
    c, q, rel = _problem(C, D, Q)
    cand = _candidates(c, precision, source, tmp_path)
    kw = dict(k=K, backend="torch", device="cpu", engine=engine, precision=precision)
    rounds = 3 if C * Q <= 200_000 * 2000 else 1
    load_before = os.getloadavg()[0]
    matmul_s = _seconds(lambda: bare_matmul(q, c), rounds)
    result = benchmark.pedantic(lambda: search_mod.search(q, cand, rel, **kw), rounds=rounds, iterations=1)
    search_s = benchmark.stats.stats.min
    matmul_after_s = _seconds(lambda: bare_matmul(q, c), 1)  # drift check: the load may change
    assert result.ranks.shape == (Q, R) and (result.ranks >= 1).all() and result.topk_ids.shape == (Q, K)
    key = (C, D, Q, precision)
    if engine == "tiles" and source == "memory" and key in _MEMORY_RANKS:  # C++ and numpy counting agree
        np.testing.assert_array_equal(result.ranks, _MEMORY_RANKS[key][0])
        np.testing.assert_array_equal(result.topk_ids, _MEMORY_RANKS[key][1])
    elif engine == "tiles" and source == "memory":
        _MEMORY_RANKS[key] = (result.ranks, result.topk_ids)
    elif source == "shards" and key in _MEMORY_RANKS:  # streamed shards: the in-memory ranks exactly
        np.testing.assert_array_equal(result.ranks, _MEMORY_RANKS[key][0])
        np.testing.assert_array_equal(result.topk_ids, _MEMORY_RANKS[key][1])
    rss_before = _rss_kib("VmRSS:") * 1024
    peak_extra = peak_memory_bytes(lambda: search_mod.search(q, cand, rel, **kw), CPU)
    stored = c.nbytes // (2 if precision == "bf16" else 1)
    RECORDS.append(dict(
        name="exact_search_ranks_top10", engine=engine, precision=precision, source=source,
        counting=counting if engine == "tiles" else None, C=C, D=D, Q=Q, R=R,
        k=K, search_s=search_s, matmul_s=matmul_s, matmul_after_s=matmul_after_s,
        ratio=search_s / min(matmul_s, matmul_after_s),
        matmul_gflops=2 * Q * C * D / min(matmul_s, matmul_after_s) / 1e9,
        candidate_bytes_fp32=int(c.nbytes), candidate_bytes_stored=int(stored), rss_before_bytes=rss_before,
        peak_extra_bytes=peak_extra, peak_rss_bytes=rss_before + peak_extra,
        shards_equal_memory=(source == "shards" and key in _MEMORY_RANKS) or None,
        rounds=rounds, threads=torch.get_num_threads(), load_before=load_before, load_after=os.getloadavg()[0],
        extra_info=("seconds: best of rounds; ratio: search / the faster of the two bare fp32 matmul runs "
                    "(before and after the search) of the same scores; bf16 in memory: the search is handed "
                    "a bfloat16 tensor (converted before the timing); peak_extra_bytes: resident set "
                    "high-water mark during one search call above the resident set before it (which holds "
                    "the float32 corpus of the benchmark, and for bf16 the bfloat16 tensor beside it)")))
    if source == "shards":
        cand.close()


@pytest.mark.skipif(os.environ.get("HYBRIDFAST_BENCH_SEARCH_10M") != "1", reason="HYBRIDFAST_BENCH_SEARCH_10M=1")
def test_10m_from_bf16_shards(tmp_path):
    """10M x 384 from bf16 shards, 2000 queries, exact ranks + top-10: seconds and absolute peak RSS."""
    from hybridfast.evaluation.shards import ShardedTiles, ShardWriter

    torch.set_num_threads(2)
    C, D, Q, block = 10_000_000, 384, 2000, 1 << 20
    rng = np.random.default_rng(SEED)
    w = ShardWriter(tmp_path / "s", C, "bf16", shard_rows=block)
    t0 = time.perf_counter()
    for s in range(0, C, block):  # never the whole corpus in memory
        w.append(_unit_rows(rng, min(block, C - s), D))
    assert w.close()
    write_s = time.perf_counter() - t0
    q, rel = _unit_rows(rng, Q, D), rng.integers(0, C, (Q, R))
    first = _unit_rows(np.random.default_rng(SEED), block, D)  # the first shard's vectors again
    matmul_1m_s = _seconds(lambda: bare_matmul(q, first), 1)
    del first
    load_before = os.getloadavg()[0]
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the generation's freed heap back first
    rss_before = _rss_kib("VmRSS:") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    shards = ShardedTiles(tmp_path / "s")
    res = search_mod.search(q, shards, rel, k=K, show_progress=True)
    search_s = time.perf_counter() - t0
    assert (res.ranks >= 1).all()
    RECORDS_10M.append(dict(
        name="exact_search_10m_bf16_shards", engine="tiles", counting="c++" if tiles_mod._native() else "numpy",
        precision="bf16", source="shards", C=C, D=D, Q=Q,
        R=R, k=K, search_s=search_s, open_and_verify_included=True, write_s=write_s,
        matmul_s_estimate=matmul_1m_s * C / block, ratio_estimate=search_s / (matmul_1m_s * C / block),
        peak_rss_bytes=_rss_kib("VmHWM:") * 1024, rss_before_bytes=rss_before, candidate_bytes_stored=C * D * 2,
        target_seconds=600, target_rss_bytes=4 << 30, load_before=load_before, load_after=os.getloadavg()[0],
        extra_info=("search_s includes opening the shards and checking every sha256; matmul_s_estimate: "
                    "the bare fp32 matmul of the first 2^20 candidates measured in this run, x C / 2^20 "
                    "(an estimate, not measured on all 10M); peak_rss_bytes: the process's high-water mark "
                    "during the search (reset before it)")))
