"""Issue 13, training side: nothing a user wrote is lost, nothing silently wrong.

One test (or a few) per numbered item: 1 output folder ownership, 2 model inside the
output, 3 --resume without a checkpoint / of a finished run, 4 the lock, 7 strict
resume, 8 divergence, 11 checkpoint manifests and fallback, 12 a torn log line,
13 clear messages (train side), 14 data rules (train_data; the ST side is in
test_integration_st.py).
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import Killed, kill_at, make_toy_jsonl, read_log, tiny_bert, toy_config, toy_vocabulary
from helpers import load_weights as weights
from hybridfast.training import (CheckpointError, OutputFolderError, TrainingDiverged,
                                 list_checkpoints, run_status, train)
from hybridfast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(toy, out, **kw):
    return toy_config(toy, out, **dict({"max_steps": 3}, **kw))


def tree(folder):
    """{relative path: sha256} of every file: to prove a folder was left untouched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1: the output folder

def test_1_user_files_are_never_replaced(toy, tmp_path):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("my notes")
    (out / ".tmp-mine").mkdir()
    (out / "train_config.json").write_text("{}")
    before = tree(out)
    for overwrite in (False, True):  # a user's final/ is never replaced, not even with --overwrite
        with pytest.raises(OutputFolderError, match=r"holds \['.tmp-mine', 'final', 'train_config.json'\], "
                                                    "which hybridfast did not write"):
            train(config(toy, out, overwrite=overwrite))
    assert tree(out) == before and run_status(out) == "foreign"


def test_1_foreign_files_need_overwrite_which_removes_only_own_files(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match=r"holds files hybridfast did not write \(\['notes.txt'\]\)"):
        train(config(toy, out))
    train(config(toy, out, overwrite=True, save_steps=1))
    assert (out / "final").is_dir() and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputFolderError, match="already holds a training run"):
        train(config(toy, out, overwrite=False))
    # --overwrite starts again: the earlier run's files go (checkpoints too), the user's stay
    (out / "checkpoint-99").mkdir()  # not written by a run: the user's, so refused
    with pytest.raises(OutputFolderError, match=r"\['checkpoint-99'\]"):
        train(config(toy, out, overwrite=True))
    (out / "checkpoint-99").rmdir()
    assert run_status(out) == "finished"
    train(config(toy, out, overwrite=True, max_steps=2))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert not list_checkpoints(out) and (out / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- 2: model inside the output

def test_2_model_inside_output_is_refused(toy, tmp_path):
    out = tmp_path / "run"
    final = train(config(toy, out, max_steps=1))
    before = tree(out)
    for resume, overwrite in ((False, True), (True, False)):
        with pytest.raises(OutputFolderError, match="lies inside the output folder"):
            train(config(toy, out, model=str(final), overwrite=overwrite, resume=resume))
    assert tree(out) == before


# ----------------------------------------------------------------------------- 3: --resume without a checkpoint

def test_3_resume_without_checkpoint_is_an_error_naming_the_folder(toy, tmp_path):
    with pytest.raises(OutputFolderError, match=f"--resume: {tmp_path / 'none'} holds no training run"):
        train(config(toy, tmp_path / "none", resume=True))
    assert not (tmp_path / "none").exists()
    assert run_status(tmp_path / "none") == "empty"
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(toy, out), on_step=kill_at(2))  # no --save-steps: no checkpoint
    assert run_status(out) == "unfinished"
    before = tree(out)
    with pytest.raises(OutputFolderError, match=f"no intact checkpoint in {out}.*--overwrite"):
        train(config(toy, out, resume=True))
    assert tree(out) == before


def test_3_resume_of_a_finished_run_leaves_it_untouched(toy, tmp_path):
    out = tmp_path / "done"
    final = train(config(toy, out, save_steps=1))
    before = tree(out)
    with pytest.warns(UserWarning, match="finished already"):
        assert train(config(toy, out, resume=True)) == final
    assert tree(out) == before
    with pytest.raises(ValueError, match="cannot be extended"):
        train(config(toy, out, resume=True, max_steps=5))
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.01"):
        train(config(toy, out, resume=True, lr=1e-2))
    assert tree(out) == before


# ----------------------------------------------------------------------------- 4: the lock

