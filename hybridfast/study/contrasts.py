"""Paired contrasts of the study: differences per training seed, their intervals, p-values and
the Holm-Bonferroni adjustment over each family of reported comparisons.

Every contrast is a linear combination of cells, sum_k c_k * cell_k, all scored on the same
test questions and (for fine-tuned cells) trained with the same seeds. Per seed s the
combination d_s = sum_k c_k x_{k,s} is formed first (paired: a seed's data order and sampling
are shared by the modes it trains; an untouched model has one value, used for every seed), so
seed-to-seed noise that the cells share cancels. The interval is the mean of d_s

    +- sqrt((t_{S-1} * sd(d_s) / sqrt(S))^2 + (1.96 * SE_questions)^2)

where SE_questions is the standard deviation, over the shared question bootstrap, of the
seed-averaged combination (a question resampled with all its translations). The p-value is the
level at which that interval just reaches 0 (so p < 0.05 exactly when the 95% interval excludes
0); Holm's step-down adjustment runs over one family at a time (one table of one benchmark).

Families reported (hybridfast.study.report): hybrid's gain over the better of mono and cross;
hybrid's position against the midpoint of mono and cross; the size trend of both (largest minus
smallest model of a family, the size x mode interaction); each fine-tune against its untouched
model. Signs: positive always means "hybrid better" (or "the fine-tune better"), rank distance
included (its differences are flipped, lower being better).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hybridfast.study.config import BASE, LOWER_IS_BETTER, METRIC_KEYS

Term = Tuple[float, np.ndarray, np.ndarray]  # (coefficient, per-seed values [S or 1], bootstraps [S or 1, n])


def paired_interval(terms: Sequence[Term]) -> dict:
    """95% interval, p-value and standard errors of sum_k c_k * mean_s(x_k,s), paired by seed.

    Terms with one row (an untouched model) are broadcast over the seeds of the others."""
    from scipy import stats as st

    seeds = max(len(obs) for _, obs, _ in terms)
    if any(len(obs) not in (1, seeds) for _, obs, _ in terms):
        raise ValueError(f"paired_interval: cells with different seed counts {[len(o) for _, o, _ in terms]}")
    d = sum(c * np.broadcast_to(np.asarray(obs, float), (seeds,)) for c, obs, _ in terms)
    boots = sum(c * np.asarray(b, float).mean(0) for c, _, b in terms)
    estimate = float(d.mean())
    se_s = float(d.std(ddof=1) / np.sqrt(seeds)) if seeds > 1 else 0.0
    se_q = float(np.nanstd(boots, ddof=1))
    df = seeds - 1

    def half(alpha):
        t = st.t.ppf(1 - alpha / 2, df) if df > 0 else 0.0
        return float(np.hypot(t * se_s, st.norm.ppf(1 - alpha / 2) * se_q))

    out = {"estimate": estimate, "ci_low": estimate - half(0.05), "ci_high": estimate + half(0.05),
           "se_seeds": se_s, "se_questions": se_q, "n_seeds": seeds, "df": df,
           "seed_variance": "measured (paired by seed)" if seeds > 1 else "not measured",
           "p": _p_value(estimate, half)}
    out["excludes_zero"] = bool(out["ci_low"] > 0 or out["ci_high"] < 0)
    return out


def _p_value(estimate: float, half) -> float:
    """The alpha at which the interval estimate +- half(alpha) touches 0 (half falls with alpha)."""
    from scipy.optimize import brentq

    if not np.isfinite(estimate):
        return float("nan")
    if half(0.999999) >= abs(estimate):
        return 1.0
    if half(1e-12) <= abs(estimate):
        return 0.0 if abs(estimate) > 0 else 1.0
    return float(brentq(lambda a: half(a) - abs(estimate), 1e-12, 0.999999, xtol=1e-10))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _better_sign(key: str) -> float:
    return -1.0 if key in LOWER_IS_BETTER else 1.0


def analyse(cells: Dict[Tuple[str, str], dict], arrays, models: List[dict], eval_name: str) -> Dict[str, List]:
    """The four families for one benchmark.

    cells: {(model_id, mode): {"idx": result indices sorted by seed}}; arrays(idx, key) -> (obs [S],
    boots [S, n]); models: [{"model_id", "label", "family", "layers", "params_non_embedding"}] in
    size order. Returns {family name: [rows]}, each row {"model", ..., key: interval dict}, with
    "p_holm" added to every interval (adjusted within its family)."""
    def term(mid, mode, key, coef):
        obs, boots = arrays(cells[(mid, mode)], key)
        return (coef * _better_sign(key), obs, boots)

    def complete(mid):
        return all((mid, m) in cells for m in ("mono", "cross", "hybrid"))

    def gain_terms(mid, key):
        means = {m: float(arrays(cells[(mid, m)], key)[0].mean()) for m in ("mono", "cross")}
        other = max(means, key=lambda m: _better_sign(key) * means[m])
        return other, [term(mid, "hybrid", key, 1.0), term(mid, other, key, -1.0)]

    def position_terms(mid, key):
        return [term(mid, "hybrid", key, 1.0), term(mid, "mono", key, -0.5), term(mid, "cross", key, -0.5)]

    families = {"gain": [], "position": [], "trend": [], "vs_base": []}
    full = [m for m in models if complete(m["model_id"])]
    for m in full:
        mid = m["model_id"]
        row_g, row_p = dict(m, eval=eval_name), dict(m, eval=eval_name)
        for key in METRIC_KEYS:
            other, terms = gain_terms(mid, key)
            row_g[key] = {"vs": other, **paired_interval(terms)}
            row_p[key] = paired_interval(position_terms(mid, key))
        families["gain"].append(row_g)
        families["position"].append(row_p)
    families["trend"] = _trends(full, gain_terms, position_terms, eval_name)
    for m in models:
        mid = m["model_id"]
        if (mid, BASE) not in cells:
            continue
        for mode in ("mono", "cross", "hybrid"):
            if (mid, mode) in cells:
                row = dict(m, mode=mode, eval=eval_name)
                for key in METRIC_KEYS:
                    row[key] = paired_interval([term(mid, mode, key, 1.0), term(mid, BASE, key, -1.0)])
                families["vs_base"].append(row)
    for rows in families.values():
        found = [(r[k], k) for r in rows for k in METRIC_KEYS]
        for (ci, _), p in zip(found, holm([ci["p"] for ci, _ in found]) if found else []):
            ci["p_holm"] = p
    return families


def _trends(full: List[dict], gain_terms, position_terms, eval_name: str) -> List[dict]:
    """Largest minus smallest model of each family, of the gain (each size against its own better
    mode) and of the position: the size x mode interaction."""
    rows, by_family = [], {}
    for m in full:
        by_family.setdefault(m["family"], []).append(m)
    for fam, members in by_family.items():
        if len(members) < 2:
            continue
        small, large = members[0], members[-1]
        for what, build in (("gain", gain_terms), ("position", position_terms)):
            row = {"family": fam, "what": what, "small": small["label"], "large": large["label"], "eval": eval_name}
            for key in METRIC_KEYS:
                t_large, t_small = build(large["model_id"], key), build(small["model_id"], key)
                if what == "gain":  # (vs, terms): the terms
                    t_large, t_small = t_large[1], t_small[1]
                row[key] = paired_interval(list(t_large) + [(-c, o, b) for c, o, b in t_small])
            rows.append(row)
    return rows


def fmt_p(p: Optional[float]) -> str:
    if p is None or not np.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
