"""TREC run and qrels files (hybridfast.evaluation.trec): pytrec_eval on the written files equals the summary."""
import json

import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from hybridfast.data.beir import load_beir  # noqa: E402
from hybridfast.evaluation.evaluator import RetrievalEvaluator  # noqa: E402
from hybridfast.evaluation.trec import read_qrels, read_run  # noqa: E402
from helpers import BeirHashEncoder as HashEncoder  # noqa: E402
from oracles import check_files_reproduce  # noqa: E402
from helpers import partly_parallel_benchmark  # noqa: E402
from helpers import synthetic_beir as synthetic, write_beir_per_language as write_per_language  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_run_files_reproduce_the_summary_with_ties(tmp_path, seed):
    bench = partly_parallel_benchmark(seed, n_questions=40)
    ev = RetrievalEvaluator(bench, k=3, chunk_size=7, show_progress=False)  # k small: runs extended
    res = ev.evaluate(HashEncoder(), save_run=tmp_path / "runs")
    check_files_reproduce(res, tmp_path / "runs")
    # trec_eval order inside the files: score descending, then docid descending; ranks 1..n
    for path in (tmp_path / "runs" / "runs").glob("*.run"):
        rows = [line.split() for line in path.read_text().splitlines()]
        by_q = {}
        for qid, q0, doc, rank, score, tag in rows:
            assert q0 == "Q0" and tag == "hybridfast"
            by_q.setdefault(qid, []).append((int(rank), float(score), doc))
        for items in by_q.values():
            assert [r for r, _, _ in items] == list(range(1, len(items) + 1))
            keys = [(s, d) for _, s, d in items]
            assert keys == sorted(keys, reverse=True)
            assert len(items) >= min(3, len(items))
    assert res.config["run_depth"] == "full"


def test_graded_beir_run_files_reproduce_the_summary(tmp_path):
    bench = load_beir(write_per_language(tmp_path / "b", synthetic(1)), shared_query_ids=True)
    res = RetrievalEvaluator(bench, k=5, show_progress=False).evaluate(HashEncoder(), save_run=tmp_path / "out")
    check_files_reproduce(res, tmp_path / "out")
    qrels = read_qrels(tmp_path / "out" / "qrels" / "all.qrels")
    assert qrels == {q: g for q, g in bench.grades.items() if any(q in qs for qs in bench.queries.values())}


def test_top_k_depth_keeps_cut_metrics_exact(tmp_path):
    bench = partly_parallel_benchmark(3, n_questions=40)
    res = RetrievalEvaluator(bench, k=10, show_progress=False).evaluate(
        HashEncoder(), save_run=tmp_path / "k", run_depth="k")
    run = read_run(tmp_path / "k" / "runs" / "en-multi.run")
    assert max(len(v) for v in run.values()) == 10 and min(len(v) for v in run.values()) == 10
    check_files_reproduce(res, tmp_path / "k", metrics=("mrr@10", "ndcg@10", "recall@1", "recall@10"))


def test_bad_save_run_arguments(tmp_path):
    bench = partly_parallel_benchmark(0)
    ev = RetrievalEvaluator(bench, show_progress=False)
    with pytest.raises(ValueError, match="run_depth must be one of"):
        ev.evaluate(HashEncoder(), save_run=tmp_path, run_depth="all")
    pytest.importorskip("faiss")
    ivf = RetrievalEvaluator(bench, ivf_lists=2, show_progress=False)
    with pytest.raises(ValueError, match="needs exact search"):
        ivf.evaluate(HashEncoder(), save_run=tmp_path)


def test_large_run_files_are_announced(tmp_path, monkeypatch):
    import functools

    import hybridfast.evaluation.trec as trec

    monkeypatch.setattr(trec, "write_runs", functools.partial(trec.write_runs, warn_lines=50))
    bench = partly_parallel_benchmark(1)
    ev = RetrievalEvaluator(bench, k=5, show_progress=False)
    with pytest.warns(UserWarning, match=r"run files will hold [\d,]+ lines .* run_depth='k'"):
        ev.evaluate(HashEncoder(), save_run=tmp_path / "big")
    manifest = (tmp_path / "big" / "manifest.json").read_text()
    n = sum(len(p.read_text().splitlines()) for p in (tmp_path / "big" / "runs").glob("*.run"))
    assert f'"lines": {n}' in manifest
    assert not list((tmp_path / "big").rglob("*.tmp"))  # every file complete under its own name


def test_save_run_never_overwrites_a_users_folder(tmp_path):
    bench = partly_parallel_benchmark(0)
    ev = RetrievalEvaluator(bench, show_progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and holds no earlier hybridfast run export"):
        ev.evaluate(HashEncoder(), save_run=mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    # an earlier export of ours is replaced
    ev.evaluate(HashEncoder(), save_run=tmp_path / "runs")
    ev.evaluate(HashEncoder(), save_run=tmp_path / "runs", run_depth="k")
    assert '"depth": "k"' in (tmp_path / "runs" / "manifest.json").read_text()


def _export(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_re_export_replaces_the_whole_earlier_export(tmp_path):
    """Reliability probe 2 #12: a second export with fewer languages leaves no file of the first."""
    bench = partly_parallel_benchmark(0, n_questions=20)
    runs = tmp_path / "sr-runs"
    RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder(), save_run=runs)
    assert (runs / "runs" / "ar-de.run").exists()
    res = RetrievalEvaluator(bench, languages=["en"], show_progress=False).evaluate(HashEncoder(), save_run=runs)
    manifest = json.loads((runs / "manifest.json").read_text())
    on_disk = {str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file()}
    listed = set(manifest["runs"]) | set(manifest["runs"].values()) | {"manifest.json"}
    assert on_disk == listed | {"qrels/all.qrels"} and all(n.startswith(("runs/en-", "qrels/", "manifest"))
                                                           for n in on_disk)
    check_files_reproduce(res, runs)
    assert [p.name for p in tmp_path.iterdir()] == ["sr-runs"]  # no staging or old folder left


def test_failed_re_export_keeps_the_earlier_export_whole(tmp_path, monkeypatch):
    import hybridfast.evaluation.trec as trec

    bench = partly_parallel_benchmark(1, n_questions=20)
    runs = tmp_path / "runs"
    RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder(), save_run=runs)
    before = _export(runs)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trec, "_qrels_lines", full_disk)  # fails after the run files were streamed
    with pytest.raises(OSError, match="No space"):
        RetrievalEvaluator(bench, languages=["de", "en"], show_progress=False).evaluate(HashEncoder(), save_run=runs)
    assert _export(runs) == before
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
