"""BEIR / MIRACL at corpus scale through the command line (issue 23): `hybridfast evaluate` on a
synthetic per-language corpus with graded qrels (0-3), candidates written to shards and
streamed, as a user would run it.

The encoder is a tiny random BERT (hidden 32, one layer, a word-level vocabulary of the
synthetic words) so that the run measures the pipeline around the encoder (reading, tokenising,
writing and verifying shards, the exact tiled search, metrics) and not a real model's encoding
speed (bench_encoder.py has that). Recorded: wall seconds of the whole command, the child's
peak RSS, the candidates' stored bytes, and that the progress lines (texts/s and tiles/s with an
ETA, no carriage returns: stderr is a pipe, as in a log) were shown.

    python -m pytest bench/bench_beir_cli.py -s -p no:cacheprovider
    HYBRIDFAST_BENCH_BEIR=200000x500 ...   # documents per language x queries per language
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench.utils import save_results

LANGS = ("de", "en")
WORDS = 2000  # synthetic words per language


def _spec():
    docs, queries = os.environ.get("HYBRIDFAST_BENCH_BEIR", "200000x500").lower().split("x")
    return int(docs), int(queries)


def _word(lang, i):
    return f"{lang}{i:04d}"


def write_corpus(root, n_docs, n_queries, seed=0):
    """Per language: corpus.jsonl, queries.jsonl, qrels/test.tsv with grades 1-3 (and some 0).
    A query shares words with its relevant documents, so the ranking is not random."""
    rng = np.random.default_rng(seed)
    for lang in LANGS:
        folder = root / lang
        (folder / "qrels").mkdir(parents=True)
        doc_words = rng.integers(0, WORDS, size=(n_docs, 6))
        with open(folder / "corpus.jsonl", "w") as f:
            for i, ws in enumerate(doc_words):
                f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(_word(lang, w) for w in ws)}) + "\n")
        lines = ["query-id\tcorpus-id\tscore"]
        with open(folder / "queries.jsonl", "w") as f:
            for q in range(n_queries):
                rel = rng.choice(n_docs, size=4, replace=False)
                words = doc_words[rel[0], :3]
                f.write(json.dumps({"_id": f"q{q}", "text": " ".join(_word(lang, w) for w in words)}) + "\n")
                lines += [f"q{q}\td{d}\t{g}" for d, g in zip(rel, (3, 2, 1, 0))]
        (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_tiny_model(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [_word(l, i) for l in LANGS for i in range(WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=16)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_beir_corpus_through_the_cli(tmp_path):
    n_docs, n_queries = _spec()
    data = write_corpus(tmp_path / "beir", n_docs, n_queries)
    model = write_tiny_model(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "hybridfast", "evaluate", "--model", str(model), "--dataset", str(data),
           "--shared-query-ids", "--query-prefix", "", "--passage-prefix", "", "--batch-size", "512",
           "--device", "cpu", "--out", str(tmp_path / "out"), "--shards", str(tmp_path / "shards")]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # stderr is no terminal here: progress comes as plain lines (hybridfast.progress), as in a log
    err = run.stderr
    shown = {"shards_progress": "encode to shards: " in err and " texts/s, ETA " in err,
             "search_progress": "search: " in err and " tiles/s, ETA " in err, "no_carriage_returns": "\r" not in err}
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    stored = sum(p.stat().st_size for p in (tmp_path / "shards").rglob("shard-*.npy"))
    record = {"name": f"beir_cli[{n_docs}x{len(LANGS)}]", "documents": n_docs * len(LANGS),
              "queries": n_queries * len(LANGS), "graded": result["config"].get("graded"),
              "seconds": seconds, "peak_rss_bytes": peak_kib * 1024, "shard_bytes": stored,
              "shard_precision": result["config"].get("shard_precision"), "progress_shown": shown,
              "summary": result["summary"], "load_avg_1min_before": load, "load_avg_1min_after": os.getloadavg()[0],
              "threads": torch.get_num_threads()}
    save_results("beir_cli", torch.device("cpu"), [record])
    print(json.dumps(record, indent=1))
    assert result["config"].get("graded") and all(shown.values()), shown
