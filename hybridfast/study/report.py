"""Study outputs: results.csv (one row per cell and eval), results.json, results.md
(mean and 95% interval per (model, mode), hybrid's gain over the better of mono and
cross), and two plots per benchmark."""
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from hybridfast.rules import atomic_savefig, atomic_write_many
from hybridfast.study.cells import jsonable
from hybridfast.study.config import (BASE, LOWER_IS_BETTER, METRIC_KEYS, MODES, SETTINGS, TABLE_COLUMNS,
                                     StudyConfig, eval_split_for, train_split_for)
from hybridfast.study.contrasts import analyse, fmt_p
from hybridfast.study.stats import METHOD_TEXT, contrast_interval, macro_replicates, question_weights

CSV_COLUMNS = ("model", "family", "layers", "params_total", "params_non_embedding", "mode", "seed", "train",
               "eval", "steps", "batch_size", "max_length") + METRIC_KEYS
HEADERS = dict(zip(METRIC_KEYS, (h for _, _, h in TABLE_COLUMNS)))
GAIN_KEYS = ("mono_map", "cross_map", "multi_map")  # plotted gains (same scale); the table has all five


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60]


def result_rows(results: List[dict], config: StudyConfig) -> List[dict]:
    """One flat row per (cell, eval): identity, budget, the study's metrics, then every other metric."""
    rows = []
    for r in results:
        base = r["mode"] == BASE
        for name, ev in r["evals"].items():
            row = {"model": r["label"], "family": r["family"], "layers": r["layers"],
                   "params_total": r["params_total"], "params_non_embedding": r["params_non_embedding"],
                   "mode": r["mode"], "seed": "" if base else r["seed"],
                   "train": "" if base else f"{config.train}[{train_split_for(config)}]",
                   "eval": name, "steps": 0 if base else config.steps,
                   "batch_size": "" if base else config.batch_size, "max_length": config.max_length}
            for setting, metric, _ in TABLE_COLUMNS:
                row[f"{setting}_{metric}" if metric != "rank_distance" else "rank_distance"] = \
                    ev["summary"][setting][metric]
            for setting in SETTINGS:
                for metric, value in ev["summary"].get(setting, {}).items():
                    if not (setting == "multi" and metric == "rank_distance"):
                        row.setdefault(f"{setting}_{metric}", value)
            row.update({"eval_split": ev.get("split", ""), "model_id": r["model_id"], "model_path": r["model_path"],
                        "train_seconds": r["train_seconds"], "eval_seconds": round(ev["eval_seconds"], 2)})
            rows.append(row)
    return rows


def _replicates(results: List[dict], name: str, n: int, seed: int) -> Dict[tuple, tuple]:
    """{(result index, metric key): (observed, [n] question-bootstrap replicates)} for eval `name`,
    all under one shared question resample."""
    qids = sorted({k.split("|", 1)[1] for r in results if name in r["evals"]
                   for d in r["evals"][name]["per_query"].values() for k in d})
    qindex = {q: i for i, q in enumerate(qids)}
    w = question_weights(qids, n, seed)
    return {(i, key): macro_replicates(r["evals"][name]["per_query"][key], qindex, w)
            for i, r in enumerate(results) if name in r["evals"] for key in METRIC_KEYS}


def summarize(results: List[dict], config: StudyConfig) -> tuple:
    """(cell summaries, hybrid gains), each a list of dicts with estimate and 95% interval per metric."""
    summaries, families = summarize_all(results, config)
    return summaries, families["gain"]


