"""Running the grid: one cell = (model, mode, seed), or (model, base) for the untouched model.

    cells/<label>-<model id>/base-<eval settings hash>/result.json
    cells/<label>-<model id>/<mode>-s<seed>-<settings hash>/train/        trainer output
    cells/<label>-<model id>/<mode>-s<seed>-<settings hash>/trained.json  written when training returned
    cells/<...>/per_query.npz   per-query values of every eval (for the intervals)
    cells/<...>/result.json     written last: a cell with it is finished

Resuming: run the same command again. Finished cells are skipped; a cell whose
training was interrupted restarts from its last checkpoint. The settings hash
covers everything that changes a cell's numbers, the contents of the training and
evaluation data included (a fingerprint, not the path), so a changed budget or
changed data never reuses stale cells; adding a model, a mode or a seed runs only the
new cells. After a cell is evaluated its fine-tuned weights and checkpoints are
removed (its log and config stay) unless keep_models is set.

One study per folder: the study holds OUT/.hybridfast.lock while it runs and each cell's
train/ folder holds the lock of `hybridfast train` (the same file), so a second study or
a `hybridfast train` on a folder in use stops at once naming the process. The folder's
ownership record (OUT/.hybridfast-run.json, as for training) lists what the study wrote;
a user's own results.* there are never replaced without overwrite.
"""
import hashlib
import json
import math
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from hybridfast.rules import atomic_write_bytes, atomic_write_json
from hybridfast.study.config import BASE, StudyConfig, eval_split_for, prefix_kwargs, train_split_for
from hybridfast.study.identity import ResolvedModel, parameter_counts, resolve_models
from hybridfast.study.stats import load_per_query, per_query_values, save_per_query


