"""The CPU search engines of hybridfast.evaluation.search: "tiles" (one pass over cached score
tiles, hybridfast.evaluation.tiles) against "rows" (the plain reference) and against sorting,
the band check's exact fallback, bf16 candidates, and argument errors (issue 23)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridfast.evaluation import tiles
from hybridfast.evaluation.search import chunk_scores, resolve_precision, search, shard_precision


def small_tiles(monkeypatch, cols):
    """Candidate tiles of `cols` columns so that small problems cross many tiles and blocks."""
    monkeypatch.setattr(tiles, "TILE_COLS", cols)


def tied_problem(rng, Q, C, D, R, n_blocks=3, low=-2, high=3):
    """Small-integer vectors: every dot product is exact in float32 (and bf16), whatever the
    GEMM's order, so ties are frequent and both engines see identical scores."""
    q = rng.integers(low, high, (Q, D)).astype(np.float32)
    c = rng.integers(low, high, (C, D)).astype(np.float32)
    cuts = np.sort(rng.integers(0, C + 1, n_blocks - 1))
    offsets = np.concatenate([[0], cuts, [C]])
    rel = np.full((Q, R), -1)
    for i in range(Q):
        n = rng.integers(0, min(R, C) + 1)
        rel[i, :n] = rng.choice(C, n, replace=False)
    return q, c, rel, offsets, rng.permutation(C)


def sorted_reference(S, rel, offsets, prio, k):
    """Ranks (pool and own block) and top-k by sorting each row: score desc, priority desc."""
    Q, R = rel.shape
    ranks, own = np.zeros((Q, R), np.int64), np.zeros((Q, R), np.int64)
    ids = np.zeros((Q, k), np.int64)
    for i in range(Q):
        order = np.lexsort((-prio, -S[i].astype(np.float64)))
        pos = np.empty(len(order), np.int64)
        pos[order] = np.arange(1, len(order) + 1)
        ids[i] = order[:k]
        for j, r in enumerate(rel[i]):
            if r < 0:
                continue
            ranks[i, j] = pos[r]
            b = np.searchsorted(offsets, r, side="right") - 1
            block = order[(order >= offsets[b]) & (order < offsets[b + 1])]
            own[i, j] = int(np.nonzero(block == r)[0][0]) + 1
    return ranks, own, ids


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 90), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 12), st.integers(1, 17), st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_tiles_equal_rows_on_tied_scores(Q, C, D, R, n_blocks, rows, cols, k, seed):
    """Any shape, block layout, tile shape, k and tie pattern: tiles == rows, top-k included."""
    rng = np.random.default_rng(seed)
    q, c, rel, offsets, prio = tied_problem(rng, Q, C, D, R, n_blocks)
    with pytest.MonkeyPatch.context() as mp:
        small_tiles(mp, cols)
        a = search(q, c, rel, offsets=offsets, tie_priority=prio, k=k, engine="rows", device="cpu")
        b = search(q, c, rel, offsets=offsets, tie_priority=prio, k=k, engine="tiles", precision="fp32",
                   chunk_size=rows)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.block_ranks, b.block_ranks)
    if min(k, C):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_scores, b.topk_scores)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiles_ranks_equal_sorting_of_their_own_float_scores(monkeypatch, seed):
    """Float vectors (the GEMM's rounding depends on the tiling): ranks and top-k equal a full
    sort of the scores chunk_scores gives for the same engine, duplicated candidates making ties."""
    small_tiles(monkeypatch, 64)
    rng = np.random.default_rng(seed)
    Q, C, D, R = 45, 700, 24, 4
    q = rng.standard_normal((Q, D), dtype=np.float32)
    c = rng.standard_normal((C, D), dtype=np.float32)
    c[rng.integers(0, C, 150)] = c[rng.integers(0, C, 150)]  # exact duplicates: tied scores
    c[:40] = c[0]
    rel = rng.integers(0, C, (Q, R))
    rel[:, 0] = rng.integers(0, 40, Q)  # relevant candidates inside the tied group
    rel[::3, 3] = -1
    offsets, prio = np.array([0, 200, 450, C]), rng.permutation(C)
    res = search(q, c, rel, offsets=offsets, tie_priority=prio, k=15, engine="tiles", precision="fp32",
                 chunk_size=16)
    S = np.concatenate([s.copy() for _, _, s in chunk_scores(q, c, chunk_size=16, engine="tiles",
                                                              precision="fp32")])
    ranks, own, ids = sorted_reference(S, rel, offsets, prio, 15)
    np.testing.assert_array_equal(res.ranks, ranks)
    np.testing.assert_array_equal(res.block_ranks, own)
    np.testing.assert_array_equal(res.topk_ids, ids)
    np.testing.assert_array_equal(res.topk_scores, np.take_along_axis(S, ids, 1))


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_scores_outside_the_band_are_swept_again_exactly(monkeypatch, scale):
    """A band too narrow (0: one ulp) or empty (-1) puts relevant scores outside it: their query
    tile is swept again with the exact threshold and the ranks are still the sorted ones."""
    small_tiles(monkeypatch, 50)
    monkeypatch.setattr(tiles, "BAND_SCALE", scale)
    sweeps = []
    real = tiles._sweep
    monkeypatch.setattr(tiles, "_sweep", lambda *a: sweeps.append(1) or real(*a))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((20, 300), dtype=np.float32)
    c = rng.standard_normal((260, 300), dtype=np.float32)
    c[100:130] = c[100]
    rel = np.stack([rng.integers(0, 260, 20), rng.integers(100, 130, 20)], 1)
    offsets, prio = np.array([0, 120, 260]), rng.permutation(260)
    res = search(q, c, rel, offsets=offsets, tie_priority=prio, k=5, engine="tiles", precision="fp32",
                 chunk_size=8)
    S = np.concatenate([s.copy() for _, _, s in chunk_scores(q, c, chunk_size=8, engine="tiles", precision="fp32")])
    ranks, own, ids = sorted_reference(S, rel, offsets, prio, 5)
    np.testing.assert_array_equal(res.ranks, ranks)
    np.testing.assert_array_equal(res.block_ranks, own)
    np.testing.assert_array_equal(res.topk_ids, ids)
    assert len(sweeps) > 3  # 3 query tiles, at least one swept twice


