"""Exact ranks and running top-k in ONE pass over score tiles (the CPU engine "tiles" of search).

The engine "rows" (hybridfast.evaluation.search) scores a chunk of queries against every
candidate and then sweeps each full score row again per relevant slot: the rows are larger
than the caches, so every sweep is a trip to memory, and the chunk is a few rows at large C
(a slow matrix shape). Here a query tile (TILE_ROWS) is scored against one candidate tile
(TILE_COLS) at a time, and the counts and the top-k are updated while the tile is in cache.

The catch is the threshold. rank(r) = 1 + #{c : s_c > s_r} + #{c : s_c == s_r, prio_c > prio_r}
needs s_r, the float32 GEMM's score of the relevant candidate r, before r's tile is reached;
and a GEMM's value depends on the tiling (blocking, edge kernels, threads), so s_r cannot be
recomputed apart from the sweep. Instead a float64 dot t_r brackets it: the band
[lo, hi] = t_r -/+ BAND_SCALE * 2^-24 * sum_k |q_k c_k| (rounded outwards to float32). Per tile
and slot two compares count the sure ones (s_c > hi) and flag rows holding band members
(s_c >= lo); those members are kept (row, slot, column, score) and resolved exactly against
s_r once the sweep is over. From r's own tile on, s_r is known (read from that tile before it
is counted) and the band shrinks to lo = hi = s_r: only exact ties are then kept. So every
comparison is still on the float32 scores of the sweep, with trec_eval's tie order.

The band is not a worst-case bound (D * 2^-24 * sum|q_k c_k|, which at large C would flag most
rows in every tile): the largest |GEMM - float64| measured on OpenBLAS sgemm was 3-6 units of
2^-24 * sum|q_k c_k| (D = 100 ... 768), so BAND_SCALE leaves a margin of about 3x. It is
therefore CHECKED: a relevant candidate whose sweep score lies outside its band has its query
tile swept again with lo = hi = s_r from the start (an exact count: the same GEMM calls give
the same scores). Tests force that path.

Blocks (one per candidate language) never share a tile, so a tile's sure count adds to the
own-block rank of the slots whose relevant candidate lives in that block. The top-k keeps,
per row, every candidate >= the running k-th score (ties at the cut are chosen by priority
at the end of each merge, trec_eval's order).

Two implementations of the counting pass, compared on every shape by tests/evaluation/test_tiles.py:
hybridfast._C.count_tile (C++, csrc/tile_count.cpp: one vectorised read of a row per slot, band
members listed from the 1024-column chunk that holds them, a running top-k per row, the rows
split over torch's thread count) and the numpy pass (_TileState.count_rows, the reference, used
when the extension lacks it). At C = 200k, D = 384, Q = 2000 the numpy pass cost 0.59 s beside
a 1.4 s matmul, the C++ pass 0.19 s (development CPU, 2 threads).
"""
import numpy as np
import torch

from hybridfast._backends import cpp_extension

TILE_ROWS = 2048    # queries per tile: 2048 x 16384 was the fastest sgemm shape measured on the 2-core CPU
TILE_COLS = 16384   # candidates per tile: 128 MiB of float32 scores at 2048 rows
BAND_SCALE = 16.0   # band half-width in units of 2^-24 * sum_k |q_k c_k| (see the module doc)
_SUB_ROWS = 32      # rows counted together: their scores stay in L2 between the compares


def bf16_bits(x):
    """uint16 numpy array of the bfloat16 bits of x (float array or tensor; round to nearest even)."""
    t = torch.as_tensor(x)
    if t.dtype != torch.bfloat16:
        t = t.to(torch.bfloat16)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _native():
    """hybridfast._C when it has the counting pass (an extension built before it lacks it)."""
    ext = cpp_extension()
    return ext if ext is not None and hasattr(ext, "count_tile") else None


