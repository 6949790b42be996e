"""`hybridfast train`: the command line is generated from TrainConfig's fields (their
types, defaults, help text and choices), so a setting is declared once
(hybridfast/training/config.py). See docs/architecture.md."""
import argparse
import os
import sys
import typing
import warnings
from dataclasses import MISSING, fields

from hybridfast.training import (CheckpointError, OutputFolderError, TrainConfig, TrainingDiverged,
                                 train)

EXIT_USAGE, EXIT_FAILED = 2, 1


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


_PARSERS = {"lang_weights": _lang_weights}


def _scalar_type(annotation):
    """int / float / str from a field annotation such as Optional[int]."""
    hints = {int: int, float: float, str: str}
    if annotation in hints:
        return hints[annotation]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    for a in args:
        if a in (int, float):
            return a
    return str


def add_arguments(parser):
    hints = typing.get_type_hints(TrainConfig)
    groups = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": meta.get("help"), "dest": f.name}
        target = parser
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        if meta.get("flag"):
            target.add_argument(flag, action="store_true", **kw)
            continue
        kw["type"] = _PARSERS.get(f.name, _scalar_type(hints[f.name]))
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if meta.get("required"):
            kw["required"] = True
        else:
            kw["default"] = None if f.default is MISSING else f.default
        target.add_argument(flag, **kw)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    kw["show_progress"] = not getattr(args, "no_progress", False)
    return TrainConfig(**kw)


def run(args) -> int:
    prog = "hybridfast train"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: print(f"{prog}: warning: {message}", file=sys.stderr)
            final = train(config_from_args(args))
    except TrainingDiverged as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (OutputFolderError, CheckpointError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}")
    return 0
