"""Builders shared by the tests (no test module imports another; they import this).

tiny_bert: THE tiny random BERT of the test suite: 2 layers, hidden 32, a WordPiece
vocabulary of whole words given by the caller, so that every word is a token
(a test that tokenises to [UNK] everywhere would prove nothing).
"""
import hashlib
import json
import random
from pathlib import Path
from typing import Iterable

import numpy as np

from hybridfast.data import RetrievalBenchmark

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(folder: Path, words: Iterable[str], dropout: float = 0.1, seed: int = 0, max_positions: int = 64,
              hidden: int = 32, layers: int = 2) -> Path:
    """Save a random BertModel and its tokenizer (vocabulary: the special tokens + `words`) to `folder`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + [w for w in dict.fromkeys(words) if w not in SPECIAL]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))  # transformers >= 5
    if len(tokenizer) != len(vocab):  # transformers 4 names the argument vocab_file
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert len(tokenizer) == len(vocab)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- toy training data

TOY_LANGS = ("en", "de", "fr")
TOY_WORDS = 40


def toy_word(lang, i):
    return f"{lang}{i}"


def toy_vocabulary():
    """The words of make_toy_jsonl's data."""
    return ["query", "passage", ":", "about", "the"] + [toy_word(l, i) for l in TOY_LANGS + ("x",)
                                                         for i in range(TOY_WORDS)]


