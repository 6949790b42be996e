"""Test oracles: the slow, obviously right references the fast paths are checked against.

- `trec_order` / `reference_ranks` / `reference_metrics`: sort a whole run the way
  trec_eval does (score descending, then id descending) and compute the metrics from it;
- `pytrec_eval_metrics`: the same metrics through pytrec_eval (trec_eval itself), binary
  or graded relevance.

They lived in hybridfast/metrics.py until issue 14 (library code carries no test oracles).
Below them: the check that TREC files reproduce a result. The small benchmarks and encoders
the oracles are run on are builders: tests/helpers.py.
"""
import json
import math
from typing import Dict, Iterable, Mapping, Union

import numpy as np
import pytest

from hybridfast.evaluation.metrics import METRICS, macro_average

Relevance = Union[Iterable[str], Mapping[str, int]]


def _graded(rel: Relevance) -> Dict[str, int]:
    """{id: grade} from a set of ids (grade 1) or an {id: grade} mapping."""
    if isinstance(rel, Mapping):
        return {str(d): int(g) for d, g in rel.items()}
    return {str(d): 1 for d in rel}


def trec_order(run: Mapping[str, float]):
    """Candidate ids of one query's run in trec_eval's order (score desc, id desc)."""
    return [d for _, d in sorted(((s, str(d)) for d, s in run.items()), reverse=True)]


def reference_ranks(run: Mapping[str, float], relevant: Iterable[str]) -> Dict[str, int]:
    """{relevant id: 1-based rank} for the relevant ids present in `run`."""
    relevant = set(relevant)
    return {d: i + 1 for i, d in enumerate(trec_order(run)) if d in relevant}


def reference_metrics(run: Mapping[str, float], relevant: Relevance,
                      with_rank_distance=False) -> Dict[str, float]:
    """Metrics of one query by sorting its run: the slow reference (grades as nDCG gains)."""
    grades = {d: g for d, g in _graded(relevant).items() if g > 0}
    if not grades:
        raise ValueError("relevant must hold at least one candidate id with grade > 0")
    ranked = reference_ranks(run, grades)
    ranks = sorted(ranked.values())
    n = len(grades)
    ap = sum((k + 1) / r for k, r in enumerate(ranks)) / n
    rr = 1.0 / ranks[0] if ranks and ranks[0] <= 10 else 0.0
    dcg = sum(grades[d] / math.log2(r + 1) for d, r in ranked.items() if r <= 10)
    ideal = sorted(grades.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    out = {"map": ap, "mrr@10": rr, "ndcg@10": dcg / idcg}
    for k in (1, 10, 100):
        out[f"recall@{k}"] = sum(r <= k for r in ranks) / n
    if with_rank_distance:
        out["rank_distance"] = float(ranks[-1] - ranks[0]) if len(ranks) == n else float("nan")
    return out


def pytrec_eval_qrels(qrels: Mapping[str, Relevance]) -> Dict[str, Dict[str, int]]:
    """pytrec_eval's qrels form, {query: {doc: grade}}, queries with a relevant doc only."""
    out = {str(q): _graded(rel) for q, rel in qrels.items()}
    return {q: rel for q, rel in out.items() if any(g > 0 for g in rel.values())}


def trec_to_ours(m: Mapping[str, float]) -> Dict[str, float]:
    """pytrec_eval's measure names -> the evaluator's metric names.
    mrr@10 is trec_eval's recip_rank with ranks beyond 10 set to 0."""
    rr = m["recip_rank"]
    # recip_rank = 1/rank of the first relevant; cut at 10 (1/rank >= 0.1, with slack for rounding)
    return {"map": m["map"], "mrr@10": rr if rr > 1 / 10.5 else 0.0,
            "ndcg@10": m["ndcg_cut_10"], "recall@1": m["recall_1"],
            "recall@10": m["recall_10"], "recall@100": m["recall_100"]}


TREC_MEASURES = {"map", "recip_rank", "ndcg_cut.10", "recall.1,10,100"}


def pytrec_eval_metrics(run: Mapping[str, Mapping[str, float]],
                        qrels: Mapping[str, Relevance]) -> Dict[str, Dict[str, float]]:
    """The same metrics through pytrec_eval (trec_eval), per query: the external check.

    run: {query_id: {candidate_id: score}}; qrels: {query_id: relevant ids} or
    {query_id: {candidate_id: grade}} (graded: nDCG gains are the grades).
    """
    import pytrec_eval

    judged = pytrec_eval_qrels(qrels)
    ev = pytrec_eval.RelevanceEvaluator(judged, TREC_MEASURES)
    raw = ev.evaluate({q: {d: float(s) for d, s in r.items()} for q, r in run.items() if q in judged})
    return {q: trec_to_ours(m) for q, m in raw.items()}


# ----------------------------------------------------------------------------- TREC files

def trec_eval_files(folder):
    """{run file name: {metric: mean over its queries}} by pytrec_eval on the files only."""
    import pytrec_eval

    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for run_name, qrels_name in manifest["runs"].items():
        with open(folder / qrels_name) as f:
            qrels = pytrec_eval.parse_qrel(f)
        with open(folder / run_name) as f:
            run = pytrec_eval.parse_run(f)
        per_q = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)
        assert set(per_q) == set(run), run_name  # every query of the file is judged
        values = [trec_to_ours(m) for m in per_q.values()]
        out[run_name] = {m: float(np.mean([v[m] for v in values])) for m in METRICS}
    return out


def check_files_reproduce(res, folder, metrics=METRICS):
    got = trec_eval_files(folder)
    pairs = {}
    for (x, y), ref in res.per_pair.items():
        name = f"runs/{x}-{y}.run"
        if res.n_queries[f"{x}->{y}"] == 0:
            assert not (folder / name).read_text()
            continue
        pairs[(x, y)] = got[name]
        for m in metrics:
            assert got[name][m] == pytest.approx(ref[m], abs=1e-12), (name, m)
    for x, ref in res.per_language.items():
        for m in metrics:
            assert got[f"runs/{x}-multi.run"][m] == pytest.approx(ref[m], abs=1e-12), (x, m)
    # the summary is the macro average of the files' numbers
    if "mono" in res.summary:
        mono = macro_average(v for (x, y), v in pairs.items() if x == y)
        for m in metrics:
            assert res.summary["mono"][m] == pytest.approx(mono[m], abs=1e-12)
    if "cross" in res.summary:
        cross = macro_average(v for (x, y), v in pairs.items() if x != y)
        for m in metrics:
            assert res.summary["cross"][m] == pytest.approx(cross[m], abs=1e-12)
    if "multi" in res.summary:
        multi = macro_average(got[f"runs/{x}-multi.run"] for x in res.per_language)
        for m in metrics:
            assert res.summary["multi"][m] == pytest.approx(multi[m], abs=1e-12)


