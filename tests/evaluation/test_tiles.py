"""The C++ counting pass of the tiles engine (hybridfast._C.count_tile, widen_bf16) against the
numpy pass beside it (_TileState.count_rows + merge_topk), tile by tile and through whole searches."""
import numpy as np
import pytest
import torch

from hybridfast.evaluation import tiles
from hybridfast.evaluation.search import search

pytestmark = pytest.mark.skipif(tiles._native() is None, reason="hybridfast._C without the counting pass")


def _tile_problem(rng, b, width, R, n_blocks, tie_levels):
    """Scores rounded to few levels (many exact ties), bands around some of them, padding slots."""
    wide = np.zeros((b, width + 7), np.float32)  # the tile is a column slice: rows not contiguous
    S = wide[:, 3:3 + width]
    S[:] = np.round(rng.standard_normal((b, width)) * tie_levels) / tie_levels
    col0 = int(rng.integers(0, 50))
    n = col0 + width + 20
    cuts = np.sort(rng.choice(np.arange(1, width), n_blocks - 1, replace=False)) if n_blocks > 1 else []
    edges = np.concatenate([[0], cuts, [width]]).astype(np.int64)
    pieces = [(col0 + a, col0 + e, blk) for blk, (a, e) in enumerate(zip(edges[:-1], edges[1:]))]
    rel = rng.integers(col0 - 10, col0 + width + 10, (b, R))  # some inside this tile, some outside
    rel[rng.random((b, R)) < 0.2] = -1
    valid = rel >= 0
    centre = S[np.arange(b)[:, None], np.clip(rel - col0, 0, width - 1)]
    half = rng.choice([0.0, 0.0, 1e-3, 0.3], (b, R)).astype(np.float32)  # exact, narrow, wide bands
    lo = np.where(valid, centre - half, np.inf).astype(np.float32)
    hi = np.where(valid, centre + half, np.inf).astype(np.float32)
    slot_block = np.where(valid, rng.integers(0, n_blocks, (b, R)), -1)
    prio = rng.permutation(n).astype(np.int64)
    return S, col0, pieces, rel, lo, hi, slot_block, prio


def _state(rel, slot_block, lo, hi, k, prio, prefill):
    st = tiles._TileState(rel, slot_block, lo, hi, k, prio)
    if k and prefill is not None:  # a running top-k from earlier tiles
        st.best_vals[:], st.best_ids[:] = prefill
    return st


def _members(band):
    if not band:
        return set()
    rows, slots, cols, vals = (np.concatenate(x) for x in zip(*band))
    return set(zip(rows.tolist(), slots.tolist(), cols.tolist(), vals.tolist()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [0, 1, 7])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_count_tile_equals_the_numpy_pass(seed, k, threads, monkeypatch):
    rng = np.random.default_rng(seed)
    b, width, R = int(rng.integers(1, 70)), int(rng.integers(1, 300)), int(rng.integers(1, 5))
    S, col0, pieces, rel, lo, hi, slot_block, prio = _tile_problem(rng, b, width, R, int(rng.integers(1, 4)),
                                                                   tie_levels=float(rng.choice([4, 64])))
    prefill = None
    if k and seed % 2 and col0:  # a running list from an earlier tile (ids < col0), ties with this one likely
        earlier = _state(rel, slot_block, lo, hi, k, prio, None)
        earlier.merge_topk(np.round(rng.standard_normal((b, col0)) * 4).astype(np.float32) / 4, 0, b, 0)
        prefill = (earlier.best_vals, earlier.best_ids)
    ref = _state(rel, slot_block, lo, hi, k, prio, prefill)
    mask = np.empty((tiles._SUB_ROWS, width), bool)
    for r0 in range(0, b, tiles._SUB_ROWS):
        ref.count_rows(S, r0, min(b, r0 + tiles._SUB_ROWS), col0, pieces, mask)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    nat = _state(rel, slot_block, lo, hi, k, prio, prefill)
    nat.count_tile_native(S, col0, pieces)
    np.testing.assert_array_equal(nat.total, ref.total)
    np.testing.assert_array_equal(nat.own, ref.own)
    # the numpy pass also lists r itself; the C++ pass leaves it out (resolve skips it either way)
    own_col = {(r, j, int(rel[r, j])) for r in range(b) for j in range(R)}
    assert _members(nat.band) == {m for m in _members(ref.band) if m[:3] not in own_col}
    if k:
        np.testing.assert_array_equal(nat.best_ids, ref.best_ids)
        np.testing.assert_array_equal(nat.best_vals, ref.best_vals)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(3))