def test_4_a_live_lock_keeps_a_second_run_out(toy, tmp_path):
    import socket

    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".hybridfast.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(OutputFolderError, match=f"in use by another training run \\(pid {sleeper.pid}"):
            train(config(toy, out))
        assert sorted(os.listdir(out)) == [".hybridfast.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale, taken over with a warning, and removed at the end
    with pytest.warns(UserWarning, match=f"pid {sleeper.pid} .* is gone; taking the lock over"):
        train(config(toy, out))
    assert (out / "final").is_dir() and not (out / ".hybridfast.lock").exists()


def test_4_lock_is_released_when_training_fails(toy, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Killed):
        train(config(toy, out, save_steps=1), on_step=kill_at(2))
    assert not (out / ".hybridfast.lock").exists()


# ----------------------------------------------------------------------------- 7: strict resume

@pytest.mark.parametrize("change, difference", [
    ({"lr": 1e-2}, "lr: 0.001 -> 0.01"),
    ({"temperature": 0.1}, "temperature: 0.05 -> 0.1"),
    ({"max_length": 12}, "max_length: 16 -> 12"),
    ({"bf16": True}, "bf16: False -> True"),
    ({"mode": "mono"}, "mode: 'hybrid' -> 'mono'"),
])
def test_7_resume_refuses_settings_that_change_the_result(toy, tmp_path, change, difference):
    out = tmp_path / "r"
    with pytest.raises(Killed):
        train(config(toy, out, max_steps=4, save_steps=1), on_step=kill_at(2))
    before = tree(out)
    assert run_status(out) == "resumable"
    with pytest.raises(ValueError, match="cannot change on resume") as info:
        train(config(toy, out, max_steps=4, resume=True, **change))
    assert difference in str(info.value)
    assert tree(out) == before


def test_7_resume_refuses_another_model_and_changed_data(toy, tmp_path):
    out = tmp_path / "r"
    data = make_toy_jsonl(tmp_path / "data.jsonl")
    with pytest.raises(Killed):
        train(config(toy, out, train=str(data), max_steps=4, save_steps=1), on_step=kill_at(2))
    other = tiny_bert(tmp_path / "other", toy_vocabulary(), seed=1)
    with pytest.raises(ValueError, match="model: "):
        train(config(toy, out, train=str(data), model=str(other), max_steps=4, resume=True))
    make_toy_jsonl(data, seed=1)  # same path, other content
    with pytest.raises(ValueError, match="training data: its content changed"):
        train(config(toy, out, train=str(data), max_steps=4, resume=True))


def test_7_max_steps_may_grow_on_resume_and_is_recorded(toy, tmp_path):
    out = tmp_path / "grow"
    with pytest.raises(Killed):
        train(config(toy, out, max_steps=4, save_steps=2), on_step=kill_at(3))
    train(config(toy, out, max_steps=6, save_steps=2, resume=True))
    log = read_log(out)
    assert {"step": 2, "config_change": {"max_steps": [4, 6]}} in log
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 6
    assert saved["changes"] == [{"step": 2, "max_steps": {"before": 4, "after": 6}}]


# ----------------------------------------------------------------------------- 8: divergence

def test_8_divergence_stops_at_the_first_non_finite_step(toy, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as info:
        train(config(toy, out, lr=1e30, max_steps=20, save_steps=1))
    err = info.value
    assert f"step {err.step}: the " in str(err) and "not finite" in str(err)
    assert not (out / "final").exists()
    kept = list_checkpoints(out)
    for folder in kept:  # whatever was kept holds finite weights
        assert all(torch.isfinite(t).all() for t in weights(folder).values())
        assert int(folder.name.split("-")[1]) < err.step
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in read_log(out) if "loss" in r)
    assert not (out / ".hybridfast.lock").exists()


def test_8_cli_exits_non_zero_naming_the_step(toy, tmp_path, capsys):
    from hybridfast.cli import main

    rc = main(["train", "--model", str(toy["model"]), "--train", str(toy["data"]), "--batch-size", "8",
               "--max-steps", "20", "--lr", "1e30", "--max-length", "16", "--device", "cpu", "--no-progress",
               "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert rc == 1 and "hybridfast train: error: step " in err and "not finite" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "final").exists()


# ----------------------------------------------------------------------------- 11: manifest and fallback

def test_11_damaged_newest_checkpoint_falls_back_to_an_intact_one(toy, tmp_path):
    cfg = config(toy, tmp_path / "full", max_steps=6, save_steps=2)
    full = weights(train(cfg))
    out = tmp_path / "broken"
    with pytest.raises(Killed):
        train(replace(cfg, output=str(out)), on_step=kill_at(5))
    newest = list_checkpoints(out)[-1]
    assert newest.name == "checkpoint-4"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"optimizer.pt", "scheduler.pt", "rank0.pt", "trainer_state.json", "model.safetensors"} <= set(manifest)
    assert all(set(m) == {"size", "sha256"} for m in manifest.values())
    data = (newest / "optimizer.pt").read_bytes()
    (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match=r"checkpoint-4 is damaged and skipped: .*optimizer.pt has"):
        resumed = weights(train(replace(cfg, output=str(out), resume=True)))
    for name in full:  # resumed from checkpoint-2, bit-identical to the uninterrupted run
        assert torch.equal(resumed[name], full[name]), name


def test_11_no_intact_checkpoint_names_the_damage(toy, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Killed):
        train(config(toy, out, max_steps=4, save_steps=2), on_step=kill_at(3))
    (out / "checkpoint-2" / "rank0.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(OutputFolderError, match=r"rank0.pt has 7 bytes"):
        train(config(toy, out, max_steps=4, resume=True))


# ----------------------------------------------------------------------------- 12: torn log line

def test_12_torn_last_log_line_is_dropped_with_a_warning(toy, tmp_path):
    out = tmp_path / "torn"
    with pytest.raises(Killed):
        train(config(toy, out, max_steps=4, save_steps=2), on_step=kill_at(3))
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"train_log.jsonl:\d+: the last line is torn"):
        train(config(toy, out, max_steps=4, save_steps=2, resume=True))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_12_damaged_middle_log_line_is_an_error(toy, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(Killed):
        train(config(toy, out, max_steps=4, save_steps=2), on_step=kill_at(3))
    lines = (out / "train_log.jsonl").read_text().splitlines()
    lines[0] = lines[0][:5]
    (out / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train_log.jsonl:1: not a JSON row"):
        train(config(toy, out, max_steps=4, resume=True))


# ----------------------------------------------------------------------------- 13: clear messages

def test_13_non_utf8_and_corrupt_gzip_name_the_file(toy, tmp_path):
    from hybridfast.data.pairs import load_training_pairs

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": 1, "lang": "en", "query": "q", "positive": "p"}\n'
                    b'{"id": 2, "lang": "en", "query": "caf\xe9", "positive": "p"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: not UTF-8"):
        load_training_pairs(bad)
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(toy["data"].read_bytes())[:200])  # truncated archive
    with pytest.raises(ValueError, match=rf"{gz}:\d+: damaged gzip file"):
        load_training_pairs(gz)
    mm = tmp_path / "mm"
    (mm / "en").mkdir(parents=True)
    (mm / "en" / "collection.tsv").write_bytes(b"p1\tthe caf\xe9\n")
    (mm / "en" / "queries.train.tsv").write_text("q1\twhat\n")
    (mm / "triples.train.ids.small.tsv").write_text("q1\tp1\tp1\n")
    with pytest.raises(ValueError, match=r"collection.tsv:1: not UTF-8"):
        load_training_pairs(mm)


def test_13_max_length_beyond_the_position_table(toy, tmp_path):
    out = tmp_path / "long"
    # the rule lives in the Encoder (one place); its message names the folder and the table
    with pytest.raises(ValueError, match=r"max_length=100 exceeds the position table of .*model \(64 tokens\)"):
        train(config(toy, out, max_length=100))
    assert not out.exists()


def test_13_no_space_left_during_a_checkpoint_keeps_the_previous_one(toy, tmp_path, monkeypatch):
    out = tmp_path / "full-disk"
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "checkpoint-4" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"checkpoint-4: no space left on device; .*checkpoint-2 is kept"):
        train(config(toy, out, max_steps=6, save_steps=2))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert ckpt.verify(out / "checkpoint-2") is None
    assert not list(out.glob(".tmp-*"))


def test_13_models_that_cannot_be_loaded(toy, tmp_path, monkeypatch, capsys):
    from hybridfast.cli import main

    rc = main(["train", "--model", "/nonexistent/model", "--train", str(toy["data"]), "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "model: '/nonexistent/model' does not exist" in err and "Traceback" not in err

    import hybridfast.encoder

    def unreachable(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(hybridfast.encoder, "Encoder", unreachable)
    out = tmp_path / "hub"
    with pytest.raises(ValueError, match=r"model 'some-org/some-model' could not be loaded \(a hub name"):
        train(config(toy, out, model="some-org/some-model"))
    assert not out.exists()  # no empty output folder left behind


# ----------------------------------------------------------------------------- 14: data rules

def test_14_region_codes_are_read_alike_by_train_data(tmp_path):
    """data.py loads a pt-BR.json benchmark file; train_data reads the same language files."""
    from helpers import write_lareqa
    from hybridfast.data.pairs import load_training_pairs

    root = write_lareqa(tmp_path / "lareqa")
    (root / "de.json").rename(root / "pt-BR.json")
    pairs = load_training_pairs(root, split="all")
    assert pairs.languages == ["en", "pt-BR"]


def test_14_mmarco_language_without_positives_is_refused(tmp_path):
    from hybridfast.data.pairs import load_training_pairs

    mm = tmp_path / "mm"
    for lang, pids in (("english", "p1"), ("german", "p7")):
        (mm / lang).mkdir(parents=True)
        (mm / lang / "collection.tsv").write_text(f"{pids}\tsome passage\n")
        (mm / lang / "queries.train.tsv").write_text("q1\tsome query\n")
    (mm / "triples.train.ids.small.tsv").write_text("q1\tp1\tp1\n")
    with pytest.raises(ValueError, match=r"german: no triple has both its query .* in language 'de'"):
        load_training_pairs(mm)
    assert load_training_pairs(mm, languages=["en"]).languages == ["en"]
