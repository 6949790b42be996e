"""hybridfast.demo: a tiny-budget demo end to end (tiny random BERT, synthetic
LAReQA data, CPU), the budget presets, the verdict and the missing-data message."""
import json
import math
from pathlib import Path

import pytest

from hybridfast import demo
from hybridfast.demo import choose_budget, format_table, run_demo, subset_articles, verdict
from test_study import LANGS, write_synthetic_lareqa, write_tiny_bert


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = write_synthetic_lareqa(root / "data" / "synthetic")
    model = write_tiny_bert(root / "model")
    lines = []
    result = run_demo(out=root / "out", data=str(data), model=str(model), steps=2, batch_size=4, max_length=16,
                      languages=list(LANGS), device="cpu", show_progress=False, n_bootstrap=200,
                      log=lambda *a: lines.append(" ".join(map(str, a))))
    return root / "out", result, "\n".join(lines)


def test_demo_runs_all_four_and_writes_files(tiny_demo):
    out, result, printed = tiny_demo
    assert list(result["runs"]) == ["base", "mono", "cross", "hybrid"]
    for name in ("results.json", "results.md", "demo_map.png", "demo_rank_distance.png"):
        assert (out / name).exists(), name
    for png in ("demo_map.png", "demo_rank_distance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["budget"]["steps"] == 2 and saved["budget"]["batch_size"] == 4
    assert saved["languages"] == list(LANGS)
    assert [r["run"] for r in saved["table"]] == ["base", "mono", "cross", "hybrid"]
    # only the fine-tunes were trained, with the same budget
    assert saved["runs"]["base"]["train_seconds"] is None
    assert all(saved["runs"][m]["train_seconds"] > 0 for m in ("mono", "cross", "hybrid"))


def test_demo_states_budget_and_verdict(tiny_demo):
    out, result, printed = tiny_demo
    assert "2 steps x batch 4" in printed and "de, en, es" in printed and "device: CPU" in printed
    assert result["verdict"] and result["verdict"] in printed
    md = (out / "results.md").read_text()
    assert "2 steps x batch 4" in md and "| run | mono mAP |" in md
    # one bootstrap per mode vs base and per pair of modes, each interval around its difference
    assert len(result["comparisons"]) == 6
    for c in result["comparisons"]:
        assert c["ci_low"] - 1e-12 <= c["diff"] <= c["ci_high"] + 1e-12
    # the verdict claims a mode difference only when a bootstrap says so
    mode_sig = [c for c in result["comparisons"] if c["b"] != "base" and c["significant"]]
    assert ("do NOT differ" in result["verdict"]) == (not mode_sig)


def test_table_marks_the_best_value(tiny_demo):
    out, result, printed = tiny_demo
    md = (out / "results.md").read_text()
    rows = result["table"]
    for key, lower in (("multi_map", False), ("multi_rank_distance", True)):
        vals = [r[key] for r in rows]
        best = min(vals) if lower else max(vals)
        text = f"{best:.2f}" if lower else f"{best:.4f}"
        assert f"**{text}**" in md
        assert f"{text}*" in printed


def test_rerun_reuses_finished_runs(tiny_demo, monkeypatch):
    import hybridfast.trainer as trainer

    out, result, _ = tiny_demo
    monkeypatch.setattr(trainer, "train", lambda cfg: pytest.fail("retrained a finished run"))
    again = run_demo(out=out, data=result["data"], model=result["model"], steps=2, batch_size=4, max_length=16,
                     languages=list(LANGS), device="cpu", show_progress=False, n_bootstrap=200, log=lambda *a: None)
    assert again["table"] == result["table"]


def test_budgets():
    cpu, quick = choose_budget("cpu", False), choose_budget("cpu", True)
    gpu = choose_budget("cuda", False)
    assert quick.steps < cpu.steps < gpu.steps
    assert quick.max_length <= cpu.max_length <= gpu.max_length
    assert gpu.languages is None and len(quick.languages) >= 2
    custom = choose_budget("cpu", True, steps=5, languages="en,de")
    assert custom.steps == 5 and custom.languages == ("de", "en") and "modified" in custom.name
    with pytest.raises(ValueError, match="steps"):
        choose_budget("cpu", False, steps=0)
    with pytest.raises(ValueError, match="languages"):
        choose_budget("cpu", False, languages=["en"])


def test_subset_articles(tmp_path):
    from hybridfast.data import load_benchmark

    bench = load_benchmark(write_synthetic_lareqa(tmp_path / "d"), split="test")
    sub = subset_articles(bench, 2)
    arts = {c.split(":")[1] for cands in sub.candidates.values() for c in cands}
    assert len(arts) == 2
    for lang, qs in sub.queries.items():
        for q in qs:
            assert sub.qrels[q] and all(c.split(":")[1] in arts for c in sub.qrels[q])
    assert 0 < sum(map(len, sub.queries.values())) < sum(map(len, bench.queries.values()))


def _cmp(a, b, diff, lo, hi):
    return {"a": a, "b": b, "diff": diff, "ci_low": lo, "ci_high": hi, "significant": lo > 0 or hi < 0}


def test_verdict_is_honest():
    budget = choose_budget("cpu", True)
    noise = [_cmp("hybrid", "mono", 0.01, -0.01, 0.03), _cmp("hybrid", "cross", 0.02, -0.005, 0.04),
             _cmp("mono", "cross", 0.01, -0.02, 0.03)]
    text = verdict(noise, budget)
    assert "do NOT differ" in text and "no finding" in text and "beat" not in text
    clear = [_cmp("hybrid", "mono", 0.05, 0.02, 0.08), _cmp("hybrid", "cross", 0.04, 0.01, 0.07),
             _cmp("mono", "cross", -0.01, -0.03, 0.01)]
    text = verdict(clear, budget)
    assert "beat both" in text and "Within noise: mono - cross" in text


def test_format_table_text_and_markdown():
    rows = [{"run": r, "mono_map": v, "cross_map": v, "multi_map": v, "multi_recall@1": v,
             "multi_rank_distance": 10 * v} for r, v in (("base", 0.1), ("hybrid", 0.2))]
    text = format_table(rows)
    assert "0.2000*" in text and "1.00*" in text and "0.1000*" not in text
    md = format_table(rows, markdown=True)
    assert "**0.2000**" in md and "**1.00**" in md


def test_missing_data_points_to_download(tmp_path, monkeypatch, capsys):
    from hybridfast.cli import main

    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    rc = main(["demo", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert "hybridfast data download xquad-r" in capsys.readouterr().err
