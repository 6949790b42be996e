"""Exact search at corpus scale: hybridfast.evaluation.search.search against a bare matmul of
the same scores, measured in the same run (issue 23).

Problem (synthetic, seeded): Q random unit queries, C random unit candidates of dimension D,
R = 3 relevant columns per query drawn at random, k = 10 top-k lists; one block (the pool).
Random vectors put every relevant candidate near the middle of the ranking, the worst case for
counting (about C/2 candidates above each one) and a dense band of near-equal scores.

Baseline: the bare float32 matmul of the same Q x C scores (numpy sgemm, query tiles of 512 x
candidate tiles of 16,384 into one reused buffer: the fastest tiling measured on the development
CPU), nothing else. Every record holds both timings from the same run, their ratio, the peak
resident memory of the search (the process high-water mark, reset before the call) beside the
candidates' stored bytes, the 1-minute load average before and after, and Q (fewer queries at
the largest C keep one point within a few minutes: the ratio does not depend on Q once a query
tile is full).

Run explicitly (CI does not collect bench/):

    python -m pytest bench/bench_search.py --benchmark-only -s -p no:cacheprovider
    HYBRIDFAST_BENCH_SEARCH=50000x384x2000,200000x768x500 python -m pytest bench/bench_search.py ...

HYBRIDFAST_BENCH_SEARCH: comma-separated CxDxQ points (default: POINTS below).
HYBRIDFAST_BENCH_SEARCH_ENGINES: comma-separated engines of search() (default: every engine);
HYBRIDFAST_BENCH_SEARCH_PRECISIONS: comma-separated candidate precisions (default: fp32).
HYBRIDFAST_BENCH_RESULTS_DIR: write the JSON there instead of bench/results (trial runs).
"""
import os
import time

import numpy as np
import pytest
import torch

from bench.utils import _rss_kib, peak_memory_bytes, save_results
from hybridfast.evaluation import search as search_mod

CPU = torch.device("cpu")
R, K, SEED = 3, 10, 0
BASE_ROWS, BASE_COLS = 512, 16384
# (C, D, Q): Q shrinks with C so that one point stays within a few minutes on 2 cores
POINTS = [(50_000, 384, 2000), (200_000, 384, 2000), (800_000, 384, 1000), (3_200_000, 384, 512),
          (50_000, 768, 2000), (200_000, 768, 1000), (800_000, 768, 512), (1_600_000, 768, 512)]
RECORDS = []


def _points():
    spec = os.environ.get("HYBRIDFAST_BENCH_SEARCH", "").strip()
    if not spec:
        return POINTS
    out = []
    for item in spec.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"HYBRIDFAST_BENCH_SEARCH: expected CxDxQ items, got {item!r}")
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


def _engines():
    return _listed("HYBRIDFAST_BENCH_SEARCH_ENGINES", getattr(search_mod, "ENGINES", ("rows",)))


def _cases():
    precisions = _listed("HYBRIDFAST_BENCH_SEARCH_PRECISIONS", ["fp32"])
    return [(c, d, q, e, p) for (c, d, q) in _points() for e in _engines() for p in precisions]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RECORDS:
        # a trial run can write elsewhere: HYBRIDFAST_BENCH_RESULTS_DIR=/tmp/x
        path = save_results("search", CPU, RECORDS, os.environ.get("HYBRIDFAST_BENCH_RESULTS_DIR") or None)
        print(f"\nsearch results -> {path}")
        for r in RECORDS:
            print({k: r[k] for k in ("engine", "precision", "C", "D", "Q", "search_s", "matmul_s", "ratio",
                                     "peak_rss_bytes", "load_before")})


def _search_kwargs(engine, precision):
    kw = dict(k=K, backend="torch", device="cpu")
    if hasattr(search_mod, "ENGINES"):
        kw["engine"] = engine
    if precision != "fp32":
        kw["precision"] = precision
    return kw


@pytest.mark.parametrize("C,D,Q,engine,precision", _cases())
def test_search_vs_matmul(benchmark, C, D, Q, engine, precision):
    torch.set_num_threads(2)
    c, q, rel = _problem(C, D, Q)
    kw = _search_kwargs(engine, precision)
    rounds = 3 if C * Q <= 200_000 * 2000 else 1
    load_before = os.getloadavg()[0]
    matmul_s = _seconds(lambda: bare_matmul(q, c), rounds)
    result = benchmark.pedantic(lambda: search_mod.search(q, c, rel, **kw), rounds=rounds, iterations=1)
    search_s = benchmark.stats.stats.min
    matmul_after_s = _seconds(lambda: bare_matmul(q, c), 1)  # drift check: the load may change
    assert result.ranks.shape == (Q, R) and (result.ranks >= 1).all() and result.topk_ids.shape == (Q, K)
    rss_before = _rss_kib("VmRSS:") * 1024
    peak_extra = peak_memory_bytes(lambda: search_mod.search(q, c, rel, **kw), CPU)
    RECORDS.append(dict(
        name="exact_search_ranks_top10", engine=engine, precision=precision, C=C, D=D, Q=Q, R=R, k=K,
        search_s=search_s, matmul_s=matmul_s, matmul_after_s=matmul_after_s,
        ratio=search_s / min(matmul_s, matmul_after_s),
        matmul_gflops=2 * Q * C * D / min(matmul_s, matmul_after_s) / 1e9,
        candidate_bytes=int(c.nbytes), rss_before_bytes=rss_before, peak_extra_bytes=peak_extra,
        peak_rss_bytes=rss_before + peak_extra, rounds=rounds, threads=torch.get_num_threads(),
        load_before=load_before, load_after=os.getloadavg()[0],
        extra_info=("seconds: best of rounds; ratio: search / the faster of the two bare matmul runs "
                    "(before and after the search) of the same scores; peak_rss_bytes: resident "
                    "set high-water mark during one search call (candidates and queries included)")))