def jsonable(obj):
    """A copy of obj with numpy scalars, tuples, sets and paths made JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    """Atomic JSON write (hybridfast.rules.atomic_write_json) of any study or demo record."""
    return atomic_write_json(path, jsonable(obj))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text)[:60]


def model_dir(config: StudyConfig, model: ResolvedModel) -> Path:
    return Path(config.out) / "cells" / f"{_slug(model.label)}-{model.model_id}"


def cell_dir(config: StudyConfig, model: ResolvedModel, mode: str, seed: Optional[int] = None) -> Path:
    if mode == BASE:
        return model_dir(config, model) / f"base-{config.settings_hash(base=True)}"
    return model_dir(config, model) / f"{mode}-s{seed}-{config.settings_hash()}"


def train_config(config: StudyConfig, model_path: str, mode: str, seed: int, output: Path, resume: bool,
                 overwrite: bool = False):
    from hybridfast.training import TrainConfig

    if config.save_steps is None:
        save_steps = max(1, math.ceil(config.steps / 4))
    else:
        save_steps = config.save_steps or None  # 0: no checkpoints
    kwargs = dict(model=model_path, train=config.train, data_dir=config.data_dir, split=train_split_for(config),
                  languages=config.languages, mode=mode, mono_prob=config.mono_prob,
                  batch_size=config.batch_size, max_steps=config.steps, lr=config.lr,
                  max_length=config.max_length, seed=seed, device=config.device,
                  lang_weights=config.train_lang_weights(), bf16=config.resolved_precision() == "bf16",
                  save_steps=save_steps, output=str(output), resume=resume, overwrite=overwrite,
                  show_progress=config.show_progress, allow_modified_data=config.allow_modified_data,
                  **prefix_kwargs(config.prefixes))
    kwargs.update(config.extra_train)
    return TrainConfig(**kwargs)


def _load_result(cdir: Path) -> dict:
    result = json.loads((cdir / "result.json").read_text())
    per_query = load_per_query(cdir / "per_query.npz")
    for name, ev in result["evals"].items():
        ev["per_query"] = {k[len(name) + 2:]: v for k, v in per_query.items() if k.startswith(name + "::")}
        ev["multi_ap"] = ev["per_query"]["multi_map"]
    return result


def _train(config, model, mode, seed, cdir, train_fn, log):
    trained_file = cdir / "trained.json"
    if trained_file.exists():
        info = json.loads(trained_file.read_text())
        final = cdir / "train" / "final"  # (the --out folder may have moved since)
        if (final / "config.json").exists():
            log(f"[study] {model.label} / {mode} / seed {seed}: trained earlier, evaluating {final}")
            return str(final), info["train_seconds"]
    from hybridfast.training import OutputFolderError, RunFolder, run_status

    train_out = cdir / "train"
    # the lock of `hybridfast train` on the cell's folder, held from the decision on: a second
    # study (or a train) waits for nothing and removes nothing here while this one trains
    with RunFolder(train_out).lock(kind="study cell"):
        status = run_status(train_out)
        if status == "foreign":
            raise OutputFolderError(f"study: {train_out} holds files hybridfast did not write; move them away")
        # resumable: from its last checkpoint; unfinished (killed before one): the trainer's overwrite
        # removes only its own files; finished (killed before trained.json): resume returns final/
        resume = status in ("resumable", "finished")
        log(f"[study] {model.label} / {mode} / seed {seed}: training {config.steps} steps (batch "
            f"{config.batch_size}, max_length {config.max_length})"
            + (", resuming from its last checkpoint" if status == "resumable" else ""))
        t0 = time.perf_counter()
        final = str(train_fn(train_config(config, model.path, mode, seed, train_out, resume,
                                          overwrite=status == "unfinished")))
    seconds = time.perf_counter() - t0
    write_json(trained_file, {"final": final, "train_seconds": seconds})
    return final, seconds


def run_cell(config: StudyConfig, model: ResolvedModel, mode: str, seed: Optional[int], evaluators: Dict,
             train_fn: Callable, log=print) -> dict:
    """Train (unless mode is base) and evaluate one cell; load it when finished earlier."""
    cdir = cell_dir(config, model, mode, seed)
    if (cdir / "result.json").exists():
        log(f"[study] {model.label} / {mode}" + (f" / seed {seed}" if mode != BASE else "")
            + ": finished earlier, skipped")
        return _load_result(cdir)
    cdir.mkdir(parents=True, exist_ok=True)
    train_seconds = None
    if mode == BASE:
        eval_path = model.path
        log(f"[study] {model.label} / base: evaluating the untouched model")
    else:
        eval_path, train_seconds = _train(config, model, mode, seed, cdir, train_fn, log)

    from hybridfast.encoder import Encoder

    # a fine-tuned folder records its prefixes; the base model gets the training choice
    kw = prefix_kwargs(config.prefixes) if mode == BASE else {}
    encoder = Encoder(eval_path, max_length=config.max_length, device=config.device,
                      show_progress=config.show_progress, amp="bf16" if config.resolved_precision() == "bf16" else None,
                      **kw)
    result = {"model": str(model.spec), "model_name": model.name, "model_id": model.model_id,
              "model_content": model.content, "label": model.label,
              # a folder the user named is its identity; a named model's cache path is local noise
              "model_path": model.path if model.name == model.path else None,
              "family": model.family, **parameter_counts(encoder.model), "mode": mode,
              "seed": None if mode == BASE else seed, "query_prefix": encoder.query_prefix,
              "passage_prefix": encoder.passage_prefix, "train_seconds": train_seconds,
              "settings": config.eval_settings() if mode == BASE else config.cell_settings(), "evals": {}}
    result["params"] = result["params_total"]
    per_query = {}
    for name, (benchmark, evaluator) in evaluators.items():
        t0 = time.perf_counter()
        res = evaluator.evaluate(encoder)
        values = per_query_values(res)
        per_query.update({f"{name}::{k}": v for k, v in values.items()})
        result["evals"][name] = {"summary": res.summary, "per_language": res.per_language,
                                 "n_queries": getattr(res, "n_queries", {}), "split": eval_split_for(config, name),
                                 "unk_rates": getattr(res, "unk_rates", {}),
                                 "eval_seconds": time.perf_counter() - t0}
    del encoder
    result["host"] = host_record()
    atomic_write_bytes(cdir / "per_query.npz", save_per_query(per_query))
    write_json(cdir / "result.json", result)
    if mode != BASE and not config.keep_models:
        for d in [cdir / "train" / "final", *(cdir / "train").glob("checkpoint-*")]:
            if d.is_dir():
                shutil.rmtree(d)
    return _load_result(cdir)


def host_record() -> dict:
    """Where and under what load a cell ran: its timings mean little without it."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def subset_articles(benchmark, n_articles: int, seed: Optional[int] = None):
    """The benchmark restricted to `n_articles` of its articles (LAReQA candidate ids, read by
    hybridfast.data.lareqa_article): the first ones in sorted order, or, with `seed`, drawn at
    random without replacement (numpy's default_rng(seed), so a stated seed names the subset);
    a query is kept only if a relevant candidate survives."""
    from hybridfast.data import RetrievalBenchmark, lareqa_article

    if not isinstance(n_articles, int) or isinstance(n_articles, bool) or n_articles < 1:
        raise ValueError(f"n_articles must be a positive int, got {n_articles!r}")
    articles = sorted({lareqa_article(c) for cands in benchmark.candidates.values() for c in cands})
    if seed is None:
        keep = set(articles[:n_articles])
    else:
        picked = np.random.default_rng(seed).permutation(len(articles))[:n_articles]
        keep = {articles[i] for i in picked}
    candidates = {l: {c: v for c, v in cands.items() if lareqa_article(c) in keep}
                  for l, cands in benchmark.candidates.items()}
    kept = {c for cands in candidates.values() for c in cands}
    qrels = {q: rel & kept for q, rel in benchmark.qrels.items() if rel & kept}
    queries = {l: {q: t for q, t in qs.items() if q in qrels} for l, qs in benchmark.queries.items()}
    how = f"{len(keep)} articles" + (f" drawn with seed {seed}" if seed is not None else "")
    return RetrievalBenchmark(queries, candidates, qrels, name=f"{benchmark.name}[{how}]")


