"""Metrics from exact ranks vs a sorting reference and pytrec_eval (trec_eval), ties included."""
import math

import numpy as np
import pytest

from hybridfast.evaluation.metrics import METRICS, macro_average, mean_metrics, per_query_metrics, tie_priority
from oracles import pytrec_eval_metrics, reference_metrics, reference_ranks


def counted_ranks(scores, ids, relevant_idx):
    """Rank of each relevant candidate by counting, with trec_eval's tie-break (id descending)."""
    prio = tie_priority(ids)
    out = []
    for r in relevant_idx:
        higher = (scores > scores[r]).sum()
        tied_before = ((scores == scores[r]) & (prio > prio[r])).sum()
        out.append(1 + higher + tied_before)
    return out


def test_tie_priority_is_descending_id_order():
    ids = ["b", "a", "c", "a2"]
    prio = tie_priority(ids)
    # ascending order a < a2 < b < c -> priorities 0, 1, 2, 3
    assert prio.tolist() == [2, 0, 3, 1]


def test_pytrec_eval_breaks_ties_by_id_descending():
    # The policy this module relies on, checked directly against trec_eval.
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.5}}
    m = pytrec_eval_metrics(run, {"q": {"b"}})["q"]
    assert m["mrr@10"] == 0.5  # order c, b, a, d
    assert reference_ranks(run["q"], {"a", "b", "c", "d"}) == {"c": 1, "b": 2, "a": 3, "d": 4}