def test_changing_scores_between_sweeps_are_refused(monkeypatch):
    """The fallback relies on the same GEMM call giving the same scores; if not, an error, not
    silently wrong ranks."""
    monkeypatch.setattr(tiles, "BAND_SCALE", -1.0)
    real, calls = tiles.score_tile, []

    def drifting(q_tile, cand, start, end, work):
        calls.append(1)
        return real(q_tile, cand, start, end, work) + np.float32(len(calls) * 1e-3)

    monkeypatch.setattr(tiles, "score_tile", drifting)
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((30, 8), dtype=np.float32)
    with pytest.raises(RuntimeError, match="non-deterministic GEMM"):
        search(q, c, rng.integers(0, 30, (4, 1)), engine="tiles", precision="fp32")


def test_bf16_candidates_equal_fp32_on_values_bf16_holds(monkeypatch):
    """bf16 storage, fp32 accumulation: on vectors bf16 holds exactly the scores are the fp32
    ones, so ranks and top-k equal the fp32 reference; the stored copy has half the bytes."""
    small_tiles(monkeypatch, 33)
    rng = np.random.default_rng(7)
    q, c, rel, offsets, prio = tied_problem(rng, 40, 300, 16, 3, low=-8, high=9)
    a = search(q, c, rel, offsets=offsets, tie_priority=prio, k=7, engine="rows", device="cpu")
    for cand in (c, torch.from_numpy(c).to(torch.bfloat16)):  # a bf16 tensor is taken without a fp32 copy
        b = search(q, cand, rel, offsets=offsets, tie_priority=prio, k=7, engine="tiles", precision="bf16",
                   chunk_size=9)
        np.testing.assert_array_equal(a.ranks, b.ranks)
        np.testing.assert_array_equal(a.block_ranks, b.block_ranks)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    stored = tiles.ArrayTiles(c, "bf16")
    assert stored.data.dtype == np.uint16 and stored.data.nbytes == c.nbytes // 2
    np.testing.assert_array_equal(stored.rows(np.arange(300)), torch.from_numpy(c).bfloat16().float().numpy())