def test_tiled_search_native_equals_numpy(monkeypatch, precision, seed):
    """Whole searches, tiles crossing blocks and query tiles, duplicated candidates (exact ties)."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(tiles, "TILE_COLS", int(rng.integers(17, 90)))
    Q, C, D, R = int(rng.integers(1, 60)), int(rng.integers(40, 400)), int(rng.integers(2, 24)), 3
    c = np.round(rng.standard_normal((C, D)) * 3).astype(np.float32)
    c[rng.integers(0, C, C // 4)] = c[rng.integers(0, C, C // 4)]
    q = np.round(rng.standard_normal((Q, D)) * 3).astype(np.float32)
    rel = rng.integers(-1, C, (Q, R))
    offsets = np.unique(np.concatenate([[0, C], rng.integers(0, C, 3)]))
    kw = dict(offsets=offsets, tie_priority=rng.permutation(C), k=9, engine="tiles", precision=precision,
              chunk_size=int(rng.integers(3, 40)))
    native = search(q, c, rel, **kw)
    monkeypatch.setattr(tiles, "_native", lambda: None)
    plain = search(q, c, rel, **kw)
    for name in ("ranks", "block_ranks", "topk_ids", "topk_scores"):
        np.testing.assert_array_equal(getattr(native, name), getattr(plain, name), err_msg=name)


@pytest.mark.parametrize("n", [1, 15, 17, 1000, (1 << 18) * 2 + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_widen_bf16_equals_the_numpy_shift(n, threads):
    x = torch.randn(n).to(torch.bfloat16)
    x[0] = float("-inf") if n > 1 else 0.0
    bits = tiles.bf16_bits(x)
    out = np.empty(n, np.float32)
    tiles._native().widen_bf16(bits, out, threads)
    np.testing.assert_array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(out, x.float().numpy())


def test_bad_outputs_are_refused_naming_the_argument():
    ext = tiles._native()
    S = np.zeros((4, 8), np.float32)
    lo = hi = np.zeros((4, 2), np.float32)
    ids = np.zeros((4, 2), np.int64)
    good = dict(scores=S, pieces=np.array([[0, 8, 0]], np.int64), lo=lo, hi=hi, slot_block=ids, rel=ids,
                total=np.zeros((4, 2), np.int64), own=np.zeros((4, 2), np.int64),
                topk_vals=np.zeros((4, 0), np.float32), topk_ids=np.zeros((4, 0), np.int64),
                prio=np.arange(8, dtype=np.int64), col0=0)
    ext.count_tile(**good)
    for name, value, match in [("total", np.zeros((4, 2), np.int32), "total must be"),  # would write a copy
                               ("own", np.zeros((4, 2), np.int64)[:, :1], "own must be"),
                               ("scores", S.astype(np.float64), "scores must be a 2-D float32"),
                               ("pieces", np.array([[0, 9, 0]], np.int64), "pieces must lie inside"),
                               ("col0", -1, "col0 must be"),
                               ("topk_ids", np.zeros((4, 3), np.int64), None)]:
        kw = dict(good, **{name: value})
        if name == "topk_ids":  # a top-k of 2 with ids of the wrong size
            kw.update(topk_vals=np.zeros((4, 2), np.float32))
            match = "topk_ids must be"
        with pytest.raises(ValueError, match=match):
            ext.count_tile(**kw)
    with pytest.raises(ValueError, match="dst must be"):
        ext.widen_bf16(np.zeros(4, np.uint16), np.zeros(4, np.float64))
