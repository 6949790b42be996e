"""Named data sets are checked against their pinned sha256 when loaded (reliability probe 2, #4),
with a stamp (size, mtime, sha256) so that repeated loads do not hash again."""
import json
import os
import shutil

import pytest

from hybridfast import data, rules
from hybridfast.cli import main as cli_main
from hybridfast.data import checksums


@pytest.fixture
def copy(tmp_path, monkeypatch, xquad_dir):
    """A private copy of two XQuAD-R languages under the name xquad-r, and a private cache."""
    dest = tmp_path / "c2" / "xquad-r"
    dest.mkdir(parents=True)
    for lang in ("en", "de"):
        shutil.copy2(xquad_dir / f"{lang}.json", dest / f"{lang}.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HYBRIDFAST_DATA", raising=False)
    checksums.forget_stamps()
    yield dest
    checksums.forget_stamps()


def _edit(path):
    """Keep valid JSON, move one question's answer to another sentence (probe #4's edit)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    qa = doc["data"][0]["paragraphs"][0]["qas"][0]
    qa["question"] = qa["question"] + " (edited)"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def test_pinned_copy_loads_and_edited_file_is_refused_by_name(copy):
    assert data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"]).languages == ["en"]
    _edit(copy / "en.json")
    with pytest.raises(data.ModifiedDataError, match=r"en\.json has sha256 .* pinned 7b0954f39297") as err:
        data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"])
    assert str(copy / "en.json") in str(err.value) and "--allow-modified-data" in str(err.value)
    with pytest.raises(data.ModifiedDataError, match="en.json"):  # training reads go through the same check
        data.load_training_pairs("xquad-r", data_dir=copy.parent, split="all", languages=["en", "de"])
    with pytest.warns(data.ModifiedDataWarning, match="USING MODIFIED DATA.*en.json"):
        bench = data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"], allow_modified=True)
    assert any(t.endswith("(edited)") for t in bench.queries["en"].values())
    # a folder given as a path is the user's own data: not compared with the pins
    assert data.load_benchmark(copy, languages=["en"]).languages == ["en"]


def test_stamp_avoids_rehashing_until_the_file_changes(copy, monkeypatch, tmp_path):
    data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"])
    stamps = json.loads((tmp_path / "cache" / "hybridfast" / checksums.STAMP_FILE).read_text())
    assert {os.path.basename(k) for k in stamps} == {"en.json", "de.json"}
    checksums.forget_stamps()  # a new process: only the stamp file remains
    monkeypatch.setattr(rules, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"])
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _edit(copy / "en.json")  # new size and mtime: hashed again, and refused
    with pytest.raises(data.ModifiedDataError, match="en.json"):
        data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["en"])


def test_unwritable_stamp_cache_is_not_an_error(copy, tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocker"))
    assert data.load_benchmark("xquad-r", data_dir=copy.parent, languages=["de"]).languages == ["de"]


def test_cli_refuses_edited_data_in_one_line_and_allows_it_on_request(copy, capsys):
    _edit(copy / "en.json")
    assert cli_main(["data", "info", "xquad-r", "--data-dir", str(copy.parent), "--languages", "en"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "en.json" in err and "Traceback" not in err
    assert cli_main(["data", "info", "xquad-r", "--data-dir", str(copy.parent), "--languages", "en",
                     "--allow-modified-data"]) == 0
    captured = capsys.readouterr()
    assert "warning: USING MODIFIED DATA" in captured.err and "1190" in captured.out
