"""hybridfast.models.cache and get(): damaged entries heal, disk errors are one line, stale staging goes.

The offline rebuild of multilingual-e5-small is replaced by a tiny BERT builder so that
every case runs in a second without the [multilingual] extra; the real rebuild goes
through the same stage_and_rename / write_info path (tests/models/test_models.py).
"""
import errno
import json
import os
import time

import pytest
from helpers import tiny_bert

from hybridfast import models
from hybridfast.models import cache, fetch, st_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "multilingual-e5-small"


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """An empty model cache whose offline rebuild writes a tiny BERT; returns the list of builds."""
    monkeypatch.setenv("HYBRIDFAST_MODELS", str(tmp_path / "mc"))
    monkeypatch.setenv("HYBRIDFAST_OFFLINE", "1")
    done = []

    def rebuild(folder, show_progress=True):
        done.append(folder)
        tiny_bert(folder, ["hello", "world", "query", "passage"], layers=2, max_positions=64)
        st_folder.write(folder, hidden=32, prompts=("query: ", "passage: "), max_seq_length=512)
        cache.write_info(folder, {"name": NAME, "source": "rebuild-4bit", "layers": None})

    monkeypatch.setattr(fetch, "rebuild_me5_small", rebuild)
    return done


def _cli(*argv):
    from hybridfast.cli import main

    return main(["models", *argv])


def test_build_records_sizes_and_hashes(builds):
    folder = models.get(NAME)
    files = cache.read_info(folder)["files"]
    assert files["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert len(files["config.json"]["sha256"]) == 64 and cache.MODEL_INFO_FILE not in files
    assert cache.problem(folder) is None and cache.problem(folder, verify=True) is None
    # a same-size edit passes the size check and is caught by verify
    cfg = folder / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b'"bert"', b'"BERT"'))
    assert cache.problem(folder) is None
    assert "config.json differs" in cache.problem(folder, verify=True)


@pytest.mark.parametrize("damage", ["delete tokenizer", "truncate weights"])
def test_damaged_entry_is_rebuilt_in_place(builds, damage, capsys):
    """Probe #6 / #7: a missing file or truncated weights -> `models get` rebuilds the entry in place."""
    folder = models.get(NAME)
    if damage == "delete tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    assert cache.problem(folder) is not None
    assert _cli("get", NAME) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(folder) and "damaged" in err and "rebuilding it in place" in err
    assert len(builds) == 2 and cache.problem(folder) is None
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # nothing set aside is left
    assert models.get(NAME) == folder and len(builds) == 2  # whole again: no third build


def test_damaged_layer_entry_is_rebuilt(builds):
    small = models.get(f"{NAME}@L1")
    os.truncate(small / "model.safetensors", 100)
    assert models.get(f"{NAME}@1") == small  # "@1" is the short form of "@L1"
    assert cache.problem(small) is None and cache.read_info(small)["layers"] == 1
    assert json.loads((small / "config.json").read_text())["num_hidden_layers"] == 1


def test_truncated_weights_never_load_silently(builds, tmp_path):
    """Probe #7: loading a damaged folder is one DamagedModelError (a ValueError) naming it and the fix."""
    from hybridfast.encoder import Encoder

    folder = models.get(NAME)
    os.truncate(folder / "model.safetensors", 1000)
    with pytest.raises(models.DamagedModelError, match=rf"{folder}.*model.safetensors.*models get {NAME}"):
        Encoder(str(folder), device="cpu", show_progress=False)
    # a folder with no build record: the safetensors header gives the truncation away
    plain = tiny_bert(tmp_path / "plain", ["hello"])
    os.truncate(plain / "model.safetensors", (plain / "model.safetensors").stat().st_size - 10)
    with pytest.raises(ValueError, match=r"plain is damaged .*truncated.*save the model into it again"):
        Encoder(plain, device="cpu", show_progress=False)
    # asked for by name, the damaged entry heals instead
    assert Encoder(NAME, device="cpu", show_progress=False).source == str(folder) and len(builds) == 2


def test_full_disk_is_one_line_and_leaves_nothing(builds, monkeypatch, capsys):
    """Probe #15: ENOSPC inside safetensors (a SafetensorError, not an OSError) -> one line, exit 1."""
    def full(folder, show_progress=True):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(fetch, "rebuild_me5_small", full)
    assert _cli("get", NAME) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the progress line, then the error
    assert "Traceback" not in "".join(lines) and [i for i, l in enumerate(lines) if "error" in l] == [len(lines) - 1]
    assert "no space left on device" in lines[-1] and str(cache.cache_dir() / NAME) in lines[-1]
    assert list(cache.cache_dir().iterdir()) == []  # the staging folder is gone


def test_read_only_cache_and_to_are_one_line(builds, monkeypatch, tmp_path, capsys):
    def read_only(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    models.get(NAME)  # the cache holds the full model; what follows needs a new folder
    monkeypatch.setattr(cache.tempfile, "mkdtemp", read_only)
    assert _cli("get", f"{NAME}@L1") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert "read-only file system" in lines[-1] and "HYBRIDFAST_MODELS" in lines[-1]
    assert f"{NAME}@L1" in lines[-1]
    assert "Traceback" not in "".join(lines) and [i for i, l in enumerate(lines) if "error" in l] == [len(lines) - 1]
    with pytest.raises(OSError, match=r"could not write .*mine: read-only.*another --to folder"):
        models.get(NAME, to=tmp_path / "mine")


def test_stale_staging_folders_are_removed(builds):
    """Probe #17: leftovers of killed runs go; a stage whose owner still runs stays."""
    mc = cache.cache_dir()
    mc.mkdir(parents=True)
    old = mc / f".{NAME}.tmp-killed"             # an older version's stage: no owner record
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "model.safetensors").write_bytes(b"x" * 10)
    past = time.time() - 3600
    for p in (old / "sub" / "model.safetensors", old / "sub", old):
        os.utime(p, (past, past))
    dead = mc / f".{NAME}.tmp-dead"
    dead.mkdir()
    (dead / cache._OWNER_FILE).write_text(json.dumps({"host": cache.socket.gethostname(), "pid": 2 ** 22 + 7}))
    live = mc / f".{NAME}.tmp-live"
    live.mkdir()
    (live / cache._OWNER_FILE).write_text(json.dumps({"host": cache.socket.gethostname(), "pid": os.getpid()}))
    other = mc / ".another-model.tmp-killed"
    other.mkdir()
    models.get(NAME)
    left = sorted(p.name for p in mc.iterdir() if p.name.startswith("."))
    assert left == [".another-model.tmp-killed", f".{NAME}.tmp-live"]


def test_cache_entries_follow_the_umask(builds):
    old = os.umask(0o022)
    try:
        folder = models.get(NAME)
    finally:
        os.umask(old)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
