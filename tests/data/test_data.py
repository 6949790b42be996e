"""hybridfast.data: LAReQA loading, the article split, dataset lookup and download."""
import json
import os
import urllib.error
from pathlib import Path

import pytest

from hybridfast import data
from hybridfast.data import downloads
from hybridfast.cli import main as cli_main
from hybridfast.data import (DownloadError, LAReQAFormatError, LAReQAWarning, RetrievalBenchmark,
                             candidate_text, lareqa_examples, load_benchmark, load_lareqa, resolve_dataset)

XQUAD_CANDIDATES = {"ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
                    "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196}


# ----------------------------------------------------------------------------- XQuAD-R

def test_xquad_counts_match_published(xquad_dir):
    bench = load_lareqa(xquad_dir)
    assert bench.languages == sorted(XQUAD_CANDIDATES)
    assert {l: len(q) for l, q in bench.queries.items()} == {l: 1190 for l in XQUAD_CANDIDATES}
    assert {l: len(c) for l, c in bench.candidates.items()} == XQUAD_CANDIDATES
    # Fully parallel: every question has exactly one relevant sentence per language.
    lang_of = {cid: l for l, c in bench.candidates.items() for cid in c}
    assert len(bench.qrels) == 1190
    for rel in bench.qrels.values():
        assert sorted(lang_of[c] for c in rel) == sorted(XQUAD_CANDIDATES)


def test_xquad_relevant_sentence_holds_the_answer(xquad_dir):
    """Read the answers independently from the raw JSON: the relevant English sentence contains them."""
    raw = json.loads((xquad_dir / "en.json").read_text(encoding="utf-8"))
    answers = {q["id"]: q["answers"][0]["text"] for a in raw["data"] for p in a["paragraphs"] for q in p["qas"]}
    bench = load_lareqa(xquad_dir, languages=["en"])
    inside = 0
    for qid, rel in bench.qrels.items():
        (cid,) = rel
        sentence, context = bench.candidates["en"][cid]
        assert sentence in context
        inside += answers[qid] in sentence
    assert inside >= 0.98 * len(answers)  # an answer may run over a sentence break


def test_language_selection_and_bad_arguments(xquad_dir):
    bench = load_lareqa(xquad_dir, languages=["zh", "en"])
    assert bench.languages == ["en", "zh"]
    assert all(len(rel) == 2 for rel in bench.qrels.values())
    with pytest.raises(ValueError, match="languages.*xx"):
        load_lareqa(xquad_dir, languages=["en", "xx"])
    with pytest.raises(TypeError, match="languages"):
        load_lareqa(xquad_dir, languages="en")
    with pytest.raises(ValueError, match="split"):
        load_lareqa(xquad_dir, split="dev")
    with pytest.raises(FileNotFoundError, match="path"):
        load_lareqa(xquad_dir / "missing")


def _articles(path, split, languages=None):
    return {(e["lang"], e["article"]) for e in lareqa_examples(path, languages=languages, split=split)}


def test_split_is_disjoint_complete_and_deterministic(xquad_dir):
    full = load_lareqa(xquad_dir)
    train, test = load_lareqa(xquad_dir, split="train"), load_lareqa(xquad_dir, split="test")
    for lang in full.languages:
        assert not train.queries[lang].keys() & test.queries[lang].keys()
        assert train.queries[lang].keys() | test.queries[lang].keys() == full.queries[lang].keys()
        assert not train.candidates[lang].keys() & test.candidates[lang].keys()
        assert len(train.candidates[lang]) + len(test.candidates[lang]) == XQUAD_CANDIDATES[lang]
        # no paragraph on both sides
        assert not ({c for _, c in train.candidates[lang].values()} & {c for _, c in test.candidates[lang].values()})
    assert not set(train.qrels) & set(test.qrels)
    # Whole articles, the same ones in every language, half of the 48 on each side.
    tr_articles, te_articles = _articles(xquad_dir, "train"), _articles(xquad_dir, "test")
    assert not tr_articles & te_articles
    titles = {t for _, t in te_articles}
    assert len(titles) == 24 and te_articles == {(l, t) for l in full.languages for t in titles}
    # Deterministic, and independent of which languages are loaded.
    again = load_lareqa(xquad_dir, split="test")
    assert again.queries == test.queries and again.qrels == test.qrels
    sub = load_lareqa(xquad_dir, languages=["de", "th"], split="test")
    assert sub.queries["de"] == test.queries["de"] and sub.candidates["th"] == test.candidates["th"]


def test_examples_one_per_question_and_language(xquad_dir):
    ex = lareqa_examples(xquad_dir, languages=["en", "de"])
    assert len(ex) == 2 * 1190
    assert set(ex[0]) == {"id", "lang", "question", "sentence", "context", "article"}
    bench = load_lareqa(xquad_dir, languages=["en", "de"])
    for e in ex[:50] + ex[-50:]:
        assert bench.queries[e["lang"]][e["id"]] == e["question"]
        rel = [bench.candidates[e["lang"]][c] for c in bench.qrels[e["id"]] if c.startswith(e["lang"] + ":")]
        assert rel == [(e["sentence"], e["context"])]


def test_candidate_text_puts_sentence_first():
    assert candidate_text("A b.", "Z. A b. C.") == "A b. Z. A b. C."
    assert candidate_text("A.", "") == "A."
    with pytest.raises(TypeError, match="context"):
        candidate_text("A.", None)


# ----------------------------------------------------------------------------- synthetic LAReQA folders

def _para(sentences, qas, with_sentences=True):
    """A LAReQA paragraph; qas = [(id, question, [(sentence index, offset in it), ...])]."""
    context, breaks = "", []
    for s in sentences:
        if context:
            context += " "
        breaks.append([len(context), len(context) + len(s)])
        context += s
    out = {"context": context, "sentence_breaks": breaks,
           "qas": [{"id": qid, "question": q,
                    "answers": [{"answer_start": breaks[i][0] + off, "text": "x"} for i, off in ans]}
                   for qid, q, ans in qas]}
    if with_sentences:
        out["sentences"] = list(sentences)
    return out


def _write(folder, lang, articles):
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"version": "1.0", "data": [{"title": t, "paragraphs": ps} for t, ps in articles]}
    (folder / f"{lang}.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def mlqa_like(tmp_path):
    """Partly parallel, MLQA-style: titles differ per language, questions exist in 1-3 languages."""
    root = tmp_path / "mlqa-like"
    _write(root, "en", [
        ("Alpha", [_para(["E0.", "E1 has the answer.", "E2."], [("q1", "en q1?", [(1, 3)]),
                                                                 ("q2", "en q2?", [(0, 0)])]),
                   _para(["E3.", "E4."], [("q3", "en q3?", [(1, 1)])])]),
        ("Beta", [_para(["E5.", "E6."], [("q4", "en q4?", [(0, 1)])])]),
        ("Gamma", [_para(["E7."], [("q5", "en q5?", [(0, 0)])])]),
    ])
    _write(root, "de", [
        ("Alpha-de", [_para(["D0.", "D1."], [("q1", "de q1?", [(0, 2)]), ("q3", "de q3?", [(1, 0)])],
                            with_sentences=False)]),
        ("Gamma-de", [_para(["D2.", "D3."], [("q5", "de q5?", [(1, 0)])])]),
        ("Delta-de", [_para(["D4."], [])]),  # an article with no questions
    ])
    _write(root, "zh", [("Beta-zh", [_para(["Z0。", "Z1。"], [("q4", "zh q4?", [(1, 0)])])])])
    return root


def test_partly_parallel_relevance(mlqa_like):
    bench = load_lareqa(mlqa_like)
    assert {l: sorted(q) for l, q in bench.queries.items()} == {
        "de": ["q1", "q3", "q5"], "en": ["q1", "q2", "q3", "q4", "q5"], "zh": ["q4"]}
    assert {l: len(c) for l, c in bench.candidates.items()} == {"de": 5, "en": 8, "zh": 2}
    assert bench.qrels == {"q1": {"en:0:0:1", "de:0:0:0"}, "q2": {"en:0:0:0"},
                           "q3": {"en:0:1:1", "de:0:0:1"}, "q4": {"en:1:0:0", "zh:0:0:1"},
                           "q5": {"en:2:0:0", "de:1:0:1"}}
    # without a `sentences` field the spans are cut from the context
    assert bench.candidates["de"]["de:0:0:1"] == ("D1.", "D0. D1.")
    assert bench.candidates["en"]["en:0:0:1"] == ("E1 has the answer.", "E0. E1 has the answer. E2.")
    # a language subset keeps only that language's relevant candidates
    sub = load_lareqa(mlqa_like, languages=["de", "zh"])
    assert sub.qrels["q4"] == {"zh:0:0:1"} and sub.qrels["q1"] == {"de:0:0:0"}
    assert isinstance(sub, RetrievalBenchmark) and sub.name == "mlqa-like"


def test_partly_parallel_split_keeps_linked_articles_together(mlqa_like):
    train, test = load_lareqa(mlqa_like, split="train"), load_lareqa(mlqa_like, split="test")
    for lang in ("en", "de", "zh"):
        assert not train.candidates[lang].keys() & test.candidates[lang].keys()
    # Groups linked by question ids: {Alpha, Alpha-de}, {Beta, Beta-zh}, {Gamma, Gamma-de}, {Delta-de}.
    groups = [{("en", "Alpha"), ("de", "Alpha-de")}, {("en", "Beta"), ("zh", "Beta-zh")},
              {("en", "Gamma"), ("de", "Gamma-de")}]
    tr, te = _articles(mlqa_like, "train"), _articles(mlqa_like, "test")
    for g in groups:
        assert g <= tr or g <= te
    assert not tr & te and tr | te == set().union(*groups)
    assert len(set(train.qrels)) + len(set(test.qrels)) == 5 and not set(train.qrels) & set(test.qrels)
    # 4 groups, half of them (2) on the test side: the question-less Delta-de counts as a group
    n_test_groups = sum(g <= te for g in groups) + ("de:2:0:0" in test.candidates["de"])
    assert n_test_groups == 2
    for q, rel in test.qrels.items():
        assert all(c in {cid for cs in test.candidates.values() for cid in cs} for c in rel)


def test_split_needs_two_article_groups(tmp_path):
    root = tmp_path / "one"
    _write(root, "en", [("T", [_para(["S."], [("q", "q?", [(0, 0)])])])])
    _write(root, "de", [("T-de", [_para(["D."], [("q", "q?", [(0, 0)])])])])  # linked to T: one group
    with pytest.raises(ValueError, match="1 article group.*split='all'"):
        load_lareqa(root, split="test")
    _write(root, "de", [("U", [_para(["D."], [("r", "r?", [(0, 0)])])])])      # now two groups
    train, test = load_lareqa(root, split="train"), load_lareqa(root, split="test")
    assert sorted([*train.qrels, *test.qrels]) == ["q", "r"]


def test_unmatched_answer_starts_warn_once_and_are_skipped(tmp_path):
    root = tmp_path / "gaps"
    para = _para(["S0.", "S1."], [("q1", "q1?", [(1, 0)]), ("q2", "q2?", [(0, 0)])])
    para["qas"][0]["answers"].append({"answer_start": 3, "text": " "})  # the space between sentences
    para["qas"][1]["answers"] = [{"answer_start": 99, "text": "x"}]     # past the end: q2 unanswerable
    _write(root, "en", [("T", [para])])
    with pytest.warns(LAReQAWarning, match=r"2 answer start\(s\) fell in no sentence.*en: 2.*1 question") as rec:
        bench = load_lareqa(root)
    assert len([w for w in rec if issubclass(w.category, LAReQAWarning)]) == 1
    assert bench.qrels == {"q1": {"en:0:0:1"}} and list(bench.queries["en"]) == ["q1"]
    with pytest.warns(LAReQAWarning):
        ex = lareqa_examples(root)
    assert [e["id"] for e in ex] == ["q1"] and ex[0]["sentence"] == "S1."


def test_repeated_question_is_merged(tmp_path):
    """The same id and text twice in one file (a question asked of two paragraphs): one query, both answers."""
    root = tmp_path / "rep"
    _write(root, "en", [("T", [_para(["S0.", "S1."], [("q1", "q1?", [(0, 0)])]),
                               _para(["S2."], [("q1", "q1?", [(0, 0)])])])])
    bench = load_lareqa(root)
    assert bench.queries == {"en": {"q1": "q1?"}} and bench.qrels == {"q1": {"en:0:0:0", "en:0:1:0"}}
    assert [(e["id"], e["sentence"]) for e in lareqa_examples(root)] == [("q1", "S0.")]


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {"version": 1}, "'data' list"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("sentence_breaks") and d, "sentence_breaks"),
    (lambda d: d["data"][0]["paragraphs"][0].update(sentence_breaks=[[0, 999]]) or d, r"sentence_breaks\[0\].*outside"),
    (lambda d: d["data"][0]["paragraphs"][0].update(sentence_breaks=[[0, 2], [1, 3]]) or d, "overlaps"),
    (lambda d: d["data"][0]["paragraphs"][0].update(sentences=["only one"]) or d, "1 sentences but 2"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"].append(dict(d["data"][0]["paragraphs"][0]["qas"][0],
                                                                question="other?")) or d,
     "appears twice with different questions"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="3") or d,
     r"qas\[0\]\.answers\[0\]\.answer_start.*int"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("id") and d, "missing field 'id'"),
])
def test_malformed_files_name_file_and_problem(tmp_path, mutate, problem):
    root = tmp_path / "bad"
    _write(root, "en", [("T", [_para(["S0.", "S1."], [("q1", "q1?", [(1, 0)])])])])
    doc = mutate(json.loads((root / "en.json").read_text()))
    (root / "en.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(LAReQAFormatError, match=problem) as err:
        load_lareqa(root)
    assert str(root / "en.json") in str(err.value)


# ----------------------------------------------------------------------------- lookup

def test_resolve_dataset_lookup_order(tmp_path, monkeypatch):
    def make(root):
        _write(root / "xquad-r", "en", [("T", [_para(["S."], [("q", "q?", [(0, 0)])])])])
        return root / "xquad-r"

    cache, env, explicit = make(tmp_path / "cache" / "hybridfast"), make(tmp_path / "env"), make(tmp_path / "dd")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    assert resolve_dataset("xquad-r") == cache
    monkeypatch.setenv("HYBRIDFAST_DATA", str(tmp_path / "env"))
    assert resolve_dataset("xquad-r") == env
    assert resolve_dataset("xquad-r", data_dir=tmp_path / "dd") == explicit
    assert resolve_dataset("xquad-r", data_dir=explicit) == explicit  # the dataset folder itself
    assert resolve_dataset(str(explicit)) == explicit                 # a folder, as given
    monkeypatch.chdir(tmp_path / "dd")  # a same-named folder in the working directory comes last
    assert resolve_dataset("xquad-r") == env
    # a toy folder under a known name is not the pinned data: used only when allowed, loudly
    with pytest.warns(data.ModifiedDataWarning, match="USING MODIFIED DATA.*en.json"):
        bench = load_benchmark("xquad-r", data_dir=tmp_path / "dd", allow_modified=True)
    assert bench.qrels == {"q": {"en:0:0:0"}}
    with pytest.raises(FileNotFoundError, match="mlqa-r not found.*--data-dir / HYBRIDFAST_DATA"):
        resolve_dataset("mlqa-r")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a known dataset"):
        resolve_dataset("squad")


# ----------------------------------------------------------------------------- download (no network)

def _serve_from(monkeypatch, folder):
    monkeypatch.setattr(downloads, "URL_TEMPLATE", Path(folder).as_uri() + "/{commit}/{folder}/{file}")


def _fake_source(tmp_path, monkeypatch, pinned=True):
    """A small dataset 'fake-r' served from file:// with real or deliberately wrong checksums."""
    served = tmp_path / "served" / "c0ffee" / "fake-r"
    for lang in ("en", "de"):
        _write(served, lang, [("T", [_para(["S."], [("q", "q?", [(0, 0)])])])])
    sums = {f"{l}.json": downloads._sha256((served / f"{l}.json").read_bytes()) if pinned else None
            for l in ("en", "de")}
    monkeypatch.setitem(downloads.DATASETS, "fake-r", downloads._Source("c0ffee", "fake-r", sums, "test"))
    _serve_from(monkeypatch, tmp_path / "served")
    return served, sums


def test_download_fetches_and_verifies(tmp_path, monkeypatch):
    served, sums = _fake_source(tmp_path, monkeypatch)
    dest = data.download("fake-r", to=tmp_path / "out", show_progress=False)
    assert dest == tmp_path / "out" / "fake-r"
    assert sorted(p.name for p in dest.iterdir()) == ["SHA256SUMS", "de.json", "en.json"]
    assert (dest / "en.json").read_bytes() == (served / "en.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fake-r"]  # staging folder gone
    # present and verified files are not fetched again
    monkeypatch.setattr(downloads, "_fetch", lambda url: pytest.fail(f"refetched {url}"))
    data.download("fake-r", to=tmp_path / "out", show_progress=False)


def test_download_unpinned_records_checksums(tmp_path, monkeypatch):
    served, _ = _fake_source(tmp_path, monkeypatch, pinned=False)
    dest = data.download("fake-r", to=tmp_path / "out", show_progress=False)
    sums = downloads._read_sums(dest / "SHA256SUMS")
    assert sums == {f: downloads._sha256((served / f).read_bytes()) for f in ("de.json", "en.json")}
    (dest / "de.json").write_text("truncated")  # a damaged file is fetched again, the intact one kept
    fetched = []
    real_fetch = downloads._fetch
    monkeypatch.setattr(downloads, "_fetch", lambda url: fetched.append(url) or real_fetch(url))
    data.download("fake-r", to=tmp_path / "out", show_progress=False)
    assert [u.rsplit("/", 1)[1] for u in fetched] == ["de.json"]
    assert downloads._read_sums(dest / "SHA256SUMS") == sums


def test_download_checksum_failure_writes_nothing(tmp_path, monkeypatch):
    served, sums = _fake_source(tmp_path, monkeypatch)
    (served / "de.json").write_text((served / "de.json").read_text().replace("S.", "X."))  # tampered
    with pytest.raises(DownloadError, match="de.json: sha256 .* does not match"):
        data.download("fake-r", to=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # en.json was fetched first, yet nothing was written


def test_download_unpinned_checks_structure(tmp_path, monkeypatch):
    served, _ = _fake_source(tmp_path, monkeypatch, pinned=False)
    (served / "de.json").write_text('{"data": [{"title": "T", "paragraphs": [{"context": "x", "qas": []}]}]}')
    with pytest.raises(DownloadError, match="not LAReQA data.*sentence_breaks"):
        data.download("fake-r", to=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_download_offline_message(tmp_path, monkeypatch, capsys):
    def offline(url):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(downloads, "_fetch", offline)
    monkeypatch.setenv("HYBRIDFAST_DATA", str(tmp_path / "env"))
    with pytest.raises(DownloadError, match="--data-dir DIR or set HYBRIDFAST_DATA"):
        data.download("xquad-r", show_progress=False)
    assert not (tmp_path / "env").exists()  # the default destination, $HYBRIDFAST_DATA, is not left behind
    (tmp_path / "keep").mkdir()
    with pytest.raises(DownloadError):
        data.download("xquad-r", to=tmp_path / "keep", show_progress=False)
    assert (tmp_path / "keep").is_dir() and not list((tmp_path / "keep").iterdir())  # existing folder stays
    assert cli_main(["data", "download", "mlqa-r", "--to", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r/ar.json" in err and "HYBRIDFAST_DATA" in err


def test_download_real_xquad_checksums(tmp_path, monkeypatch, xquad_dir):
    """The pinned XQuAD-R checksums accept the real files (served from the shared copy)."""
    served = tmp_path / "served" / data.DATASETS["xquad-r"].commit
    served.mkdir(parents=True)
    os.symlink(xquad_dir, served / "xquad-r")
    _serve_from(monkeypatch, tmp_path / "served")
    dest = data.download("xquad-r", to=tmp_path / "out", show_progress=False)
    assert {l: len(c) for l, c in load_lareqa(dest).candidates.items()} == XQUAD_CANDIDATES


def test_cli_info(xquad_dir, capsys):
    assert cli_main(["data", "info", str(xquad_dir), "--languages", "en", "th", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "xquad-r[test]" in out and "570" in out
    assert cli_main(["data", "info", "xquad-r", "--data-dir", str(xquad_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert " 852" in out and "13090" in out


def test_download_real_mlqa_checksums_are_pinned(tmp_path, monkeypatch, xquad_dir):
    """MLQA-R's checksums are pinned (not trusted on first use) and accept the real files."""
    mlqa_dir = xquad_dir.parent / "mlqa-r"
    if not (mlqa_dir / "en.json").exists():
        pytest.skip(f"MLQA-R not found under {mlqa_dir}")
    src = data.DATASETS["mlqa-r"]
    assert all(src.files.values()) and "non-commercial" in src.license
    assert downloads._read_sums(mlqa_dir / "SHA256SUMS") == src.files
    served = tmp_path / "served" / src.commit
    served.mkdir(parents=True)
    os.symlink(mlqa_dir, served / "mlqa-r")
    _serve_from(monkeypatch, tmp_path / "served")
    dest = data.download("mlqa-r", to=tmp_path / "out", show_progress=False)
    assert len(load_lareqa(dest).languages) == 7
    # a tampered file is refused, nothing replaced
    (tmp_path / "tampered" / src.commit / "mlqa-r").mkdir(parents=True)
    for f in src.files:
        (tmp_path / "tampered" / src.commit / "mlqa-r" / f).write_bytes((mlqa_dir / f).read_bytes())
    with open(tmp_path / "tampered" / src.commit / "mlqa-r" / "de.json", "ab") as fh:
        fh.write(b" ")
    _serve_from(monkeypatch, tmp_path / "tampered")
    with pytest.raises(DownloadError, match="de.json: sha256 .* does not match the pinned"):
        data.download("mlqa-r", to=tmp_path / "out2", show_progress=False)


def test_ensure_dataset_downloads_on_first_use(tmp_path, monkeypatch):
    served, sums = _fake_source(tmp_path, monkeypatch)
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = []
    got = data.ensure_dataset("fake-r", show_progress=False, log=lines.append)
    assert got == tmp_path / "cache" / "hybridfast" / "fake-r" and (got / "en.json").is_file()
    assert len(lines) == 1 and "downloading" in lines[0]
    monkeypatch.setattr(downloads, "_fetch", lambda url: pytest.fail("fetched again"))
    assert data.ensure_dataset("fake-r", show_progress=False) == got  # found now: no download
    # into --data-dir when one is given
    monkeypatch.undo()
    served, sums = _fake_source(tmp_path / "b", monkeypatch)
    assert data.ensure_dataset("fake-r", data_dir=tmp_path / "dd", show_progress=False) == tmp_path / "dd" / "fake-r"


def test_ensure_dataset_offline_keeps_the_clear_message(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(downloads, "_fetch", offline)
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"(?s)xquad-r not found.*hybridfast data download xquad-r.*"
                                                r"download failed.*name resolution"):
        data.ensure_dataset("xquad-r", show_progress=False)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a known dataset"):
        data.ensure_dataset("squad")


def test_malformed_sha256sums_is_ignored_with_a_warning(tmp_path):
    (tmp_path / "SHA256SUMS").write_text("garbage line\n" + "a" * 64 + "  en.json\n")
    with pytest.warns(UserWarning, match="lines \\[1\\]"):
        assert downloads._read_sums(tmp_path / "SHA256SUMS") == {"en.json": "a" * 64}


# ----------------------------------------------------------------------------- front door, destinations

def test_load_benchmark_reads_every_format_and_data_info_too(tmp_path, capsys):
    """One front door (issue 20): a BEIR folder through load_benchmark and `hybridfast data info`,
    languages given as 'en,de' or 'en de' (reliability probe 2, #23)."""
    from helpers import synthetic_beir, write_beir_per_language, write_beir_single

    per_lang = write_beir_per_language(tmp_path / "beir", synthetic_beir(langs=("de", "en", "es")))
    single = write_beir_single(tmp_path / "single", synthetic_beir(langs=("de", "en")))
    bench = load_benchmark(per_lang, languages=["de,en"], shared_query_ids=True)
    assert isinstance(bench, data.GradedRetrievalBenchmark) and bench.languages == ["de", "en"]
    assert load_benchmark(single).languages == ["de", "en"]
    with pytest.raises(ValueError, match="shared_query_ids applies to BEIR"):
        load_benchmark(write_lareqa_toy(tmp_path / "lq"), shared_query_ids=True)
    for langs in (["de,en"], ["de", "en"]):
        assert cli_main(["data", "info", str(per_lang), "--languages", *langs]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].startswith("beir") and "\nde " in out and "\nes " not in out
    assert cli_main(["data", "info", str(per_lang), "--split", "dev"]) == 1
    assert "qrels/dev.tsv not found" in capsys.readouterr().err


def write_lareqa_toy(root):
    _write(root, "en", [("T", [_para(["S."], [("q", "q?", [(0, 0)])])])])
    return root


def test_only_iso_language_files_are_data(tmp_path):
    """One rule for "which JSON is a language" (benchmark.is_language_file): metadata is not a language."""
    root = write_lareqa_toy(tmp_path / "lq")
    (root / "zzz.json").write_text("{}")
    (root / "dataset_info.json").write_text("{}")
    assert sorted(data.language_files(root)) == ["en"]
    assert load_lareqa(root).languages == ["en"]
    assert resolve_dataset(root) == root


def test_download_to_a_file_read_only_or_missing_parents_is_one_clean_error(tmp_path, monkeypatch, capsys):
    """Reliability probe 2 #13, #27: one line, no traceback, no folder left behind."""
    _fake_source(tmp_path, monkeypatch)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DownloadError, match="afile exists and is not a folder"):
        data.download("fake-r", to=tmp_path / "afile", show_progress=False)
    assert (tmp_path / "afile").read_text() == "mine"
    with pytest.raises(DownloadError, match="is not a folder"):
        data.download("fake-r", to=tmp_path / "afile" / "below", show_progress=False)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(downloads.tempfile, "mkdtemp", read_only)
    with pytest.raises(DownloadError, match="Read-only file system"):
        data.download("fake-r", to=tmp_path / "ro" / "x", show_progress=False)
    assert not (tmp_path / "ro").exists()  # every folder it created is gone
    monkeypatch.undo()
    _fake_source(tmp_path, monkeypatch)
    monkeypatch.setattr(downloads, "_fetch", lambda url, timeout=60.0: (_ for _ in ()).throw(
        urllib.error.URLError("offline")))
    monkeypatch.setenv("HYBRIDFAST_DATA", str(tmp_path / "missing" / "deeper" / "data"))
    with pytest.raises(DownloadError, match="could not download"):
        data.download("fake-r", show_progress=False)
    assert not (tmp_path / "missing").exists()
    monkeypatch.setitem(downloads.DATASETS, "xquad-r", downloads.DATASETS["fake-r"])
    assert cli_main(["data", "download", "xquad-r", "--to", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder" in err and "Traceback" not in err


def test_download_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    _fake_source(tmp_path, monkeypatch)
    real = Path.write_bytes

    def full(self, payload):
        if ".fake-r-download-" in str(self):
            raise OSError(28, "No space left on device")
        return real(self, payload)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DownloadError, match="no space left on device"):
        data.download("fake-r", to=tmp_path / "new", show_progress=False)
    assert not (tmp_path / "new").exists()


def test_resolve_and_ensure_take_beir_folders_for_demo_and_study(tmp_path):
    """The demo and the study resolve a data argument before loading it: a BEIR folder passes."""
    from helpers import synthetic_beir, write_beir_per_language

    beir = write_beir_per_language(tmp_path / "beir", synthetic_beir(langs=("de", "en")))
    assert resolve_dataset(beir) == beir and data.ensure_dataset(str(beir)) == beir
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no BEIR or MIRACL folder"):
        resolve_dataset(tmp_path / "plain")
