"""Retrieval benchmarks and training pairs: the one front door of the data.

    lareqa.py     RetrievalBenchmark, LAReQA folders (XQuAD-R, MLQA-R): parsing, article split
    beir.py       BEIR folders and MIRACL's layout -> a graded RetrievalBenchmark
    downloads.py  where named data sets live; pinned, sha256-checked downloads
    pairs.py      training pairs (LAReQA, JSONL, mMARCO folders) -> ParallelPairs

The `hybridfast data` command line is hybridfast/cli/data.py.
"""
from hybridfast.data.beir import BEIRFormatError, BEIRWarning, GradedRetrievalBenchmark, detect_layout, load_beir
from hybridfast.data.downloads import (DATASETS, DownloadError, cache_dir, download, ensure_dataset, load_benchmark,
                                       resolve_dataset)
from hybridfast.data.lareqa import (SPLITS, TEST_FRACTION, LAReQAFormatError, LAReQAWarning, RetrievalBenchmark,
                                    candidate_text, check_languages, lareqa_article, lareqa_examples, load_lareqa)
from hybridfast.data.pairs import ParallelPairs, load_training_pairs

__all__ = ["RetrievalBenchmark", "GradedRetrievalBenchmark", "load_benchmark", "load_lareqa", "load_beir",
           "load_training_pairs", "ParallelPairs", "lareqa_examples", "lareqa_article", "candidate_text",
           "check_languages", "detect_layout", "resolve_dataset", "ensure_dataset", "download", "cache_dir",
           "DATASETS", "SPLITS", "TEST_FRACTION", "DownloadError", "LAReQAFormatError", "LAReQAWarning",
           "BEIRFormatError", "BEIRWarning"]
