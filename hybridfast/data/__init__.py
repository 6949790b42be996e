"""Retrieval benchmarks and training pairs: the one front door of the data.

    benchmark.py  RetrievalBenchmark, candidate_text, the one language selector, the one
                  "is this JSON a language file" rule, SPLITS
    lareqa.py     LAReQA folders (XQuAD-R, MLQA-R): parsing, article split
    beir.py       BEIR folders and MIRACL's layout -> a graded RetrievalBenchmark
    downloads.py  where named data sets live; pinned, sha256-checked downloads
    checksums.py  named data sets checked against their pins on every load (stamped)
    pairs.py      training pairs (LAReQA, JSONL, mMARCO folders) -> ParallelPairs

`load_benchmark` reads every evaluation format, so everything that evaluates (evaluate,
train --eval, study, demo, data info) accepts the same data. docs/data.md is the manual;
the `hybridfast data` command line is hybridfast/cli/data.py.
"""
import os
from pathlib import Path

from hybridfast.data.beir import BEIRFormatError, BEIRWarning, GradedRetrievalBenchmark, detect_layout, load_beir
from hybridfast.data.benchmark import SPLITS, RetrievalBenchmark, candidate_text, check_languages, language_files
from hybridfast.data.checksums import ModifiedDataError, ModifiedDataWarning
from hybridfast.data.downloads import (DATASETS, DownloadError, cache_dir, download, ensure_dataset, resolve_dataset,
                                       verify_dataset)
from hybridfast.data.lareqa import (TEST_FRACTION, LAReQAFormatError, LAReQAWarning, lareqa_article, lareqa_examples,
                                    load_lareqa)
from hybridfast.data.pairs import ParallelPairs, load_training_pairs

FORMAT_ERRORS = (LAReQAFormatError, BEIRFormatError, ModifiedDataError)
"""What a broken or changed data file raises (all ValueErrors); CLIs print them in one line."""


def load_benchmark(name_or_path, data_dir=None, languages=None, split=None, shared_query_ids=None,
                   allow_modified=False) -> RetrievalBenchmark:
    """Any evaluation benchmark hybridfast reads, by name or folder:

    * "xquad-r" / "mlqa-r": found under data_dir, $HYBRIDFAST_DATA or the cache (resolve_dataset),
      every language file checked against its pinned sha256 (verify_dataset; an edited file
      is refused naming it, or used with a loud warning when allow_modified=True);
    * a LAReQA folder (<lang>.json files): load_lareqa; split "all" (default), "train" or "test";
    * a BEIR folder (one per language, or one with a 'lang' field) or MIRACL's native layout:
      load_beir; split is the qrels name (default "test"); shared_query_ids as there.

    languages: a list of ISO 639-1 codes (an item may be a comma list, 'en,de'); None for all.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise TypeError(f"name_or_path must be a data set name or a folder, got {name_or_path!r}")
    name = str(name_or_path)
    if name not in DATASETS and Path(name_or_path).is_dir() and detect_layout(name_or_path) is not None:
        return load_beir(name_or_path, languages=languages, split="test" if split is None else split,
                         shared_query_ids=shared_query_ids)
    if shared_query_ids is not None:
        raise ValueError("shared_query_ids applies to BEIR / MIRACL folders only (LAReQA query ids are always "
                         "shared across languages)")
    folder = resolve_dataset(name_or_path, data_dir)
    if name in DATASETS:
        verify_dataset(name, folder, allow_modified=allow_modified)
    return load_lareqa(folder, languages=languages, split="all" if split is None else split)


__all__ = ["RetrievalBenchmark", "GradedRetrievalBenchmark", "load_benchmark", "load_lareqa", "load_beir",
           "load_training_pairs", "ParallelPairs", "lareqa_examples", "lareqa_article", "candidate_text",
           "check_languages", "language_files", "detect_layout", "resolve_dataset", "ensure_dataset", "download",
           "verify_dataset", "cache_dir", "DATASETS", "SPLITS", "TEST_FRACTION", "FORMAT_ERRORS", "DownloadError",
           "LAReQAFormatError", "LAReQAWarning", "BEIRFormatError", "BEIRWarning", "ModifiedDataError",
           "ModifiedDataWarning"]
