"""hybridfast.study.demo: tiny-budget demos end to end (tiny random BERT, synthetic LAReQA data, CPU) in both
protocols, through the library and the command line; the budget presets, the default model, the
verdict, download on first use and the offline message."""
import json
import os
import urllib.error
from pathlib import Path

import pytest

from hybridfast.data import downloads as data_module  # where download and _fetch live
from hybridfast.study import demo
from hybridfast import models
from hybridfast.study.demo import choose_budget, format_table, run_demo, verdict
import helpers
from helpers import SYNTHETIC_CONCEPTS as N_CONCEPTS, synthetic_word, tiny_bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LANGS = ("de", "en", "es")



def write_synthetic_lareqa(root: Path, langs=LANGS, n_articles=8, paragraphs=2, sentences=3, questions=2,
                           seed=0) -> Path:
    return helpers.write_synthetic_lareqa(root, langs, n_articles, paragraphs, sentences, questions, seed, tag=seed)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    words = [".", "?", ":", "query", "passage"] + [synthetic_word(l, f"c{i}") for l in LANGS for i in range(N_CONCEPTS)]
    return tiny_bert(tmp_path_factory.mktemp("tiny") / "model", words, hidden=16, layers=1)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("demo")
    folder = write_synthetic_lareqa(root / "data" / "synthetic")
    lines = []
    result = run_demo(out=root / "out", data=str(folder), model=str(tiny_model), steps=2, batch_size=4,
                      max_length=16, languages=list(LANGS), device="cpu", show_progress=False, n_bootstrap=200,
                      log=lambda *a: lines.append(" ".join(map(str, a))))
    result["_paths"] = {"data": str(folder), "model": str(tiny_model)}  # results.json names them, not paths
    return root / "out", result, "\n".join(lines)


def test_demo_runs_all_four_and_writes_files(tiny_demo):
    out, result, printed = tiny_demo
    assert result["protocol"] == "held-out"  # only `data` given: train and test articles of one benchmark
    assert list(result["runs"]) == ["base", "mono", "cross", "hybrid"]
    for name in ("results.json", "results.md", "demo_map.png", "demo_rank_distance.png"):
        assert (out / name).exists(), name
    for png in ("demo_map.png", "demo_rank_distance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["budget"]["steps"] == 2 and saved["budget"]["batch_size"] == 4
    assert saved["languages"] == list(LANGS) and saved["test"]["split"] == "test"
    assert [r["run"] for r in saved["table"]] == ["base", "mono", "cross", "hybrid"]
    # only the fine-tunes were trained, with the same budget
    assert saved["runs"]["base"]["train_seconds"] is None
    assert all(saved["runs"][m]["train_seconds"] > 0 for m in ("mono", "cross", "hybrid"))
    # per-language multi mAP is the evaluator's, per run
    for run in saved["runs"]:
        assert saved["per_language_multi_map"][run] == {l: v["map"] for l, v in
                                                        saved["runs"][run]["per_language"].items()}


def test_demo_states_budget_and_verdict(tiny_demo):
    out, result, printed = tiny_demo
    assert "2 steps x batch 4" in printed and "de, en, es" in printed and "device: CPU" in printed
    assert "held-out" in printed
    # issue 21/22: the precision and the language sampling are stated (the suite pins fp32 on CPUs)
    assert "fp32 training and encoding" in printed and "sampled by their number of examples" in printed
    assert result["precision"] == "fp32" and result["lang_weights"] == "size"
    assert result["verdict"] and result["verdict"] in printed
    md = (out / "results.md").read_text()
    assert "2 steps x batch 4" in md and "| run | mono mAP |" in md and "| run | de | en | es |" in md
    assert len(result["comparisons"]) == 6
    for c in result["comparisons"]:
        assert c["ci_low"] - 1e-12 <= c["diff"] <= c["ci_high"] + 1e-12
    mode_sig = [c for c in result["comparisons"] if c["b"] != "base" and c["significant"]]
    assert ("do NOT differ" in result["verdict"]) == (not mode_sig)
    # one line per phase, each stamped with the elapsed time; no per-cell counters
    phases = [l for l in printed.splitlines() if l.startswith("[")]
    assert phases and all(l[:1] == "[" and l[3] == ":" and l[6] == "]" for l in phases)
    assert not any("cell " in l for l in phases)


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
    import hybridfast.training as trainer

    out, result, _ = tiny_demo
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: pytest.fail("retrained a finished run"))
    assert result["data"] == "synthetic" and not os.path.isabs(result["model"])
    again = run_demo(out=out, data=result["_paths"]["data"], model=result["_paths"]["model"], steps=2, batch_size=4, max_length=16,
                     languages=list(LANGS), device="cpu", show_progress=False, n_bootstrap=200, log=lambda *a: None)
    assert again["table"] == result["table"]


def test_zero_shot_through_the_cli_is_calm(tmp_path, tiny_model, capfd):
    """`--train`/`--eval` data sets: trained on two languages, evaluated on three (one unseen)."""
    from hybridfast.cli import main

    write_synthetic_lareqa(tmp_path / "d" / "mlqa-r", langs=("de", "en"), seed=1)
    write_synthetic_lareqa(tmp_path / "d" / "xquad-r", seed=2)
    rc = main(["demo", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--model", str(tiny_model), "--steps", "2", "--batch-size", "4", "--max-length", "16",
               "--languages", "de,en", "--eval-languages", "de,en,es", "--threads", "1",
               "--allow-modified-data"])  # synthetic stand-ins for the named sets
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "USING MODIFIED DATA" in captured.err  # said loudly, not silently used
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["protocol"] == "zero-shot" and saved["test"]["split"] == "all"
    assert Path(saved["train_data"]).name == "mlqa-r" and Path(saved["data"]).name == "xquad-r"
    assert saved["train_languages"] == ["de", "en"] and saved["unseen_languages"] == ["es"]
    assert "unseen in training: es" in captured.out
    # calm: no progress bars of encoding, training or loading
    for noise in ("encode query texts", "Loading weights", "step/s", "it/s"):
        assert noise not in captured.out + captured.err, noise


