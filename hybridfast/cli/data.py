"""`hybridfast data`: download or inspect the retrieval benchmarks (XQuAD-R, MLQA-R, any folder
`hybridfast evaluate` reads). argparse and printing only; the work is hybridfast.data's."""
import sys

PROG = "hybridfast data"


def add_arguments(parser) -> None:
    from hybridfast.data import DATASETS

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("download", help="fetch a benchmark from google-research-datasets/lareqa "
                                        "(pinned commit, pinned sha256 of every file)")
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("--to", default=None, metavar="DIR",
                   help="parent folder (default: $HYBRIDFAST_DATA, else ~/.cache/hybridfast)")
    i = sub.add_parser("info", help="per-language question / candidate counts")
    i.add_argument("name", help="xquad-r, mlqa-r, a LAReQA folder, or a BEIR / MIRACL folder")
    i.add_argument("--data-dir", default=None, metavar="DIR", help="folder holding <name>/ (searched first)")
    i.add_argument("--split", default=None,
                   help="LAReQA: all | train | test (default all); BEIR / MIRACL: the qrels name (default test)")
    i.add_argument("--languages", nargs="+", default=None, help="ISO 639-1 codes: 'en de' or 'en,de' (default: all)")
    i.add_argument("--shared-query-ids", action="store_true",
                   help="BEIR / MIRACL per-language folders: one query id is the same question in every language")
    i.add_argument("--allow-modified-data", action="store_true",
                   help="use a named data set whose files differ from their pinned sha256 (with a warning)")


def run(args) -> int:
    import warnings

    from hybridfast.data import DATASETS, FORMAT_ERRORS, DownloadError, download, load_benchmark

    try:
        if args.data_command == "download":
            dest = download(args.name, args.to)
            print(f"{args.name} is in {dest}\nlicense: {DATASETS[args.name].license}")
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: print(f"{PROG}: warning: {message}", file=sys.stderr)
            bench = load_benchmark(args.name, data_dir=args.data_dir, languages=args.languages, split=args.split,
                                   shared_query_ids=args.shared_query_ids or None,
                                   allow_modified=args.allow_modified_data)
    except (DownloadError, FileNotFoundError, ValueError, TypeError, *FORMAT_ERRORS) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    where = args.name
    if args.name in DATASETS:  # say which copy was read: --data-dir, $HYBRIDFAST_DATA or the cache
        from hybridfast.data import resolve_dataset

        where = resolve_dataset(args.name, args.data_dir)
    _print_counts(bench, where)
    return 0


def _print_counts(bench, where) -> None:
    print(f"{bench.name}  ({where})")
    print(f"{'lang':<6}{'questions':>10}{'candidates':>12}")
    for lang in bench.languages:
        print(f"{lang:<6}{len(bench.queries.get(lang, {})):>10}{len(bench.candidates.get(lang, {})):>12}")
    rel = [len(r) for r in bench.qrels.values()]
    print(f"{'all':<6}{sum(map(len, bench.queries.values())):>10}{sum(map(len, bench.candidates.values())):>12}"
          f"   ({len(rel)} question ids, {min(rel)}-{max(rel)} relevant each)")
