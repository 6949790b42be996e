"""Retrieval evaluation: encode once, exact search, trec_eval-equal metrics, results.

    evaluator.py  RetrievalEvaluator (mono / cross / multi settings, rank distance) and EvaluationResult
    search.py     exact rank counting (torch / numpy) and faiss top-k
    metrics.py    per-query metrics, the trec_eval tie order, averages
    trec.py       TREC run and qrels export
    plots.py      heatmaps and bar plots shared by the evaluator, the study and the demo
"""
from hybridfast.evaluation.evaluator import SETTINGS, EvaluationResult, RetrievalEvaluator
from hybridfast.evaluation.metrics import METRICS, MULTI_METRICS

__all__ = ["RetrievalEvaluator", "EvaluationResult", "SETTINGS", "METRICS", "MULTI_METRICS"]
