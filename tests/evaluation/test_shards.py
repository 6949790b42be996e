"""Candidate shards on disk (hybridfast.evaluation.shards): streamed search equals the in-memory
search exactly, resumable and checksummed writing, refusals that name the problem (issue 23)."""
import json

import hashlib

import numpy as np
import pytest
import torch

from hybridfast.evaluation import tiles
from hybridfast.evaluation.search import chunk_scores, search
from hybridfast.evaluation.shards import ShardedTiles, ShardWriter, encode_to_shards, read_manifest


def corpus(seed=0, C=500, D=16, Q=37, R=3):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((C, D), dtype=np.float32)
    lo, hi = C // 5, C // 5 + C // 12
    c[lo:hi] = c[lo]  # exact duplicates: ties across shard and tile boundaries
    q = rng.standard_normal((Q, D), dtype=np.float32)
    rel = rng.integers(0, C, (Q, R))
    rel[:, 1] = rng.integers(lo, hi, Q)
    rel[::4, 2] = -1
    return q, c, rel, np.array([0, C // 4, 3 * C // 5, C]), rng.permutation(C)


def write(folder, c, precision="fp32", shard_rows=37):
    w = ShardWriter(folder, len(c), precision, shard_rows)
    for s in range(0, len(c), 50):  # appends that do not line up with the shards
        w.append(c[s:s + 50])
    assert w.close()
    return ShardedTiles(folder)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_shards_give_the_in_memory_ranks(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(tiles, "TILE_COLS", 45)  # tiles straddle shards (37 rows) and blocks
    q, c, rel, offsets, prio = corpus()
    shards = write(tmp_path / "s", c, precision)
    kw = dict(offsets=offsets, tie_priority=prio, k=12, chunk_size=10)
    a = search(q, c, rel, precision=precision, **kw)
    b = search(q, shards, rel, **kw)  # precision "auto" takes the shards' own
    for name in ("ranks", "block_ranks", "topk_ids", "topk_scores"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for (s1, e1, x), (s2, e2, y) in zip(chunk_scores(q, c, chunk_size=10, precision=precision),
                                        chunk_scores(q, shards, chunk_size=10)):
        assert (s1, e1) == (s2, e2)
        np.testing.assert_array_equal(x, y)
    m = read_manifest(tmp_path / "s")
    assert m["complete"] and [s["rows"] for s in m["shards"]] == [37] * 13 + [19]
    want_dtype = np.uint16 if precision == "bf16" else np.float32
    assert np.load(tmp_path / "s" / "shard-00000.npy", mmap_mode="r").dtype == want_dtype


def test_a_killed_writer_resumes_where_it_stopped(tmp_path):
    _, c, *_ = corpus(1)
    whole = write(tmp_path / "whole", c)
    w = ShardWriter(tmp_path / "part", len(c), "fp32", 37)
    w.append(c[:100])  # two shards written, 26 rows pending, then the process dies
    (tmp_path / "part" / ".shard-dead.tmp").write_bytes(b"partial")
    del w
    w = ShardWriter(tmp_path / "part", len(c), "fp32", 37)
    assert w.rows_done == 74 and not w.complete
    assert not list((tmp_path / "part").glob(".shard-*.tmp"))
    w.append(c[74:])
    assert w.close()
    got, want = read_manifest(tmp_path / "part"), read_manifest(tmp_path / "whole")
    assert got["shards"] == want["shards"]  # byte-identical shards (same sha256)
    np.testing.assert_array_equal(ShardedTiles(tmp_path / "part").rows(np.arange(len(c))), whole.rows(np.arange(len(c))))


def test_encode_to_shards_resumes_after_a_failure(tmp_path):
    _, c, *_ = corpus(2, C=120)
    texts = [f"t{i}" for i in range(len(c))]
    calls = []

    def encode(batch, fail_at=None):
        calls.append(len(batch))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return c[[int(t[1:]) for t in batch]]

    with pytest.raises(KeyboardInterrupt):
        encode_to_shards(lambda b: encode(b, fail_at=3), texts, tmp_path / "s", shard_rows=25)
    calls.clear()
    shards = encode_to_shards(encode, texts, tmp_path / "s", shard_rows=25)
    assert calls == [25, 25, 20]  # only what the first run did not finish
    np.testing.assert_array_equal(shards.rows(np.arange(120)), c)
    with pytest.raises(ValueError, match="other settings"):  # another corpus in the same folder
        encode_to_shards(encode, texts[::-1], tmp_path / "s", shard_rows=25)


def test_refusals_name_the_problem(tmp_path):
    _, c, rel, *_ = corpus(3, C=90)
    write(tmp_path / "s", c)
    with pytest.raises(ValueError, match="other settings"):
        ShardWriter(tmp_path / "s", len(c), "bf16", 37)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a shard folder"):
        ShardWriter(tmp_path / "user", 10)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    w = ShardWriter(tmp_path / "half", len(c), "fp32", 37)
    w.append(c[:40])
    with pytest.raises(ValueError, match="incomplete shards \\(37 of 90 rows\\)"):
        ShardedTiles(tmp_path / "half")
    with pytest.raises(ValueError, match="more rows than total"):
        w.append(c)
    with pytest.raises(ValueError, match="dimension 3, the shards 16"):
        w.append(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        w.append(np.full((2, 16), np.nan, np.float32))
    shard = tmp_path / "s" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ShardedTiles(tmp_path / "s")
    ShardedTiles(tmp_path / "s", verify=False)  # the caller's choice
    with pytest.raises(ValueError, match="precision='bf16', but the candidate shards hold fp32"):
        search(np.zeros((3, 16), np.float32), ShardedTiles(tmp_path / "s", verify=False), rel[:3], precision="bf16")
    with pytest.raises(ValueError, match="not a hybridfast shard folder"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "x"}))
        ShardedTiles(tmp_path / "other")


class FloatEncoder:
    """Seeded float embeddings per text (no ties by construction), counting passage calls."""

    def __init__(self):
        self.passage_calls = 0

    def _enc(self, texts):
        seeds = [int(hashlib.md5(t.encode()).hexdigest()[:8], 16) for t in texts]
        out = np.stack([np.random.default_rng(s).standard_normal(12) for s in seeds])
        return out.astype(np.float32)

    encode_queries = _enc

    def encode_passages(self, texts):
        self.passage_calls += 1
        return self._enc(texts)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluator_with_shards_equals_in_memory(tmp_path, monkeypatch, precision):
    """evaluate(encoder, shards=DIR): candidates written to shards and streamed; the same metrics
    as the in-memory evaluation with that precision; a second run reuses the complete shards."""
    from helpers import partly_parallel_benchmark

    from hybridfast.evaluation.evaluator import RetrievalEvaluator

    monkeypatch.setattr(tiles, "TILE_COLS", 17)
    ev = RetrievalEvaluator(partly_parallel_benchmark(1), show_progress=False, chunk_size=5)
    enc = FloatEncoder()
    q, c = ev.encode(enc)
    if precision == "bf16":  # bf16 shards score the bf16-rounded vectors (queries too) in fp32
        q, c = (torch.from_numpy(x).bfloat16().float().numpy() for x in (q, c))
    want = ev.evaluate_embeddings(q, c)
    got = ev.evaluate(enc, shards=tmp_path / "s", shard_precision=precision)
    assert got.summary == want.summary and got.per_pair == want.per_pair
    assert got.config["shard_precision"] == precision and read_manifest(tmp_path / "s")["complete"]
    calls = enc.passage_calls
    again = ev.evaluate(enc, shards=tmp_path / "s", shard_precision=precision)
    assert enc.passage_calls == calls and again.summary == want.summary  # nothing encoded again
    with pytest.raises(ValueError, match="save_run needs the candidate embeddings in memory"):
        ev.evaluate(enc, shards=tmp_path / "s", save_run=tmp_path / "runs")
