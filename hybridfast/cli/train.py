"""`hybridfast train`: the command line is generated from TrainConfig's fields (their
types, defaults, help text and choices), so a setting is declared once
(hybridfast/training/config.py; the generator is hybridfast/cli/_common.py).
Training manual: docs/training.md."""
import argparse
import os

from hybridfast.cli._common import add_config_arguments, config_kwargs, run_guarded
from hybridfast.training import TrainConfig, train

PROG = "hybridfast train"


def _lang_weights(text):
    if text.strip().startswith("size"):  # "size" or "size^TAU", checked by the config
        return text.strip()
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        lang, sep, w = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected lang=weight pairs like 'en=2,de=1', got {item!r}")
        try:
            out[lang.strip()] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {lang!r} is not a number: {w!r}") from None
    return out


def add_arguments(parser):
    add_config_arguments(parser, TrainConfig, parsers={"lang_weights": _lang_weights})
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    kw = config_kwargs(args, TrainConfig)
    kw["show_progress"] = not getattr(args, "no_progress", False)
    return TrainConfig(**kw)


def run(args) -> int:
    code, final = run_guarded(PROG, lambda: train(config_from_args(args)))
    if code == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}")
    return code
