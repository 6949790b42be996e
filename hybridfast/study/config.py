"""Study settings: modes, model specs, StudyConfig, prefixes and threads."""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from hybridfast.rules import MODES as _RULE_MODES

MODES = ("mono", "cross", "hybrid")  # display order; the set is hybridfast.rules.MODES
assert set(MODES) == set(_RULE_MODES)
BASE = "base"
SETTINGS = ("mono", "cross", "multi")
# The study's metrics: (setting, metric, header). Their per-query values are kept for the intervals.
TABLE_COLUMNS = (("mono", "map", "mono mAP"), ("cross", "map", "cross mAP"),
                 ("multi", "map", "multi mAP"), ("multi", "recall@1", "multi R@1"),
                 ("multi", "rank_distance", "rank dist."))
LOWER_IS_BETTER = ("rank_distance",)
PROTOCOLS = {"zero-shot": ("mlqa-r", ("xquad-r",)), "held-out": ("xquad-r", ("xquad-r",))}
INTERVALS = ("t", "bootstrap")
DEFAULT_MODELS = ("multilingual-e5-small@L3", "multilingual-e5-small@L6", "multilingual-e5-small@L12")


def metric_key(setting: str, metric: str) -> str:
    """Column name of a table metric: mono_map, ..., multi_recall@1, rank_distance."""
    return "rank_distance" if metric == "rank_distance" else f"{setting}_{metric}"


METRIC_KEYS = tuple(metric_key(s, m) for s, m, _ in TABLE_COLUMNS)


@dataclass(frozen=True)
class ModelSpec:
    """One --models entry: `[FAMILY=]NAME_OR_FOLDER[@LK]`.

    `multilingual-e5-small@L3` (or `@3`) is multilingual-e5-small cut to its first 3 layers
    (hybridfast.models.get(name, layers=3)), family "multilingual-e5-small".
    `english=models/all-mpnet-base-v2` puts a folder in the family "english".
    """

    name: str                      # name or folder as given (no family, no @layers)
    layers: Optional[int] = None   # truncate to the first N layers (hybridfast.models.get)
    family: Optional[str] = None   # None: the name for @layers specs, else the model's own label

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
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
        layers = None
        if "@" in text:
            text, _, k = text.rpartition("@")
            k = k[1:] if k[:1] in ("L", "l") else k
            if not k.isdigit() or int(k) < 1 or not text:
                raise ValueError(f"models: {text}@{k}: give NAME@LK with K a positive number of layers")
            layers = int(k)
        return cls(text, layers, family)

    def __str__(self):
        return (f"{self.family}=" if self.family else "") + self.name + (f"@L{self.layers}" if self.layers else "")


@dataclass
class StudyConfig:
    """The grid: models x (base + modes) x seeds, trained on `train`, evaluated on `evals`.

    eval_split "auto": the held-out test articles for a benchmark that is also the
    training data, else all of it. train_split "auto": "train" when the training
    data is one of the benchmarks, else "all" (zero-shot). interval: "t"
    (default) or "bootstrap", see hybridfast.study.stats.
    """

    models: Sequence = DEFAULT_MODELS
    modes: Sequence[str] = MODES
    train: str = "mlqa-r"
    evals: Sequence[str] = ("xquad-r",)
    out: str = "runs/study"
    seeds: Sequence[int] = (0,)
    steps: int = 200
    batch_size: int = 32
    max_length: int = 128
    languages: Optional[Sequence[str]] = None
    data_dir: Optional[str] = None
    device: str = "auto"
    lr: float = 3e-5
    mono_prob: float = 0.5
    train_split: str = "auto"
    eval_split: str = "auto"
    eval_articles: Optional[int] = None  # evaluate on the first N articles of the eval split only (cheap CPU runs)
    eval_subset: Optional[str] = None    # label of any further restriction of the eval data (part of the hash)
    include_base: bool = True
    save_steps: Optional[int] = None     # None: about 4 checkpoints per cell; 0: none (no mid-cell resume)
    keep_models: bool = False            # keep each cell's fine-tuned weights after it is evaluated
    prefixes: str = "auto"               # "auto" | "on" | "off", see prefix_kwargs
    interval: str = "t"
    bootstrap: int = 2000
    show_progress: bool = True
    extra_train: Dict = field(default_factory=dict)  # more TrainConfig fields
    seed: Optional[int] = None           # one seed (older callers): same as seeds=(seed,)

    def __post_init__(self):
        self.models = [m if isinstance(m, ModelSpec) else ModelSpec.parse(str(m))
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
        for name in ("steps", "batch_size", "max_length", "bootstrap"):
            _int(getattr(self, name), name, 1)
        if self.eval_articles is not None:
            _int(self.eval_articles, "eval_articles", 1)
        for name, choices in (("eval_split", ("auto", "test", "all")), ("train_split", ("auto", "train", "all")),
                              ("prefixes", ("auto", "on", "off")), ("interval", INTERVALS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not 0.0 <= self.mono_prob <= 1.0:
            raise ValueError(f"mono_prob must be in [0, 1], got {self.mono_prob}")

    def eval_settings(self) -> dict:
        """What changes an untouched model's numbers."""
        return {"evals": list(self.evals), "eval_splits": [eval_split_for(self, e) for e in self.evals],
                "max_length": self.max_length, "languages": self.languages, "prefixes": self.prefixes,
                "eval_subset": self.eval_subset, "eval_articles": self.eval_articles}

    def cell_settings(self) -> dict:
        """What changes a fine-tuned cell's numbers (model, mode and seed name the cell)."""
        return {**self.eval_settings(), "train": str(self.train), "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "mono_prob": self.mono_prob, "train_split": self.train_split,
                "extra_train": dict(sorted(self.extra_train.items()))}

    def settings_hash(self, base: bool = False) -> str:
        blob = json.dumps(self.eval_settings() if base else self.cell_settings(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]


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