def bf16_to_fp32(bits, out):
    """bfloat16 bits -> float32 in `out` (exact: a bf16 is the top half of a float32): a shift,
    in C++ on every thread when built (3x numpy's single-threaded shift at 16384 x 768 on the
    development CPU), else in numpy (4x faster than torch's bf16 -> fp32 copy there)."""
    ext = _native()
    if ext is not None and bits.flags.c_contiguous and out.flags.c_contiguous:
        ext.widen_bf16(bits, out, torch.get_num_threads())
        return out
    np.left_shift(bits, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    return out


class ArrayTiles:
    """Candidates held in memory: float32, or bfloat16 bits (half the bytes) turned into float32
    tile by tile. The tiles, the gathered rows and chunk_scores all see the same values."""

    def __init__(self, candidates, precision="fp32"):
        if precision == "bf16":
            self.data = bf16_bits(candidates)
        else:
            self.data = np.ascontiguousarray(candidates, dtype=np.float32)
        self.precision = precision
        self.n, self.dim = self.data.shape
        self.needs_buffer = precision != "fp32"  # fp32 tiles are views of the array

    def tile(self, start, end, buf):
        if self.precision == "bf16":
            return bf16_to_fp32(self.data[start:end], buf[:end - start])
        return self.data[start:end]

    def rows(self, cols):
        """float32 vectors of the candidate columns `cols` (any shape)."""
        if self.precision == "bf16":
            bits = self.data[cols]
            return bf16_to_fp32(bits, np.empty(bits.shape, np.float32))
        return self.data[cols]


def tile_bounds(n, offsets, cols=None):
    """(start, end, pieces) of every candidate tile: regular tiles of <= cols over all n columns
    (the GEMM calls do not depend on the blocks, so chunk_scores needs no offsets), each with
    its (start, end, block) pieces, one per block it overlaps."""
    cols = TILE_COLS if cols is None else cols
    out = []
    for t in range(0, n, cols):
        e = min(n, t + cols)
        pieces = [(max(t, int(a)), min(e, int(b)), blk) for blk, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))
                  if a < e and b > t and a < b]
        out.append((t, e, pieces))
    return out


def score_tile(q_tile, cand, start, end, work):
    """float32 scores of a query tile against candidates [start, end): the one place the
    tiles engine computes scores (numpy sgemm into a reused buffer, so that the search and
    chunk_scores make the very same call)."""
    b, t = q_tile.shape[0], end - start
    cols = min(TILE_COLS, cand.n)  # buffers no wider than the corpus
    buf = work.get("scores")
    if buf is None or buf.shape[0] < b or buf.shape[1] < t:
        buf = work["scores"] = np.empty((b, cols), np.float32)
    if cand.needs_buffer and "cand" not in work:
        work["cand"] = np.empty((cols, cand.dim), np.float32)
    c = cand.tile(start, end, work.get("cand"))
    return np.matmul(q_tile, c.T, out=buf[:b, :t])


def bands(q_tile, cand, rel, valid, rows=256):
    """float32 [b, R] lo, hi around each relevant candidate's score (+inf for padding), in row
    chunks: the float64 [rows, R, D] products stay small whatever Q and R are."""
    b, R = rel.shape
    lo = np.full((b, R), np.inf, np.float32)
    hi = np.full((b, R), np.inf, np.float32)
    for s in range(0, b, rows):
        e = min(b, s + rows)
        prod = q_tile[s:e].astype(np.float64)[:, None, :] * cand.rows(np.maximum(rel[s:e], 0))
        thr, width = prod.sum(-1), BAND_SCALE * 2.0 ** -24 * np.abs(prod).sum(-1)
        down = np.nextafter((thr - width).astype(np.float32), np.float32(-np.inf))
        up = np.nextafter((thr + width).astype(np.float32), np.float32(np.inf))
        lo[s:e] = np.where(valid[s:e], down, np.inf)
        hi[s:e] = np.where(valid[s:e], up, np.inf)
    return lo, hi


