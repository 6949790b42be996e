"""gather_across_devices: two gloo processes equal one process on the concatenated batch.

Each rank returns the loss over its own queries. Summed over ranks ("sum") it is
the single-process loss and every input gradient is identical; with "mean" the
rank-average is the single-process loss and the gradients are world_size times
the single-process ones (DDP's gradient averaging divides that back out).
"""
import os

import pytest
import torch
import torch.distributed as dist

from helpers import spawn_ranks
from hybridfast.loss import hybrid_contrastive_loss

WORLD = 2
B_LOCAL, NEG, D = 6, 1, 12
CONFIGS = [
    dict(symmetric=False, reduction="sum", groups=False, backend="torch"),
    dict(symmetric=True, reduction="sum", groups=True, backend="torch"),
    dict(symmetric=True, reduction="mean", groups=True, backend="torch"),
    dict(symmetric=False, reduction="mean", groups=True, backend="torch"),
    dict(symmetric=True, reduction="sum", groups=True, backend="triton"),
    dict(symmetric=True, reduction="mean", groups=True, backend="chunked"),
    dict(symmetric=False, reduction="sum", groups=False, backend="chunked"),
]


def shard(rank):
    """Rank-local batch: queries, passages [positives, negatives], labels, groups."""
    g = torch.Generator().manual_seed(100 + rank)
    n_local = B_LOCAL * (1 + NEG)
    q = torch.randn(B_LOCAL, D, generator=g, dtype=torch.float64).float()
    p = torch.randn(n_local, D, generator=g, dtype=torch.float64).float()
    labels = torch.randperm(n_local, generator=g)[:B_LOCAL]
    qg = torch.randint(0, 3, (B_LOCAL,), generator=g)
    pg = torch.randint(0, 3, (n_local,), generator=g)
    return q, p, labels, qg, pg


def loss_and_grads(q, p, labels, qg, pg, cfg, gather):
    q = q.clone().requires_grad_(True)
    p = p.clone().requires_grad_(True)
    t = torch.tensor(0.07, requires_grad=True)
    groups = (qg, pg) if cfg["groups"] else (None, None)
    loss = hybrid_contrastive_loss(q, p, labels, *groups, temperature=t, symmetric=cfg["symmetric"],
                                   reduction=cfg["reduction"], backend=cfg["backend"],
                                   gather_across_devices=gather)
    loss.backward()
    return loss.detach(), q.grad, p.grad, t.grad


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = [loss_and_grads(*shard(rank), cfg, gather=True) for cfg in CONFIGS]
        # unequal local batches cannot be offset by rank * N_local: every rank must refuse
        q, p = torch.randn(4 + rank, D), torch.randn(8, D)
        try:
            hybrid_contrastive_loss(q, p, gather_across_devices=True)
            results.append("no error")
        except ValueError as exc:
            results.append(str(exc))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    assert spawn_ranks(_worker, WORLD, str(out)) == [0] * WORLD
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_gather_equals_single_process(per_rank, index):
    cfg = CONFIGS[index]
    shards = [shard(r) for r in range(WORLD)]
    n_local = B_LOCAL * (1 + NEG)
    q = torch.cat([s[0] for s in shards])
    p = torch.cat([s[1] for s in shards])
    labels = torch.cat([s[2] + r * n_local for r, s in enumerate(shards)])
    qg = torch.cat([s[3] for s in shards])
    pg = torch.cat([s[4] for s in shards])
    loss, gq, gp, gt = loss_and_grads(q, p, labels, qg, pg, cfg, gather=False)

    ranks = [per_rank[r][index] for r in range(WORLD)]
    factor = WORLD if cfg["reduction"] == "mean" else 1
    combined = sum(r[0] for r in ranks) / factor
    torch.testing.assert_close(combined, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), gq * factor, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]), gp * factor, rtol=1e-4, atol=1e-6)
    # temperature: a replicated parameter, so DDP would average its per-rank gradients
    torch.testing.assert_close(sum(r[3] for r in ranks) / factor, gt, rtol=1e-4, atol=1e-5)


def test_unequal_local_batches_are_refused_on_every_rank(per_rank):
    for rank in range(WORLD):
        assert "same q and p sizes on every rank" in per_rank[rank][-1]


# ----------------------------------------------------------------------------- first GPU run (issue 18, finding 2)

def _uneven_worker(rank, port, out_dir):
    """Uneven last batches without gather, and a bucket only rank 0 meets, with "auto" timing (the CUDA
    path, patched on): no rank may enter a collective the other does not, so the all_reduce after
    the losses pairs with the other rank's all_reduce (before the fix rank 0 stalled in a broadcast)."""
    import datetime

    from hybridfast.loss import dispatch

    dispatch.wants_timing = lambda q: True
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=15))
    try:
        g = torch.Generator().manual_seed(rank)
        b = 6 - rank  # uneven: a new shape bucket on each rank
        hybrid_contrastive_loss(torch.randn(b, 8, generator=g, requires_grad=True), torch.randn(2 * b, 8, generator=g),
                                backend="auto", reduction="sum").backward()
        if rank == 0:  # validation on rank 0 only
            hybrid_contrastive_loss(torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g), backend="auto")
        # with gather (ranks in lockstep) the ranks agree on one engine
        q, p = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(8, 8, generator=g)
        hybrid_contrastive_loss(q, p, backend="auto", gather_across_devices=True).backward()
        chosen = [v["backend"] for k, v in dispatch.backend_choices().items() if k.endswith("ranks")]
        t = torch.ones(1)
        dist.all_reduce(t)
        torch.save(dict(sum=float(t), agreed=chosen), os.path.join(out_dir, f"uneven{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu_first_run
@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="timing needs the Triton engines")
def test_uneven_batches_and_one_rank_buckets_never_stall(tmp_path):
    # a stall would be a rank still in a collective after 55 s (the process group's timeout is 15 s)
    assert spawn_ranks(_uneven_worker, WORLD, str(tmp_path), timeout=55) == [0] * WORLD
    results = [torch.load(tmp_path / f"uneven{r}.pt") for r in range(WORLD)]
    assert all(r["sum"] == WORLD for r in results)
    assert results[0]["agreed"] == results[1]["agreed"] and len(results[0]["agreed"]) == 1