def load_benchmarks(config: StudyConfig) -> Dict:
    """{eval name: benchmark} of config.evals (split, languages and article subset applied)."""
    from hybridfast.data import load_benchmark

    benchmarks = {name: load_benchmark(name, data_dir=config.data_dir, languages=config.languages,
                                       split=eval_split_for(config, name), allow_modified=config.allow_modified_data)
                  for name in config.evals}
    if config.eval_articles is not None:
        benchmarks = {n: subset_articles(b, config.eval_articles, config.article_seed) for n, b in benchmarks.items()}
    return benchmarks


def build_evaluators(config: StudyConfig, benchmarks: Optional[Dict] = None) -> Dict:
    """{eval name: (benchmark, RetrievalEvaluator(keep_per_query=True))}; benchmarks from config.evals unless given."""
    from hybridfast.evaluation.evaluator import RetrievalEvaluator

    if benchmarks is None:
        benchmarks = load_benchmarks(config)
    return {name: (bench, RetrievalEvaluator(bench, device=config.device, show_progress=config.show_progress,
                                             keep_per_query=True))
            for name, bench in benchmarks.items()}


def plan(config: StudyConfig, models: List[ResolvedModel]) -> List[tuple]:
    """(model, mode, seed) of every cell, in run order: the untouched models, then seed by seed the
    whole models x modes grid (an interrupted study holds complete seeds)."""
    cells = [(m, BASE, None) for m in models] if config.include_base else []
    return cells + [(m, mode, s) for s in config.seeds for m in models for mode in config.modes]


def run_cells(config: StudyConfig, train_fn: Optional[Callable] = None, evaluators: Optional[Dict] = None,
              log=print) -> List[dict]:
    """Run (or resume) every cell of the grid; returns the cell results (no tables).

    train_fn: defaults to hybridfast.training.train. evaluators: {eval name:
    (benchmark, RetrievalEvaluator(keep_per_query=True))} instead of building them from config.evals.
    """
    if train_fn is None:
        from hybridfast import training

        train_fn = training.train
    with study_folder(config.out, ("cells",), config.overwrite):
        models = resolve_models(config.models)
        if evaluators is None:
            evaluators = build_evaluators(config)
        fingerprint_data(config, evaluators)
        todo = plan(config, models)
        results, t0 = [], time.perf_counter()
        for i, (model, mode, seed) in enumerate(todo):
            log(f"[study] cell {i + 1}/{len(todo)} ({(time.perf_counter() - t0) / 60:.1f} min so far)")
            results.append(run_cell(config, model, mode, seed, evaluators, train_fn, log=log))
    return results


# ----------------------------------------------------------------------------- the study's folder

@contextmanager
def study_folder(out, names: Sequence[str], overwrite: bool = False, kind: str = "study"):
    """Hold OUT's lock (the training lock file; re-entrant within this process) and claim the
    names the study writes there: a name that exists but that no hybridfast run recorded is
    the user's, refused unless overwrite. Nothing is written before both pass."""
    from hybridfast.training import OutputFolderError, RunFolder

    folder = RunFolder(out)
    if folder.path.exists() and not folder.path.is_dir():
        raise OutputFolderError(f"out: {folder.path} exists and is not a folder")
    with folder.lock(kind=kind):
        own = set(folder.own_names())
        # a study folder from before the ownership record: its cells/ shows the study wrote it
        legacy = folder.record() is None and any((folder.path / "cells").glob("*/*/result.json"))
        clash = [n for n in names if (folder.path / n).exists() and n not in own]
        if clash and not (overwrite or legacy):
            raise OutputFolderError(f"out: {folder.path} holds {clash}, which hybridfast did not write; it will "
                                    "not replace them. Move them away, choose another --out, or pass --overwrite")
        for name in names:
            folder.own(name)
        yield folder


def benchmark_fingerprint(benchmark) -> str:
    """sha256 of a benchmark's queries, candidates and qrels as loaded (not its path)."""
    h = hashlib.sha256()
    for part in (benchmark.queries, benchmark.candidates, benchmark.qrels):
        h.update(json.dumps(part, sort_keys=True, default=sorted).encode("utf-8"))
    return h.hexdigest()[:16]


def fingerprint_data(config: StudyConfig, evaluators: Optional[Dict] = None) -> dict:
    """Fingerprints of the evaluation data (of `evaluators`' benchmarks, else of config.evals)
    and, when anything is trained, of the training data, stored on the config: the cells'
    settings hashes follow the data's contents, so edited or regenerated data never reuses a
    cell computed on the old data."""
    benchmarks = ({name: bench for name, (bench, _) in evaluators.items()} if evaluators is not None
                  else load_benchmarks(config))
    found = {"evals": {name: benchmark_fingerprint(bench) for name, bench in sorted(benchmarks.items())}}
    if config.modes:
        from hybridfast.data import load_training_pairs

        pairs = load_training_pairs(config.train, data_dir=config.data_dir, split=train_split_for(config),
                                    languages=config.languages, allow_modified=config.allow_modified_data)
        found["train"] = pairs.fingerprint()[:16]
    config.data_fingerprints = found
    return found
