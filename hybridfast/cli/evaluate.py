"""`hybridfast evaluate`: an encoder on any benchmark hybridfast.data.load_benchmark reads (XQuAD-R,
MLQA-R, a LAReQA, BEIR or MIRACL folder); results.json, results.md, map_heatmap.png, optionally
TREC runs. argparse and printing only: the data front door, RetrievalEvaluator and
EvaluationResult.save do the work (docs/evaluation.md).

Mistakes a user can make (an unknown dataset or language, a broken or edited data file, an
output folder that cannot be written or holds the user's own results, a device that is not
there, a model that cannot be loaded, a full disk, Ctrl-C) end with one line naming the
problem, never a traceback, and leave no half-written file: exit 2 for errors, 130 for Ctrl-C.
"""
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

PROG = "hybridfast evaluate"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser):
    from hybridfast.evaluation.search import BACKENDS

    parser.add_argument("--model", default=None,
                        help="model folder or name (default: multilingual-e5-small, the project's multilingual encoder)")
    parser.add_argument("--dataset", required=True,
                        help="xquad-r, mlqa-r, a LAReQA folder, or a BEIR / MIRACL folder (one subfolder per "
                             "language, or one folder with a 'lang' field)")
    parser.add_argument("--languages", nargs="+", default=None,
                        help="ISO 639-1 codes, 'en de' or 'en,de' (default: all)")
    parser.add_argument("--split", default=None,
                        help="LAReQA: all | train | test (default all); BEIR / MIRACL: the qrels name "
                             "(default test; MIRACL: dev, test-a, ...)")
    parser.add_argument("--shared-query-ids", action="store_true",
                        help="BEIR / MIRACL per-language folders: one query id is the same question in every "
                             "language (enables the cross-lingual and multilingual settings)")
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (else HYBRIDFAST_DATA, cache)")
    parser.add_argument("--allow-modified-data", action="store_true",
                        help="use a named data set whose files differ from their pinned sha256 (with a warning)")
    parser.add_argument("--search", default="auto", choices=BACKENDS, help="search backend (default: auto)")
    parser.add_argument("--device", default="auto", help="device for encoding and search (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    parser.add_argument("--max-length", type=int, default=None,
                        help="max tokens per text (default: the model's own length, within its position table)")
    parser.add_argument("--fp32", action="store_true",
                        help="encode in float32 (default: bf16 where the hardware computes it natively: "
                             "CUDA, or a CPU with AVX512-BF16 / AMX; fp32 elsewhere)")
    parser.add_argument("--query-prefix", default=None, help="query prefix (default: the model's own; '' for none)")
    parser.add_argument("--passage-prefix", default=None,
                        help="passage prefix (default: the model's own; '' for none)")
    parser.add_argument("--k", type=int, default=100, help="top-k depth (approximate search, run files)")
    parser.add_argument("--ivf-lists", type=int, default=None, help="approximate faiss IVF search with N lists")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, map_heatmap.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results files in --out that hybridfast did not write (the user's own)")
    parser.add_argument("--save-run", default=None, metavar="DIR",
                        help="also write TREC run files (per language pair and per pool) and qrels to DIR, "
                             "so trec_eval / pytrec_eval / ranx reproduce the numbers; an earlier export "
                             "there is replaced as a whole")
    parser.add_argument("--run-depth", default="full", choices=("full", "k"),
                        help="run files: top k extended to each query's deepest relevant candidate (full, "
                             "reproduces mAP exactly) or strictly the top k")
    parser.add_argument("--shards", default=None, metavar="DIR",
                        help="corpora larger than memory: write the candidate embeddings to DIR as checksummed "
                             "shards (a stopped run resumes there) and stream the exact search from them")
    parser.add_argument("--shard-precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="dtype of the shards (default auto: bf16 where the CPU computes it natively, "
                             "halving the bytes; scores are compared in fp32 either way)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _error(message) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_writable(folder: Path, what: str):
    """Prove a file can be written in `folder` (or where it will be created), before any work."""
    from hybridfast import rules

    target = folder if folder.is_dir() else next((p for p in folder.parents if p.exists()), Path("."))
    if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {folder} cannot be written ({target} is not a writable folder)")
    free = rules.free_bytes(target)
    if free is not None and free < (1 << 20):
        raise PermissionError(rules.write_error_message(OSError(28, "No space left on device"), folder))


def _prepare(args):
    """Every check that needs no model: data, folders, evaluator -> the evaluator."""
    from hybridfast.data import load_benchmark
    from hybridfast.evaluation.evaluator import RetrievalEvaluator
    from hybridfast.evaluation.result import check_out_folder

    check_out_folder(args.out, overwrite=args.overwrite)
    _check_writable(Path(args.out), "--out")
    if args.save_run is not None:
        from hybridfast.evaluation.trec import check_run_folder

        check_run_folder(args.save_run)
        _check_writable(Path(args.save_run), "--save-run")
        if args.ivf_lists is not None:
            raise ValueError("--save-run needs exact search (drop --ivf-lists)")
    if args.shards is not None:
        if args.save_run is not None:
            raise ValueError("--shards and --save-run: run files hold whole score rows, which need the "
                             "candidates in memory; drop one of them")
        if args.ivf_lists is not None:
            raise ValueError("--shards streams an exact search; drop --ivf-lists")
        if Path(args.shards).exists() and not Path(args.shards).is_dir():
            raise ValueError(f"--shards {args.shards} exists and is not a folder")
        _check_writable(Path(args.shards), "--shards")
    benchmark = load_benchmark(args.dataset, data_dir=args.data_dir, languages=args.languages, split=args.split,
                               shared_query_ids=args.shared_query_ids or None,
                               allow_modified=args.allow_modified_data)
    return RetrievalEvaluator(benchmark, k=args.k, search=args.search, device=args.device,
                              batch_size=args.batch_size, show_progress=not args.no_progress,
                              ivf_lists=args.ivf_lists, nprobe=args.nprobe)


def _encoder(args):
    from hybridfast.encoder import Encoder
    from hybridfast.models import default_model

    model = args.model or default_model()  # fetched or rebuilt on first use
    return model, Encoder(model, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
                          max_length=args.max_length, device=args.device, batch_size=args.batch_size,
                          show_progress=not args.no_progress, amp=None if args.fp32 else "auto")


def run(args) -> int:
    try:
        with _data_parallel(args) as rank:
            code = _run(args)
            return code if rank == 0 else 0  # rank 0 reports; the others wrote their share of the shards
    except KeyboardInterrupt:  # results are written atomically: nothing half-written is left
        print(f"{PROG}: interrupted; no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:  # torchrun without --shards
        return _error(e)


@contextmanager
def _data_parallel(args):
    """Under torchrun (WORLD_SIZE > 1): one process group for the run, each rank on its own
    device; the corpus is encoded data-parallel into --shards and rank 0 searches and writes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0
        return
    if args.shards is None:
        raise ValueError(f"torchrun with {world} processes: give --shards DIR (the ranks encode the corpus "
                         "into it; rank 0 searches it)")
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if cuda:
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank()
        if rank != 0:
            args.no_progress = True
        yield rank
    finally:
        dist.destroy_process_group()


def _run(args) -> int:
    from hybridfast.data import FORMAT_ERRORS
    from hybridfast.models import ModelUnavailableError

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"{PROG}: warning: {message}", file=sys.stderr)
        try:
            evaluator = _prepare(args)
        except (OSError, ValueError, TypeError, *FORMAT_ERRORS) as e:
            return _error(e)
    try:
        model, encoder = _encoder(args)
    except (OSError, ValueError, TypeError, ModelUnavailableError) as e:
        return _error(f"--model {args.model or 'multilingual-e5-small'}: {e}")
    # what the encoder will really use (an Encoder says; a stand-in object need not)
    precision, max_length = getattr(encoder, "precision", None), getattr(encoder, "max_length", args.max_length)
    if precision is not None:
        print(f"{PROG}: encoding in {precision} on {encoder.device.type}, max_length {max_length}"
              + ("" if precision == "fp32" else " (--fp32 to opt out)"), file=sys.stderr)
    try:
        result = evaluator.evaluate(encoder, save_run=args.save_run, run_depth=args.run_depth, shards=args.shards,
                                    shard_precision=args.shard_precision)
    except OSError as e:  # the TREC export or a shard: earlier files stay as they were
        from hybridfast import rules

        which = "--shards" if args.shards is not None else "--save-run"
        return _error(f"{which} {rules.write_error_message(e, args.shards or args.save_run)}")
    except ValueError as e:  # shards written with other settings or damaged: named by the shard reader
        return _error(f"--shards {e}")
    if result is None:  # a data-parallel rank other than 0
        return 0
    result.config.update(model=str(model), dataset=str(args.dataset), split=args.split,
                         query_prefix=encoder.query_prefix, passage_prefix=encoder.passage_prefix,
                         max_length=max_length, precision=precision)
    print(result.to_markdown())
    try:
        written = result.save(args.out, overwrite=args.overwrite)
    except OSError as e:
        return _error(f"--out {e.strerror or e}")
    print(f"wrote {', '.join(map(str, written.values()))}"
          + (f"; TREC runs and qrels in {args.save_run}" if args.save_run else ""))
    return 0