def test_hand_computed_query():
    # relevant at ranks 2 and 5 of a long ranking, 3 relevant in total (one never retrieved)
    m = per_query_metrics(np.array([[5, 2, 0]]), n_relevant=np.array([3]))
    assert m["map"][0] == pytest.approx((1 / 2 + 2 / 5) / 3)
    assert m["mrr@10"][0] == pytest.approx(0.5)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"][0] == pytest.approx(dcg / idcg)
    assert m["recall@1"][0] == 0.0
    assert m["recall@10"][0] == pytest.approx(2 / 3)
    # first relevant beyond 10 -> mrr@10 = 0; rank distance 40 - 11
    m = per_query_metrics(np.array([[11, 40]]), with_rank_distance=True)
    assert m["mrr@10"][0] == 0.0 and m["ndcg@10"][0] == 0.0
    assert m["recall@100"][0] == 1.0 and m["rank_distance"][0] == 29.0
    assert m["map"][0] == pytest.approx((1 / 11 + 2 / 40) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counted_ranks_equal_pytrec_eval_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_docs, n_queries = 150, 40
    ids = [f"d{rng.integers(0, 10**6)}_{i}" for i in range(n_docs)]
    run, qrels, rank_rows, nrel = {}, {}, [], []
    for q in range(n_queries):
        # integer-valued float32 scores over a small range: many ties
        scores = rng.integers(0, 12, size=n_docs).astype(np.float32)
        rel = rng.choice(n_docs, size=rng.integers(1, 15), replace=False)
        qid = f"q{q}"
        run[qid] = {ids[i]: float(scores[i]) for i in range(n_docs)}
        qrels[qid] = {ids[i] for i in rel}
        ranks = counted_ranks(scores, ids, rel)
        assert sorted(ranks) == sorted(reference_ranks(run[qid], qrels[qid]).values())
        rank_rows.append(ranks + [0] * (15 - len(ranks)))
        nrel.append(len(rel))
    fast = per_query_metrics(np.array(rank_rows), np.array(nrel))
    _assert_equal_to_trec_eval(fast, run, qrels, n_queries)


def _assert_equal_to_trec_eval(fast, run, qrels, n_queries):
    """Per query and metric: the fast metrics and the reference both equal pytrec_eval's."""
    trec = pytrec_eval_metrics(run, qrels)
    for q in range(n_queries):
        ref = reference_metrics(run[f"q{q}"], qrels[f"q{q}"])
        for m in METRICS:
            assert fast[m][q] == pytest.approx(trec[f"q{q}"][m], abs=1e-12), (m, q)
            assert ref[m] == pytest.approx(trec[f"q{q}"][m], abs=1e-12), (m, q)


def test_averages():
    assert mean_metrics({"map": np.array([0.5, 1.0])}) == {"map": 0.75}
    avg = macro_average([{"map": 0.2}, {"map": float("nan")}, {"map": 0.4}])
    assert avg["map"] == pytest.approx(0.3)


def test_bad_ranks():
    with pytest.raises(ValueError, match="2-D"):
        per_query_metrics(np.array([1, 2]))
    with pytest.raises(TypeError, match="integers"):
        per_query_metrics(np.array([[1.5]]))
    with pytest.raises(ValueError, match="share a rank"):
        per_query_metrics(np.array([[3, 3]]))
    with pytest.raises(ValueError, match="n_relevant"):
        per_query_metrics(np.array([[1, 2]]), n_relevant=np.array([1]))
    with pytest.raises(ValueError, match="full ranking"):
        per_query_metrics(np.array([[1, 0]]), n_relevant=np.array([2]), with_rank_distance=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_graded_ndcg_equals_pytrec_eval_ndcg_cut(seed):
    """Grades are nDCG gains (trec_eval ndcg_cut); map/mrr/recall count grade >= 1 as relevant;
    grade-0 judgments change nothing; truncated runs (relevant ones missing) too."""
    rng = np.random.default_rng(seed)
    n_docs, n_queries = 60, 30
    ids = [f"d{i:03d}" for i in range(n_docs)]
    run, qrels, rank_rows, gain_rows, ideal_rows, nrel = {}, {}, [], [], [], []
    for q in range(n_queries):
        scores = rng.integers(0, 8, size=n_docs).astype(np.float32)
        judged = rng.choice(n_docs, size=rng.integers(1, 14), replace=False)
        grades = {ids[i]: int(rng.integers(0, 4)) for i in judged}
        grades[ids[judged[0]]] = int(rng.integers(1, 4))  # at least one relevant
        qid = f"q{q}"
        depth = int(rng.integers(5, n_docs + 1))  # a truncated run
        order = sorted(range(n_docs), key=lambda i: (-scores[i], -i))[:depth]
        run[qid] = {ids[i]: float(scores[i]) for i in order}
        qrels[qid] = grades
        rel = [d for d, g in grades.items() if g > 0]
        got = reference_ranks(run[qid], rel)
        rank_rows.append([got[d] for d in got] + [0] * (14 - len(got)))
        gain_rows.append([grades[d] for d in got] + [0] * (14 - len(got)))
        ideal_rows.append([grades[d] for d in rel] + [0] * (14 - len(rel)))
        nrel.append(len(rel))
    fast = per_query_metrics(np.array(rank_rows), np.array(nrel), gains=np.array(gain_rows),
                             ideal_gains=np.array(ideal_rows))
    _assert_equal_to_trec_eval(fast, run, qrels, n_queries)


def test_unit_gains_equal_binary_and_bad_gains():
    ranks = np.array([[5, 2, 0], [1, 0, 0]])
    a = per_query_metrics(ranks, np.array([3, 2]))
    b = per_query_metrics(ranks, np.array([3, 2]), gains=(ranks > 0).astype(float))
    for m in METRICS:
        np.testing.assert_allclose(a[m], b[m], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="gains must have shape"):
        per_query_metrics(ranks, gains=np.ones((2, 2)))
    with pytest.raises(ValueError, match="gains must be finite"):
        per_query_metrics(ranks, gains=-np.ones((2, 3)))


def test_library_carries_no_test_oracles():
    import hybridfast.evaluation.metrics as metrics

    for name in ("pytrec_eval_metrics", "reference_metrics", "reference_ranks", "trec_order"):
        assert not hasattr(metrics, name), name
