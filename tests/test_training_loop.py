"""Trainer tests on CPU with a tiny BERT built here from a config (no download).

Covered: the loss falls on a toy parallel set; GradCache == no chunking (dropout on);
2-process gloo DDP == one process with the doubled batch; kill-and-resume (also a
kill during a save) == uninterrupted, exactly; output layout; bad configs fail
before training with clear messages; the CLI.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridfast import trainer
from hybridfast.trainer import TrainConfig, gradcache_step, plain_step, train

LANGS = ("en", "de", "fr")
N_WORDS = 40


def _word(lang, i):
    return f"{lang}{i}"


def make_tiny_model(folder: Path, dropout=0.1, seed=0):
    """A 2-layer, hidden-32 BERT with a WordPiece vocabulary covering the toy data."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", "passage", ":", "about", "the"]
    vocab += [_word(l, i) for l in LANGS + ("x",) for i in range(N_WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))  # transformers >= 5
    if len(tokenizer) != len(vocab):  # transformers 4 names the argument vocab_file
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert tokenizer.tokenize("query: en1 de2") == ["query", ":", "en1", "de2"]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_toy_jsonl(path: Path, n_examples=24, seed=0, negatives=False):
    """Example i: a query of 2 words and a positive of those 2 words plus 2 others,
    in three 'languages' whose words are disjoint (a translation maps word i of en to
    word i of de), plus one language-neutral name token x<i> shared by query and positive
    (as names are in real parallel data), so a few steps can learn to match."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_examples):
        key = rng.sample(range(N_WORDS), 2)
        extra = rng.sample(range(N_WORDS), 2)
        for lang in LANGS:
            name = _word("x", i % N_WORDS)
            row = {"id": f"ex{i}", "lang": lang,
                   "query": " ".join([_word(lang, w) for w in key] + [name]),
                   "positive": "about " + " ".join([_word(lang, w) for w in key + extra] + [name])}
            if negatives:
                row["negatives"] = [" ".join(_word(lang, w) for w in rng.sample(range(N_WORDS), 4))
                                    for _ in range(3)]
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {"model": make_tiny_model(root / "model"),
            "model_nodrop": make_tiny_model(root / "model_nodrop", dropout=0.0),
            "data": make_toy_jsonl(root / "train.jsonl"),
            "data_neg": make_toy_jsonl(root / "train_neg.jsonl", negatives=True)}


def base_config(toy, out, **kw):
    defaults = dict(model=str(toy["model"]), train=str(toy["data"]), batch_size=8, max_steps=6, lr=1e-3,
                    warmup_ratio=0.0, max_length=16, device="cpu", log_steps=1, output=str(out),
                    show_progress=False, seed=3)
    defaults.update(kw)
    return TrainConfig(**defaults)


def load_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def read_log(out):
    return [json.loads(l) for l in (Path(out) / "train_log.jsonl").read_text().splitlines() if l.strip()]


# ----------------------------------------------------------------------------- training works

def test_loss_falls_and_outputs(toy, tmp_path):
    out = tmp_path / "run"
    final = train(base_config(toy, out, max_steps=30, save_steps=10, log_steps=5, temperature=0.1))
    assert final == out / "final"
    log = read_log(out)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    for r in log:
        assert {"step", "epoch", "loss", "lr", "kind", "examples_per_s"} <= set(r)
        assert r["kind"] in ("mono", "cross") and r["examples_per_s"] > 0
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], [r["loss"] for r in log]
    # the newest two checkpoints are kept, each complete; no temporary folders remain
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-10", "checkpoint-20"]
    assert not list(out.glob(".tmp-*"))
    for name in ("optimizer.pt", "scheduler.pt", "rank0.pt", "trainer_state.json", "model.safetensors"):
        assert (out / "checkpoint-20" / name).exists(), name
    assert json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["step"] == 20
    # final/ loads with the Encoder and with sentence-transformers, giving the same embeddings
    from hybridfast.encoder import Encoder

    enc = Encoder(str(final), device="cpu", show_progress=False)
    texts = ["en1 en2", "de3 de4"]
    ours = enc.encode_queries(texts)
    assert ours.shape == (2, 32)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(final), device="cpu")
    theirs = st.encode([enc.query_prefix + t for t in texts], convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs.float().cpu(), atol=1e-5, rtol=1e-4)


def test_mono_and_cross_modes_and_hard_negatives(toy, tmp_path):
    log_kinds = {}
    for mode in ("mono", "cross"):
        out = tmp_path / mode
        train(base_config(toy, out, mode=mode, max_steps=3, train=str(toy["data_neg"]), hard_negatives=2))
        log_kinds[mode] = {r["kind"] for r in read_log(out)}
    assert log_kinds == {"mono": {"mono"}, "cross": {"cross"}}


def test_tensorboard_when_installed(toy, tmp_path, monkeypatch):
    """With tensorboard importable, every logged number also goes to a SummaryWriter."""
    import types

    calls = []

    class FakeWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    out = tmp_path / "tb"
    train(base_config(toy, out, max_steps=2))
    assert calls[0] == ("init", str(out / "tensorboard")) and calls[-1] == ("close",)
    logged = {(tag, step) for tag, *rest in calls[1:-1] for step in rest[1:]}
    assert {("train/loss", 1), ("train/loss", 2), ("train/lr", 2), ("train/examples_per_s", 1)} <= logged


def test_collator_layout_and_groups(toy, tmp_path):
    from hybridfast.train_data import load_training_pairs

    pairs = load_training_pairs(toy["data_neg"])

    class NoTokenizer:
        pass

    coll = trainer.Collator(pairs, NoTokenizer(), hard_negatives=2, seed=0)
    batch = [(0, 0, 1), (5, 2, 2), (7, 1, 0)]
    queries, passages, qg, pg = coll.texts(batch, step=4)
    assert queries == [pairs.query(e, x) for e, x, _ in batch]
    assert passages[:3] == [pairs.positive(e, y) for e, _, y in batch]
    assert len(passages) == 3 * 3
    for j in range(2):  # negatives block j holds negative j of every query, in the passage language
        for i, (e, _, y) in enumerate(batch):
            assert passages[3 + 3 * j + i] in pairs.negatives(e, y)
    assert qg == [0, 5, 7] and pg[:3] == qg and all(g == -1 for g in pg[3:])
    # deterministic given (seed, step), different across steps
    assert coll.texts(batch, step=4) == (queries, passages, qg, pg)


def test_lareqa_training_with_periodic_evaluation(toy, tmp_path):
    from test_train_data import write_lareqa

    data = write_lareqa(tmp_path / "toy-lareqa")
    out = tmp_path / "eval"
    train(base_config(toy, out, train=str(data), split="all", batch_size=2, max_steps=3, save_steps=1,
                      log_steps=2, eval=str(data), eval_split="all", hard_negatives=1))
    log = read_log(out)
    evals = [r for r in log if "eval/mono/map" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]  # at each save and after the final step
    for r in evals:
        for key in ("eval/mono/map", "eval/cross/mrr@10", "eval/multi/rank_distance"):
            assert np.isfinite(r[key]), key
        assert 0 < r["eval/mono/map"] <= 1
    assert [r["step"] for r in log if "loss" in r] == [2, 3]
    assert json.loads((out / "final_eval.json").read_text())


def test_epochs_gradient_checkpointing_and_bf16(toy, tmp_path):
    from hybridfast.sampler import HybridBatchSampler
    from hybridfast.train_data import load_training_pairs

    cfg = base_config(toy, tmp_path / "a", max_steps=None, epochs=2, lang_weights="size")
    a = load_weights(train(cfg))
    pairs = load_training_pairs(toy["data"])
    sampler = HybridBatchSampler(pairs.availability, 8, seed=3, lang_weights="size")
    expected = len(sampler)
    sampler.set_epoch(1)
    expected += len(sampler)
    log = read_log(tmp_path / "a")
    assert [r["step"] for r in log] == list(range(1, expected + 1))
    assert log[-1]["epoch"] == 2.0
    # recomputing activations (same dropout masks: the checkpoint keeps the RNG state) changes nothing
    b = load_weights(train(replace(cfg, output=str(tmp_path / "b"), gradient_checkpointing=True)))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    # bf16 autocast trains (on CPU too) and lands near the fp32 weights
    c = load_weights(train(replace(cfg, output=str(tmp_path / "c"), bf16=True)))
    assert all(torch.isfinite(t).all() for t in c.values())
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ----------------------------------------------------------------------------- GradCache

def _grads(encoder):
    return {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _chunked_reference_step(encoder, loss_fn, q_in, p_in, qg, pg, chunk):
    """Embed chunk by chunk WITH a graph (the same chunks, hence dropout masks, as GradCache's
    first pass), then an ordinary backward through everything."""
    qs = [encoder(**c) for c in trainer._chunks(q_in, chunk, trim=True)]
    ps = [encoder(**c) for c in trainer._chunks(p_in, chunk, trim=True)]
    loss = loss_fn(torch.cat(qs), torch.cat(ps), query_groups=qg, passage_groups=pg)
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_gradcache_equals_full_batch_with_dropout(toy, chunk):
    from hybridfast.encoder import Encoder
    from hybridfast.loss import HybridContrastiveLoss
    from hybridfast.train_data import load_training_pairs

    pairs = load_training_pairs(toy["data_neg"])
    enc = Encoder(str(toy["model"]), device="cpu", max_length=16, show_progress=False)
    enc.train()  # dropout on
    coll = trainer.Collator(pairs, enc, hard_negatives=1, seed=0)
    batch = [(e, e % 3, (e + 1) % 3) for e in range(11)]
    q_in, p_in, qg, pg = coll(batch, step=0)
    loss_fn = HybridContrastiveLoss(temperature=0.05)

    torch.manual_seed(123)
    if chunk >= 22:  # one chunk: the plain step consumes the RNG the same way
        ref_loss = plain_step(enc, loss_fn, q_in, p_in, qg, pg)
    else:
        ref_loss = _chunked_reference_step(enc, loss_fn, q_in, p_in, qg, pg, chunk)
    ref = _grads(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    gc_loss = gradcache_step(enc, loss_fn, q_in, p_in, qg, pg, chunk)
    after = torch.rand(1)
    got = _grads(enc)
    assert float(gc_loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)
    # the RNG continues where the first pass left it (the replay does not advance it)
    torch.manual_seed(123)
    with torch.no_grad():
        for c in list(trainer._chunks(q_in, chunk, True)) + list(trainer._chunks(p_in, chunk, True)):
            enc(**c)
    assert torch.equal(after, torch.rand(1))


def test_gradcache_without_dropout_matches_plain_for_any_chunking(toy):
    from hybridfast.encoder import Encoder
    from hybridfast.loss import HybridContrastiveLoss
    from hybridfast.train_data import load_training_pairs

    pairs = load_training_pairs(toy["data"])
    enc = Encoder(str(toy["model_nodrop"]), device="cpu", max_length=16, show_progress=False)
    coll = trainer.Collator(pairs, enc)
    batch = [(e, 0, 1) for e in range(9)]
    q_in, p_in, qg, pg = coll(batch, step=0)
    loss_fn = HybridContrastiveLoss(temperature=0.05)
    plain_step(enc, loss_fn, q_in, p_in, qg, pg)
    ref = _grads(enc)
    enc.zero_grad(set_to_none=True)
    gradcache_step(enc, loss_fn, q_in, p_in, qg, pg, chunk_size=4)
    got = _grads(enc)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_training_with_chunking_matches_without(toy, tmp_path):
    cfg = base_config(toy, tmp_path / "a", model=str(toy["model_nodrop"]), max_steps=3, batch_size=6)
    a = load_weights(train(cfg))
    b = load_weights(train(replace(cfg, output=str(tmp_path / "b"), chunk_size=4)))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- resume

class Killed(RuntimeError):
    pass


def test_kill_and_resume_equals_uninterrupted(toy, tmp_path, monkeypatch):
    cfg = base_config(toy, tmp_path / "full", max_steps=9, save_steps=2, batch_size=6,
                      train=str(toy["data_neg"]), hard_negatives=1)
    full = load_weights(train(cfg))

    # 1) killed after step 5 (checkpoint-4 is the newest complete one)
    out = tmp_path / "killed"
    original = trainer._after_step

    def kill_at_5(step):
        if step == 5:
            raise Killed()

    monkeypatch.setattr(trainer, "_after_step", kill_at_5)
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out)))
    assert [p.name for p in trainer.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    # 2) resumed, then killed in the middle of writing checkpoint-6 (a temp folder is left)
    real_write = trainer._write_checkpoint

    def crash_while_writing(tmp, encoder, *args, **kw):
        encoder.save_pretrained(tmp)  # part of the files, no state file
        raise Killed()

    monkeypatch.setattr(trainer, "_after_step", original)
    monkeypatch.setattr(trainer, "_write_checkpoint", crash_while_writing)
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out), resume=True))
    assert (out / ".tmp-checkpoint-6").exists()
    assert trainer.list_checkpoints(out)[-1].name == "checkpoint-4"

    # 3) resumed to the end
    monkeypatch.setattr(trainer, "_write_checkpoint", real_write)
    resumed = load_weights(train(replace(cfg, output=str(out), resume=True)))
    assert not list(out.glob(".tmp-*"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=0, rtol=0, msg=name)
    # the log has each step once, as if never interrupted
    assert [r["step"] for r in read_log(out)] == list(range(1, 10))
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "full")]


def test_resume_without_checkpoint_restarts_cleanly(toy, tmp_path, monkeypatch):
    cfg = base_config(toy, tmp_path / "full", max_steps=3)
    full = load_weights(train(cfg))
    out = tmp_path / "killed"

    def kill_at_2(step):
        if step == 2:
            raise Killed()

    monkeypatch.setattr(trainer, "_after_step", kill_at_2)
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out)))
    monkeypatch.undo()
    resumed = load_weights(train(replace(cfg, output=str(out), resume=True)))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_resume_refuses_changed_data_order(toy, tmp_path):
    cfg = base_config(toy, tmp_path / "r", max_steps=2, save_steps=1)
    train(cfg)
    with pytest.raises(ValueError, match="batch_size"):
        train(replace(cfg, batch_size=4, resume=True, max_steps=4))


# ----------------------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process_doubled_batch(toy, tmp_path):
    """torchrun, 2 gloo processes x batch 4 (with GradCache chunks of 3 and negatives gathered
    across processes) == 1 process x batch 8 without chunking, after 3 steps."""
    common = ["--model", str(toy["model_nodrop"]), "--train", str(toy["data_neg"]), "--max-steps", "3",
              "--lr", "1e-3", "--warmup-ratio", "0", "--max-length", "16", "--device", "cpu",
              "--log-steps", "1", "--seed", "5", "--hard-negatives", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "hybridfast", "train", *common, "--batch-size", "4",
         "--gather-across-devices", "--chunk-size", "3", "--output", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = train(base_config(toy, tmp_path / "one", model=str(toy["model_nodrop"]), train=str(toy["data_neg"]),
                               max_steps=3, batch_size=8, seed=5, hard_negatives=1))
    a, b = load_weights(tmp_path / "ddp" / "final"), load_weights(single)
    moved = 0
    base = load_weights(toy["model_nodrop"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(a[name], base[name])
    assert moved > 10
    la, lb = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [r["kind"] for r in la] == [r["kind"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-4)


# ----------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("change, error, message", [
    ({"mode": "bilingual"}, ValueError, "mode must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ({"bf16": True, "fp16": True}, ValueError, "bf16 and fp16 are both set"),
    ({"fp16": True}, ValueError, "fp16 needs a CUDA device"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"mono_prob": 1.5}, ValueError, "mono_prob must be in"),
    ({"temperature": 0.0}, ValueError, "temperature must be in"),
    ({"languages": ["english"]}, ValueError, "'english' is not a language code"),
    ({"languages": ["en", "ja"]}, ValueError, r"\['ja'\] not in"),
    ({"lang_weights": {"ja": 1.0}}, ValueError, "lang_weights: \\['ja'\\] not in the training data"),
    ({"train": "/nonexistent/train.jsonl"}, FileNotFoundError, "not found"),
    ({"model": "/nonexistent/model"}, FileNotFoundError, "model: '/nonexistent/model' does not exist"),
    ({"batch_size": 1000}, ValueError, "not even one batch of 1000"),
    ({"lang_weights": "big"}, TypeError, "lang_weights must be"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, ValueError, "device"),
    ({"mode": "cross", "languages": ["en"]}, ValueError, "needs at least two languages"),
    ({"split": "test"}, ValueError, "split"),
])
def test_bad_configs_fail_before_training(toy, tmp_path, monkeypatch, change, error, message):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for a bad config")

    import hybridfast.encoder

    monkeypatch.setattr(hybridfast.encoder, "Encoder", no_model)
    with pytest.raises(error, match=message):
        train(base_config(toy, tmp_path / "bad", **change))
    assert not (tmp_path / "bad" / "train_log.jsonl").exists()


def test_existing_output_needs_resume(toy, tmp_path):
    cfg = base_config(toy, tmp_path / "o", max_steps=1)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(cfg)


def test_cli(toy, tmp_path, capsys):
    from hybridfast.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--model", str(toy["model"]), "--train", str(toy["data"]), "--batch-size", "4",
               "--max-steps", "2", "--languages", "en,de", "--lang-weights", "en=2,de=1", "--mode", "hybrid",
               "--mono-prob", "0.5", "--query-prefix", "", "--device", "cpu", "--output", str(out),
               "--no-progress", "--log-steps", "1"])
    assert rc == 0
    assert (out / "final" / "model.safetensors").exists()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["languages"] == ["en", "de"] and saved["lang_weights"] == {"en": 2.0, "de": 1.0}
    assert saved["query_prefix"] == ""
    rc = main(["train", "--model", str(toy["model"]), "--train", str(toy["data"]), "--mode", "hybrid",
               "--chunk-size", "0", "--output", str(tmp_path / "x")])
    assert rc == 2 and "chunk_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--train", str(toy["data"]), "--bf16", "--fp16"])
