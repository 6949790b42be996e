"""Recompute every table of this folder's results.md from the committed per-query values.

    python docs/study/recompute.py [FOLDER] [--seeds 0,1,2] [--check]

Reads results.json (the settings) and cells/*/*/{result.json,per_query.npz}; trains, evaluates
and downloads nothing. Prints the Markdown; --check exits 1 when it differs from results.md.
"""
import argparse
import sys
from pathlib import Path

from hybridfast.study.reload import load_study
from hybridfast.study.report import study_markdown, summarize_all

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("folder", nargs="?", default=str(Path(__file__).parent))
p.add_argument("--seeds", default=None, help="comma-separated subset of the study's seeds")
p.add_argument("--check", action="store_true", help="compare with the folder's results.md")
args = p.parse_args()
overrides = {"seeds": [int(s) for s in args.seeds.split(",")]} if args.seeds else {}
config, results = load_study(args.folder, **overrides)
summaries, families = summarize_all(results, config)
text = study_markdown(config, summaries, families["gain"], families)
print(text)
if args.check:
    same = text == (Path(args.folder) / "results.md").read_text()
    print("results.md: " + ("identical" if same else "DIFFERS"), file=sys.stderr)
    sys.exit(0 if same else 1)