def _nonzero2d(mask):
    """np.nonzero of a 2-D mask, through the flat index: 16x faster than the 2-D form here."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


_NO_TOPK_VALS, _NO_TOPK_IDS = np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)


class _TileState:
    """Counts, band members and top-k of one query tile while its candidate tiles stream by."""

    def __init__(self, rel, slot_block, lo, hi, k, prio):
        b, R = rel.shape
        self.rel, self.slot_block, self.k, self.prio = rel, slot_block, k, prio
        self.band_lo, self.band_hi = lo, hi          # checked against s_r at the end
        self.lo, self.hi = lo.copy(), hi.copy()      # the thresholds in use (s_r once known)
        self.total = np.zeros((b, R), np.int64)
        self.own = np.zeros((b, R), np.int64)
        self.score_r = np.full((b, R), np.nan, np.float32)
        self.band = []
        self.active = [j for j in range(R) if (rel[:, j] >= 0).any()]
        if k:
            self.best_ids = np.full((b, k), -1, np.int64)
            self.best_vals = np.full((b, k), -np.inf, np.float32)

    def count_rows(self, S, r0, r1, t0, pieces, mask):
        """Sure counts and band members of rows r0:r1 of one tile, block piece by block piece."""
        for a, b, blk in pieces:
            sub, m = S[r0:r1, a - t0:b - t0], mask[:r1 - r0, :b - a]
            u8 = m.view(np.uint8)
            for j in self.active:
                np.greater(sub, self.hi[r0:r1, j, None], out=m)
                sure = u8.sum(1, dtype=np.uint16)
                np.greater_equal(sub, self.lo[r0:r1, j, None], out=m)
                flagged = np.nonzero(u8.sum(1, dtype=np.uint16) > sure)[0]
                self.total[r0:r1, j] += sure
                self.own[r0:r1, j] += np.where(self.slot_block[r0:r1, j] == blk, sure, 0)
                if flagged.size:
                    part = sub[flagged]
                    inside = (part >= self.lo[r0 + flagged, j, None]) & (part <= self.hi[r0 + flagged, j, None])
                    ii, cc = _nonzero2d(inside)
                    self.band.append((r0 + flagged[ii], np.full(ii.size, j), cc + a, part[ii, cc]))
        if self.k:
            self.merge_topk(S[r0:r1], r0, r1, t0)

    def count_tile_native(self, S, t0, pieces):
        """count_rows and merge_topk of every row of the tile in one C++ pass
        (hybridfast._C.count_tile: one read per slot, a running top-k per row, every thread,
        band members listed while the row is in cache; r's own column is none of them)."""
        rel_pieces = np.array([(a - t0, e - t0, blk) for a, e, blk in pieces], np.int64).reshape(-1, 3)
        vals, ids = (self.best_vals, self.best_ids) if self.k else (_NO_TOPK_VALS, _NO_TOPK_IDS)
        members = _native().count_tile(S, rel_pieces, self.lo, self.hi, self.slot_block, self.rel, self.total,
                                       self.own, vals, ids, self.prio, t0, torch.get_num_threads())
        if members[0].size:
            self.band.append(members)

    def merge_topk(self, sub, r0, r1, t0):
        """Keep every score >= the running k-th (a lower bound from a sample on the first tile)."""
        k, kth = self.k, self.best_vals[r0:r1, -1]
        if np.isneginf(kth).any() and sub.shape[1] > 8 * k:
            m = min(sub.shape[1], max(8 * k, 1024))  # the k-th of m columns bounds the tile's k-th
            kth = np.maximum(kth, np.partition(sub[:, :m], m - k, axis=1)[:, m - k])
        # after a few tiles most rows hold nothing >= their k-th: one max per row finds the others
        hot = np.nonzero(sub.max(1) >= kth)[0]
        if not hot.size:
            return
        if 4 * hot.size > len(kth):  # many rows: compare in place rather than copy them out
            rows, cols = _nonzero2d(sub >= kth[:, None])
        else:
            rows, cols = _nonzero2d(sub[hot] >= kth[hot, None])
            rows = hot[rows]
        n = r1 - r0
        all_rows = np.concatenate([np.repeat(np.arange(n), k), rows])
        all_ids = np.concatenate([self.best_ids[r0:r1].ravel(), cols + t0])
        all_vals = np.concatenate([self.best_vals[r0:r1].ravel(), sub[rows, cols]])
        pr = np.where(all_ids >= 0, self.prio[np.maximum(all_ids, 0)], -1)
        order = np.lexsort((-pr, -all_vals.astype(np.float64), all_rows))
        first = np.searchsorted(all_rows[order], np.arange(n))
        take = order[(first[:, None] + np.arange(k)).ravel()]
        self.best_ids[r0:r1] = all_ids[take].reshape(n, k)
        self.best_vals[r0:r1] = all_vals[take].reshape(n, k)

    def read_own_scores(self, S, t0, t1):
        """s_r of the relevant candidates in this tile; from here on their counts are exact."""
        rows, slots = np.nonzero((self.rel >= t0) & (self.rel < t1))
        g = S[rows, self.rel[rows, slots] - t0]
        self.score_r[rows, slots] = g
        self.lo[rows, slots] = self.hi[rows, slots] = g

    def resolve(self, block_of):
        """Band members ranked before r (by score, then priority) join its counts; returns the
        rows whose own score fell outside its band (to sweep again)."""
        valid = self.rel >= 0
        g = self.score_r
        outside = valid & ~((g >= self.band_lo) & (g <= self.band_hi))
        if self.band:
            rows, slots, cols, vals = (np.concatenate(x) for x in zip(*self.band))
            r, gr = self.rel[rows, slots], g[rows, slots]
            before = (cols != r) & ((vals > gr) | ((vals == gr) & (self.prio[cols] > self.prio[r])))
            np.add.at(self.total, (rows[before], slots[before]), 1)
            same = before & (block_of[cols] == block_of[r])
            np.add.at(self.own, (rows[same], slots[same]), 1)
        return np.nonzero(outside.any(1))[0]


def sweep_count(Q, n, rows=None):
    """Score tiles one search sweeps (query tiles x candidate tiles): its progress total."""
    rows = TILE_ROWS if rows is None else rows
    return -(-Q // rows) * -(-n // TILE_COLS)


def _sweep(q_tile, cand, bounds, state, work, native, progress=None):
    """Score every candidate tile once and count it: in C++ (native) or with numpy row block by
    row block (the reference; one thread: two numpy workers over the row blocks measured no
    faster on 2 cores, 2.18 s vs 2.08 s at C = 200k, Q = 2048)."""
    b = q_tile.shape[0]
    mask = None if native else work.setdefault("mask", np.empty((_SUB_ROWS, min(TILE_COLS, cand.n)), dtype=bool))
    for t0, t1, pieces in bounds:
        S = score_tile(q_tile, cand, t0, t1, work)
        state.read_own_scores(S, t0, t1)
        if native:
            state.count_tile_native(S, t0, pieces)
        else:
            for r0 in range(0, b, _SUB_ROWS):
                state.count_rows(S, r0, min(b, r0 + _SUB_ROWS), t0, pieces, mask)
        if progress is not None:
            progress.update(1)


def query_tile(q_tile, rel, cand, offsets, block_of, prio, k, bounds, work, native, progress=None):
    """(total, own, top-k ids, top-k scores) of one query tile, exact (see the module doc);
    native: count in C++ (True) or with numpy (False)."""
    valid = rel >= 0
    lo, hi = bands(q_tile, cand, rel, valid)
    slot_block = np.where(valid, block_of[np.maximum(rel, 0)], -1)
    for attempt in range(2):
        state = _TileState(rel, slot_block, lo, hi, k, prio)
        # a second sweep (rare, see the module doc) is not counted: the total stays the plan
        _sweep(q_tile, cand, bounds, state, work, native, None if attempt else progress)
        redo = state.resolve(block_of)
        if not redo.size:
            return state
        if attempt:
            raise RuntimeError("search: the scores changed between two identical sweeps (non-deterministic GEMM)")
        # exact count for these rows: the band is the relevant candidate's own sweep score
        lo, hi = lo.copy(), hi.copy()
        lo[redo] = np.where(valid[redo], state.score_r[redo], lo[redo])
        hi[redo] = lo[redo]


def tiled_search(q, cand, rel, offsets, prio, k, rows=None, progress=None, native=None):
    """ranks, block_ranks, top-k ids, top-k scores of every query (the "tiles" engine).
    native: count in C++ (True), with numpy (False), or C++ when the extension is built (None);
    progress: updated once per score tile (sweep_count of them)."""
    rows = TILE_ROWS if rows is None else rows
    Q = q.shape[0]
    prio = np.ascontiguousarray(prio, np.int64)  # the C++ pass reads it in place
    native = _native() is not None if native is None else native
    block_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    bounds = tile_bounds(cand.n, offsets)
    ranks = np.zeros(rel.shape, np.int64)
    block_ranks = np.zeros(rel.shape, np.int64)
    ids = np.zeros((Q, k), np.int64) if k else None
    vals = np.zeros((Q, k), np.float32) if k else None
    work = {}
    for s in range(0, Q, rows):
        e = min(Q, s + rows)
        st = query_tile(q[s:e], rel[s:e], cand, offsets, block_of, prio, k, bounds, work, native, progress)
        valid = rel[s:e] >= 0
        ranks[s:e] = np.where(valid, st.total + 1, 0)
        block_ranks[s:e] = np.where(valid, st.own + 1, 0)
        if k:
            ids[s:e], vals[s:e] = st.best_ids, st.best_vals
    return ranks, block_ranks, ids, vals


def tile_chunk_scores(q, cand, rows=None):
    """Yield (start, end, float32 [end - start, C]) rows scored exactly as tiled_search scores
    them (same query tiles, same candidate tiles, same GEMM calls)."""
    rows = TILE_ROWS if rows is None else rows
    work = {}
    bounds = tile_bounds(cand.n, np.array([0, cand.n]))
    for s in range(0, q.shape[0], rows):
        e = min(q.shape[0], s + rows)
        out = np.empty((e - s, cand.n), np.float32)
        for t0, t1, _ in bounds:
            out[:, t0:t1] = score_tile(q[s:e], cand, t0, t1, work)
        yield s, e, out
