"""hybridfast._malloc: when the training commands keep freed memory for reuse, and that it does
(fewer page faults for a large buffer allocated and freed again and again)."""
import os
import subprocess
import sys

import pytest

from hybridfast import _malloc
from hybridfast.cli import main


@pytest.mark.parametrize("environ,platform,applies,says", [
    ({}, "linux", True, "kept for reuse"),
    ({"HYBRIDFAST_MALLOC": "keep"}, "linux", True, "kept for reuse"),
    ({"HYBRIDFAST_MALLOC": "System"}, "linux", False, "$HYBRIDFAST_MALLOC=system"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so"}, "linux", False, "left to your LD_PRELOAD"),
    ({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "x"}, "linux", False, "GLIBC_TUNABLES, MALLOC_ARENA_MAX"),
    ({}, "darwin", False, "glibc's malloc only"),
])
def test_plan_follows_the_environment(environ, platform, applies, says):
    apply, why = _malloc.plan(environ, platform)
    assert apply is applies and says in why


def test_a_bad_setting_is_refused_naming_the_variable(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"\$HYBRIDFAST_MALLOC must be 'keep' or 'system', got 'fast'"):
        _malloc.plan({"HYBRIDFAST_MALLOC": "fast"}, "linux")
    monkeypatch.setenv("HYBRIDFAST_MALLOC", "fast")
    monkeypatch.setattr(sys, "argv", ["hybridfast", "train", "--train", "x"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "HYBRIDFAST_MALLOC must be" in capsys.readouterr().err


def test_only_the_command_line_tunes_the_process(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    bad = ["train", "--train", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]
    main(bad)                      # a call from Python: the caller's process is left alone
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["hybridfast"] + bad)
    main()                         # the console script
    assert calls == [1]
    monkeypatch.setattr(sys, "argv", ["hybridfast", "info"])
    main()                         # not a training command
    assert calls == [1]


_FAULTS = """
import resource, sys
import torch
from hybridfast import _malloc
torch.set_num_threads(1)  # one arena: the same allocation sequence on every run
if sys.argv[1] == "keep":
    assert _malloc.keep_freed_memory()
def step():  # a 64 MiB buffer (an embedding gradient's kind) and small objects, freed again
    x = torch.ones(64 << 18)
    return [str(i) for i in range(100)], x.sum()
for _ in range(30):  # warm-up: the heap grows until freed blocks fit the requests
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k not in _malloc._USER_SETTINGS and k != _malloc.ENV}
    faults = {how: int(subprocess.run([sys.executable, "-c", _FAULTS, how], env=env, capture_output=True,
                                      text=True, check=True).stdout) for how in ("system", "keep")}
    # the system's malloc maps each 64 MiB block afresh and faults it in (16k pages of 4 KiB, fewer
    # with transparent huge pages); kept memory is reused once the heap has grown
    assert faults["system"] >= 10 * 32 and faults["keep"] < faults["system"] / 4, faults
