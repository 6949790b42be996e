"""Rank counting of the "rows" engine (hybridfast.evaluation.search): a chunk of whole score
rows, counted per relevant slot (numpy on CPU, torch on CUDA), and trec_eval-ordered top-k.
The plain reference the "tiles" engine (hybridfast.evaluation.tiles) is tested against."""
import threading

import numpy as np
import torch




def _count_numpy(scores, cols, offsets, block_of, prio, pool=None, work=None):
    """numpy: (#ranked above r in r's block, #ranked above r in the pool), each int64 [b, R].

    Per relevant slot j: one float compare gives the mask of strictly higher
    scores; its row sums (bool viewed as uint8, summed in uint16/uint32: several
    times faster than count_nonzero along an axis) give the pool count, and a
    slice of the same mask the own-block count (slots are sorted by block, so a
    slot usually maps to one block for all rows). A second compare counts equal
    scores: rows where another candidate ties with r (rare with float scores) are
    then resolved with the tie priority. Slots run on a thread pool: numpy
    releases the GIL in compares and sums.
    """
    b, R = cols.shape
    own = np.zeros((b, R), dtype=np.int64)
    total = np.zeros((b, R), dtype=np.int64)
    valid = cols >= 0
    safe = np.where(valid, cols, 0)
    rs = np.take_along_axis(scores, safe, axis=1)
    slot_block = np.where(valid, block_of[safe], -1)
    acc = np.uint16 if scores.shape[1] < (1 << 16) else np.uint32
    work = {} if work is None else work
    lock = threading.Lock()

    def buffer():
        key = (threading.get_ident(), scores.shape)
        with lock:
            if key not in work:
                work[key] = np.empty(scores.shape, dtype=bool)
            return work[key]

    def slot(j):
        if not valid[:, j].any():
            return
        thr = rs[:, j:j + 1]
        mask = buffer()
        above = np.greater(scores, thr, out=mask).view(np.uint8)
        total[:, j] = above.sum(axis=1, dtype=acc)
        for blk in np.unique(slot_block[:, j]):
            if blk < 0:
                continue
            s, e = offsets[blk], offsets[blk + 1]
            rows = slot_block[:, j] == blk
            if rows.all():
                own[:, j] = above[:, s:e].sum(axis=1, dtype=acc)
            else:
                own[rows, j] = above[rows, s:e].sum(axis=1, dtype=acc)
        # ties with r other than r itself (-0.0 == +0.0, as for trec_eval's doubles)
        n_equal = np.equal(scores, thr, out=mask).view(np.uint8).sum(axis=1, dtype=acc)
        tied_rows = np.nonzero(valid[:, j] & (n_equal > 1))[0]
        _add_ties(scores, tied_rows, safe[tied_rows, j], offsets, block_of, prio, own[:, j], total[:, j])

    if pool is None:
        for j in range(R):
            slot(j)
    else:
        list(pool.map(slot, range(R)))
    return own, total


def _add_ties(scores, rows, cols, offsets, block_of, prio, own, total):
    """Rows where candidate r = cols[i] shares its score with others: those ranked before r by
    the tie priority are added to its pool count `total` and own-block count `own` (in place)."""
    for i, r in zip(rows, cols):
        before = (scores[i] == scores[i, r]) & (prio > prio[r])
        total[i] += np.count_nonzero(before)
        s, e = offsets[block_of[r]], offsets[block_of[r] + 1]
        own[i] += np.count_nonzero(before[s:e])


def _count_torch(scores, cols, offsets_t, block_of_t, prio_t):
    """torch (GPU path; also runs on CPU for tests): same as _count_numpy."""
    valid = cols >= 0
    safe = cols.clamp(min=0)
    rs = scores.gather(1, safe)                                   # [b, R]
    s3, r3 = scores.unsqueeze(1), rs.unsqueeze(2)
    above = (s3 > r3) | ((s3 == r3) & (prio_t.view(1, 1, -1) > prio_t[safe].unsqueeze(2)))
    cum = above.cumsum(2, dtype=torch.int32)                      # [b, R, C]
    cum = torch.nn.functional.pad(cum, (1, 0))                   # cum[..., c] = # above among columns < c
    per_block = cum[:, :, offsets_t[1:]] - cum[:, :, offsets_t[:-1]]  # [b, R, L]
    total = per_block.sum(2)
    own = per_block.gather(2, block_of_t[safe].unsqueeze(2)).squeeze(2)
    zero = torch.zeros_like(total)
    return (torch.where(valid, own, zero).to(torch.int64).cpu().numpy(),
            torch.where(valid, total, zero).to(torch.int64).cpu().numpy())


def trec_topk(scores, k, prio):
    """Top-k columns of each row of a numpy score chunk in trec_eval order."""
    b, C = scores.shape
    if k >= C:
        idx = np.broadcast_to(np.arange(C), (b, C)).copy()
    else:
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, idx, 1).min(1)
        # rows where the k-th score is shared by candidates left out: choose those by id
        n_ge = np.count_nonzero(scores >= kth[:, None], axis=1)
        for i in np.nonzero(n_ge > k)[0]:
            above = np.nonzero(scores[i] > kth[i])[0]
            tied = np.nonzero(scores[i] == kth[i])[0]
            tied = tied[np.argsort(-prio[tied], kind="stable")][:k - len(above)]
            idx[i] = np.concatenate([above, tied])
    return _trec_sort(scores, idx, prio)


def _trec_sort(scores, idx, prio):
    """Sort the candidate columns `idx` of each row by (score desc, tie priority desc)."""
    vals = np.take_along_axis(scores, idx, 1)
    order = np.argsort(-prio[idx], axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
