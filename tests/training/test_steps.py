"""The collator and the two training steps (hybridfast.training.batches / steps, hybridfast.gradcache)."""
import pytest
import torch

from hybridfast.gradcache import row_chunks
from hybridfast.training import Collator, gradcache_step, plain_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_collator_layout_and_groups(toy):
    from hybridfast.data.pairs import load_training_pairs

    pairs = load_training_pairs(toy["data_neg"])
    calls = []
    coll = Collator(pairs, lambda texts, kind: calls.append((kind, list(texts))) or {"n": len(texts)},
                    hard_negatives=2, seed=0)
    batch = [(0, 0, 1), (5, 2, 2), (7, 1, 0)]
    queries, passages, qg, pg = coll.texts(batch, step=4)
    assert queries == [pairs.query(e, x) for e, x, _ in batch]
    assert passages[:3] == [pairs.positive(e, y) for e, _, y in batch]
    assert len(passages) == 3 * 3
    for j in range(2):  # negatives block j holds negative j of every query, in the passage language
        for i, (e, _, y) in enumerate(batch):
            assert passages[3 + 3 * j + i] in pairs.negatives(e, y)
    assert qg == [0, 5, 7] and pg[:3] == qg and all(g == -1 for g in pg[3:])
    # deterministic given (seed, step)
    assert coll.texts(batch, step=4) == (queries, passages, qg, pg)
    # tokenisation is injected: called once per side with the kind
    q_in, p_in, q_groups, p_groups = coll(batch, step=4)
    assert calls == [("query", queries), ("passage", passages)]
    assert q_in == {"n": 3} and p_in == {"n": 9} and q_groups.tolist() == qg and p_groups.tolist() == pg


def _grads(encoder):
    return {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _chunked_reference_step(encoder, loss_fn, q_in, p_in, qg, pg, chunk):
    """Embed chunk by chunk WITH a graph (the same chunks, hence dropout masks, as GradCache's
    first pass), then an ordinary backward through everything."""
    qs = [encoder(**c) for c in row_chunks(q_in, chunk, trim_padding=True)]
    ps = [encoder(**c) for c in row_chunks(p_in, chunk, trim_padding=True)]
    loss = loss_fn(torch.cat(qs), torch.cat(ps), query_groups=qg, passage_groups=pg)
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_gradcache_equals_full_batch_with_dropout(toy, chunk):
    from hybridfast.encoder import Encoder
    from hybridfast.loss import HybridContrastiveLoss
    from hybridfast.data.pairs import load_training_pairs

    pairs = load_training_pairs(toy["data_neg"])
    enc = Encoder(str(toy["model"]), device="cpu", max_length=16, show_progress=False)
    enc.train()  # dropout on
    coll = Collator(pairs, enc, hard_negatives=1, seed=0)
    batch = [(e, e % 3, (e + 1) % 3) for e in range(11)]
    q_in, p_in, qg, pg = coll(batch, step=0)
    loss_fn = HybridContrastiveLoss(temperature=0.05)

    torch.manual_seed(123)
    if chunk >= 22:  # one chunk: the plain step consumes the RNG the same way
        ref_loss = plain_step(enc, loss_fn, q_in, p_in, qg, pg)
    else:
        ref_loss = _chunked_reference_step(enc, loss_fn, q_in, p_in, qg, pg, chunk)
    ref = _grads(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    gc_loss = gradcache_step(enc, loss_fn, q_in, p_in, qg, pg, chunk)
    after = torch.rand(1)
    got = _grads(enc)
    assert float(gc_loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)
    # the RNG continues where the first pass left it (the replay does not advance it)
    torch.manual_seed(123)
    with torch.no_grad():
        for c in row_chunks(q_in, chunk, True) + row_chunks(p_in, chunk, True):
            enc(**c)
    assert torch.equal(after, torch.rand(1))


def test_gradcache_without_dropout_matches_plain_for_any_chunking(toy):
    from hybridfast.encoder import Encoder
    from hybridfast.loss import HybridContrastiveLoss
    from hybridfast.data.pairs import load_training_pairs

    pairs = load_training_pairs(toy["data"])
    enc = Encoder(str(toy["model_nodrop"]), device="cpu", max_length=16, show_progress=False)
    coll = Collator(pairs, enc)
    batch = [(e, 0, 1) for e in range(9)]
    q_in, p_in, qg, pg = coll(batch, step=0)
    loss_fn = HybridContrastiveLoss(temperature=0.05)
    plain_step(enc, loss_fn, q_in, p_in, qg, pg)
    ref = _grads(enc)
    enc.zero_grad(set_to_none=True)
    gradcache_step(enc, loss_fn, q_in, p_in, qg, pg, chunk_size=4)
    got = _grads(enc)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_row_chunks_trim_padding_and_pass_metadata():
    features = {"input_ids": torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 0]]),
                "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]),
                "prompt_length": 2}
    chunks = row_chunks(features, 2, trim_padding=True)
    assert [c["input_ids"].tolist() for c in chunks] == [[[1, 2], [3, 0]], [[4, 5, 6]]]
    assert all(c["prompt_length"] == 2 for c in chunks)
    assert row_chunks(features, 2, trim_padding=False)[0]["input_ids"].shape == (2, 4)
