"""Evaluate the untouched multilingual-e5-small on the full XQuAD-R and MLQA-R.

Run from the repository root:  python docs/eval-me5-small/run_eval.py [--data-dir DIR] [--threads N]
Writes docs/eval-me5-small/<dataset>/{results.json, results.md, map_heatmap.png}
(the standard `hybridfast evaluate` outputs). docs/eval-me5-small/README.md is written by make_tables.py.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--datasets", nargs="+", default=["xquad-r", "mlqa-r"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hybridfast import Encoder, RetrievalEvaluator, models
    from hybridfast.data import load_benchmark

    folder = models.get("multilingual-e5-small", log=print)
    info = json.loads((folder / models.MODEL_INFO_FILE).read_text())
    for name in args.datasets:
        bench = load_benchmark(name, data_dir=args.data_dir)
        enc = Encoder(str(folder), max_length=args.max_length, device="cpu", batch_size=32, show_progress=False)
        t0 = time.perf_counter()
        result = RetrievalEvaluator(bench, device="cpu", show_progress=False).evaluate(enc)
        seconds = time.perf_counter() - t0
        result.config.update(model="multilingual-e5-small", model_source=info["source"], dataset=name,
                             split="all", query_prefix=enc.query_prefix, passage_prefix=enc.passage_prefix,
                             max_length=args.max_length, wall_seconds=round(seconds, 1),
                             torch_threads=args.threads, cpu=platform.processor() or platform.machine(),
                             torch=torch.__version__)
        out = HERE / name
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(out / "results.json")
        (out / "results.md").write_text(result.to_markdown())
        result.plot(out / "map_heatmap.png")
        print(f"{name}: {seconds / 60:.1f} min; {result.summary}", flush=True)


if __name__ == "__main__":
    main()
