"""Retrieval metrics computed from the exact ranks of the relevant candidates.

Every metric the evaluator reports is a function of where the relevant
candidates of a query land in its ranking, so there is no need to keep
(or sort) whole rankings: `hybridfast.evaluation.search` counts, per query, the ranks of
its relevant candidates and this module turns those ranks into

- ``map``        average precision over the FULL ranking (not cut at k):
                 AP = (1 / n_rel) * sum over relevant retrieved of (#relevant at or above it) / rank
- ``mrr@10``     1 / rank of the first relevant candidate if it is in the top 10, else 0
- ``ndcg@10``    DCG = sum over relevant in the top 10 of gain / log2(rank + 1), divided by
                 the ideal DCG (the query's gains sorted descending, top 10). Gains are the
                 relevance grades (trec_eval's ``ndcg_cut`` uses the qrels value as gain);
                 binary relevance is grade 1 everywhere. map, mrr and recall count every
                 candidate with grade >= 1 as relevant (trec_eval's relevance_level 1).
- ``recall@k``   (#relevant in the top k) / n_rel, for k = 1, 10, 100
- ``rank_distance`` (max rank distance, Huang et al. 2023): worst rank minus best
                 rank of the relevant candidates (0 with a single relevant one).

These are trec_eval's ``map``, ``recip_rank`` (cut at 10), ``ndcg_cut_10`` and
``recall_k``; tests check equality with pytrec_eval on runs with ties.

Tie policy (trec_eval's, checked against pytrec_eval): a run is ordered by score,
descending, and candidates with EQUAL scores by document id, descending, as
strings (C ``strcmp``; Python's ``str`` order is the same order, since UTF-8 byte
order is code point order). Hence the rank of candidate r in a candidate set is

    1 + #{c : score_c > score_r} + #{c : score_c == score_r and id_c > id_r}

`tie_priority` gives each candidate id an integer that reproduces that order.

Ranks are passed as an int array [queries, R]: row i holds the ranks of query
i's relevant candidates in any order, padded with 0. ``n_relevant[i]`` is the
number of relevant candidates of query i in the candidate set; it may exceed the
number of ranks given when a ranking was truncated (top-k search), in which case
the missing ones count as not retrieved, as trec_eval does for a truncated run.
Graded relevance: ``gains`` [queries, R] holds the grade of the candidate at each
rank slot, ``ideal_gains`` [queries, R'] the grades of ALL the query's relevant
candidates in the candidate set (0-padded; for the ideal DCG).

The test oracles (a sorting reference and pytrec_eval wrappers) live in tests/oracles.py.
"""
import math
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np

METRICS = ("map", "mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
MULTI_METRICS = METRICS + ("rank_distance",)
LOWER_IS_BETTER = ("rank_distance",)


def tie_priority(ids: Sequence[str]) -> np.ndarray:
    """int64 [n]: larger value = ranked earlier among candidates with equal scores.

    trec_eval breaks ties by id descending, so the priority is the position of
    each id in ascending string order.
    """
    ids = [str(i) for i in ids]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    prio = np.empty(len(ids), dtype=np.int64)
    prio[order] = np.arange(len(ids), dtype=np.int64)
    return prio


def _check_ranks(ranks, n_relevant):
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D [queries, R], got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"ranks must be integers (0 = padding), got {ranks.dtype}")
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 1, or 0 for padding")
    ranks = np.sort(np.where(ranks > 0, ranks, np.iinfo(np.int64).max).astype(np.int64), axis=1)
    found = (ranks != np.iinfo(np.int64).max).sum(1)
    if n_relevant is None:
        n_relevant = found
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if n_relevant.shape != (ranks.shape[0],):
        raise ValueError(f"n_relevant must have shape ({ranks.shape[0]},), got {n_relevant.shape}")
    if (n_relevant < found).any():
        raise ValueError("n_relevant is smaller than the number of ranks given for some query")
    if (n_relevant < 1).any():
        raise ValueError("every query needs at least one relevant candidate (n_relevant >= 1)")
    # Two relevant candidates cannot share a rank in a strict ranking.
    valid = ranks[:, 1:] != np.iinfo(np.int64).max
    if (valid & (ranks[:, 1:] == ranks[:, :-1])).any():
        raise ValueError("ranks: two relevant candidates of one query share a rank")
    return ranks, n_relevant


