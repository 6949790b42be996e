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


def test_languages_comma_and_space_forms_are_one_list():
    """Reliability probe 2 #23: `--languages en,de` (argparse gives ['en,de']) and `en de` agree."""
    assert rules.check_languages(["en,de"]) == ["en", "de"]
    assert rules.check_languages(["en,de", "es"]) == ["en", "de", "es"]
    assert rules.flatten_languages(["en, de", "es"]) == ["en", "de", "es"]
    with pytest.raises(ValueError, match="duplicates"):
        rules.check_languages(["en,de", "de"])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """Reliability probe 2 #14: mkstemp creates 0600; written files must look like ordinary ones."""
    old = os.umask(umask)
    try:
        assert rules.current_umask() == umask
        a = rules.atomic_write_text(tmp_path / "a.txt", "x")
        (b, c) = rules.atomic_write_many({tmp_path / "b.txt": b"1", tmp_path / "c.txt": b"2"})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for path in (a, b, c):
        assert path.stat().st_mode & 0o777 == want, path


def test_atomic_write_many_is_all_or_nothing_on_a_full_disk(tmp_path, monkeypatch):
    first = {tmp_path / "r.json": b'{"v": 1}', tmp_path / "r.md": b"old"}
    rules.atomic_write_many(first)
    real_fdopen = os.fdopen
    calls = []

    def second_write_fails(fd, *a, **k):  # the 2nd temporary hits a full disk
        calls.append(fd)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(os, "fdopen", second_write_fails)
    with pytest.raises(OSError, match="No space"):
        rules.atomic_write_many({tmp_path / "r.json": b'{"v": 2}', tmp_path / "r.md": b"new"})
    assert {p: p.read_bytes() for p in first} == first  # the first file was not replaced either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary left


def test_write_error_message_names_a_full_disk_without_errno(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('... unexpected pos ...') with no errno:
    the free space decides (reliability probe 2 #9)."""
    target = tmp_path / "ckpt" / "model.pt"
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 112960 vs 112848")
    usage = type("U", (), {"free": 4096})
    monkeypatch.setattr(rules.shutil, "disk_usage", lambda p: usage)
    assert rules.is_disk_full(torch_error, target)
    msg = rules.write_error_message(torch_error, target)
    assert "no space left on device" in msg and str(target) in msg and "4,096 bytes free" in msg
    usage.free = 10 << 30
    assert not rules.is_disk_full(torch_error, target)
    assert "unexpected pos" in rules.write_error_message(torch_error, target)
    assert rules.is_disk_full(OSError(28, "No space left on device"), target)  # errno alone suffices
    assert "no space left on device" in rules.write_error_message(OSError(28, "x"), target)
    assert rules.write_error_message(PermissionError(13, "Permission denied"), target).endswith(
        "Permission denied")


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    """A study/demo plot replaced under a full disk keeps the earlier PNG byte-identical."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridfast import rules

    path = tmp_path / "plot.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    rules.atomic_savefig(fig, path, dpi=50)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    ax.plot([0, 1], [1, 0])

    def full(fd, *a, **k):
        os.close(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(OSError):
        rules.atomic_savefig(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
