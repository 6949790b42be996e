"""Study settings: the grid's StudyConfig (its fields generate `hybridfast study`'s options,
hybridfast/cli/_common.py), the model choices of --models, prefixes, and data identity.

Constants come from the modules that own them: the batch modes from hybridfast.sampler,
the evaluation settings from hybridfast.evaluation, the lower-is-better metrics from
hybridfast.evaluation.metrics; the protocols are defined here (the demo uses them too).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from hybridfast.evaluation import SETTINGS
from hybridfast.evaluation.metrics import LOWER_IS_BETTER
from hybridfast.models.registry import split_layers
from hybridfast.sampler import MODES as BATCH_MODES

# The order of the study's tables and plots: the two pure modes, then hybrid, which mixes them.
MODES = ("mono", "cross", "hybrid")
if set(MODES) != set(BATCH_MODES):  # a new batch mode must get its place in the tables
    raise ImportError(f"hybridfast.study: MODES {MODES} do not match hybridfast.sampler.MODES {BATCH_MODES}")
BASE = "base"
# The study's metrics: (setting, metric, header). Their per-query values are kept for the intervals.
TABLE_COLUMNS = (("mono", "map", "mono mAP"), ("cross", "map", "cross mAP"),
                 ("multi", "map", "multi mAP"), ("multi", "recall@1", "multi R@1"),
                 ("multi", "rank_distance", "rank dist."))
# protocol -> (training data, evaluation benchmarks)
PROTOCOLS = {"zero-shot": ("mlqa-r", ("xquad-r",)), "held-out": ("xquad-r", ("xquad-r",))}
INTERVALS = ("t", "bootstrap")
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_MODELS = ("multilingual-e5-small@L3", "multilingual-e5-small@L6", "multilingual-e5-small@L12")


def metric_key(setting: str, metric: str) -> str:
    """Column name of a table metric: mono_map, ..., multi_recall@1, rank_distance."""
    return "rank_distance" if metric == "rank_distance" else f"{setting}_{metric}"


METRIC_KEYS = tuple(metric_key(s, m) for s, m, _ in TABLE_COLUMNS)


@dataclass(frozen=True)
class ModelChoice:
    """One --models entry: `[FAMILY=]NAME_OR_FOLDER[@LK]`.

    `multilingual-e5-small@L3` (or `@3`) is multilingual-e5-small cut to its first 3 layers
    (hybridfast.models.get(name, layers=3)), family "multilingual-e5-small".
    `english=models/all-mpnet-base-v2` puts a folder in the family "english".
    """

    name: str                      # name or folder as given (no family, no @layers)
    layers: Optional[int] = None   # truncate to the first N layers (hybridfast.models.get)
    family: Optional[str] = None   # None: the name for @layers choices, else the model's own label

    @classmethod
    def parse(cls, text: str) -> "ModelChoice":
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"models: {text!r} is not a model name or folder")
        text = text.strip()
        if os.path.exists(text):  # a folder whose name holds '=' or '@' is taken as it is
            return cls(text)
        family = None
        if "=" in text:
            family, text = (s.strip() for s in text.split("=", 1))
            if not family or not text:
                raise ValueError(f"models: {text!r}: give FAMILY=MODEL")
        name, layers = split_layers(text, arg="models")  # THE NAME@LK grammar (hybridfast.models)
        return cls(name, layers, family)

    def __str__(self):
        return (f"{self.family}=" if self.family else "") + self.name + (f"@L{self.layers}" if self.layers else "")


ModelSpec = ModelChoice  # the name before 0.2; kept for one release


def _setting(default, help=None, **meta):
    """A StudyConfig field; `help` puts it on the command line (hybridfast/cli/_common.py)."""
    if help is not None:
        meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StudyConfig:
    """The grid: models x (base + modes) x seeds, trained on `train`, evaluated on `evals`.

    Each field with a help text is an option of `hybridfast study` (the dataclass's default
    is the only default). eval_split "auto": the held-out test articles for a benchmark that
    is also the training data, else all of it. train_split "auto": "train" when the training
    data is one of the benchmarks, else "all" (zero-shot). interval: "t" (default) or
    "bootstrap", see hybridfast.study.stats.
    """

    models: Sequence = _setting(DEFAULT_MODELS, "comma-separated [FAMILY=]NAME_OR_FOLDER[@LK]; NAME@LK is the "
                                                "named model cut to its first K layers (hybridfast models get "
                                                "NAME --layers K)")
    modes: Sequence[str] = _setting(MODES, "comma-separated subset of mono,cross,hybrid")
    seeds: Sequence[int] = _setting((0, 1, 2), "training seeds: every (model, mode) cell is trained once per seed")
    protocol: str = _setting("zero-shot", "zero-shot: train mlqa-r, evaluate xquad-r (all of it); held-out: train "
                                          "on xquad-r's train articles, evaluate on its test articles. --train / "
                                          "--eval override it", choices=tuple(PROTOCOLS))
    train: Optional[str] = _setting(None, "training data: mlqa-r, xquad-r, or a folder/file (default: the "
                                          "protocol's)")
    evals: Optional[Sequence[str]] = _setting(None, "comma-separated benchmarks (xquad-r, mlqa-r or folders; "
                                                    "default: the protocol's)", cli="--eval")
    eval_split: str = _setting("auto", "auto: held-out test articles when the benchmark is the training data, "
                                       "else all", choices=("auto", "test", "all"))
    out: str = _setting("runs/study", "output folder (run the same command again to resume)")
    steps: int = _setting(200, "training steps per cell")
    batch_size: int = _setting(32, "examples per training step")
    max_length: int = _setting(128, "tokens per text, training and evaluation")
    lr: float = _setting(3e-5, "peak learning rate")
    mono_prob: float = _setting(0.5, "alpha of hybrid batches")
    lang_weights: str = _setting("size", "mono-batch language weights: size (by examples per language, the "
                                         "paper's sampling), size^TAU (smoothed), uniform")
    precision: str = _setting("auto", "training and evaluation precision; auto: bf16 where the hardware computes "
                                      "it natively (CUDA, CPUs with AVX512-BF16 / AMX), else fp32",
                              choices=PRECISIONS)
    languages: Optional[Sequence[str]] = _setting(None, "comma-separated language subset (default: all)")
    eval_articles: Optional[int] = _setting(None, "evaluate on N articles of the eval split only (cheap CPU "
                                                  "runs): the first N in file order, or N drawn at random with "
                                                  "--article-seed")
    article_seed: Optional[int] = _setting(None, "with --eval-articles: draw the N articles at random with this "
                                                 "seed (stated in the results) instead of taking the first N")
    interval: str = _setting("t", "95% interval method over seeds and test questions (see results.md)",
                             choices=INTERVALS)
    bootstrap: int = _setting(2000, "question resamples for the intervals")
    data_dir: Optional[str] = _setting(None, "where benchmarks live (else $HYBRIDFAST_DATA, the cache)")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1 ...")
    save_steps: Optional[int] = _setting(None, "checkpoint every N steps (default: 4 per cell; 0: none)")
    keep_models: bool = _setting(False, "keep each cell's fine-tuned weights (default: removed once the cell is "
                                        "evaluated)", flag=True)
    prefixes: str = _setting("auto", '"query: "/"passage: " prefixes; auto: the model\'s own (none for '
                                     'sentence-transformers models, the paper\'s for e5)', choices=("auto", "on", "off"))
    include_base: bool = _setting(True, "skip evaluating the untouched models", flag=True, cli="--no-base")
    overwrite: bool = _setting(False, "replace results.csv / .json / .md and plots/ in --out although "
                                      "hybridfast did not write them (a user's files)", flag=True)
    allow_modified_data: bool = _setting(False, "use named data sets whose files differ from their pinned sha256 "
                                                "(with a warning; the cells follow the data's contents either way)",
                                         flag=True)
    train_split: str = "auto"
    eval_subset: Optional[str] = None    # label of any further restriction of the eval data (part of the hash)
    show_progress: bool = True
    extra_train: Dict = _setting({})     # more TrainConfig fields
    seed: Optional[int] = None           # one seed (older callers): same as seeds=(seed,)
    # {"train": ..., "evals": {...}}: fingerprints of the data contents, set by the study before the
    # first cell (hybridfast.study.cells.fingerprint_data); part of the cells' hashes
    data_fingerprints: Optional[Dict] = None

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {self.protocol!r}")
        train, evals = PROTOCOLS[self.protocol]
        self.train = train if self.train is None else self.train
        self.evals = list(evals) if self.evals is None else self.evals
        self.models = [m if isinstance(m, ModelChoice) else ModelChoice.parse(str(m))
                       for m in _as_list(self.models, "models")]
        if not self.models:
            raise ValueError("models: give at least one model")
        self.modes = [m.strip() for m in _as_list(self.modes, "modes")]
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes: {bad} not in {list(MODES)}")
        if not self.modes and not self.include_base:
            raise ValueError("modes: empty and include_base is False: nothing to run")
        self.evals = [e.strip() for e in _as_list(self.evals, "evals")]
        if not self.evals:
            raise ValueError("evals: give at least one evaluation benchmark")
        if self.seed is not None:
            self.seeds = (self.seed,)
        self.seeds = [_int(s, "seeds", 0) for s in _as_list(self.seeds, "seeds")]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: give distinct ints, got {self.seeds}")
        self.seed = self.seeds[0]
        if self.languages is not None:
            self.languages = sorted(l.strip() for l in _as_list(self.languages, "languages"))
        self._check_numbers_and_choices()

    def _check_numbers_and_choices(self):
        for name in ("steps", "batch_size", "max_length", "bootstrap"):
            _int(getattr(self, name), name, 1)
        if self.eval_articles is not None:
            _int(self.eval_articles, "eval_articles", 1)
        if self.article_seed is not None:
            self.article_seed = _int(self.article_seed, "article_seed", 0)
            if self.eval_articles is None:
                raise ValueError("article_seed: draws --eval-articles articles at random; give --eval-articles too")
        if self.save_steps is not None:
            _int(self.save_steps, "save_steps", 0)
        for name, choices in (("eval_split", ("auto", "test", "all")), ("train_split", ("auto", "train", "all")),
                              ("prefixes", ("auto", "on", "off")), ("interval", INTERVALS),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not 0.0 <= self.mono_prob <= 1.0:
            raise ValueError(f"mono_prob must be in [0, 1], got {self.mono_prob}")
        if self.lang_weights != "uniform":
            from hybridfast.sampler import parse_lang_weights

            parse_lang_weights(self.lang_weights)  # a ValueError naming lang_weights

    def train_lang_weights(self):
        """lang_weights as TrainConfig takes it (None: uniform)."""
        return None if self.lang_weights == "uniform" else self.lang_weights

    def resolved_precision(self) -> str:
        """"bf16" or "fp32": what `precision` means on this study's device."""
        return resolve_precision(self.precision, self.device)

    def fingerprints(self) -> dict:
        """The data fingerprints of the cells' hashes; computed (the data loaded) on first use
        when the study has not set them yet."""
        if self.data_fingerprints is None:
            from hybridfast.study.cells import fingerprint_data

            fingerprint_data(self)
        return self.data_fingerprints

    def eval_settings(self) -> dict:
        """What changes an untouched model's numbers (the evaluation data's content included)."""
        fp = self.fingerprints()
        return {"evals": list(self.evals), "eval_splits": [eval_split_for(self, e) for e in self.evals],
                "max_length": self.max_length, "languages": self.languages, "prefixes": self.prefixes,
                "precision": self.resolved_precision(),
                "eval_subset": self.eval_subset, "eval_articles": self.eval_articles,
                "eval_data": fp.get("evals"),
                # only when set: cells of first-N studies keep their hashes
                **({"article_seed": self.article_seed} if self.article_seed is not None else {})}

    def cell_settings(self) -> dict:
        """What changes a fine-tuned cell's numbers (model, mode and seed name the cell)."""
        fp = self.fingerprints()
        return {**self.eval_settings(), "train": str(self.train), "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "mono_prob": self.mono_prob, "lang_weights": self.lang_weights,
                "train_split": self.train_split,
                "extra_train": dict(sorted(self.extra_train.items())), "train_data": fp.get("train")}

    def settings_hash(self, base: bool = False) -> str:
        blob = json.dumps(self.eval_settings() if base else self.cell_settings(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]


def resolve_precision(precision: str, device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively (CUDA with bf16, a CPU with
    AVX512-BF16 / AMX), else "fp32"; "bf16" and "fp32" stay as they are."""
    if precision != "auto":
        return precision
    import torch

    from hybridfast._backends import resolve_device
    from hybridfast.models.packed import cpu_bf16_native

    device = resolve_device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_native() else "fp32"


def _int(v, name, minimum):
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be {'a positive' if minimum else 'a non-negative'} int, got {v!r}")
    return v


def _as_list(value, arg) -> list:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a comma-separated string or a list, got {type(value).__name__}") from None


def _same_data(a, b, data_dir=None) -> bool:
    """The same benchmark: the same name, or names/folders resolving to one folder."""
    if str(a).rstrip("/") == str(b).rstrip("/"):
        return True
    from hybridfast.data import resolve_dataset

    try:
        return resolve_dataset(a, data_dir).resolve() == resolve_dataset(b, data_dir).resolve()
    except (FileNotFoundError, TypeError, OSError):
        return False


def eval_split_for(config: StudyConfig, eval_name: str) -> str:
    """Held-out articles when evaluating on the training data, else the whole benchmark."""
    if config.eval_split != "auto":
        return config.eval_split
    return "test" if _same_data(eval_name, config.train, config.data_dir) else "all"


def train_split_for(config: StudyConfig) -> str:
    """"train" (the articles the test split leaves out) when the training data is also evaluated, else all."""
    if config.train_split != "auto":
        return config.train_split
    return "train" if any(_same_data(e, config.train, config.data_dir) for e in config.evals) else "all"


def prefix_kwargs(prefixes: str = "auto") -> dict:
    """Encoder/TrainConfig keyword arguments for the prefix choice.

    "auto" leaves it to the Encoder, which uses the model's own prefixes (none for
    sentence-transformers models such as all-MiniLM-L6-v2, so the untouched
    baseline is not handicapped); "on" / "off" force the paper's
    "query: " / "passage: " prefixes or none.
    """
    if prefixes == "auto":
        return {}
    from hybridfast.encoder import DEFAULT_PASSAGE_PREFIX, DEFAULT_QUERY_PREFIX

    on = prefixes == "on"
    return {"query_prefix": DEFAULT_QUERY_PREFIX if on else "",
            "passage_prefix": DEFAULT_PASSAGE_PREFIX if on else ""}
