"""The `hybridfast` console script.

Each subcommand is one file of this package, `hybridfast/cli/<name>.py`, which
provides `add_arguments(parser)` and `run(args) -> int` (argparse lives here,
never in library modules). Only the file of the chosen subcommand is imported,
so `hybridfast info` does not pay for transformers.
"""
import argparse
import sys
from importlib import import_module

from hybridfast import _malloc

# name -> help text; the code is hybridfast.cli.<name>
SUBCOMMANDS = {
    "data": "download or inspect retrieval benchmarks (XQuAD-R, MLQA-R)",
    "train": "fine-tune an encoder with mono / cross / hybrid batches",
    "evaluate": "evaluate an encoder on XQuAD-R / MLQA-R (mono, cross, multi)",
    "study": "grid of models x batch modes: how does model size change the benefit?",
    "models": "list the named encoders; get one as a local folder (multilingual-e5-small offline)",
    "demo": "small-scale reproduction of the paper's comparison on the bundled model",
    "info": "versions and which optional parts are active",
}


def build_parser(command=None):
    parser = argparse.ArgumentParser(prog="hybridfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only import the module that will run
            import_module(f"hybridfast.cli.{name}").add_arguments(p)
    return parser


def main(argv=None) -> int:
    """argv None: the command line (the console script, python -m hybridfast, torchrun), where
    process-wide tuning (hybridfast._malloc) may apply; a list: a call from Python, where not."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if from_command_line and args.command in _malloc.COMMANDS:  # hybridfast owns this process
        try:
            _malloc.keep_freed_memory()
        except ValueError as e:  # a bad $HYBRIDFAST_MALLOC
            parser.error(str(e))
    module = import_module(f"hybridfast.cli.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
