"""The training loop on CPU with a tiny BERT (tests/helpers.py; no download).

Covered: the loss falls on a toy parallel set; output layout; epochs, gradient
checkpointing, bf16; 2-process gloo DDP == one process with the doubled batch;
kill-and-resume (also a kill during a save) == uninterrupted, exactly; bad configs
fail before training with clear messages; the CLI. GradCache and the collator:
test_training_steps.py; the output-folder and resume safety rules: test_training_safety.py.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Killed, free_port, kill_at, load_weights, read_log, toy_config as base_config, write_lareqa
from hybridfast.training import legacy as trainer
from hybridfast.training import TrainConfig, list_checkpoints, train
from hybridfast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    for name in ("optimizer.pt", "scheduler.pt", "rank0.pt", "trainer_state.json", "model.safetensors",
                 "manifest.json"):
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


def test_lareqa_training_with_periodic_evaluation(toy, tmp_path):
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
    from hybridfast.data.pairs import load_training_pairs

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


def test_training_with_chunking_matches_without(toy, tmp_path):
    cfg = base_config(toy, tmp_path / "a", model=str(toy["model_nodrop"]), max_steps=3, batch_size=6)
    a = load_weights(train(cfg))
    b = load_weights(train(replace(cfg, output=str(tmp_path / "b"), chunk_size=4)))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- resume

def test_kill_and_resume_equals_uninterrupted(toy, tmp_path, monkeypatch):
    cfg = base_config(toy, tmp_path / "full", max_steps=9, save_steps=2, batch_size=6,
                      train=str(toy["data_neg"]), hard_negatives=1)
    full = load_weights(train(cfg))

    # 1) killed after step 5 (checkpoint-4 is the newest complete one)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out)), on_step=kill_at(5))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".hybridfast.lock").exists()  # the lock goes with the run

    # 2) resumed, then killed in the middle of writing checkpoint-6 (a temp folder is left)
    def crash_before_manifest(folder):
        raise Killed()

    monkeypatch.setattr(ckpt, "write_manifest", crash_before_manifest)
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out), resume=True))
    assert (out / ".tmp-checkpoint-6").exists()
    assert list_checkpoints(out)[-1].name == "checkpoint-4"

    # 3) resumed to the end
    monkeypatch.undo()
    resumed = load_weights(train(replace(cfg, output=str(out), resume=True)))
    assert not list(out.glob(".tmp-*"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=0, rtol=0, msg=name)
    # the log has each step once, as if never interrupted
    assert [r["step"] for r in read_log(out)] == list(range(1, 10))
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "full")]


def test_old_import_path_and_after_step_hook(toy, tmp_path, monkeypatch):
    """The old trainer module (hybridfast.trainer) keeps working for older callers: its train calls _after_step."""
    seen = []
    monkeypatch.setattr(trainer, "_after_step", seen.append)
    assert trainer.TrainConfig is TrainConfig
    trainer.train(base_config(toy, tmp_path / "old", max_steps=2))
    assert seen == [1, 2]


def test_resume_refuses_changed_data_order(toy, tmp_path):
    cfg = base_config(toy, tmp_path / "r", max_steps=2, save_steps=1)
    train(cfg)
    with pytest.raises(ValueError, match="batch_size: 8 -> 4"):
        train(replace(cfg, batch_size=4, resume=True, max_steps=4))


# ----------------------------------------------------------------------------- DDP

@pytest.mark.parametrize("chunk", ["3", None])
def test_two_process_ddp_equals_one_process_doubled_batch(toy, tmp_path, chunk):
    """torchrun, 2 gloo processes x batch 4 (DistributedDataParallel; with GradCache chunks of 3 or
    the plain step, negatives gathered across processes) == 1 process x batch 8 without chunking,
    after 3 steps."""
    common = ["--model", str(toy["model_nodrop"]), "--train", str(toy["data_neg"]), "--max-steps", "3",
              "--lr", "1e-3", "--warmup-ratio", "0", "--max-length", "16", "--device", "cpu",
              "--log-steps", "1", "--seed", "5", "--hard-negatives", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "hybridfast", "train", *common, "--batch-size", "4",
         "--gather-across-devices", *(["--chunk-size", chunk] if chunk else []), "--output", str(tmp_path / "ddp")],
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
    ({"lang_weights": "big"}, ValueError, "lang_weights must be"),
    ({"lang_weights": "size^2"}, ValueError, "TAU must be in \\[0, 1\\]"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, ValueError, "device"),
    ({"mode": "cross", "languages": ["en"]}, ValueError, "needs at least two languages"),
    ({"split": "test"}, ValueError, "split"),
    ({"eval": "LAREQA", "eval_split": "dev"}, ValueError, "split"),  # LAReQA has no dev split (BEIR may)
    ({"eval_split": ""}, ValueError, "eval_split must be a split name"),
    ({"bf16": 1}, TypeError, "bf16 must be True or False"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"resume": True, "overwrite": True}, ValueError, "resume and overwrite are both set"),
])
def test_bad_configs_fail_before_training(toy, tmp_path, monkeypatch, change, error, message):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for a bad config")

    import hybridfast.encoder

    monkeypatch.setattr(hybridfast.encoder, "Encoder", no_model)
    if change.get("eval") == "LAREQA":
        from helpers import write_lareqa

        change = dict(change, eval=str(write_lareqa(tmp_path / "lareqa")))
    with pytest.raises(error, match=message):
        train(base_config(toy, tmp_path / "bad", **change))
    assert not (tmp_path / "bad" / "train_log.jsonl").exists()


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


def test_cli_smoothed_language_weights_reach_the_sampler(toy, tmp_path, monkeypatch):
    # --lang-weights size^0.3 passes the config's check and arrives at the sampler as written
    from hybridfast.cli import main
    from hybridfast.training import loop

    seen = []
    real = loop.HybridBatchSampler

    def recording(*args, **kwargs):
        seen.append(kwargs["lang_weights"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "HybridBatchSampler", recording)
    out = tmp_path / "smooth"
    rc = main(["train", "--model", str(toy["model"]), "--train", str(toy["data"]), "--batch-size", "4",
               "--max-steps", "1", "--lang-weights", "size^0.3", "--device", "cpu", "--output", str(out),
               "--no-progress"])
    assert rc == 0 and seen and seen[0] == "size^0.3"
    assert json.loads((out / "train_config.json").read_text())["lang_weights"] == "size^0.3"


def test_optimizer_is_fused_adamw_where_available(toy, monkeypatch):
    from types import SimpleNamespace

    from hybridfast.encoder import Encoder
    from hybridfast.training.loop import make_optimizer

    enc = Encoder(toy["model"], device="cpu", show_progress=False)
    config = SimpleNamespace(lr=3e-5, weight_decay=0.01)
    opt = make_optimizer(enc, config)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]

    real = torch.optim.AdamW

    def no_fused_kernel(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    fallback = make_optimizer(enc, config)
    assert not fallback.defaults.get("fused") and fallback.defaults["lr"] == 3e-5


@pytest.mark.parametrize("show", [True, False])
def test_progress_in_a_log_is_one_line_per_log_row(toy, tmp_path, capsys, show):
    """Issue 21: off a terminal (stderr captured, as in a log file) training prints plain lines with
    the rate and an ETA at every log row instead of a bar's carriage returns; --no-progress: none."""
    train(base_config(toy, tmp_path / "p", max_steps=4, log_steps=2, show_progress=show))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("train: step")]
    if not show:
        assert lines == []
        return
    assert [l.split(",")[0] for l in lines] == ["train: step 2/4 (50%)", "train: step 4/4 (100%)"]
    assert all(" steps/s, loss " in l and ", ETA " in l for l in lines)
    assert lines[-1].endswith("ETA 0:00") and "\r" not in err
