"""TrainConfig: every setting of `hybridfast train`, with its help text and its check, once.

The command line is generated from these fields (hybridfast/cli/_common.py); the
metadata says how: `help`, `choices`, `flag` (a store_true switch) and `cli`
(False: not on the command line). See docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

from hybridfast import rules
from hybridfast._backends import resolve_device
from hybridfast.sampler import parse_lang_weights


def _f(default, help, **meta):
    return field(default=default, metadata=dict(help=help, **meta))


# Settings a resumed run may change; each change is recorded in the log at the step where it
# happened (train_log.jsonl: {"step": s, "config_change": {...}}). Every other setting changes
# the result and must match the checkpoint (strict resume). chunk_size and
# gradient_checkpointing only trade memory for time (same gradients); device moves a run.
RESUMABLE_CHANGES = ("max_steps", "epochs", "save_steps", "log_steps", "eval", "eval_split", "data_dir",
                     "allow_modified_data",
                     "device", "chunk_size", "gradient_checkpointing", "show_progress")
# Settings that are about this invocation, not the run.
INVOCATION_ONLY = ("output", "resume", "overwrite")


@dataclass
class TrainConfig:
    """Everything `train` needs; defaults follow the paper (alpha 0.5, cos, AdamW 3e-5 / 0.01, batch 100)."""

    model: Optional[str] = _f(None, "model folder, name (hybridfast models list) or hub id (default: multilingual-e5-small)")
    train: Union[str, Path] = _f("", "training data: xquad-r, mlqa-r, a LAReQA folder, a .jsonl file or an "
                                     "mMARCO-style folder", required=True)
    data_dir: Optional[str] = _f(None, "where named data sets live (default: $HYBRIDFAST_DATA, then the cache)")
    split: str = _f("train", "training split (LAReQA article split; mMARCO queries file; 'dev' for mMARCO)",
                    choices=rules.TRAIN_SPLITS)
    languages: Optional[Sequence[str]] = _f(None, "comma-separated ISO 639-1 codes (default: all in the data)")
    mode: str = _f("hybrid", "batch kind: mono, cross, or hybrid (paper, alpha=mono-prob)", choices=rules.MODES)
    mono_prob: float = _f(0.5, "probability of a monolingual batch in hybrid mode")
    lang_weights: Optional[Union[Dict[str, float], str]] = _f(
        "size", "mono-batch language weights: 'size' (by examples per language, the paper's sampling), "
                "'size^TAU' (by examples^TAU, 0 <= TAU <= 1, e.g. size^0.3: smoothed, as in multilingual "
                "pre-training; size^0: uniform) or per language, e.g. en=2,de=1")
    batch_size: int = _f(100, "examples per step per process (global batch = batch size x processes)")
    max_steps: Optional[int] = _f(None, "stop after this many steps (overrides --epochs; may grow on --resume)")
    epochs: int = _f(1, "epochs when --max-steps is not given")
    lr: float = _f(3e-5, "peak learning rate (AdamW, linear warmup then linear decay)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = _f(0.1, "fraction of the steps spent warming up")
    temperature: float = _f(0.05, "InfoNCE temperature")
    hard_negatives: int = _f(0, "hard negatives per query")
    max_length: Optional[int] = _f(None, "tokens per text (default: the model's saved length, else 256, "
                                         "within its position table)")
    query_prefix: Optional[str] = _f(None, "prefix of queries (default: the Encoder's; '' for none)")
    passage_prefix: Optional[str] = _f(None, "prefix of passages (default: the Encoder's; '' for none)")
    seed: int = _f(0, "seed of the batch plan, hard negatives and dropout")
    device: str = _f("auto", "auto, cpu, cuda, cuda:1 ...")
    bf16: bool = _f(False, "bfloat16 autocast", flag=True, exclusive="precision")
    fp16: bool = _f(False, "float16 autocast with loss scaling (CUDA)", flag=True, exclusive="precision")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward", flag=True)
    chunk_size: Optional[int] = _f(None, "GradCache chunk size (rows per embedding pass); None: whole batch")
    gather_across_devices: bool = _f(False, "in-batch negatives from all processes (torchrun)", flag=True)
    save_steps: Optional[int] = _f(None, "checkpoint (and evaluate, with --eval) every N steps")
    log_steps: int = _f(10, "log every N steps")
    eval: Optional[str] = _f(None, "benchmark evaluated at each checkpoint and at the end, e.g. xquad-r")
    eval_split: str = _f("test", "split of the --eval benchmark: all, train or test (LAReQA), or a qrels name "
                                 "(BEIR / MIRACL: test, dev, ...)")
    allow_modified_data: bool = _f(False, "use a named data set whose files differ from their pinned sha256 "
                                          "(with a warning)", flag=True)
    output: Union[str, Path] = _f("runs/train", "output folder (train_log.jsonl, checkpoint-N/, final/)")
    resume: bool = _f(False, "continue the run in --output from its newest intact checkpoint", flag=True)
    overwrite: bool = _f(False, "start again in an --output holding an earlier run: removes only the files "
                                "hybridfast wrote there", flag=True)
    show_progress: bool = _f(True, "progress bar", cli=False)

    def __post_init__(self):
        if isinstance(self.languages, (str, tuple)):  # "en,de" or a tuple: one canonical form
            self.languages = rules.split_list(self.languages)

    def validate(self):
        """Check every field without touching files; raise ValueError/TypeError naming the field."""
        rules.check_choice("mode", self.mode, rules.MODES)
        if not self.train:
            raise ValueError("train: give a training data set (a name such as 'xquad-r', a folder or a .jsonl file)")
        rules.check_choice("split", self.split, rules.TRAIN_SPLITS)
        if not isinstance(self.eval_split, str) or not self.eval_split.strip():
            raise ValueError(f"eval_split must be a split name (all, train, test, or a BEIR / MIRACL qrels name "
                             f"such as dev), got {self.eval_split!r}")
        rules.check_number("mono_prob", self.mono_prob, 0.0, 1.0)
        for name, minimum, optional in (("batch_size", 1, False), ("max_steps", 1, True), ("epochs", 1, False),
                                        ("hard_negatives", 0, False), ("max_length", 1, True),
                                        ("chunk_size", 1, True), ("save_steps", 1, True), ("log_steps", 1, False),
                                        ("seed", 0, False)):
            rules.check_int(name, getattr(self, name), minimum, optional)
        rules.check_number("lr", self.lr, 0.0, low_open=True)
        rules.check_number("weight_decay", self.weight_decay, 0.0)
        rules.check_number("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        rules.check_number("temperature", self.temperature, 0.0, low_open=True)
        for name in ("bf16", "fp16", "gradient_checkpointing", "gather_across_devices", "resume", "overwrite",
                     "show_progress"):
            rules.check_bool(name, getattr(self, name))
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one mixed-precision dtype")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite are both set; resume continues a run, overwrite starts again")
        rules.check_languages(self.languages)
        self._check_lang_weights()
        rules.check_optional_str("query_prefix", self.query_prefix)
        rules.check_optional_str("passage_prefix", self.passage_prefix)
        self._check_device()
        self._check_paths()

    def _check_lang_weights(self):
        if self.lang_weights is None:
            return
        if isinstance(self.lang_weights, str):
            parse_lang_weights(self.lang_weights)  # a ValueError naming lang_weights
            return
        if not isinstance(self.lang_weights, dict) or not self.lang_weights:
            raise TypeError("lang_weights must be a non-empty dict {lang: weight}, 'size' (proportional to "
                            f"the examples per language) or 'size^TAU', got {self.lang_weights!r}")
        for lang, w in self.lang_weights.items():
            rules.check_language_code(lang, arg="lang_weights")
            if not rules.is_number(w) or not 0 <= w < float("inf"):
                raise ValueError(f"lang_weights[{lang!r}] must be a finite number >= 0, got {w!r}")
        if not any(w > 0 for w in self.lang_weights.values()):
            raise ValueError("lang_weights: at least one weight must be > 0")

    def _check_device(self):
        try:
            device = resolve_device(self.device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"device: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        if self.fp16 and device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device (fp16 autocast with loss scaling); use bf16 on CPU")

    def _check_paths(self):
        if self.model is not None:
            if not isinstance(self.model, (str, Path)) or not str(self.model):
                raise TypeError(f"model must be a folder or hub name, got {self.model!r}")
            if looks_local(str(self.model)) and not Path(str(self.model)).expanduser().exists():
                raise FileNotFoundError(f"model: {str(self.model)!r} does not exist (a local path; hub names look "
                                        "like 'name' or 'org/name')")
        if not isinstance(self.output, (str, Path)) or not str(self.output):
            raise TypeError(f"output must be a folder path, got {self.output!r}")

    def to_json(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def looks_local(model: str) -> bool:
    """Hub ids look like 'name' or 'org/name'; anything else is meant as a local path."""
    return Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or \
        Path(model).expanduser().exists()


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
