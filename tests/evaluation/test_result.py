"""EvaluationResult.save and `hybridfast evaluate --out`: atomic, never over a user's files, clear
errors (reliability probe 2: #2 full disk, #11 Ctrl-C, #16 --device cuda, #18 user files,
#22 one language, #23 --languages en,de)."""
import json
import os

import pytest
import torch

from hybridfast import rules
from hybridfast.cli import evaluate as cli_evaluate
from hybridfast.cli import main
from hybridfast.evaluation import EvalLayout, EvaluationResult, RetrievalEvaluator
from hybridfast.evaluation.result import OWNER_FILE, RESULT_FILES
from helpers import BeirHashEncoder, partly_parallel_benchmark, synthetic_beir, write_beir_per_language


class _CliEncoder(BeirHashEncoder):
    query_prefix = passage_prefix = ""


@pytest.fixture
def beir(tmp_path):
    return write_beir_per_language(tmp_path / "beir", synthetic_beir(0, langs=("de", "en", "es")))


@pytest.fixture
def fake_model(monkeypatch):
    """The CLI without a real model: the hashing encoder of the oracles (fast, deterministic)."""
    monkeypatch.setattr(cli_evaluate, "_encoder", lambda args: ("hash", _CliEncoder()))


def _evaluate(beir, out, *extra):
    return main(["evaluate", "--dataset", str(beir), "--shared-query-ids", "--out", str(out), "--no-progress",
                 "--device", "cpu", *extra])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_full_disk_leaves_earlier_results_byte_identical(tmp_path, beir, fake_model, monkeypatch, capsys):
    out = tmp_path / "evout"
    assert _evaluate(beir, out, "--languages", "en") == 0
    before = _snapshot(out)
    assert set(RESULT_FILES) <= set(before)
    real_fdopen = os.fdopen
    writes = []

    def disk_full_on_second_file(fd, *a, **k):
        writes.append(fd)
        if len(writes) == 2:  # results.json's temporary was written, results.md's hits the full disk
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *a, **k)

    capsys.readouterr()
    monkeypatch.setattr(os, "fdopen", disk_full_on_second_file)
    assert _evaluate(beir, out, "--languages", "en", "de", "es") == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and str(out) in err and "Traceback" not in err
    assert _snapshot(out) == before  # byte-identical, no temporaries left
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: (os.close(fd), (_ for _ in ()).throw(
        OSError(28, "No space left on device")))[1])
    assert _evaluate(beir, fresh) == 2
    assert not any(p.name in RESULT_FILES for p in fresh.glob("*"))  # no 0-byte results.json


def test_users_own_results_are_kept_unless_overwrite(tmp_path, beir, fake_model, capsys):
    out = tmp_path / "userev"
    out.mkdir()
    (out / "results.json").write_text('{"mine": 1}')
    assert _evaluate(beir, out) == 2
    err = capsys.readouterr().err
    assert "results.json not written by hybridfast" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == '{"mine": 1}'
    assert _evaluate(beir, out, "--overwrite") == 0
    assert "summary" in json.loads((out / "results.json").read_text())
    assert set(json.loads((out / OWNER_FILE).read_text())["entries"]) == set(RESULT_FILES)
    assert _evaluate(beir, out) == 0  # hybridfast's own results: replaced without a flag