def make_toy_jsonl(path: Path, n_examples=24, seed=0, negatives=False):
    """Example i: a query of 2 words and a positive of those 2 words plus 2 others,
    in three 'languages' whose words are disjoint (a translation maps word i of en to
    word i of de), plus one language-neutral name token x<i> shared by query and positive
    (as names are in real parallel data), so a few steps can learn to match."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_examples):
        key = rng.sample(range(TOY_WORDS), 2)
        extra = rng.sample(range(TOY_WORDS), 2)
        for lang in TOY_LANGS:
            name = toy_word("x", i % TOY_WORDS)
            row = {"id": f"ex{i}", "lang": lang,
                   "query": " ".join([toy_word(lang, w) for w in key] + [name]),
                   "positive": "about " + " ".join([toy_word(lang, w) for w in key + extra] + [name])}
            if negatives:
                row["negatives"] = [" ".join(toy_word(lang, w) for w in rng.sample(range(TOY_WORDS), 4))
                                    for _ in range(3)]
            rows.append(row)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_lareqa(root: Path) -> Path:
    """A LAReQA folder: two languages, two articles; the questions q1 and q2 share one answer sentence."""
    root = Path(root)
    root.mkdir()
    texts = {
        "en": ["The cat sat. The dog ran.", "Rain is wet. Snow is cold."],
        "de": ["Die Katze sass. Der Hund lief.", "Regen ist nass. Schnee ist kalt."],
    }
    questions = {"en": ["Who sat?", "What sat?", "Who ran?", "What is cold?"],
                 "de": ["Wer sass?", "Was sass?", "Wer lief?", "Was ist kalt?"]}
    for lang in ("en", "de"):
        data = []
        for a, ctx in enumerate(texts[lang]):
            first, second = ctx.split(". ")
            breaks = [[0, len(first) + 1], [len(first) + 2, len(ctx)]]
            sentences = [first + ".", second]
            if a == 0:
                qas = [(0, "q1", 0), (1, "q2", 0), (2, "q3", 1)]
            else:
                qas = [(3, "q4", 1)]
            data.append({"title": f"article{a}", "paragraphs": [{
                "context": ctx, "sentence_breaks": breaks, "sentences": sentences,
                "qas": [{"id": qid, "question": questions[lang][i],
                         "answers": [{"answer_start": breaks[s][0], "text": sentences[s][:3]}]}
                        for i, qid, s in qas]}]})
        (root / f"{lang}.json").write_text(json.dumps({"data": data, "version": "1.1"}), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- training runs

def toy_training_files(root: Path) -> dict:
    """The tiny models and toy data the training tests share (conftest's `toy` fixture)."""
    root = Path(root)
    return {"model": tiny_bert(root / "model", toy_vocabulary()),
            "model_nodrop": tiny_bert(root / "model_nodrop", toy_vocabulary(), dropout=0.0),
            "data": make_toy_jsonl(root / "train.jsonl"),
            "data_neg": make_toy_jsonl(root / "train_neg.jsonl", negatives=True)}


def toy_config(toy: dict, out, **kw):
    """A TrainConfig for the toy files: tiny batches, CPU, a log row per step."""
    from hybridfast.training import TrainConfig

    defaults = dict(model=str(toy["model"]), train=str(toy["data"]), batch_size=8, max_steps=6, lr=1e-3,
                    warmup_ratio=0.0, max_length=16, device="cpu", log_steps=1, output=str(out),
                    show_progress=False, seed=3)
    defaults.update(kw)
    return TrainConfig(**defaults)


def load_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def read_log(out):
    return [json.loads(l) for l in (Path(out) / "train_log.jsonl").read_text().splitlines() if l.strip()]


class Killed(Exception):
    """A simulated kill: not an OSError/RuntimeError, so no checkpoint write absorbs it."""


def kill_at(n):
    """An on_step callback that 'kills' the run after step n."""
    def on_step(step):
        if step == n:
            raise Killed()
    return on_step


SYNTHETIC_CONCEPTS = 48


def synthetic_word(lang, concept):
    """The word form of a shared concept in one synthetic language: de + c7 -> 'dec7'."""
    return f"{lang}{concept}"


def write_synthetic_lareqa(root: Path, langs=("de", "en", "es"), n_articles=8, paragraphs=2, sentences=3,
                           questions=2, seed=0, tag=None) -> Path:
    """A fully parallel LAReQA folder (one SQuAD-format JSON per language with sentence_breaks):
    every language uses its own word forms of shared concepts, a question repeats two words of
    its answer sentence. `tag` (e.g. the seed) goes into question ids and article titles, so that
    two folders made with different seeds share neither."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    plan = []  # language-independent: [article][paragraph] -> (sentences as concept lists, questions)
    for a in range(n_articles):
        paras = []
        for p in range(paragraphs):
            sents = [[f"c{rng.randrange(SYNTHETIC_CONCEPTS)}" for _ in range(4)] for _ in range(sentences)]
            qs = []
            for k in range(questions):
                s = rng.randrange(sentences)
                qs.append((f"{'' if tag is None else f's{tag}-'}q{a}-{p}-{k}", s, rng.sample(sents[s], 2)))
            paras.append((sents, qs))
        plan.append(paras)
    for lang in langs:
        articles = []
        for a, paras in enumerate(plan):
            out = []
            for sents, qs in paras:
                texts = [" ".join(synthetic_word(lang, c) for c in s) + " ." for s in sents]
                context, breaks = "", []
                for t in texts:
                    start = len(context) + (1 if context else 0)
                    context = (context + " " + t) if context else t
                    breaks.append([start, start + len(t)])
                qas = [{"id": qid, "question": " ".join(synthetic_word(lang, c) for c in words) + " ?",
                        "answers": [{"answer_start": breaks[s][0], "text": texts[s][:5]}]} for qid, s, words in qs]
                out.append({"context": context, "qas": qas, "sentence_breaks": breaks, "sentences": texts})
            title = f"article {a}" if tag is None else f"article {tag}-{a}"
            articles.append({"title": title, "paragraphs": out})
        (root / f"{lang}.json").write_text(json.dumps({"data": articles, "version": "synthetic"}))
    return root


def full_disk_in_final(monkeypatch):
    """Make Encoder.save_pretrained fail into OUT/.tmp-final as safetensors does on a full disk
    (half a file written, its own error type, no errno)."""
    from hybridfast.encoder import Encoder

    real = Encoder.save_pretrained

    def save_pretrained(self, folder, *a, **k):
        if str(folder).endswith(".tmp-final"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")
        return real(self, folder, *a, **k)

    monkeypatch.setattr(Encoder, "save_pretrained", save_pretrained)


# ----------------------------------------------------------------------------- evaluation benchmarks and encoders
# (the references they are checked against: tests/oracles.py)

def partly_parallel_benchmark(seed=0, n_questions=30, langs=("ar", "de", "en", "zh")):
    """Questions missing in some languages, 1-3 relevant sentences per question and language,
    texts from a tiny vocabulary so the hashing encoder produces many tied scores."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(8)]
    queries, candidates, qrels = {l: {} for l in langs}, {l: {} for l in langs}, {}
    for q in range(n_questions):
        qid = f"q{q:03d}"
        qrels[qid] = set()
        present = [l for l in langs if rng.random() < 0.7] or [langs[0]]
        for l in present:
            queries[l][qid] = " ".join(rng.choice(vocab, 3))
            context = " ".join(rng.choice(vocab, 4))
            for s in range(rng.integers(1, 5)):
                cid = f"{l}-{q}-{s}"
                candidates[l][cid] = (" ".join(rng.choice(vocab, 2)), context)
                if s < 3 and rng.random() < 0.8:
                    qrels[qid].add(cid)
    # a query id without any qrels is not evaluated
    queries[langs[0]]["orphan"] = "w1 w2"
    return RetrievalBenchmark(queries, candidates, qrels, name="synthetic")



_VOCAB = [f"w{i}" for i in range(7)]


class BeirHashEncoder:
    """Bag of hashed words: integer embeddings, many tied scores."""

    def _enc(self, texts):
        out = np.zeros((len(texts), 5), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 5] += 1
        return out

    encode_queries = encode_passages = _enc


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def synthetic_beir(seed=0, langs=("de", "en"), n_docs=25, n_queries=12, shared=True):
    """Per language: docs, queries, graded qrels (0-3). Shared ids: query q<i> exists in every
    language and is judged against its own language's docs (plus, for 'en', a German doc)."""
    rng = np.random.default_rng(seed)
    data = {}
    for lang in langs:
        docs = [{"_id": f"d{i}", "title": " ".join(rng.choice(_VOCAB, 1)) if i % 3 else "",
                 "text": " ".join(rng.choice(_VOCAB, 3))} for i in range(n_docs)]
        queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(_VOCAB, 2))} for i in range(n_queries)]
        qrels = []
        for i in range(n_queries - 1):  # the last query has no qrels: not evaluated
            for d in rng.choice(n_docs, rng.integers(1, 5), replace=False):
                qrels.append((f"q{i}", f"d{d}", int(rng.integers(0, 4))))
            qrels.append((f"q{i}", f"d{(i * 7) % n_docs}", int(rng.integers(1, 4))))
        # dedupe (keep the first grade)
        seen, clean = set(), []
        for q, d, g in qrels:
            if (q, d) not in seen:
                seen.add((q, d))
                clean.append((q, d, g))
        data[lang] = (docs, queries, clean)
    return data


