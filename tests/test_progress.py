"""hybridfast.progress.Progress, the one progress helper of encoding, shards, search and training:
plain lines in a log, a bar on a terminal, nothing when off."""
import io

import numpy as np

from hybridfast.encoder import TextProgress
from hybridfast.evaluation import tiles
from hybridfast.evaluation.search import search
from hybridfast.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_in_logs_a_bar_on_a_terminal_and_nothing_when_off():
    """In a log (a stream that is no terminal): plain lines with the rate and an ETA, ending at
    100%; on a terminal a tqdm bar; disabled, nothing."""
    log = io.StringIO()
    with TextProgress(10, "encode passage texts", enabled=True, every=0.0, stream=log) as bar:
        for _ in range(5):
            bar.update(2)
    lines = log.getvalue().strip().splitlines()
    assert len(lines) == 5 and "\r" not in log.getvalue()
    assert lines[-1].startswith("encode passage texts: 10/10 (100%),") and "texts/s, ETA 0:00" in lines[-1]
    tty = Terminal()
    with TextProgress(10, "encode query texts", enabled=True, stream=tty) as bar:
        bar.update(10)
    assert "encode query texts" in tty.getvalue() and "\r" in tty.getvalue() and "ETA" not in tty.getvalue()
    quiet = io.StringIO()
    with TextProgress(10, "encode query texts", enabled=False, every=0.0, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_lines_are_rate_limited_and_always_end_at_100_percent():
    log = io.StringIO()
    with Progress(1000, "work", "item", every=3600.0, stream=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()  # every hour at most: only the final line
    assert len(lines) == 1 and lines[0].startswith("work: 1000/1000 (100%), ") and " items/s, ETA 0:00" in lines[0]


def test_resumed_work_counts_from_initial_and_label_plural_and_extra_are_used():
    log = io.StringIO()
    bar = Progress(8, "train", "step", initial=4, every=None, stream=log, label="step", digits=2)
    bar.update(2)
    assert log.getvalue() == ""  # every=None: only line() prints
    bar.line(done=6, extra=", loss 0.5000")
    bar.close()
    (line,) = log.getvalue().splitlines()
    assert line.startswith("train: step 6/8 (75%), ") and " steps/s, loss 0.5000, ETA " in line
    rate = float(line.split(", ")[1].split()[0])
    assert rate > 0  # 2 steps done in this run; the 4 resumed ones are not in the rate
    log = io.StringIO()
    with Progress(3, "search", "query", plural="queries", every=0.0, stream=log) as bar:
        bar.update(3)
    assert " queries/s, ETA 0:00" in log.getvalue()


def test_search_progress_counts_score_tiles(monkeypatch, capsys):
    """The tiles engine reports per score tile (query tile x candidate tile): a single query
    tile against a large corpus still moves, with an ETA."""
    monkeypatch.setattr(tiles, "TILE_COLS", 16)
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((10, 4), dtype=np.float32), rng.standard_normal((100, 4), dtype=np.float32)
    search(q, c, rng.integers(0, 100, (10, 2)), k=3, engine="tiles", chunk_size=4, show_progress=True)
    err = capsys.readouterr().err  # captured: no terminal, plain lines
    total = tiles.sweep_count(10, 100, 4)
    assert total == 3 * 7
    assert f"search: {total}/{total} (100%), " in err and " tiles/s, ETA 0:00" in err and "\r" not in err