def test_default_model_is_multilingual_e5_small(tmp_path, tiny_model, monkeypatch):
    asked = []

    def fake_get(name, layers=None, **kw):
        asked.append((name, layers))
        return tiny_model

    monkeypatch.setattr(models, "get", fake_get)
    folder = write_synthetic_lareqa(tmp_path / "xq")
    result = run_demo(out=tmp_path / "out", data=str(folder), steps=1, batch_size=4, max_length=16,
                      languages=list(LANGS), device="cpu", show_progress=False, n_bootstrap=50,
                      log=lambda *a: None)
    assert asked == [("multilingual-e5-small", None)]
    assert result["model"] == demo.model_label(str(tiny_model))  # a name, not the (cache) path


def test_missing_dataset_is_downloaded_on_first_use(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)  # the test's own data dir is the only place to look
    fetched = []

    def fake_download(name, to=None, show_progress=True):
        fetched.append((name, Path(to) if to else None))
        return write_synthetic_lareqa(Path(to) / name, langs=("de", "en") if name == "mlqa-r" else LANGS,
                                      seed=len(fetched))

    monkeypatch.setattr(data_module, "download", fake_download)
    lines = []
    result = run_demo(out=tmp_path / "out", data_dir=tmp_path / "data", model=str(tiny_model), steps=1,
                      batch_size=4, max_length=16, languages="de,en", eval_languages="de,en,es", device="cpu",
                      show_progress=False, n_bootstrap=50, log=lambda *a: lines.append(" ".join(map(str, a))),
                      allow_modified_data=True)  # the fake download is synthetic, not the pinned files
    assert fetched == [("mlqa-r", tmp_path / "data"), ("xquad-r", tmp_path / "data")]
    assert sum("downloading" in l for l in lines) == 2
    assert result["protocol"] == "zero-shot"


def test_offline_missing_data_points_to_download(tmp_path, tiny_model, monkeypatch, capsys):
    from hybridfast.cli import main

    def offline(url, timeout=60.0):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data_module, "_fetch", offline)
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    rc = main(["demo", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--model", str(tiny_model)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hybridfast data download mlqa-r" in err and "download failed" in err
    assert not any((tmp_path / "empty").iterdir())  # nothing half-downloaded left behind


def test_budgets():
    cpu, quick = choose_budget("cpu", False), choose_budget("cpu", True)
    gpu = choose_budget("cuda", False)
    assert quick.steps < cpu.steps < gpu.steps
    assert quick.max_length <= cpu.max_length <= gpu.max_length
    assert gpu.languages is None and len(quick.languages) >= 2
    for b in (cpu, quick):  # zero-shot over several scripts, with languages unseen in training
        assert b.protocol == "zero-shot"
        assert set(b.eval_languages) - set(b.languages)
        assert {"zh", "th"} & set(b.eval_languages)
    custom = choose_budget("cpu", True, steps=5, languages="en,de")
    assert custom.steps == 5 and custom.languages == ("de", "en") and "modified" in custom.name
    held = choose_budget("cpu", False, protocol="held-out", languages="de,en,es")
    assert held.protocol == "held-out" and held.eval_languages is None
    with pytest.raises(ValueError, match="steps"):
        choose_budget("cpu", False, steps=0)
    with pytest.raises(ValueError, match="languages"):
        choose_budget("cpu", False, languages=["en"])
    with pytest.raises(ValueError, match="protocol"):
        choose_budget("cpu", False, protocol="few-shot")


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
    runs = {"base": {"per_language": {"de": {"map": 0.1}, "en": {"map": 0.4}}},
            "hybrid": {"per_language": {"de": {"map": 0.3}, "en": {"map": 0.2}}}}
    table = demo.per_language_table(runs, ["de", "en"], markdown=True)
    assert "| base | 0.100 | **0.400** |" in table and "| hybrid | **0.300** | 0.200 |" in table


def test_plots_carry_question_bootstrap_error_bars(tiny_demo):
    """Every plotted mAP and rank distance has its 95% question-bootstrap interval (the plots'
    error bars), recorded in results.json; an interval lies around its figure."""
    _, result, _ = tiny_demo
    for mode, run in result["runs"].items():
        iv = run["intervals"]
        for setting in ("mono", "cross", "multi"):
            lo, hi = iv[f"{setting}_map"]
            assert lo <= hi and lo - 1e-9 <= run["summary"][setting]["map"] <= hi + 1e-9, (mode, setting)
        assert iv["rank_distance"][0] <= iv["rank_distance"][1]


def test_named_data_edited_on_disk_is_refused_by_the_demo(tmp_path, tiny_model, capfd):
    """The demo reads named sets by path: it checks their pinned sha256 first (a synthetic
    "mlqa-r" is an edited one), naming the file and the flag that accepts it."""
    from hybridfast.cli import main

    write_synthetic_lareqa(tmp_path / "d" / "mlqa-r", langs=("de", "en"), seed=1)
    write_synthetic_lareqa(tmp_path / "d" / "xquad-r", seed=2)
    rc = main(["demo", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--model", str(tiny_model), "--steps", "2", "--batch-size", "4", "--max-length", "16",
               "--languages", "de,en", "--threads", "1"])
    err = capfd.readouterr().err
    assert rc != 0 and "--allow-modified-data" in err and ".json" in err
    assert not (tmp_path / "out" / "results.json").exists()
