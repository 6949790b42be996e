"""`hybridfast demo`: mono / cross / hybrid fine-tunes of a multilingual encoder, compared at
small scale. The options are generated from DemoConfig's fields (hybridfast/study/demo.py)."""
from hybridfast.cli._common import (add_config_arguments, add_threads_argument, config_kwargs, prepare_run,
                                    run_guarded)
from hybridfast.study.demo import DemoConfig

PROG = "hybridfast demo"


def add_arguments(p) -> None:
    add_config_arguments(p, DemoConfig)
    add_threads_argument(p)


def config_from_args(args) -> DemoConfig:
    # the command line prints one line per phase instead of progress bars
    return DemoConfig(**config_kwargs(args, DemoConfig), show_progress=False)


def run(args) -> int:
    from hybridfast.models import ModelUnavailableError
    from hybridfast.study.demo import run_demo

    config, code = prepare_run(PROG, args, config_from_args)
    if config is None:
        return code
    code, _ = run_guarded(PROG, lambda: run_demo(config), rerun="run the same command again to resume",
                          calm=True, user_errors=(ModelUnavailableError,))
    return code
