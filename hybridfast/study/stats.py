"""Per-query values and the intervals of the study.

A cell's metric is a macro average: over languages (mono, multi) or language pairs
(cross) of the mean over that group's queries. Per-query values come from
`RetrievalEvaluator(keep_per_query=True)` and are held as {"group|question_id":
value}, group a language ("de") or a pair ("de>en").

Intervals (95%) include both sources of noise:

- test queries: a bootstrap over questions (a question is resampled with all its
  translations, which are correlated). The same resampled question set is applied
  to every cell and seed of a benchmark, because they are all scored on the same
  queries (paired).
- training seeds: the spread between the seeds of a cell.

Method "t" (default): estimate = mean over seeds. Seed part: SE_s^2 = sum over the
cells in the contrast of s^2/S (between-seed variance of the per-seed values, S
seeds), at the t quantile with S-1 degrees of freedom (Welch-Satterthwaite for a
difference of two cells). Question part: SE_q = the standard deviation of the
seed-averaged contrast over the question resamples, at the normal quantile. The
interval is estimate +- sqrt((t SE_s)^2 + (1.96 SE_q)^2): each source at its own
quantile, so that a few seeds widen the seed part only, and adding noise can only
widen the interval. The seed variance measured on a fixed test set also carries
some query noise, so this errs on the wide side.
Method "bootstrap": each replicate resamples questions (shared) and, independently
per cell, its seeds with replacement; percentile interval. With few seeds it
understates seed variance (a resample of 3 seeds has variance 2/3 of the sample's).
With one seed per cell neither can measure seed variance: the interval is the
question bootstrap alone and is marked "seed variance not measured".
"""
import io
from typing import Dict, List, Optional, Sequence

import numpy as np

from hybridfast.study.config import LOWER_IS_BETTER, METRIC_KEYS

METHOD_TEXT = {
    "t": ("95% intervals: mean over training seeds +- sqrt((t * SE_seeds)^2 + (1.96 * SE_questions)^2), "
          "where SE_seeds^2 = s^2/S from the between-seed variance (t quantile with S-1 degrees of freedom, "
          "Welch-Satterthwaite for a difference) and SE_questions is the standard deviation over a "
          "bootstrap of test questions (a question resampled with all its translations, the same resample "
          "for every cell and seed)"),
    "bootstrap": ("95% intervals: percentile bootstrap that resamples test questions (with all their "
                  "translations, shared by every cell) and, independently per cell, the training seeds"),
}


# ---------------------------------------------------------------------------
# per-query values

def per_query_values(result) -> Dict[str, Dict[str, float]]:
    """{metric key: {"group|qid": value}} from an EvaluationResult built with keep_per_query=True."""
    pq = getattr(result, "per_query", None)
    if not pq:
        raise ValueError("the evaluation result holds no per-query values: build the RetrievalEvaluator "
                         "with keep_per_query=True")
    out = {k: {} for k in METRIC_KEYS}
    for key, queries in pq.items():
        x, y = key.split("->", 1)
        if y == "multi":
            for q, vals in queries.items():
                out["multi_map"][f"{x}|{q}"] = vals["map"]
                out["multi_recall@1"][f"{x}|{q}"] = vals["recall@1"]
                out["rank_distance"][f"{x}|{q}"] = vals.get("rank_distance", float("nan"))
        else:
            target, group = ("mono_map", x) if x == y else ("cross_map", f"{x}>{y}")
            for q, vals in queries.items():
                out[target][f"{group}|{q}"] = vals["map"]
    return out


