"""faiss pieces of hybridfast.evaluation.search: an index over float32 vectors (flat or IVF),
top-k lists in trec_eval order (ties at the cut chosen by id), and ranks read from lists."""
import numpy as np


def faiss_index(faiss, vectors, ivf_lists, nprobe, use_gpu):
    d = vectors.shape[1]
    if ivf_lists is None:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(ivf_lists), vectors.shape[0]))
        # index_factory: the index owns its coarse quantizer
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, min(int(nprobe), nlist))
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def faiss_topk(index, q, k, prio):
    """Top-k from a faiss index in trec_eval order. Rows whose k-th score is still
    tied at the end of the returned list are searched again deeper, so that the
    candidates tied at the cut are chosen by id like trec_eval does; -1 ids
    (fewer hits than k under IVF) stay -1 at the end."""
    n = index.ntotal
    kk = min(n, k + 16)
    vals, ids = index.search(q, kk)
    ids = ids.astype(np.int64)
    while kk < n:
        open_rows = np.nonzero((ids[:, -1] >= 0) & (vals[:, -1] == vals[:, k - 1]))[0]
        if not len(open_rows):
            break
        kk = min(n, kk * 4)
        v2, i2 = index.search(q[open_rows], kk)
        vals = np.concatenate([vals, np.full((len(q), kk - vals.shape[1]), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((len(q), kk - ids.shape[1]), -1, np.int64)], 1)
        vals[open_rows], ids[open_rows] = v2, i2
    missing = ids < 0
    key_prio = np.where(missing, -1, prio[np.where(missing, 0, ids)])
    vals = np.where(missing, -np.inf, vals)
    order = np.argsort(-key_prio, axis=1, kind="stable")
    ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids, vals = np.take_along_axis(ids, order, 1)[:, :k], np.take_along_axis(vals, order, 1)[:, :k]
    return ids, vals.astype(np.float32)


def ranks_from_lists(lists, cols):
    """1-based position of each relevant column in its row's list, 0 if absent."""
    out = np.zeros(cols.shape, dtype=np.int64)
    for i in range(cols.shape[0]):
        pos = {int(c): p + 1 for p, c in enumerate(lists[i]) if c >= 0}
        for j, c in enumerate(cols[i]):
            if c >= 0:
                out[i, j] = pos.get(int(c), 0)
    return out