def write_beir_per_language(root, data):
    for lang, (docs, queries, qrels) in data.items():
        _write_jsonl(root / lang / "corpus.jsonl", docs)
        _write_jsonl(root / lang / "queries.jsonl", queries)
        (root / lang / "qrels").mkdir(parents=True, exist_ok=True)
        (root / lang / "qrels" / "test.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return root


def write_beir_single(root, data):
    """One folder, a lang field; ids made global: docs <lang>-d<i>; queries keep their ids."""
    docs, queries, qrels = [], [], []
    for lang, (ds, qs, rs) in data.items():
        docs += [dict(d, _id=f"{lang}-{d['_id']}", lang=lang) for d in ds]
        queries += [dict(q, lang=lang) for q in qs]
        qrels += [(q, f"{lang}-{d}", g) for q, d, g in rs]
    grades = {}
    for q, d, g in qrels:
        grades.setdefault((q, d), g)
    _write_jsonl(root / "corpus.jsonl", docs)
    _write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for (q, d), g in grades.items()))
    return root


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world, *args, timeout=120):
    """Run target(rank, port, *args) in `world` fresh processes (spawn context) and return their
    exit codes; ranks still running after `timeout` seconds are killed and fail the test.

    A rank killed by a signal is run again once, all ranks on a new port, with a warning: about one
    run in ten of the distributed tests saw gloo abort a rank at interpreter exit, after its work
    was saved ("terminate called without an active exception", SIGABRT, no Python frame). An exit
    code, an exception or a hang is never retried."""
    import time
    import warnings

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for attempt in range(2):
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(world)]
        deadline = time.monotonic() + timeout
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        assert not alive, "a rank hung"
        codes = [p.exitcode for p in procs]
        if attempt or not any(c < 0 for c in codes):
            return codes
        warnings.warn(f"spawn_ranks: a rank was killed by signal {-min(codes)} (exit codes {codes}); running again")
