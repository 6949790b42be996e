"""Retrieval evaluation: encode once, exact search, trec_eval-equal metrics, results.

    layout.py     EvalLayout: query rows, candidate blocks, relevance matrix, gains, tie priority
    evaluator.py  RetrievalEvaluator (mono / cross / multi settings, rank distance)
    result.py     EvaluationResult: JSON, Markdown, heatmap; save(out) atomic, never over a user's files
    search.py     exact rank counting (torch / numpy) and faiss top-k
    metrics.py    per-query metrics, the trec_eval tie order, averages
    trec.py       TREC run and qrels export from an EvalLayout
    plots.py      heatmaps and bar plots shared by the evaluator, the study and the demo

docs/evaluation.md is the manual.
"""
from hybridfast.evaluation.evaluator import SETTINGS, RetrievalEvaluator
from hybridfast.evaluation.layout import EvalLayout
from hybridfast.evaluation.metrics import METRICS, MULTI_METRICS
from hybridfast.evaluation.result import EvaluationResult, ResultsNotSaved

__all__ = ["RetrievalEvaluator", "EvaluationResult", "EvalLayout", "ResultsNotSaved", "SETTINGS", "METRICS",
           "MULTI_METRICS"]
