"""hybridfast.rules: one answer for modes, splits, language codes, bools and atomic writes."""
import json
import os

import numpy as np
import pytest

from hybridfast import rules


@pytest.mark.parametrize("code", ["en", "de", "zh", "pt-BR", "zh_Hans", "sw"])
def test_language_codes_accepted(code):
    assert rules.check_language_code(code) == code


@pytest.mark.parametrize("code", ["xx", "zzz", "english", "EN", "", None, 1, "e"])
def test_language_codes_refused(code):
    assert not rules.is_language_code(code)
    with pytest.raises(ValueError, match="not a language code"):
        rules.check_language_code(code, arg="lang")


def test_bools_are_not_numbers_and_only_bools_are_bools():
    for bad in (True, False, np.bool_(True)):
        assert not rules.is_int(bad) and not rules.is_number(bad)
        with pytest.raises(TypeError, match="must be an int"):
            rules.check_int("k", bad, 1)
        with pytest.raises(TypeError, match="must be a number"):
            rules.check_number("x", bad)
    assert rules.check_int("k", np.int64(3), 1) == 3
    assert rules.check_bool("flag", np.bool_(False)) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(TypeError, match="must be True or False"):
            rules.check_bool("flag", bad)
    with pytest.raises(TypeError):
        rules.check_number("x", float("nan"))
    with pytest.raises(ValueError, match=r"must be in \(0, inf\]"):
        rules.check_number("t", 0.0, 0, low_open=True)


def test_modes_splits_languages():
    assert set(rules.MODES) == {"mono", "cross", "hybrid"}
    assert "dev" in rules.TRAIN_SPLITS and "dev" not in rules.BENCHMARK_SPLITS
    with pytest.raises(ValueError, match="eval_split must be one of"):
        rules.check_choice("eval_split", "dev", rules.BENCHMARK_SPLITS)
    assert rules.check_languages("en, de") == ["en", "de"]
    with pytest.raises(ValueError, match="duplicates"):
        rules.check_languages(["en", "en"])
    with pytest.raises(ValueError, match="empty"):
        rules.check_languages([])


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    rules.atomic_write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        rules.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left
