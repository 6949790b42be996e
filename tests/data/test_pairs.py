"""Training-data readers on small fixtures written here (JSONL, mMARCO-style, LAReQA)."""
import json

import numpy as np
import pytest

from hybridfast.data import candidate_text
from hybridfast.data.pairs import ParallelPairs, load_training_pairs
from helpers import write_lareqa


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


JSONL_ROWS = [
    {"id": "a", "lang": "en", "query": "where is the cat", "positive": "the cat is on the mat",
     "negatives": ["the dog is in the park"]},
    {"id": "a", "lang": "de", "query": "wo ist die katze", "positive": "die katze ist auf der matte"},
    {"id": "b", "lang": "en", "query": "what is red", "positive": "the apple is red"},
    {"id": "c", "lang": "de", "query": "was ist blau", "positive": "der himmel ist blau"},
    # d duplicates a's English positive: one group, never both in a batch
    {"id": "d", "lang": "en", "query": "what is on the mat", "positive": "the cat is on the mat"},
]


def test_jsonl_reader(tmp_path):
    pairs = load_training_pairs(write_jsonl(tmp_path / "t.jsonl", JSONL_ROWS))
    assert isinstance(pairs, ParallelPairs)
    assert pairs.languages == ["de", "en"]
    assert pairs.example_ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(pairs.availability, [[1, 1], [0, 1], [1, 0], [0, 1]])
    assert pairs.availability.dtype == np.bool_
    de, en = 0, 1
    assert pairs.query(0, de) == "wo ist die katze"
    assert pairs.positive(2, de) == "der himmel ist blau"
    assert pairs.negatives(0, en) == ["the dog is in the park"]
    assert pairs.negatives(0, de) == []
    with pytest.raises(KeyError, match="no text in language 'de'"):
        pairs.query(1, de)
    assert pairs.groups is not None and pairs.groups.dtype == np.int64
    assert pairs.groups[0] == pairs.groups[3]
    assert len({pairs.groups[0], pairs.groups[1], pairs.groups[2]}) == 3
    # languages filter drops examples left without text
    en_only = load_training_pairs(tmp_path / "t.jsonl", languages=["en"])
    assert en_only.languages == ["en"] and en_only.example_ids == ["a", "b", "d"]


def test_jsonl_without_duplicates_has_no_groups(tmp_path):
    pairs = load_training_pairs(write_jsonl(tmp_path / "t.jsonl", JSONL_ROWS[:4]))
    assert pairs.groups is None
    # a folder of jsonl files is read as one set
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "1.jsonl", JSONL_ROWS[:2])
    write_jsonl(tmp_path / "dir" / "2.jsonl", JSONL_ROWS[2:4])
    assert load_training_pairs(tmp_path / "dir").example_ids == ["a", "b", "c"]


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "lang": "en", "query": "q"}', "missing key 'positive'"),
    ('{"id": 1, "lang": "english", "query": "q", "positive": "p"}', "'english' is not a language code"),
    ('{"id": 1, "lang": "en", "query": "q", "positive": ""}', "'positive' must be a non-empty string"),
    ('{"id": 1, "lang": "en", "query": "q", "positive": "p", "negatives": "n"}', "'negatives' must be a list"),
    ('{"id": 1, "lang": "en", "query": "q", "positive": "p"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    # issue 13 item 14: ISO 639-1 codes only; a null id must not merge with the real id "None"
    ('{"id": 1, "lang": "xx", "query": "q", "positive": "p"}', "'xx' is not a language code"),
    ('{"id": 1, "lang": "zzz", "query": "q", "positive": "p"}', "'zzz' is not a language code"),
    ('{"id": null, "lang": "en", "query": "q", "positive": "p"}', "'id' must be a non-empty string or an integer"),
    ('{"id": true, "lang": "en", "query": "q", "positive": "p"}', "'id' must be a non-empty string or an integer"),
])
def test_jsonl_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "None", "lang": "en", "query": "q", "positive": "p"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_training_pairs(path)
    assert f"{path}:2" in str(info.value)


def test_jsonl_duplicate_language_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [JSONL_ROWS[0], JSONL_ROWS[0]])
    with pytest.raises(ValueError, match=r"t.jsonl:2: id 'a' already has a 'en' line"):
        load_training_pairs(path)


