"""Issue 19 (reliability probe 2), study side: one run per folder (#1), cells follow the data's
content (#5), a full disk is one line and leaves earlier results byte-identical (#9, #10),
a user's results.* are never replaced without --overwrite (#18), outputs follow the umask
(#14), SIGINT stops the study with a checkpoint (#11)."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from hybridfast import rules, study
from hybridfast.cli import main
from hybridfast.study import StudyConfig, run_study
from hybridfast.study.identity import resolve_models
from hybridfast.training import OutputFolderError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LANGS = ("de", "en", "es")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    words = [".", "?", ":", "query", "passage"] + [helpers.synthetic_word(l, f"c{i}") for l in LANGS
                                                    for i in range(helpers.SYNTHETIC_CONCEPTS)]
    return helpers.tiny_bert(tmp_path_factory.mktemp("m") / "bert", words, hidden=16, layers=1)


def data(root, seed=0):
    return helpers.write_synthetic_lareqa(root, LANGS, n_articles=6, seed=seed)


def config(out, model, data, **kw):
    args = dict(models=[str(model)], modes=("mono",), train=str(data), evals=[str(data)], out=str(out), steps=2,
                batch_size=4, max_length=16, device="cpu", show_progress=False, bootstrap=50, seeds=(0,),
                include_base=False)
    args.update(kw)
    return StudyConfig(**args)


class Recorder:
    def __init__(self, fn=None):
        from hybridfast.training import train

        self.fn, self.configs = fn or train, []

    def __call__(self, cfg):
        self.configs.append(cfg)
        return self.fn(cfg)


def quiet(*a):
    pass


def cli(out, model, data, *extra):
    return ["study", "--models", str(model), "--modes", "mono", "--seeds", "0", "--no-base", "--train", str(data),
            "--eval", str(data), "--out", str(out), "--steps", "2", "--batch-size", "4", "--max-length", "16",
            "--device", "cpu", "--bootstrap", "50", "--threads", "1", *extra]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def lock(folder, pid, kind):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".hybridfast.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "kind": kind}))


# ----------------------------------------------------------------------------- 1: one run per folder

def test_1_a_second_study_on_a_folder_in_use_stops_at_once(tmp_path, model, sleeper, capsys):
    syn = data(tmp_path / "syn")
    out = tmp_path / "busy"
    lock(out, sleeper, "study")
    rc = main(cli(out, model, syn))
    err = capsys.readouterr().err
    assert rc == 2 and f"in use by another study (pid {sleeper}" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".hybridfast.lock"]


def test_1_a_live_cell_folder_is_never_removed(tmp_path, model, sleeper):
    syn = data(tmp_path / "syn")
    cfg = config(tmp_path / "s", model, syn)
    from hybridfast.training import RunFolder

    Path(cfg.out).mkdir()
    RunFolder(cfg.out).own("cells")  # as the study that made the cell recorded it
    cell = study.cell_dir(cfg, resolve_models(cfg.models)[0], "mono", 0) / "train"
    lock(cell, sleeper, "training run")  # a train (or another study's cell) is writing there
    (cell / "train_log.jsonl").write_text('{"step": 1}\n')
    recorder = Recorder()
    with pytest.raises(OutputFolderError, match=f"in use by another training run \\(pid {sleeper}"):
        run_study(cfg, train_fn=recorder, log=quiet)
    assert recorder.configs == [] and (cell / "train_log.jsonl").read_text() == '{"step": 1}\n'


def test_1_cell_killed_before_its_first_checkpoint_restarts_through_the_trainer(tmp_path, model):
    syn = data(tmp_path / "syn")
    cfg = config(tmp_path / "s", model, syn)

    def killed(train_cfg):
        from hybridfast.training import train

        train(train_cfg)
        raise KeyboardInterrupt("simulated kill before the study recorded the cell")

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, train_fn=Recorder(killed), log=quiet)
    recorder = Recorder()
    run_study(cfg, train_fn=recorder, log=quiet)
    # the finished training is taken as it is (resume returns its final/), not deleted and redone
    assert [c.resume for c in recorder.configs] == [True]


# ----------------------------------------------------------------------------- 5: data content

def test_5_changed_data_under_the_same_path_retrains_the_cell(tmp_path, model):
    syn = data(tmp_path / "syn")
    cfg = config(tmp_path / "s", model, syn)
    run_study(cfg, train_fn=Recorder(), log=quiet)
    again = Recorder()
    run_study(config(tmp_path / "s", model, syn), train_fn=again, log=quiet)
    assert again.configs == []  # same data: the finished cell is reused
    data(syn, seed=5)  # regenerated in place: other questions, other passages
    changed = Recorder()
    run_study(config(tmp_path / "s", model, syn), train_fn=changed, log=quiet)
    assert len(changed.configs) == 1
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["rows"]
    assert len(rows) == 1


# ----------------------------------------------------------------------------- 18: a user's results

def test_18_a_users_results_are_not_replaced_without_overwrite(tmp_path, model, capsys):
    syn = data(tmp_path / "syn")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my,own\n1,2\n")
    recorder = Recorder()
    with pytest.raises(OutputFolderError, match=r"holds \['results.csv'\], which hybridfast did not write"):
        run_study(config(out, model, syn), train_fn=recorder, log=quiet)
    assert recorder.configs == [] and (out / "results.csv").read_text() == "my,own\n1,2\n"
    assert main(cli(out, model, syn)) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(cli(out, model, syn, "--overwrite")) == 0
    assert (out / "results.csv").read_text().startswith("model,")
    assert main(cli(out, model, syn)) == 0  # now the study's own: a rerun needs no flag


# ----------------------------------------------------------------------------- 9, 10: full disk

def test_10_full_disk_during_training_is_one_line(tmp_path, model, monkeypatch, capsys):
    syn = data(tmp_path / "syn")
    out = tmp_path / "full"
    helpers.full_disk_in_final(monkeypatch)
    rc = main(cli(out, model, syn))
    err = capsys.readouterr().err
    assert rc != 0 and "no space left on device" in err and "Traceback" not in err
    assert not list(out.glob("cells/*/*/train/.tmp-final")) and not (out / ".hybridfast.lock").exists()


def test_9_full_disk_while_writing_results_keeps_the_previous_ones(tmp_path, model, monkeypatch, capsys):
    syn = data(tmp_path / "syn")
    out = tmp_path / "res"
    assert main(cli(out, model, syn)) == 0
    before = {n: (out / n).read_bytes() for n in ("results.csv", "results.json", "results.md")}
    real = rules._write_temporary

    def full_at_md(path, payload):
        if path.name == "results.md":  # results.csv and .json are staged already
            raise OSError(28, "No space left on device", str(path))
        return real(path, payload)

    monkeypatch.setattr(rules, "_write_temporary", full_at_md)
    rc = main(cli(out, model, syn, "--bootstrap", "60"))  # another interval: new results
    err = capsys.readouterr().err
    assert rc == 1 and "results.md: no space left on device" in err and "Traceback" not in err
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 14: permissions

def test_14_study_outputs_follow_the_umask(tmp_path, model):
    syn = data(tmp_path / "syn")
    out = tmp_path / "perm"
    old = os.umask(0o022)
    try:
        run_study(config(out, model, syn), train_fn=Recorder(), log=quiet)
    finally:
        os.umask(old)
    files = [out / "results.json", out / "results.csv", out / "results.md", *out.glob("cells/*/*/result.json")]
    assert len(files) == 4 and {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o644"}


# ----------------------------------------------------------------------------- 11: signals

def test_11_sigint_in_a_cell_saves_its_checkpoint_and_the_rerun_resumes(tmp_path, model, capsys):
    from hybridfast.training import train

    syn = data(tmp_path / "syn")
    out = tmp_path / "sig"

    def interrupted(cfg):
        return train(cfg, on_step=lambda step: step == 1 and os.kill(os.getpid(), signal.SIGINT))

    import hybridfast.training as training

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "train", interrupted)
        rc = main(cli(out, model, syn, "--steps", "3", "--save-steps", "100"))
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted at step 1; run the same command again to resume" in err
    assert "Traceback" not in err and not (out / ".hybridfast.lock").exists()
    assert list(out.glob("cells/*/mono-*/train/checkpoint-1"))
    recorder = Recorder()
    run_study(config(out, model, syn, steps=3, save_steps=100), train_fn=recorder, log=quiet)
    assert [c.resume for c in recorder.configs] == [True]
