"""Column detection of the sentence-transformers hybrid batching (reliability probe 2, #24 and #25)."""
import warnings

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("sentence_transformers")

from hybridfast.integrations.st_batching import HybridBatching, HybridPairIndex  # noqa: E402

LANGS = ("de", "en", "es")


def rows(lang_column="lang", extra=None, n=6):
    out = {"id": [], lang_column: [], "anchor": [], "positive": []}
    for i in range(n):
        for lang in LANGS:
            out["id"].append(f"q{i}")
            out[lang_column].append(lang)
            out["anchor"].append(f"what {i} {lang}")
            out["positive"].append(f"the {i} {lang}")
            for column in extra or ():
                out.setdefault(column, []).append(f"{column} {i} {lang}")
    return out


def test_locale_column_is_a_language_column_not_text():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: locale is no hard negative
        index = HybridPairIndex(datasets.Dataset.from_dict(rows("locale")), HybridBatching())
    assert index.text_columns == ["anchor", "positive"]
    assert index.lang_of == {"anchor": "locale", "positive": "locale"}
    assert index.languages == list(LANGS) and index.availability.all()


def test_an_unknown_language_column_is_named_in_the_hint():
    ds = datasets.Dataset.from_dict(rows("loc"))
    with pytest.raises(ValueError, match=r"\['loc'\] hold language codes.*lang_columns='loc'"):
        HybridPairIndex(ds, HybridBatching())
    index = HybridPairIndex(ds, HybridBatching(lang_columns="loc"))  # the hint's fix works
    assert index.text_columns == ["anchor", "positive"]


def test_an_extra_text_column_is_said_to_be_a_hard_negative():
    ds = datasets.Dataset.from_dict(rows(extra=["title"]))
    with pytest.warns(UserWarning, match=r"columns \['title'\] are used as hard negatives"):
        index = HybridPairIndex(ds, HybridBatching())
    assert index.text_columns == ["anchor", "positive", "title"]  # the convention itself is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HybridPairIndex(ds, HybridBatching(text_columns=["anchor", "positive"]))  # chosen: no warning
        HybridPairIndex(datasets.Dataset.from_dict(rows(extra=["negative_1"])), HybridBatching())


def test_default_lang_weights_are_the_papers_size_sampling():
    assert HybridBatching().lang_weights == "size"