def test_ctrl_c_leaves_no_traceback_and_no_half_written_files(tmp_path, beir, fake_model, monkeypatch, capsys):
    out = tmp_path / "sigint"
    assert _evaluate(beir, out) == 0
    before = _snapshot(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(RetrievalEvaluator, "evaluate", interrupted)
    assert _evaluate(beir, tmp_path / "new", "--save-run", str(tmp_path / "runs")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()
    monkeypatch.undo()
    monkeypatch.setattr(cli_evaluate, "_encoder", lambda args: ("hash", _CliEncoder()))
    monkeypatch.setattr(rules.os, "replace", interrupted)  # Ctrl-C while the files are swapped in
    assert _evaluate(beir, out, "--languages", "en") == 130
    assert _snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, beir, fake_model, capsys):
    out = tmp_path / "dcuda"
    assert main(["evaluate", "--dataset", str(beir), "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err and not out.exists()
    with pytest.raises(ValueError, match="device: 'cuda'"):
        RetrievalEvaluator(partly_parallel_benchmark(0), device="cuda")


def test_languages_comma_or_space_and_one_language_note(tmp_path, beir, fake_model, capsys):
    for i, langs in enumerate((["de,en"], ["de", "en"])):
        assert _evaluate(beir, tmp_path / f"o{i}", "--languages", *langs) == 0
    a, b = (json.loads((tmp_path / f"o{i}" / "results.json").read_text()) for i in (0, 1))
    assert a["summary"] == b["summary"] and a["query_languages"] == ["de", "en"]
    assert _evaluate(beir, tmp_path / "one", "--languages", "en") == 0
    res = EvaluationResult.from_json(tmp_path / "one" / "results.json")
    assert set(res.summary) == {"mono"} and res.per_language == {}
    note = " ".join(res.config["notes"])
    assert "only one language (en)" in note and "no query id is shared" not in note
    md = (tmp_path / "one" / "results.md").read_text()
    assert "| multi |" not in md and "| cross |" not in md and "only one language" in md


def test_eval_layout_is_public_and_shared_with_the_trec_export():
    import inspect

    import hybridfast.evaluation.trec as trec

    bench = partly_parallel_benchmark(1, n_questions=10)
    ev = RetrievalEvaluator(bench, show_progress=False)
    lay = ev.layout
    assert isinstance(lay, EvalLayout) and lay.query_rows() == ev.query_rows
    assert lay.candidate_ids == ev.candidate_ids and lay.offsets[-1] == len(lay.candidate_ids)
    for i, (lang, qid) in enumerate(lay.query_rows()):
        rel = {lay.candidate_ids[c] for c in lay.relevant[i] if c >= 0}
        assert rel == set(bench.qrels[qid]) & set(lay.candidate_ids)
    source = inspect.getsource(trec)
    assert "ev._" not in source and "evaluator._" not in source and "import _" not in source


def test_cli_shards_give_the_in_memory_numbers_and_resume(tmp_path, beir, fake_model, capsys):
    """`evaluate --shards DIR`: the candidates go to checksummed shards and the streamed exact
    search reports the in-memory numbers; a second run reuses the complete shards; --save-run
    and --ivf-lists are refused with the reason before any work."""
    from hybridfast.evaluation.shards import read_manifest

    assert _evaluate(beir, tmp_path / "mem") == 0
    shards = tmp_path / "shards"
    assert _evaluate(beir, tmp_path / "sh", "--shards", str(shards), "--shard-precision", "fp32") == 0
    mem = json.loads((tmp_path / "mem" / "results.json").read_text())
    sh = json.loads((tmp_path / "sh" / "results.json").read_text())
    assert sh["summary"] == mem["summary"] and sh["per_pair"] == mem["per_pair"]
    assert sh["config"]["shards"] == str(shards) and sh["config"]["shard_precision"] == "fp32"
    manifest = read_manifest(shards)
    assert manifest["complete"] and all(s["sha256"] for s in manifest["shards"])
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npy")}
    assert _evaluate(beir, tmp_path / "sh", "--shards", str(shards), "--shard-precision", "fp32") == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npy")} == stamps  # reused, not rewritten
    capsys.readouterr()
    assert _evaluate(beir, tmp_path / "x", "--shards", str(shards), "--save-run", str(tmp_path / "runs")) == 2
    assert "--shards and --save-run" in capsys.readouterr().err
    assert _evaluate(beir, tmp_path / "x", "--shards", str(shards), "--ivf-lists", "4") == 2
    assert "drop --ivf-lists" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_cli_shards_show_one_progress_bar_over_the_corpus(tmp_path, beir, fake_model, capfd):
    rc = main(["evaluate", "--dataset", str(beir), "--shared-query-ids", "--out", str(tmp_path / "o"),
               "--device", "cpu", "--shards", str(tmp_path / "s")])
    assert rc == 0
    err = capfd.readouterr().err
    assert "encode to shards: " in err and " texts/s, ETA " in err and "\r" not in err  # plain lines off a terminal