def test_bad_specs_and_languages(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", JSONL_ROWS)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_training_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"languages: \['fr'\] not in"):
        load_training_pairs(path, languages=["en", "fr"])
    with pytest.raises(ValueError, match="'EN' is not a language code"):
        load_training_pairs(path, languages=["EN"])
    with pytest.raises(ValueError, match="split"):
        load_training_pairs(path, split="test")
    with pytest.raises(ValueError, match="split must be"):
        load_training_pairs(path, split="validation")
    with pytest.raises(TypeError, match="spec"):
        load_training_pairs(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training data recognised"):
        load_training_pairs(tmp_path / "empty")


def write_mmarco(root, with_root_triples=True):
    texts = {
        "english": ({"q1": "what is red", "q2": "what is blue", "q3": "where is the cat"},
                    {"p1": "the apple is red", "p2": "the sky is blue", "p3": "the cat is on the mat",
                     "p9": "bananas are yellow"}),
        "de": ({"q1": "was ist rot", "q2": "was ist blau"},
               {"p1": "der apfel ist rot", "p2": "der himmel ist blau", "p9": "bananen sind gelb"}),
    }
    for lang, (queries, collection) in texts.items():
        (root / lang).mkdir(parents=True)
        (root / lang / "queries.train.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in queries.items()))
        (root / lang / "collection.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in collection.items()))
    triples = "q1\tp1\tp9\nq1\tp1\tp2\nq2\tp2\tp9\nq3\tp3\tp1\nq1\tp1\tp9\n"
    target = root if with_root_triples else root / "english"
    (target / "triples.train.ids.small.tsv").write_text(triples)
    return root


def test_mmarco_reader(tmp_path):
    pairs = load_training_pairs(write_mmarco(tmp_path / "mm"))
    assert pairs.languages == ["de", "en"]  # 'english' folder maps to 'en'
    assert pairs.example_ids == ["q1", "q2", "q3"]
    np.testing.assert_array_equal(pairs.availability, [[1, 1], [1, 1], [0, 1]])
    de, en = 0, 1
    assert pairs.query(0, de) == "was ist rot"
    assert pairs.positive(1, en) == "the sky is blue"
    assert pairs.negatives(0, en) == ["bananas are yellow", "the sky is blue"]  # distinct, file order
    assert pairs.negatives(2, en) == ["the apple is red"]
    assert pairs.groups is None
    de_only = load_training_pairs(tmp_path / "mm", languages=["de"])
    assert de_only.example_ids == ["q1", "q2"] and de_only.negatives(0, 0) == ["bananen sind gelb", "der himmel ist blau"]


def test_mmarco_triples_in_language_folder_and_errors(tmp_path):
    pairs = load_training_pairs(write_mmarco(tmp_path / "mm", with_root_triples=False))
    assert pairs.example_ids == ["q1", "q2", "q3"]
    bad = write_mmarco(tmp_path / "bad")
    (bad / "triples.train.ids.small.tsv").write_text("q1\tp1\n")
    with pytest.raises(ValueError, match=r"triples.train.ids.small.tsv:1: expected 'qid<TAB>pos_pid<TAB>neg_pid'"):
        load_training_pairs(bad)
    (bad / "triples.train.ids.small.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="no id triples file"):
        load_training_pairs(bad)
    mm = tmp_path / "mm"
    with pytest.raises(FileNotFoundError, match="queries.dev.tsv"):
        load_training_pairs(mm, split="dev")
    with pytest.raises(ValueError, match=r"\['fr'\] not in"):
        load_training_pairs(mm, languages=["fr"])


def test_lareqa_reader(tmp_path):
    root = write_lareqa(tmp_path / "toy")
    pairs = load_training_pairs(root, split="all")
    assert pairs.languages == ["de", "en"]
    assert sorted(pairs.example_ids) == ["q1", "q2", "q3", "q4"]
    assert pairs.availability.all()
    e1, e2, e3 = (pairs.example_ids.index(q) for q in ("q1", "q2", "q3"))
    en = pairs.languages.index("en")
    assert pairs.query(e1, en) == "Who sat?"
    assert pairs.positive(e1, en) == candidate_text("The cat sat.", "The cat sat. The dog ran.")
    # q1 and q2 are answered by the same sentence: one group
    assert pairs.groups is not None and pairs.groups[e1] == pairs.groups[e2] != pairs.groups[e3]
    # hard negatives: the other answer sentence of the paragraph
    assert pairs.negatives(e1, en) == [candidate_text("The dog ran.", "The cat sat. The dog ran.")]
    assert load_training_pairs(root, split="all", languages=["de"]).languages == ["de"]
    with pytest.raises(ValueError, match=r"\['fr'\] not in"):
        load_training_pairs(root, languages=["fr"])


def test_xquad_r_by_name(xquad_dir):
    pairs = load_training_pairs("xquad-r", data_dir=xquad_dir.parent, split="train", languages=["en", "de"])
    test = load_training_pairs(xquad_dir, split="test", languages=["en", "de"])
    assert pairs.languages == ["de", "en"] and pairs.availability.all()
    assert 0 < len(pairs) < 1190 and len(pairs) + len(test) == 1190
    assert not set(pairs.example_ids) & set(test.example_ids)
    assert pairs.groups is not None  # several questions share an answer sentence


def test_fingerprint_follows_the_content(tmp_path):
    a = load_training_pairs(write_jsonl(tmp_path / "a.jsonl", JSONL_ROWS))
    b = load_training_pairs(write_jsonl(tmp_path / "b.jsonl", JSONL_ROWS))
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    changed = [dict(r) for r in JSONL_ROWS]
    changed[1]["positive"] += "!"
    assert load_training_pairs(write_jsonl(tmp_path / "c.jsonl", changed)).fingerprint() != a.fingerprint()
    assert load_training_pairs(tmp_path / "a.jsonl", languages=["en"]).fingerprint() != a.fingerprint()