def test_bf16_ranks_are_those_of_the_rounded_vectors(monkeypatch):
    """Float vectors: bf16 search ranks = fp32 sorting of the bf16-rounded vectors' scores."""
    small_tiles(monkeypatch, 40)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((30, 20), dtype=np.float32)
    c = rng.standard_normal((200, 20), dtype=np.float32)
    rel, prio, offsets = rng.integers(0, 200, (30, 2)), rng.permutation(200), np.array([0, 200])
    res = search(q, c, rel, tie_priority=prio, k=4, engine="tiles", precision="bf16", chunk_size=10)
    S = np.concatenate([s.copy() for _, _, s in chunk_scores(q, c, chunk_size=10, engine="tiles", precision="bf16")])
    rounded = (torch.from_numpy(q).bfloat16().float() @ torch.from_numpy(c).bfloat16().float().T).numpy()
    np.testing.assert_allclose(S, rounded, rtol=0, atol=1e-5)  # the same products, summed in fp32
    ranks, own, ids = sorted_reference(S, rel, offsets, prio, 4)
    np.testing.assert_array_equal(res.ranks, ranks)
    np.testing.assert_array_equal(res.topk_ids, ids)


def test_precision_auto_is_fp32_in_memory_and_follows_the_cpu_for_shards(monkeypatch):
    cpu = torch.device("cpu")
    for native in ("1", "0"):
        monkeypatch.setenv("HYBRIDFAST_CPU_BF16", native)
        assert resolve_precision("auto", cpu, "tiles") == "fp32"
        assert resolve_precision("bf16", cpu, "tiles") == "bf16"
        assert shard_precision("auto") == ("bf16" if native == "1" else "fp32")
        assert shard_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="shard_precision must be one of"):
        shard_precision("int8")


@pytest.mark.parametrize("kwargs, match", [
    (dict(engine="fast"), "engine must be one of"),
    (dict(precision="fp16"), "precision must be one of"),
    (dict(engine="rows", precision="bf16"), "precision='bf16' needs the CPU engine"),
    (dict(engine="tiles", backend="faiss"), "engine='tiles' is the CPU engine"),
    (dict(engine="tiles", device="cuda"), "engine='tiles' is the CPU engine"),
])
def test_bad_engine_and_precision_name_the_argument(kwargs, match):
    q, c = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        search(q, c, np.zeros((2, 1), np.int64), **kwargs)


def test_nan_candidates_are_refused_block_by_block():
    c = np.ones((10, 3), np.float32)
    c[9, 2] = np.nan
    with pytest.raises(ValueError, match="candidates holds NaN"):
        search(np.ones((2, 3), np.float32), c, np.zeros((2, 1), np.int64))
    for bad in (float("inf"), float("-inf"), float("nan")):  # bfloat16 is tested through its bits
        bf = torch.ones(10, 3, dtype=torch.bfloat16)
        bf[3, 0] = bad
        with pytest.raises(ValueError, match="candidates holds NaN"):
            search(np.ones((2, 3), np.float32), bf, np.zeros((2, 1), np.int64), precision="bf16")
    big = torch.full((10, 3), 2.0 ** 127, dtype=torch.bfloat16)  # the largest exponent below inf/NaN's
    big[0] = -(2.0 ** 127)                                         # passes (scores 0.75 * 2^127 stay finite)
    assert search(np.full((2, 3), 0.25, np.float32), big, np.zeros((2, 1), np.int64), precision="bf16").ranks.shape == (2, 1)


@pytest.mark.parametrize("prio", [[0, 1, 1, 2], [5, 10**9, 7, 10**9]])
def test_repeated_tie_priorities_are_refused(prio):
    """Dense (a count per value) and sparse (a sort) priorities: both checks find the repeat."""
    q, c = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="tie_priority must hold distinct integers"):
        search(q, c, np.zeros((2, 1), np.int64), tie_priority=np.array(prio))