def summarize_all(results: List[dict], config: StudyConfig) -> tuple:
    """(cell summaries, {family: rows}): the cells' means and intervals, and the paired contrasts of
    hybridfast.study.contrasts (gain, position, trend, vs_base), Holm-adjusted per family."""
    summaries, families = [], {"gain": [], "position": [], "trend": [], "vs_base": []}
    evals = list(dict.fromkeys(n for r in results for n in r["evals"]))
    for name in evals:
        reps = _replicates(results, name, config.bootstrap, config.seed)
        groups: Dict[tuple, List[int]] = {}
        for i, r in enumerate(results):
            if name in r["evals"]:
                groups.setdefault((r["model_id"], r["mode"]), []).append(i)
        for idx in groups.values():  # seed order: contrasts pair seed s of one cell with seed s of another
            idx.sort(key=lambda i: -1 if results[i]["seed"] is None else results[i]["seed"])

        def arrays(idx, key):
            return (np.array([reps[(i, key)][0] for i in idx]), np.stack([reps[(i, key)][1] for i in idx]))

        models = {}
        for (mid, mode), idx in groups.items():
            r = results[idx[0]]
            ident = {k: r[k] for k in ("label", "family", "layers", "params_total", "params_non_embedding")}
            models[mid] = dict(ident, model=r["label"], model_id=mid)
            s = dict(ident, model=r["label"], model_id=mid, mode=mode, eval=name,
                     seeds=[results[i]["seed"] for i in idx] if mode != BASE else [])
            for key in METRIC_KEYS:
                ci = contrast_interval(*arrays(idx, key), method=config.interval, seed=config.seed)
                if mode == BASE:
                    ci["seed_variance"] = "none (untouched model)"
                s[key] = ci
            summaries.append(s)
        ordered = sorted(models.values(), key=lambda m: (m["family"], m["params_non_embedding"], m["model"]))
        for fam, rows in analyse(groups, arrays, ordered, name).items():
            families[fam] += rows
    order = lambda s: (s["eval"], s["family"], s["params_non_embedding"], s["model"])
    summaries.sort(key=lambda s: (*order(s), ([BASE] + list(MODES)).index(s["mode"])))
    return summaries, families


# ---------------------------------------------------------------------------
# text

