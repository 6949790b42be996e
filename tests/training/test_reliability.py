"""Issue 19 (reliability probe 2), training side: a finished model is never lost by following
the tool's advice (#3), a shorter --resume is refused (#20), the default max length fits the
model (#8), a full disk is named in one line with nothing partial left (#9, #10), SIGINT /
SIGTERM save a checkpoint and stop cleanly (#11), outputs follow the umask (#14)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch

from helpers import Killed, full_disk_in_final, kill_at, read_log, toy_config, write_lareqa
from helpers import load_weights as weights
from hybridfast import rules
from hybridfast.cli import main
from hybridfast.training import (CheckpointError, Interrupted, OutputFolderError, list_checkpoints, run_status,
                                 train)
from hybridfast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENOSPC = OSError(28, "No space left on device")


def cli_args(toy, out, *extra):
    return ["train", "--model", str(toy["model"]), "--train", str(toy["data"]), "--batch-size", "8",
            "--max-length", "16", "--device", "cpu", "--lr", "1e-3", "--seed", "3", "--warmup-ratio", "0",
            "--log-steps", "1", "--output", str(out), "--no-progress", *extra]


# ----------------------------------------------------------------------------- 3: final evaluation failed

def test_3_complete_final_model_whose_evaluation_failed_is_finished_by_resume(toy, tmp_path, monkeypatch, capsys):
    data = write_lareqa(tmp_path / "lareqa")
    out = tmp_path / "run"
    cfg = toy_config(toy, out, train=str(data), split="all", batch_size=2, max_steps=2, eval=str(data),
                     eval_split="all")
    real = rules.atomic_write_json

    def full_at_final_eval(path, obj, *a, **k):
        if str(path).endswith("final_eval.json"):
            raise ENOSPC
        return real(path, obj, *a, **k)

    monkeypatch.setattr(rules, "atomic_write_json", full_at_final_eval)
    with pytest.raises(OSError):
        train(cfg)
    monkeypatch.setattr(rules, "atomic_write_json", real)
    final_weights = weights(out / "final")
    assert not (out / "final_eval.json").exists() and run_status(out) == "finished"
    # the advice given for this folder never suggests --overwrite over the complete model
    for resume in (False, True):
        rc = main(cli_args(toy, out, "--train", str(data), "--split", "all", "--batch-size", "2", "--max-steps",
                           "2", "--eval", str(data), "--eval-split", "all", *(["--resume"] if resume else [])))
        err = capsys.readouterr().err
        assert "--overwrite" not in err and "Traceback" not in err
        assert rc == (0 if resume else 2)
    assert "final evaluation was missing" in err
    assert json.loads((out / "final_eval.json").read_text())["summary"]["mono"]["map"] > 0
    assert [r["step"] for r in read_log(out) if "eval/mono/map" in r] == [2]
    assert all(torch.equal(final_weights[k], v) for k, v in weights(out / "final").items())


def test_3_final_eval_json_is_written_atomically(toy, tmp_path):
    data = write_lareqa(tmp_path / "lareqa")
    out = tmp_path / "run"
    train(toy_config(toy, out, train=str(data), split="all", batch_size=2, max_steps=1, eval=str(data),
                     eval_split="all"))
    assert json.loads((out / "final_eval.json").read_text())["benchmark"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 20: shorter resume

def test_20_resume_with_fewer_steps_than_the_checkpoint_is_refused(toy, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(Killed):
        train(toy_config(toy, out, max_steps=10, save_steps=4), on_step=kill_at(5))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"checkpoint-4 is at step 4, beyond this run's 3 steps"):
        train(toy_config(toy, out, max_steps=3, save_steps=4, resume=True))
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "final").exists()
    final = train(toy_config(toy, out, max_steps=4, save_steps=4, resume=True))  # equal: finishes at once
    assert max(r["step"] for r in read_log(out)) == 4 and final.is_dir()


# ----------------------------------------------------------------------------- 8: default max length

def test_8_without_max_length_the_position_table_bounds_the_length(toy, tmp_path):
    out = tmp_path / "ml"
    # the toy model has 64 positions; its tokenizer sets no model_max_length (like many): the
    # default 256 would overflow the table on the first long batch
    train(toy_config(toy, out, max_length=None, max_steps=1))
    assert json.loads((out / "train_config.json").read_text())["max_length_used"] == 64
    assert json.loads((out / "final" / "hybridfast_config.json").read_text())["max_length"] == 64


# ----------------------------------------------------------------------------- 9, 10: full disk

def _no_free_space(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rules.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))


def test_9_torch_save_failing_on_a_full_disk_is_named(toy, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real = torch.save

    def save(obj, path, *a, **k):
        if "checkpoint-4" in str(path):  # what torch raises when its writer hits a full disk
            _no_free_space(monkeypatch)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 112960 vs 112848")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"checkpoint-4: no space left on device; .*checkpoint-2 is kept"):
        train(toy_config(toy, out, max_steps=6, save_steps=2))
    assert not list(out.glob(".tmp-*"))


def test_10_full_disk_while_writing_final_is_one_line_and_leaves_no_partial_copy(toy, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "full-final"
    full_disk_in_final(monkeypatch)
    rc = main(cli_args(toy, out, "--max-steps", "4", "--save-steps", "2"))
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"could not write {out / 'final'}: no space left on device" in err and "--resume" in err
    assert not (out / ".tmp-final").exists() and not (out / "final").exists()
    assert not (out / ".hybridfast.lock").exists() and list_checkpoints(out)[-1].name == "checkpoint-2"


def test_10_full_disk_while_taking_the_lock_leaves_no_empty_lock(toy, tmp_path, monkeypatch, capsys):
    from hybridfast.training import rundir

    out = tmp_path / "full-lock"
    real = rundir.json.dump

    def dump(obj, f, *a, **k):
        if isinstance(obj, dict) and "pid" in obj:
            raise ENOSPC
        return real(obj, f, *a, **k)

    monkeypatch.setattr(rundir.json, "dump", dump)
    rc = main(cli_args(toy, out, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and "no space left on device" in err and "Traceback" not in err
    assert not out.exists()  # created for the lock, removed again: nothing left behind


# ----------------------------------------------------------------------------- 11: signals

def test_11_sigint_finishes_the_step_saves_a_checkpoint_and_resumes(toy, tmp_path):
    out = tmp_path / "int"

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled after this step, not inside it

    with pytest.raises(Interrupted) as caught:
        train(toy_config(toy, out, max_steps=6, save_steps=100), on_step=interrupt)
    assert str(caught.value) == "interrupted at step 3; resume with --resume" and caught.value.exit_code == 130
    assert ckpt.verify(out / "checkpoint-3") is None and not (out / ".hybridfast.lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    train(toy_config(toy, out, max_steps=6, save_steps=100, resume=True))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_11_sigterm_on_the_command_line_exits_143_with_one_line(toy, tmp_path):
    out = tmp_path / "term"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "hybridfast", *cli_args(toy, out, "--max-steps", "100000",
                                                                            "--log-steps", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not (out / "train_log.jsonl").exists() or not (out / "train_log.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    line = [l for l in err.splitlines() if "interrupted" in l]
    assert len(line) == 1 and line[0].endswith("; resume with --resume"), err
    step = int(line[0].split("interrupted at step ")[1].split(";")[0])
    assert ckpt.verify(out / f"checkpoint-{step}") is None and not (out / ".hybridfast.lock").exists()


# ----------------------------------------------------------------------------- 14: permissions

def test_14_training_outputs_follow_the_umask(toy, tmp_path):
    out = tmp_path / "perm"
    old = os.umask(0o022)
    try:
        train(toy_config(toy, out, max_steps=2, save_steps=1))
    finally:
        os.umask(old)
    files = [out / "final" / "model.safetensors", out / "train_config.json", out / ".hybridfast-run.json",
             out / "checkpoint-1" / "manifest.json", out / "checkpoint-1" / "trainer_state.json",
             out / "checkpoint-1" / "model.safetensors"]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): "0o644" for f in files}
    assert stat.S_IMODE((out / "final").stat().st_mode) == 0o755


def test_lock_is_reentrant_in_one_process_and_names_its_kind(tmp_path):
    import socket

    from hybridfast.training import RunFolder

    folder = RunFolder(tmp_path / "x")
    with folder.lock(kind="study cell"):
        with folder.lock():  # the training inside a study's cell
            pass
        assert json.loads((tmp_path / "x" / ".hybridfast.lock").read_text())["kind"] == "study cell"
    assert not (tmp_path / "x").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "y").mkdir()
        (tmp_path / "y" / ".hybridfast.lock").write_text(json.dumps({"pid": sleeper.pid, "kind": "study",
                                                                      "host": socket.gethostname()}))
        with pytest.raises(OutputFolderError, match=f"in use by another study \\(pid {sleeper.pid}"):
            with RunFolder(tmp_path / "y").lock():
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
