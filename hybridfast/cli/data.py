"""`hybridfast data`: download or inspect the retrieval benchmarks (XQuAD-R, MLQA-R)."""
import sys


def add_arguments(parser) -> None:
    from hybridfast.data import DATASETS, SPLITS

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("download", help="fetch a benchmark from google-research-datasets/lareqa "
                                        "(pinned commit, pinned sha256 of every file)")
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("--to", default=None, metavar="DIR",
                   help="parent folder (default: $HYBRIDFAST_DATA, else ~/.cache/hybridfast)")
    i = sub.add_parser("info", help="per-language question / candidate counts")
    i.add_argument("name", help="xquad-r, mlqa-r or a LAReQA folder")
    i.add_argument("--data-dir", default=None, metavar="DIR", help="folder holding <name>/ (searched first)")
    i.add_argument("--split", default="all", choices=SPLITS)
    i.add_argument("--languages", nargs="+", default=None)


def run(args) -> int:
    from hybridfast.data import DATASETS, DownloadError, LAReQAFormatError, download, load_benchmark, resolve_dataset

    try:
        if args.data_command == "download":
            dest = download(args.name, args.to)
            print(f"{args.name} is in {dest}\nlicense: {DATASETS[args.name].license}")
            return 0
        bench = load_benchmark(args.name, data_dir=args.data_dir, languages=args.languages, split=args.split)
    except (DownloadError, FileNotFoundError, LAReQAFormatError, ValueError, TypeError) as e:
        print(f"hybridfast data: error: {e}", file=sys.stderr)
        return 1
    print(f"{bench.name}  ({resolve_dataset(args.name, args.data_dir)})")
    print(f"{'lang':<6}{'questions':>10}{'candidates':>12}")
    for lang in bench.languages:
        print(f"{lang:<6}{len(bench.queries.get(lang, {})):>10}{len(bench.candidates.get(lang, {})):>12}")
    rel = [len(r) for r in bench.qrels.values()]
    print(f"{'all':<6}{sum(map(len, bench.queries.values())):>10}{sum(map(len, bench.candidates.values())):>12}"
          f"   ({len(rel)} question ids, {min(rel)}-{max(rel)} relevant each)")
    return 0
