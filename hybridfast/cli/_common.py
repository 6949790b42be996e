"""What every subcommand shares: options generated from a config dataclass, one-line errors,
warnings on stderr, signals, and torch's CPU threads.

Options from a dataclass. A command's settings are declared once, as the fields of its config
dataclass (TrainConfig, StudyConfig, DemoConfig) with their help text in the field metadata:
`help`, `choices`, `flag` (a switch: store_true, or store_false when the field defaults to
True), `cli` (False: not on the command line; a string: the option's name), `required`,
`exclusive` (a mutually exclusive group). The options have no argparse defaults: a setting
left out is left out of the config too, so the dataclass's default is the only one, and the
help text shows it.
"""
from __future__ import annotations

import argparse
import collections.abc
import os
import sys
import typing
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Callable, Dict, Optional

EXIT_FAILED, EXIT_USAGE = 1, 2


_LISTS = (list, tuple, collections.abc.Sequence)


def _scalar_type(annotation):
    """int / float / str from a field annotation such as Optional[int]; lists are given as
    comma-separated text and split by the config."""
    if annotation in (int, float, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in _LISTS or any(typing.get_origin(a) in _LISTS for a in args):
        return str  # "0,1,2": split by the config
    for a in args:
        if a in (int, float):
            return a
    return str


def option_name(f) -> str:
    name = f.metadata.get("cli")
    return name if isinstance(name, str) else "--" + f.name.replace("_", "-")


def _default_text(f) -> str:
    default = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    return "" if default in (None, "", False, True) else f" (default: {default})"


def add_config_arguments(parser, config_class, parsers: Optional[Dict[str, Callable]] = None):
    """One option per field of `config_class` whose metadata has a help text and not cli=False."""
    hints = typing.get_type_hints(config_class)
    groups = {}
    for f in fields(config_class):
        meta = f.metadata
        if meta.get("cli") is False or "help" not in meta:
            continue
        target = parser
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        kw = {"dest": f.name, "default": argparse.SUPPRESS}
        if meta.get("flag"):
            action = "store_false" if f.default is True else "store_true"
            target.add_argument(option_name(f), action=action, help=meta["help"], **kw)
            continue
        kw["type"] = (parsers or {}).get(f.name, _scalar_type(hints[f.name]))
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        kw["required"] = bool(meta.get("required"))
        help_text = meta["help"] + ("" if kw["required"] else _default_text(f))
        target.add_argument(option_name(f), help=help_text.replace("%", "%%"), **kw)


def config_kwargs(args, config_class) -> dict:
    """The settings given on the command line (the others keep the dataclass's defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}


# ----------------------------------------------------------------------------- messages

def error(prog: str, message) -> None:
    """A user error: one line on stderr, no traceback."""
    text = str(message).strip()
    print(f"{prog}: error: {text}", file=sys.stderr)


@contextmanager
def warnings_to_stderr(prog: str, calm: bool = False):
    """Every warning as one line "PROG: warning: ..." on stderr. calm: library deprecation
    chatter (FutureWarning, DeprecationWarning) is not the user's business and is dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        if calm:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = lambda message, *a, **k: print(f"{prog}: warning: {message}", file=sys.stderr)
        yield


def os_error_message(err: OSError, where=None) -> str:
    """One line for a failed read or write; a full disk is said in those words (rules)."""
    from hybridfast import rules

    path = getattr(err, "filename", None) or where or "?"
    return rules.write_error_message(err, path)


def interrupted(prog: str, err: KeyboardInterrupt, rerun: str = "resume with --resume") -> int:
    """The one line printed when a signal stopped the command; the exit code of that signal."""
    import signal

    step = getattr(err, "step", None)
    signum = getattr(err, "signum", signal.SIGINT)
    if step is None:  # loading, or the final evaluation: whatever was saved stays
        print(f"{prog}: interrupted outside a training step; {rerun} continues from what was saved",
              file=sys.stderr)
    else:
        print(f"{prog}: interrupted at step {step}; {rerun}", file=sys.stderr)
    return 128 + int(signum)


def run_guarded(prog: str, work: Callable[[], object], rerun: str = "resume with --resume", calm: bool = False,
                user_errors: tuple = ()):
    """(exit code, work()'s result or None): run a training command with its failures as one
    line each. A user error (settings, folders, data) exits 2; a diverged run or a failed
    write (a full disk named as such) exits 1; SIGINT / SIGTERM exit 130 / 143 after the
    trainer saved a checkpoint (hybridfast.training.signals)."""
    from hybridfast.training import CheckpointError, OutputFolderError, TrainingDiverged
    from hybridfast.training.signals import signals_raise

    try:
        with signals_raise(), warnings_to_stderr(prog, calm):
            return 0, work()
    except KeyboardInterrupt as err:  # Interrupted included: its checkpoint is saved already
        return interrupted(prog, err, rerun), None
    except TrainingDiverged as err:
        error(prog, err)
        return EXIT_FAILED, None
    except (OutputFolderError, CheckpointError, ValueError, TypeError, FileNotFoundError, FileExistsError,
            *user_errors) as err:
        error(prog, err)
        return EXIT_USAGE, None
    except OSError as err:
        error(prog, os_error_message(err))
        return EXIT_FAILED, None


# ----------------------------------------------------------------------------- threads

def prepare_run(prog: str, args, config_from_args: Callable):
    """(config, 0), or (None, exit code 2) after one line naming the bad setting; torch's threads
    set from --threads."""
    try:
        config = config_from_args(args)
        configure_threads(args.threads)
    except (ValueError, TypeError) as e:
        error(prog, e)
        return None, EXIT_USAGE
    return config, 0


def add_threads_argument(parser):
    parser.add_argument("--threads", default="auto",
                        help="CPU threads for torch: a number, or auto (1 when the CPU is already busy, which "
                             "avoids oversubscription: 7-13x faster steps measured under load; else torch's choice)")


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
