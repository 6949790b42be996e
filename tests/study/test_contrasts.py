"""Paired contrasts, p-values and Holm's adjustment (hybridfast.study.contrasts)."""
import numpy as np
import pytest

from hybridfast.study.contrasts import analyse, holm, paired_interval
from hybridfast.study.config import METRIC_KEYS


def _cell(values, n=400, noise=0.01, seed=0):
    """(per-seed values [S], question-bootstrap replicates [S, n]) around them."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, float)
    return v, v[:, None] + rng.normal(0.0, noise, size=(len(v), n))


def test_pairing_removes_shared_seed_noise():
    """Seeds that move both cells together: the paired interval sees only the difference's spread."""
    seed_effect = np.array([0.00, 0.05, -0.04, 0.03, -0.02])
    a = _cell(0.50 + seed_effect + np.array([0.011, 0.009, 0.010, 0.012, 0.008]), noise=0.001, seed=1)
    b = _cell(0.50 + seed_effect, noise=0.001, seed=2)
    c = paired_interval([(1.0, *a), (-1.0, *b)])
    assert c["estimate"] == pytest.approx(0.010)
    assert c["excludes_zero"] and c["ci_low"] > 0.005 and c["p"] < 0.01
    assert c["se_seeds"] == pytest.approx(np.std([0.011, 0.009, 0.010, 0.012, 0.008], ddof=1) / np.sqrt(5))


def test_p_value_matches_the_interval_and_negative_controls():
    rng = np.random.default_rng(0)
    for trial in range(20):
        shift = rng.uniform(-0.02, 0.02)
        a = _cell(rng.normal(0.5, 0.01, 5) + shift, seed=trial)
        b = _cell(rng.normal(0.5, 0.01, 5), seed=100 + trial)
        c = paired_interval([(1.0, *a), (-1.0, *b)])
        assert (c["p"] < 0.05) == c["excludes_zero"], c
    # a cell against itself: estimate 0, nothing to find
    same = _cell([0.4, 0.5, 0.45, 0.42, 0.47])
    c = paired_interval([(1.0, *same), (-1.0, *same)])
    assert c["estimate"] == 0.0 and c["p"] == 1.0 and not c["excludes_zero"]


def test_untouched_model_is_broadcast_over_seeds():
    base = _cell([0.40], noise=0.002)
    tuned = _cell([0.45, 0.46, 0.44, 0.45, 0.47], noise=0.002, seed=3)
    c = paired_interval([(1.0, *tuned), (-1.0, *base)])
    assert c["estimate"] == pytest.approx(0.054) and c["n_seeds"] == 5 and c["excludes_zero"]
    with pytest.raises(ValueError, match="seed counts"):
        paired_interval([(1.0, *tuned), (-1.0, *_cell([0.4, 0.4]))])


def test_holm_against_a_worked_example():
    # p sorted 0.01, 0.02, 0.03, 0.5 with m = 4: 0.04, 0.06, 0.06 (monotone), 0.5
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_analyse_families_signs_and_holm():
    """Hybrid built 0.02 above cross (the better mode) at the large model, level with it at the
    small one: the gain, its size trend and the fine-tune-vs-base rows come out with the right signs."""
    models = [{"model_id": f"m{i}", "label": f"m@L{k}", "family": "m", "layers": k, "params_non_embedding": k,
               "params_total": k, "model": f"m@L{k}"} for i, k in enumerate((3, 12))]
    level = {("m0", "mono"): 0.40, ("m0", "cross"): 0.45, ("m0", "hybrid"): 0.45, ("m0", "base"): 0.30,
             ("m1", "mono"): 0.50, ("m1", "cross"): 0.55, ("m1", "hybrid"): 0.57, ("m1", "base"): 0.35}
    jitter = np.random.default_rng(0).normal(0, 0.002, 5)
    cells = {k: k for k in level}

    def arrays(cell, key):
        v = np.array([level[cell]]) if cell[1] == "base" else level[cell] + jitter
        if key == "rank_distance":  # lower is better: mirror the mAPs
            v = 100 - 100 * v
        return _cell(v, noise=0.001, seed=hash(cell) % 1000)

    fam = analyse(cells, arrays, models, "x")
    assert [len(fam[k]) for k in ("gain", "position", "trend", "vs_base")] == [2, 2, 2, 6]
    large = fam["gain"][1]
    assert large["multi_map"]["vs"] == "cross" and large["multi_map"]["estimate"] == pytest.approx(0.02, abs=1e-3)
    assert large["rank_distance"]["vs"] == "cross" and large["rank_distance"]["estimate"] == pytest.approx(2.0, abs=0.1)
    assert fam["gain"][0]["multi_map"]["estimate"] == pytest.approx(0.0, abs=1e-3)
    trend = next(r for r in fam["trend"] if r["what"] == "gain")
    assert trend["multi_map"]["estimate"] == pytest.approx(0.02, abs=1e-3) and trend["multi_map"]["excludes_zero"]
    assert all(r["multi_map"]["estimate"] > 0 for r in fam["vs_base"])
    for rows in fam.values():
        ps = [r[k]["p"] for r in rows for k in METRIC_KEYS]
        adj = [r[k]["p_holm"] for r in rows for k in METRIC_KEYS]
        assert adj == pytest.approx(holm(ps)) and all(q >= p for p, q in zip(ps, adj))