def save_per_query(per_query: Dict[str, Dict[str, float]]) -> bytes:
    """npz bytes: for each metric key, parallel arrays of groups, question ids and values."""
    arrays = {}
    for k, d in per_query.items():
        keys = sorted(d)
        arrays[f"{k}::group"] = np.array([s.split("|", 1)[0] for s in keys], dtype=str)
        arrays[f"{k}::qid"] = np.array([s.split("|", 1)[1] for s in keys], dtype=str)
        arrays[f"{k}::value"] = np.array([d[s] for s in keys], dtype=np.float64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def load_per_query(path) -> Dict[str, Dict[str, float]]:
    with np.load(path, allow_pickle=False) as z:
        keys = sorted({n.rsplit("::", 1)[0] for n in z.files})
        return {k: {f"{g}|{q}": float(v) for g, q, v in zip(z[f"{k}::group"], z[f"{k}::qid"], z[f"{k}::value"])}
                for k in keys}


def macro_map(per_query: Dict[str, float]) -> float:
    """Mean over groups (languages or pairs) of the mean over that group's queries."""
    by: Dict[str, List[float]] = {}
    for key, v in per_query.items():
        if not np.isnan(v):
            by.setdefault(key.split("|", 1)[0], []).append(v)
    return float(np.mean([np.mean(v) for v in by.values()])) if by else float("nan")


# ---------------------------------------------------------------------------
# question bootstrap

def question_weights(qids: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """[n, Q] multinomial resampling counts of the questions (row sums Q)."""
    rng = np.random.default_rng(seed)
    q = len(qids)
    return rng.multinomial(q, np.full(q, 1.0 / q), size=n).astype(np.float64)


def _matrix(per_query: Dict[str, float], qindex: Dict[str, int]):
    groups = sorted({k.split("|", 1)[0] for k in per_query})
    gi = {g: i for i, g in enumerate(groups)}
    v = np.zeros((len(groups), len(qindex)))
    p = np.zeros_like(v)
    for k, val in per_query.items():
        g, q = k.split("|", 1)
        if not np.isnan(val):
            v[gi[g], qindex[q]] = val
            p[gi[g], qindex[q]] = 1.0
    return v, p


def macro_replicates(per_query: Dict[str, float], qindex: Dict[str, int], weights: np.ndarray):
    """(observed macro average, [n] macro averages under the question resamples `weights`)."""
    v, p = _matrix(per_query, qindex)
    num, den = weights @ v.T, weights @ p.T  # [n, G]
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = np.nanmean(num / den, axis=1)
        observed = float(np.nanmean(v.sum(1) / p.sum(1)))
    return observed, boots


def paired_bootstrap(a: Dict[str, float], b: Dict[str, float], n: int = 2000, seed: int = 0) -> dict:
    """Bootstrap over questions of macro(a) - macro(b) on one seed each (both scored on the same queries).

    Returns the observed difference, the 95% percentile interval and the one-sided
    fraction of resamples where a is not better."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("paired_bootstrap: a and b share no queries")
    qids = sorted({k.split("|", 1)[1] for k in keys})
    qindex = {q: i for i, q in enumerate(qids)}
    w = question_weights(qids, n, seed)
    oa, ba = macro_replicates({k: a[k] for k in keys}, qindex, w)
    ob, bb = macro_replicates({k: b[k] for k in keys}, qindex, w)
    boots = ba - bb
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"diff": oa - ob, "ci_low": float(lo), "ci_high": float(hi),
            "p_not_better": float(np.mean(boots <= 0.0)), "n_questions": len(qids),
            "n_bootstrap": n, "significant": bool(lo > 0.0 or hi < 0.0)}


# ---------------------------------------------------------------------------
# intervals over seeds and questions

def contrast_interval(a_obs, a_boots, b_obs=None, b_boots=None, method: str = "t", seed: int = 0) -> dict:
    """95% interval of mean(a) [- mean(b)] over seeds, including question noise.

    a_obs: [S] per-seed observed values of cell a; a_boots: [S, n] their values under the
    shared question resamples (same for b). See the module docstring for the methods.
    """
    from scipy import stats as st

    cells = [(np.asarray(a_obs, float), np.asarray(a_boots, float), 1.0)]
    if b_obs is not None:
        cells.append((np.asarray(b_obs, float), np.asarray(b_boots, float), -1.0))
    estimate = float(sum(sign * obs.mean() for obs, _, sign in cells))
    seeds = [len(obs) for obs, _, _ in cells]
    measured = min(seeds) >= 2
    out = {"estimate": estimate, "n_seeds": seeds, "method": method,
           "seed_variance": "measured" if measured else "not measured"}
    if method == "t" and measured:
        seed_terms = [obs.var(ddof=1) / len(obs) for obs, _, _ in cells]
        q_series = sum(sign * boots.mean(0) for _, boots, sign in cells)
        se_q = float(np.nanstd(q_series, ddof=1))
        se_s = float(np.sqrt(sum(seed_terms)))
        denom = sum(t * t / (len(obs) - 1) for t, (obs, _, _) in zip(seed_terms, cells))
        df = float("inf") if denom == 0 else sum(seed_terms) ** 2 / denom  # Welch-Satterthwaite, seed terms
        t_q = float(st.t.ppf(0.975, df)) if np.isfinite(df) else float(st.norm.ppf(0.975))
        # each source at its own quantile, half-widths added in quadrature
        half = float(np.hypot(t_q * se_s, st.norm.ppf(0.975) * se_q))
        out.update(ci_low=estimate - half, ci_high=estimate + half, se=float(np.hypot(se_s, se_q)), df=df,
                   se_seeds=se_s, se_questions=se_q)
    elif method in ("t", "bootstrap"):
        rng = np.random.default_rng(seed)
        n = cells[0][1].shape[1]
        reps = np.zeros(n)
        for obs, boots, sign in cells:
            s = len(obs)
            if measured and method == "bootstrap":
                idx = rng.integers(0, s, size=(n, s))
                reps += sign * boots[idx, np.arange(n)[:, None]].mean(1)
            else:  # one seed (or "t" without seed variance): the question bootstrap of the seed mean
                reps += sign * boots.mean(0)
        lo, hi = np.nanpercentile(reps, [2.5, 97.5])
        out.update(ci_low=float(lo), ci_high=float(hi))
    else:
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    out["excludes_zero"] = bool(out["ci_low"] > 0 or out["ci_high"] < 0) if b_obs is not None else None
    return out


def better_of(means: Dict[str, float], metric_key: str) -> str:
    """The mode with the better mean (rank distance: lower)."""
    pick = min if metric_key in LOWER_IS_BETTER else max
    return pick(sorted(means), key=lambda m: means[m])
