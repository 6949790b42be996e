"""`hybridfast demo`: mono / cross / hybrid fine-tunes of a multilingual encoder, compared at small scale."""
import sys


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding xquad-r/ and mlqa-r/ (else $HYBRIDFAST_DATA, the cache; "
                        "missing ones are downloaded there)")
    p.add_argument("--quick", action="store_true", help="about 3 minutes on a 2-core CPU")
    p.add_argument("--protocol", default=None, choices=("zero-shot", "held-out"),
                   help="zero-shot (default): train on MLQA-R, evaluate on XQuAD-R; held-out: train and "
                        "evaluate on disjoint XQuAD-R articles")
    p.add_argument("--train", default=None, help="training data for zero-shot (default mlqa-r)")
    p.add_argument("--eval", dest="evaluate", default=None, help="evaluation data (default xquad-r)")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode (default: by budget)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="(default: by budget)")
    p.add_argument("--max-length", type=int, default=None, help="(default: by budget)")
    p.add_argument("--languages", default=None, help="comma-separated training languages (default: by budget)")
    p.add_argument("--eval-languages", default=None,
                   help="comma-separated evaluation languages (default: by budget; held-out: --languages)")
    p.add_argument("--eval-articles", type=int, default=None,
                   help="evaluate on the first N articles only (default: by budget)")
    p.add_argument("--model", default=None,
                   help="a name (multilingual-e5-small [default], all-MiniLM-L6-v2, NAME@LK), a folder or a hub id")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: a number, or auto (1 when the CPU is already busy, which "
                        "avoids oversubscription: 7-13x faster steps measured under load; else torch's choice)")


def run(args) -> int:
    import warnings

    from hybridfast.study.demo import run_demo
    from hybridfast.models import ModelUnavailableError
    from hybridfast.study import configure_threads

    configure_threads(args.threads)
    try:
        with warnings.catch_warnings():
            # calm output: library deprecation chatter is not the user's business here
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            run_demo(out=args.out, data_dir=args.data_dir, quick=args.quick, steps=args.steps, device=args.device,
                     model=args.model, languages=args.languages, batch_size=args.batch_size,
                     max_length=args.max_length, eval_articles=args.eval_articles, protocol=args.protocol,
                     train=args.train, evaluate=args.evaluate, eval_languages=args.eval_languages,
                     show_progress=False)
    except FileNotFoundError as e:
        print(f"hybridfast demo: {e}", file=sys.stderr)
        return 2
    except (ModelUnavailableError, ValueError) as e:
        print(f"hybridfast demo: error: {e}", file=sys.stderr)
        return 2
    return 0