def _check_gains(gains, shape, name):
    g = np.asarray(gains, dtype=np.float64)
    if g.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {g.shape}")
    if not np.isfinite(g).all() or (g < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return g


def per_query_metrics(ranks, n_relevant=None, with_rank_distance=False, gains=None,
                      ideal_gains=None) -> Dict[str, np.ndarray]:
    """Per-query metric values (float64 [queries]) from the ranks of relevant candidates.

    ranks: int [queries, R], 0-padded (see the module docstring); n_relevant: int
    [queries] or None (= number of non-zero ranks per row). gains: float [queries, R],
    the grade of the candidate in each slot of `ranks` (None: 1 for every relevant);
    ideal_gains: float [queries, R'] the grades of all of a query's relevant candidates
    (None: the given gains, plus gain 1 for relevant ones missing from a truncated run).
    """
    raw = np.asarray(ranks)
    if gains is not None:
        gains = _check_gains(gains, raw.shape, "gains")
    ranks, n_rel = _check_ranks(raw, n_relevant)
    big = np.iinfo(np.int64).max
    valid = ranks != big
    if gains is None:
        g = valid.astype(np.float64)
    else:  # the same sort as _check_ranks (padding last), applied to the gains
        order = np.argsort(np.where(raw > 0, raw, big).astype(np.int64), axis=1, kind="stable")
        g = np.where(valid, np.take_along_axis(gains, order, 1), 0.0)
    r = np.where(valid, ranks, 1).astype(np.float64)
    # k-th relevant (sorted by rank) has k relevant at or above it.
    above = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)[None, :]
    out = {"map": np.where(valid, above / r, 0.0).sum(1) / n_rel}
    first = np.where(valid[:, 0], r[:, 0], np.inf)
    out["mrr@10"] = np.where(first <= 10, 1.0 / first, 0.0)
    in10 = valid & (ranks <= 10)
    dcg = np.where(in10, g / np.log2(r + 1.0), 0.0).sum(1)
    discount = 1.0 / np.log2(np.arange(2, 12, dtype=np.float64))
    if ideal_gains is None and gains is None:
        idcg = np.cumsum(discount)[np.minimum(n_rel, 10) - 1]
    else:
        if ideal_gains is None:  # the given gains, + 1 for each relevant beyond the run
            missing = (n_rel - valid.sum(1))[:, None] > np.arange(10)[None, :]
            ideal = np.concatenate([g, missing.astype(np.float64)], axis=1)
        else:
            ideal = np.asarray(ideal_gains, dtype=np.float64)
            if ideal.ndim != 2 or ideal.shape[0] != ranks.shape[0]:
                raise ValueError(f"ideal_gains must be 2-D [{ranks.shape[0]}, R'], got shape {ideal.shape}")
            ideal = _check_gains(ideal, ideal.shape, "ideal_gains")
        top = -np.sort(-ideal, axis=1)[:, :10]
        top = np.pad(top, ((0, 0), (0, 10 - top.shape[1])))
        idcg = (top * discount[None, :]).sum(1)
    # a query whose relevant grades are all 0 has no ideal gain: ndcg 0, as trec_eval
    out["ndcg@10"] = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
    for k in (1, 10, 100):
        out[f"recall@{k}"] = (valid & (ranks <= k)).sum(1) / n_rel
    if with_rank_distance:
        if (valid.sum(1) != n_rel).any():
            raise ValueError("rank_distance needs the ranks of all relevant candidates (full ranking)")
        last = np.take_along_axis(ranks, (n_rel - 1)[:, None], axis=1)[:, 0]
        out["rank_distance"] = (last - ranks[:, 0]).astype(np.float64)
    return out


def mean_metrics(per_query: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Mean over queries of each metric (nan when there are no queries)."""
    return {m: (float(np.mean(v)) if len(v) else float("nan")) for m, v in per_query.items()}


def macro_average(groups: Iterable[Mapping[str, float]]) -> Dict[str, float]:
    """Unweighted mean over groups (pairs or languages) of each metric, skipping nan."""
    groups = list(groups)
    names = [m for m in (groups[0] if groups else {})]
    out = {}
    for m in names:
        vals = [g[m] for g in groups if m in g and not math.isnan(g[m])]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out
