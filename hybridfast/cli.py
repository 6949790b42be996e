"""The `hybridfast` console script.

Each subcommand lives in its own module, which provides `add_arguments(parser)`
and `run(args) -> int`. Only the module of the chosen subcommand is imported,
so `hybridfast info` does not pay for transformers.
"""
import argparse
import sys
from importlib import import_module

SUBCOMMANDS = {
    "data": ("hybridfast.data", "download or inspect retrieval benchmarks (XQuAD-R, MLQA-R)"),
    "train": ("hybridfast.trainer", "fine-tune an encoder with mono / cross / hybrid batches"),
    "evaluate": ("hybridfast.evaluator", "evaluate an encoder on XQuAD-R / MLQA-R (mono, cross, multi)"),
    "study": ("hybridfast.study", "grid of models x batch modes: how does model size change the benefit?"),
    "demo": ("hybridfast.demo", "small-scale reproduction of the paper's comparison on the bundled model"),
    "info": ("hybridfast.info", "versions and which optional parts are active"),
}


def build_parser(command=None):
    parser = argparse.ArgumentParser(prog="hybridfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only import the module that will run
            import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    module = import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
