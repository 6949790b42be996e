"""`hybridfast evaluate`: an encoder on XQuAD-R / MLQA-R, a LAReQA folder, or a BEIR / MIRACL
folder (hybridfast.data.beir); results.json, results.md, map_heatmap.png, optionally TREC runs.

Mistakes a user can make (an unknown dataset or language, a broken data file, an output
folder that cannot be written, a model that cannot be loaded) end with one line naming
the problem and exit code 2, never a traceback.
"""
import os
import sys
import warnings
from pathlib import Path

PROG = "hybridfast evaluate"
EXIT_USAGE = 2


def add_arguments(parser):
    from hybridfast.evaluation.search import BACKENDS

    parser.add_argument("--model", default=None,
                        help="model folder or name (default: multilingual-e5-small, the project's multilingual encoder)")
    parser.add_argument("--dataset", required=True,
                        help="xquad-r, mlqa-r, a LAReQA folder, or a BEIR / MIRACL folder (one subfolder per "
                             "language, or one folder with a 'lang' field)")
    parser.add_argument("--languages", nargs="+", default=None, help="ISO 639-1 codes (default: all)")
    parser.add_argument("--split", default=None,
                        help="LAReQA: all | train | test (default all); BEIR / MIRACL: the qrels name "
                             "(default test; MIRACL: dev, test-a, ...)")
    parser.add_argument("--shared-query-ids", action="store_true",
                        help="BEIR / MIRACL per-language folders: one query id is the same question in every "
                             "language (enables the cross-lingual and multilingual settings)")
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (else HYBRIDFAST_DATA, cache)")
    parser.add_argument("--search", default="auto", choices=BACKENDS, help="search backend (default: auto)")
    parser.add_argument("--device", default="auto", help="device for encoding and search (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per text")
    parser.add_argument("--query-prefix", default=None, help="query prefix (default: the model's own; '' for none)")
    parser.add_argument("--passage-prefix", default=None,
                        help="passage prefix (default: the model's own; '' for none)")
    parser.add_argument("--k", type=int, default=100, help="top-k depth (approximate search, run files)")
    parser.add_argument("--ivf-lists", type=int, default=None, help="approximate faiss IVF search with N lists")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, map_heatmap.png")
    parser.add_argument("--save-run", default=None, metavar="DIR",
                        help="also write TREC run files (per language pair and per pool) and qrels to DIR, "
                             "so trec_eval / pytrec_eval / ranx reproduce the numbers")
    parser.add_argument("--run-depth", default="full", choices=("full", "k"),
                        help="run files: top k extended to each query's deepest relevant candidate (full, "
                             "reproduces mAP exactly) or strictly the top k")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _error(message) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_writable(folder: Path, what: str):
    """Create `folder` (or find it) and prove a file can be written there, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hybridfast-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {folder} cannot be written ({e.strerror or e})") from None


def _remove_if_empty(folders):
    """A failed run leaves no empty folder it created behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def load_dataset(dataset, data_dir=None, languages=None, split=None, shared_query_ids=False):
    """A RetrievalBenchmark from a known name, a LAReQA folder or a BEIR / MIRACL folder."""
    from hybridfast.data.beir import detect_layout, load_beir
    from hybridfast.data import DATASETS, load_benchmark

    if str(dataset) not in DATASETS and Path(dataset).is_dir() and detect_layout(dataset) is not None:
        return load_beir(dataset, languages=languages, split=split or "test",
                         shared_query_ids=shared_query_ids or None)
    if shared_query_ids:
        raise ValueError("--shared-query-ids applies to BEIR / MIRACL folders only (LAReQA ids are always shared)")
    split = split or "all"
    if split not in ("all", "train", "test"):
        raise ValueError(f"--split for a LAReQA benchmark must be all, train or test, got {split!r}")
    return load_benchmark(dataset, data_dir=data_dir, languages=languages, split=split)


def run(args) -> int:
    from hybridfast.data.beir import BEIRFormatError
    from hybridfast.data import LAReQAFormatError
    from hybridfast.evaluation.evaluator import RetrievalEvaluator

    out = Path(args.out)
    created = [p for p in (out, Path(args.save_run) if args.save_run else None) if p is not None and not p.exists()]
    try:
        _check_writable(out, "--out")
        if args.save_run is not None:
            from hybridfast.evaluation.trec import check_run_folder

            check_run_folder(args.save_run)
            _check_writable(Path(args.save_run), "--save-run")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: print(f"{PROG}: warning: {message}", file=sys.stderr)
            benchmark = load_dataset(args.dataset, data_dir=args.data_dir, languages=args.languages,
                                     split=args.split, shared_query_ids=args.shared_query_ids)
            evaluator = RetrievalEvaluator(benchmark, k=args.k, search=args.search, device=args.device,
                                           batch_size=args.batch_size, show_progress=not args.no_progress,
                                           ivf_lists=args.ivf_lists, nprobe=args.nprobe)
        if args.save_run is not None and args.ivf_lists is not None:
            raise ValueError("--save-run needs exact search (drop --ivf-lists)")
    except (FileNotFoundError, FileExistsError, PermissionError, BEIRFormatError, LAReQAFormatError, ValueError,
            TypeError) as e:
        _remove_if_empty(created)
        return _error(e)

    from hybridfast.encoder import Encoder
    from hybridfast.models import ModelUnavailableError, default_model

    model = args.model or "multilingual-e5-small"
    try:
        if not args.model:
            model = default_model()  # fetched or rebuilt on first use
        encoder = Encoder(model, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
                          max_length=args.max_length, device=args.device, batch_size=args.batch_size,
                          show_progress=not args.no_progress)
    except (OSError, ValueError, TypeError, ModelUnavailableError) as e:
        _remove_if_empty(created)
        return _error(f"--model {model}: {e}")
    result = evaluator.evaluate(encoder, save_run=args.save_run, run_depth=args.run_depth)
    result.config.update(model=str(model), dataset=str(args.dataset), split=args.split,
                         query_prefix=encoder.query_prefix, passage_prefix=encoder.passage_prefix,
                         max_length=args.max_length)
    markdown = result.to_markdown()
    print(markdown)
    try:
        result.to_json(out / "results.json")
        (out / "results.md").write_text(markdown)
        result.plot(out / "map_heatmap.png")
    except OSError as e:
        return _error(f"--out {out}: {e}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'map_heatmap.png'}"
          + (f"; TREC runs and qrels in {args.save_run}" if args.save_run else ""))
    return 0