def _fmt(v, key=None, sign=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    digits = 2 if key in LOWER_IS_BETTER else 4
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _millions(n):
    return f"{n / 1e6:.1f}M" if n >= 100_000 else str(n)


def _ci(c, key, sign=False):
    return f"{_fmt(c['estimate'], key, sign)} [{_fmt(c['ci_low'], key, sign)}, {_fmt(c['ci_high'], key, sign)}]"


def best_marks(values: Sequence[float], metric: str) -> List[bool]:
    """True where the value is the best of the column (ties all marked)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return [False] * len(values)
    best = min(finite) if metric in LOWER_IS_BETTER else max(finite)
    return [v is not None and not math.isnan(v) and abs(v - best) <= 1e-12 for v in values]


def summary_table(summaries: List[dict]) -> str:
    heads = ["model", "family", "layers", "non-emb. params", "params", "mode", "seeds"] + [HEADERS[k] for k in METRIC_KEYS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    marks = {}
    for mid in {s["model_id"] for s in summaries}:
        idx = [i for i, s in enumerate(summaries) if s["model_id"] == mid]
        for key in METRIC_KEYS:
            for i, m in zip(idx, best_marks([summaries[i][key]["estimate"] for i in idx], key)):
                marks[(i, key)] = m
    for i, s in enumerate(summaries):
        cells = [s["model"], s["family"], str(s["layers"]), _millions(s["params_non_embedding"]),
                 _millions(s["params_total"]), s["mode"], ",".join(map(str, s["seeds"])) or "-"]
        for key in METRIC_KEYS:
            text = _ci(s[key], key)
            cells.append(f"**{text}**" if marks[(i, key)] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains_table(gains: List[dict]) -> str:
    heads = ["model", "layers", "non-emb. params"] + [HEADERS[k] for k in METRIC_KEYS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for g in gains:
        cells = [g["model"], str(g["layers"]), _millions(g["params_non_embedding"])]
        for key in METRIC_KEYS:
            c = g[key]
            cells.append(f"{_ci(c, key, sign=True)} vs {c['vs']}" + (" *" if c["excludes_zero"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FAMILY_TEXT = {
    "gain": "Hybrid minus the better (by mean) of mono and cross (`vs`)",
    "position": "Hybrid minus the midpoint of mono and cross (positive: above the midpoint, toward or beyond "
                "the better mode; the size x mode interaction per size)",
    "trend": "Size trend: the largest minus the smallest model of a family, of the gain and of the position "
             "(positive: the benefit grows with size)",
    "vs_base": "Each fine-tune minus its untouched model (positive: training helped)",
}


def contrast_table(family: str, rows: List[dict]) -> str:
    """Long format, one line per (row, metric): paired estimate [95% interval], p and Holm's p."""
    first = {"gain": "model", "position": "model", "trend": "family / what", "vs_base": "model / mode"}[family]
    lines = [f"| {first} | metric | estimate [95% interval] | seeds | p | Holm p |", "|---|---|---|---|---|---|"]
    for r in rows:
        label = {"gain": r.get("model"), "position": r.get("model"), "vs_base": f"{r.get('model')} / {r.get('mode')}",
                 "trend": f"{r.get('what')}: {r.get('large')} - {r.get('small')}"}[family]
        for key in METRIC_KEYS:
            c = r[key]
            vs = f" vs {c['vs']}" if "vs" in c else ""
            star = " *" if c.get("p_holm", 1.0) < 0.05 else ""
            lines.append(f"| {label} | {HEADERS[key]} | {_ci(c, key, sign=True)}{vs}{star} | {c['n_seeds']} | "
                         f"{fmt_p(c['p'])} | {fmt_p(c.get('p_holm'))} |")
    return "\n".join(lines)


def contrasts_markdown(families: Dict[str, List[dict]], name: str) -> List[str]:
    parts = ["### Paired comparisons", "",
             "Differences formed per training seed (same seed, same test questions), then averaged; 95% interval "
             "mean +- sqrt((t_{S-1} * SE_seeds)^2 + (1.96 * SE_questions)^2), SE_seeds from the per-seed "
             "differences, SE_questions from the shared question bootstrap (hybridfast.study.contrasts). p: the "
             "level at which that interval reaches 0. Holm p: Holm-Bonferroni over the family (one table); `*`: "
             "Holm p < 0.05. Positive always means hybrid (or the fine-tune) better; rank-distance differences are "
             "flipped accordingly.", ""]
    for family in ("gain", "position", "trend", "vs_base"):
        rows = [r for r in families.get(family, []) if r["eval"] == name]
        if rows:
            parts += [f"**{FAMILY_TEXT[family]}** ({len(rows) * len(METRIC_KEYS)} comparisons in the family)", "",
                      contrast_table(family, rows), ""]
    return parts


def _articles_text(config: StudyConfig) -> str:
    if config.article_seed is None:
        return f", first {config.eval_articles} articles in file order"
    return f", {config.eval_articles} articles drawn at random with seed {config.article_seed}"


def budget_text(config: StudyConfig) -> str:
    langs = ", ".join(config.languages) if config.languages else "all"
    evals = "; ".join(f"{e} ({eval_split_for(config, e)} split"
                      + (_articles_text(config) if config.eval_articles else "")
                      + (f", {config.eval_subset}" if config.eval_subset else "") + ")" for e in config.evals)
    return (f"Train: {config.train} ({train_split_for(config)} split), {config.steps} steps x batch "
            f"{config.batch_size}, max_length {config.max_length}, lr {config.lr}, alpha {config.mono_prob}, "
            f"seeds {', '.join(map(str, config.seeds))}, languages {langs}, prefixes {config.prefixes}. "
            f"Evaluation: {evals}.")


def study_markdown(config: StudyConfig, summaries: List[dict], gains: List[dict],
                   families: Optional[Dict[str, List[dict]]] = None) -> str:
    parts = ["# hybridfast study", "", budget_text(config), "",
             METHOD_TEXT[config.interval] + f" ({config.bootstrap} question resamples). Untouched models "
             "(`base`) have no training noise: their interval is the question bootstrap alone. A cell with "
             "one seed cannot measure seed variance: its interval covers test questions only.", "",
             "Mean over seeds [95% interval]; best mean per model in bold; rank distance: lower is better. "
             "Parameters: `non-emb.` excludes the embedding tables. Ceilings: a query with R relevant candidates "
             "in the multilingual pool has multi R@1 <= 1/R and rank distance >= R - 1 (XQuAD-R and MLQA-R: one "
             "relevant sentence per language, so R = L languages: R@1 <= 1/L).", ""]
    for name in dict.fromkeys(s["eval"] for s in summaries):
        parts += [f"## {name}", "", summary_table([s for s in summaries if s["eval"] == name]), ""]
        g = [x for x in gains if x["eval"] == name]
        if g:
            parts += ["Hybrid minus the better (by mean) of mono and cross, `vs` naming it; for rank distance "
                      "the better minus hybrid, so positive always means hybrid is better. `*`: the interval "
                      "excludes 0. Choosing the better mode by its mean biases these gains slightly downward.",
                      "", gains_table(g), ""]
        if families:
            parts += contrasts_markdown(families, name)
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# plots

STYLES = ("-", ":", "-.", (0, (5, 1)))  # one line style per model family


def plot_study(summaries: List[dict], gains: List[dict], folder: Path) -> Dict[str, Path]:
    """Per benchmark: metrics_vs_params-<eval>.png and hybrid_gain-<eval>.png (when gains exist)."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in dict.fromkeys(s["eval"] for s in summaries):
        sub = [s for s in summaries if s["eval"] == name]
        families = list(dict.fromkeys(s["family"] for s in sub))
        paths[f"metrics_{name}"] = _plot_metrics(name, sub, families, folder / f"metrics_vs_params-{_slug(name)}.png")
        g = [x for x in gains if x["eval"] == name]
        if g:
            paths[f"gain_{name}"] = _plot_gains(name, g, families, folder / f"hybrid_gain-{_slug(name)}.png")
    return paths


def _errorbar(ax, points, dx, **kw):
    """points: [(x, interval dict)], drawn at x * (1 + dx) so that modes sit side by side."""
    c = [p for _, p in points]
    ax.errorbar([x * (1 + dx) for x, _ in points], [v["estimate"] for v in c],
                yerr=[[v["estimate"] - v["ci_low"] for v in c], [v["ci_high"] - v["estimate"] for v in c]],
                marker="o", **kw)


def _plot_metrics(name, sub, families, path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.ravel()
    axes[-1].axis("off")
    for ax, key in zip(axes, METRIC_KEYS):
        for mi, mode in enumerate([BASE] + list(MODES)):
            for fi, fam in enumerate(families):
                pts = sorted(((s["params_non_embedding"], s[key]) for s in sub
                              if s["mode"] == mode and s["family"] == fam), key=lambda p: p[0])
                if pts:
                    _errorbar(ax, pts, 0.03 * (mi - 1.5), markersize=4, capsize=3, color=f"C{mi}",
                              linestyle="--" if mode == BASE else STYLES[fi % len(STYLES)],
                              label=mode + (f" ({fam})" if len(families) > 1 else ""))
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(HEADERS[key] + (" (lower better)" if key in LOWER_IS_BETTER else ""))
        ax.grid(alpha=0.3)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", title="batch mode", fontsize=8)
    fig.suptitle(f"{name}: metrics vs non-embedding parameters per batch mode (mean over seeds, 95% interval)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def _plot_gains(name, gains, families, path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for fi, fam in enumerate(families):
        gf = sorted((x for x in gains if x["family"] == fam), key=lambda x: x["params_non_embedding"])
        for ki, key in enumerate(GAIN_KEYS + ("rank_distance",)):
            if gf:
                _errorbar(ax2 if key == "rank_distance" else ax, [(v["params_non_embedding"], v[key]) for v in gf],
                          0.03 * (ki - 1), capsize=4, color=f"C{ki}", linestyle=STYLES[fi % len(STYLES)],
                          label=HEADERS[key] + (f" ({fam})" if len(families) > 1 else ""))
    for a, title in ((ax, "hybrid - max(mono, cross), mAP"), (ax2, "min(mono, cross) - hybrid, rank distance")):
        a.axhline(0.0, color="grey", linewidth=1)
        a.set_xscale("log")
        a.set_xlabel("non-embedding parameters")
        a.set_title(title + "\n(positive: hybrid better)", fontsize=9)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"{name}: benefit of hybrid batches vs model size (mean over seeds, 95% interval)", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


STUDY_RESULTS = ("results.csv", "results.json", "results.md", "plots")


def write_outputs(config: StudyConfig, results: List[dict]) -> Dict[str, Path]:
    """results.csv / .json / .md (replaced together: a failed write, a full disk included,
    leaves the previous three byte-identical) and the plots under config.out."""
    out = Path(config.out)
    rows = result_rows(results, config)
    summaries, families = summarize_all(results, config)
    gains = families["gain"]
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    columns = list(CSV_COLUMNS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in CSV_COLUMNS]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    record = jsonable({"settings": config.cell_settings(), "seeds": config.seeds,
                       "models": [str(m) for m in config.models], "modes": list(config.modes),
                       "interval_method": METHOD_TEXT[config.interval], "interval": config.interval,
                       "bootstrap": config.bootstrap, "include_base": config.include_base, "rows": rows,
                       "cells": summaries, "hybrid_gain": gains,
                       "contrasts": {k: v for k, v in families.items() if k != "gain"}})
    atomic_write_many({paths["csv"]: table.getvalue().encode("utf-8"),
                       paths["json"]: (json.dumps(record, indent=2) + "\n").encode("utf-8"),
                       paths["md"]: study_markdown(config, summaries, gains, families).encode("utf-8")})
    paths.update(plot_study(summaries, gains, out / "plots"))
    return paths
