"""sentence-transformers integration: loss parity with ST's MNRL, GradCache parity, hybrid batches in the trainer.

Everything runs on a tiny random BERT built here (no download).
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from sentence_transformers import SentenceTransformer  # noqa: E402
try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer import losses as st_losses
except ImportError:
    from sentence_transformers import losses as st_losses

from helpers import tiny_bert  # noqa: E402
from hybridfast.integrations.sentence_transformers import (  # noqa: E402
    CachedHybridMNRLoss,
    HybridBatching,
    HybridMNRLoss,
    HybridPairDataset,
    HybridPairIndex,
    HybridSentenceTransformerTrainer,
    HybridSTBatchSampler,
    parallel_pairs_dataset,
)

LANGS = ["de", "en", "fr"]
WORDS = (
    "the a of and to in is was for on with as by at from this that it be are what who where when how why "
    "city river king war year music law film book game team school church north south east west old new "
    "first last great small large red blue green black white water fire stone light day night "
).split()


VOCABULARY = WORDS + [str(i) for i in range(100)] + LANGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    folder = tiny_bert(tmp_path_factory.mktemp("tiny_bert"), VOCABULARY)
    transformer = Transformer(str(folder), max_seq_length=32)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    model = SentenceTransformer(modules=[transformer, Pooling(dim(), "mean")], device="cpu")
    # the tests are only meaningful if words are words, not [UNK] everywhere
    assert model.tokenizer.tokenize("what 7 de river") == ["what", "7", "de", "river"]
    return model


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def _features(model, columns):
    return [model.preprocess(texts) for texts in columns]


def _batch(model, batch=7, negatives=0, seed=0):
    columns = [_sentences(batch, seed + c) for c in range(2 + negatives)]
    return _features(model, columns)


def _loss_and_grads(model, loss, features, scale=1.0):
    model.zero_grad(set_to_none=True)
    value = loss(features, None)
    (value * scale).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _st_reference(model, symmetric, similarity):
    from sentence_transformers.util import cos_sim, dot_score

    fct = cos_sim if similarity == "cos" else dot_score
    scale = 20.0 if similarity == "cos" else 1.0
    if symmetric:
        return st_losses.MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=fct,
            directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
        ), scale
    return st_losses.MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=fct), scale


# ---- loss parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_equals_multiple_negatives_ranking_loss(tiny_model, negatives, symmetric, similarity):
    tiny_model.eval()
    features = _batch(tiny_model, batch=7, negatives=negatives, seed=10 * negatives)
    reference, scale = _st_reference(tiny_model, symmetric, similarity)
    ours = HybridMNRLoss(tiny_model, scale=scale, symmetric=symmetric, similarity=similarity, backend="torch")
    ref_value, ref_grads = _loss_and_grads(tiny_model, reference, features)
    value, grads = _loss_and_grads(tiny_model, ours, features)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, ref_grads)


def test_equals_deprecated_symmetric_loss(tiny_model):
    tiny_model.eval()
    features = _batch(tiny_model, batch=5, negatives=1, seed=3)
    cls = getattr(st_losses, "MultipleNegativesSymmetricRankingLoss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = cls(tiny_model)
    ours = HybridMNRLoss(tiny_model, symmetric=True, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(ours(features, None), reference(features, None), rtol=1e-5, atol=1e-5)


def test_triton_backend_equals_multiple_negatives_ranking_loss(tiny_model):
    """The fused Triton kernels (interpreted on CPU without CUDA) give ST's value and gradients too."""
    pytest.importorskip("triton")
    tiny_model.eval()
    features = _batch(tiny_model, batch=6, negatives=1, seed=5)
    reference, _ = _st_reference(tiny_model, True, "cos")
    ref_value, ref_grads = _loss_and_grads(tiny_model, reference, features)
    value, grads = _loss_and_grads(tiny_model, HybridMNRLoss(tiny_model, symmetric=True, backend="triton"), features)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, ref_grads)


def test_scale_above_cap_warns(tiny_model):
    with pytest.warns(UserWarning, match="scale=150"):
        HybridMNRLoss(tiny_model, scale=150.0, backend="torch")


def test_config_and_citation(tiny_model):
    loss = HybridMNRLoss(tiny_model, scale=25.0, symmetric=True, backend="torch")
    config = loss.get_config_dict()
    assert config["scale"] == 25.0 and config["symmetric"] is True and config["similarity"] == "cos"
    assert loss.temperature == pytest.approx(1 / 25.0)
    assert "2408.10536" in loss.citation
    cached = CachedHybridMNRLoss(tiny_model, mini_batch_size=4, backend="torch")
    assert cached.get_config_dict()["mini_batch_size"] == 4 and "2101.06983" in cached.citation


@pytest.mark.parametrize("bad", [{"scale": 0.0}, {"scale": -1}, {"similarity": "l2"}])
def test_bad_loss_arguments(tiny_model, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        HybridMNRLoss(tiny_model, backend="torch", **bad)


def test_bad_mini_batch_size(tiny_model):
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedHybridMNRLoss(tiny_model, mini_batch_size=0, backend="torch")


# ---- GradCache parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("negatives,symmetric", [(0, False), (1, True), (2, False)])
def test_cached_equals_uncached(tiny_model, negatives, symmetric):
    tiny_model.eval()
    features = _batch(tiny_model, batch=7, negatives=negatives, seed=100 + negatives)
    plain = HybridMNRLoss(tiny_model, symmetric=symmetric, backend="torch")
    cached = CachedHybridMNRLoss(tiny_model, mini_batch_size=3, symmetric=symmetric, backend="torch")
    ref_value, ref_grads = _loss_and_grads(tiny_model, plain, features)
    # an upstream scale (gradient accumulation, fp16 scaler) must reach every replayed mini-batch
    value, grads = _loss_and_grads(tiny_model, cached, features, scale=2.5)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, {k: 2.5 * v for k, v in ref_grads.items()})
    with torch.no_grad():
        torch.testing.assert_close(cached(features, None), ref_value, rtol=1e-5, atol=1e-6)


def test_cached_learnt_temperature_gets_scaled_gradient(tiny_model):
    tiny_model.eval()
    features = _batch(tiny_model, batch=5, negatives=1, seed=11)
    plain = HybridMNRLoss(tiny_model, learn_temperature=True, backend="torch")
    cached = CachedHybridMNRLoss(tiny_model, mini_batch_size=2, learn_temperature=True, backend="torch")
    assert cached.get_config_dict()["learn_temperature"] is True
    _, ref_grads = _loss_and_grads(tiny_model, plain, features, scale=3.0)
    _, grads = _loss_and_grads(tiny_model, cached, features, scale=3.0)
    _assert_grads_close(grads, ref_grads)
    learnt_plain, learnt_cached = plain.loss_fn.log_scale.grad, cached.loss_fn.log_scale.grad
    assert learnt_plain is not None and learnt_cached is not None and learnt_plain.abs() > 0
    torch.testing.assert_close(learnt_cached, learnt_plain, rtol=1e-5, atol=1e-6)


def test_cached_replays_dropout(tiny_model):
    """In train mode the re-embedding must draw the same dropout masks as the graph-free pass: compare with
    embedding the same mini-batches, in the same order from the same seed, with a graph."""
    from sentence_transformers.util import cos_sim

    from hybridfast.gradcache import row_chunks

    tiny_model.train()
    try:
        features = _batch(tiny_model, batch=6, negatives=1, seed=7)
        cached = CachedHybridMNRLoss(tiny_model, mini_batch_size=4, backend="torch")
        torch.manual_seed(123)
        value, grads = _loss_and_grads(tiny_model, cached, features)

        torch.manual_seed(123)
        columns = []
        for f in features:
            # the same mini-batches as the cache (padding columns trimmed per mini-batch: dropout masks
            # follow the tensor shape)
            parts = [tiny_model(chunk)["sentence_embedding"] for chunk in row_chunks(f, 4, trim_padding=True)]
            columns.append(torch.cat(parts))
        logits = 20.0 * cos_sim(columns[0], torch.cat(columns[1:]))
        reference = torch.nn.functional.cross_entropy(logits, torch.arange(6))
        tiny_model.zero_grad(set_to_none=True)
        reference.backward()
        ref_grads = {n: p.grad.detach().clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        tiny_model.zero_grad(set_to_none=True)
        torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)
        _assert_grads_close(grads, ref_grads)
    finally:
        tiny_model.eval()


# ---- hybrid batches over a datasets.Dataset -----------------------------------------------------------

def _parallel_rows(n_examples, langs=LANGS, missing=(), negatives=False, seed=0):
    """Per-language rows: question i in language l is "what <i> <l> ...", its passage "the <i> <l> ..."."""
    rng = np.random.default_rng(seed)
    rows = {"id": [], "lang": [], "anchor": [], "positive": []}
    if negatives:
        rows["negative"] = []
    for i in range(n_examples):
        tail = " ".join(rng.choice(WORDS, size=3))
        for lang in langs:
            if (i, lang) in missing:
                continue
            rows["id"].append(f"q{i}")
            rows["lang"].append(lang)
            rows["anchor"].append(f"what {i} {lang} {tail}")
            rows["positive"].append(f"the {i} {lang} {tail}")
            if negatives:
                rows["negative"].append(f"old {(i + 1) % n_examples} {lang} {tail}")
    return rows


def _parse(text):
    _, example, lang = text.split()[:3]
    return int(example), lang


def test_index_and_dataset_per_language_rows():
    missing = {(0, "fr"), (1, "de"), (1, "fr")}
    ds = datasets.Dataset.from_dict(_parallel_rows(6, missing=missing, negatives=True))
    index = HybridPairIndex(ds, HybridBatching())
    assert index.languages == LANGS and index.text_columns == ["anchor", "positive", "negative"]
    assert set(index.meta_columns) == {"id", "lang"}
    expected = np.ones((6, 3), dtype=bool)
    expected[0, 2] = expected[1, 0] = expected[1, 2] = False
    np.testing.assert_array_equal(index.availability, expected)
    pairs = HybridPairDataset(ds, index)
    plan = [(e, x, y) for e in range(6) for x in range(3) for y in range(3) if expected[e, x] and expected[e, y]]
    items = pairs.__getitems__(index.rows(plan))
    for (e, x, y), item in zip(plan, items):
        assert list(item) == ["anchor", "positive", "negative"]
        assert _parse(item["anchor"]) == (e, LANGS[x])
        assert _parse(item["positive"]) == (e, LANGS[y])
        assert _parse(item["negative"])[1] == LANGS[y]  # negatives come with the positive's row
    assert pairs[index.rows([(2, 0, 1)])[0]]["positive"].startswith("the 2 en")


def test_index_language_per_text_column_layout():
    # one cross-lingual pair per row; the first row serving (example, language) is used
    ds = datasets.Dataset.from_dict({
        "pid": [7, 7, 9, 9],
        "anchor": ["what 7 en", "what 7 de", "what 9 en", "what 9 fr"],
        "anchor_lang": ["en", "de", "en", "fr"],
        "positive": ["the 7 de", "the 7 en", "the 9 fr", "the 9 en"],
        "positive_lang": ["de", "en", "fr", "en"],
    })
    index = HybridPairIndex(ds, HybridBatching(id_column="pid"))
    assert index.ids == [7, 9] and index.languages == ["de", "en", "fr"]
    np.testing.assert_array_equal(index.availability, [[True, True, False], [False, True, True]])
    pairs = HybridPairDataset(ds, index)
    item = pairs.__getitems__(index.rows([(0, 0, 1), (1, 2, 1)]))
    assert item == [{"anchor": "what 7 de", "positive": "the 7 en"}, {"anchor": "what 9 fr", "positive": "the 9 en"}]


@pytest.mark.parametrize("columns,config,match", [
    ({"anchor": ["a"], "positive": ["b"], "lang": ["en"]}, {}, "id_column='id'"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"]}, {}, "anchor_lang"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "lang": ["en"]}, {"lang_columns": "language"}, "'language'"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "anchor_lang": ["en"], "positive_lang": ["en"]},
     {"lang_columns": {"anchor": "anchor_lang"}}, "'positive'"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "lang": ["en"]},
     {"lang_columns": {"anchor": "lang", "positive": "plang"}}, "'plang'"),
    ({"id": [1], "anchor": ["a"], "lang": ["en"]}, {}, "text_columns"),
    ({"id": [1], "anchor": ["a"], "positive": [3], "lang": ["en"]}, {}, "'positive'"),
    ({"id": [1, 2], "anchor": ["a", "b"], "positive": ["b", "c"], "lang": ["en", None]}, {}, "'lang'.*row 1"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "lang": ["en"]}, {"text_columns": ["anchor", "pos"]}, "'pos'"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "lang": ["en"]}, {"group_column": "article"}, "'article'"),
    ({"id": [1, 1], "anchor": ["a", "b"], "positive": ["b", "c"], "lang": ["en", "de"], "g": [0, 1]},
     {"group_column": "g"}, "group_column='g'"),
    ({"id": [1], "anchor": ["a"], "positive": ["b"], "lang": ["en"]}, {"languages": ["de"]}, "'anchor'"),
])
def test_bad_column_setups_name_the_column(columns, config, match):
    ds = datasets.Dataset.from_dict(columns)
    with pytest.raises(ValueError, match=match):
        HybridPairIndex(ds, HybridBatching(**config))


def test_bad_batching_options():
    with pytest.raises(ValueError, match="mode"):
        HybridBatching(mode="mixed")
    with pytest.raises(ValueError, match="mono_prob"):
        HybridBatching(mono_prob=1.5)
    with pytest.raises(TypeError, match="train_dataset"):
        HybridPairIndex({"id": [1]}, HybridBatching())
    with pytest.raises(TypeError, match="mono_prob must be a number"):  # a bool is not a probability
        HybridBatching(mono_prob=True)


def test_languages_without_data_are_refused_or_warned():
    """Issue 13 item 14: as in hybridfast.data.pairs, a language named in languages= needs data; one found
    only in a language column (no example has both texts in it) is warned about."""
    ds = datasets.Dataset.from_dict(_parallel_rows(6))
    with pytest.raises(ValueError, match=r"languages: \['es'\] have no example"):
        HybridPairIndex(ds, HybridBatching(languages=["de", "es"]))
    with pytest.raises(ValueError, match="'xx' is not a language code"):
        HybridPairIndex(ds, HybridBatching(languages=["de", "xx"]))
    rows = {"id": ["a", "a", "b"], "anchor": ["x", "y", "z"], "anchor_lang": ["de", "en", "fr"],
            "positive": ["p", "q", "r"], "positive_lang": ["de", "en", "de"]}
    with pytest.warns(UserWarning, match=r"\['fr'\] have no example"):
        index = HybridPairIndex(datasets.Dataset.from_dict(rows), HybridBatching())
    assert index.languages == ["de", "en", "fr"] and not index.availability[:, 2].any()


def test_parallel_pairs_dataset_round_trip():
    """hybridfast's training data -> per-language rows whose index has the same availability and texts."""
    from hybridfast.data.pairs import ParallelPairs

    rows = {
        f"q{i}": {lang: (f"what {i} {lang}", f"the {i} {lang}", [f"old {i} {lang}", f"new {i} {lang}"])
                  for lang in LANGS if (i, lang) not in {(1, "en"), (2, "de")}}
        for i in range(4)
    }
    rows["q3"]["fr"] = ("what 3 fr", "the 0 fr", ["old 3 fr", "new 3 fr"])  # duplicate positive -> one group
    pairs = ParallelPairs(rows)
    ds = parallel_pairs_dataset(pairs, hard_negatives=2)
    assert ds.column_names == ["id", "lang", "group", "anchor", "positive", "negative_1", "negative_2"]
    index = HybridPairIndex(ds, HybridBatching(group_column="group"))
    assert index.languages == pairs.languages and index.ids == pairs.example_ids
    np.testing.assert_array_equal(index.availability, pairs.availability)
    assert index.text_columns == ["anchor", "positive", "negative_1", "negative_2"]
    assert index.groups[0] == index.groups[3] != index.groups[1]
    item = HybridPairDataset(ds, index).__getitems__(index.rows([(3, 0, 2)]))[0]
    assert item == {"anchor": "what 3 de", "positive": "the 0 fr", "negative_1": "old 3 fr", "negative_2": "new 3 fr"}
    with pytest.raises(ValueError, match="hard_negatives=3"):
        parallel_pairs_dataset(pairs, hard_negatives=3)
    with pytest.raises(TypeError, match="pairs"):
        parallel_pairs_dataset(rows)


def _step_kind(plan):
    same = [x == y for _, x, y in plan]
    assert all(same) or not any(same), f"mixed batch {plan}"
    if all(same):
        assert len({x for _, x, _ in plan}) == 1, "mono batch with several languages"
    return "mono" if all(same) else "cross"


@pytest.mark.parametrize("split_batches", [False, True])
def test_sampler_shards_like_the_hybrid_sampler_under_accelerate(split_batches):
    """Each process builds the same batch sampler; accelerate's BatchSamplerShard must hand rank r exactly
    HybridBatchSampler(rank=r)'s batches, mapped to rows."""
    from accelerate.data_loader import BatchSamplerShard

    from hybridfast import HybridBatchSampler

    ds = datasets.Dataset.from_dict(_parallel_rows(40, missing={(3, "de"), (5, "en")}))
    index = HybridPairIndex(ds, HybridBatching())
    world = 2
    sampler = HybridSTBatchSampler(index, 4, mode="hybrid", seed=5, world_size=world, split_batches=split_batches)
    sampler.set_epoch(1)
    assert len(sampler) == len(HybridBatchSampler(index.availability, 4, seed=5, world_size=world)) * (
        1 if split_batches else world)
    shards = [list(BatchSamplerShard(sampler, world, r, split_batches=split_batches)) for r in range(world)]
    for rank in range(world):
        reference = HybridBatchSampler(index.availability, 4, mode="hybrid", seed=5, rank=rank, world_size=world)
        reference.set_epoch(1)
        expected = [index.rows(batch) for batch in reference]
        assert shards[rank] == expected and len(expected) > 0
    pairs = HybridPairDataset(ds, index)
    kinds = set()
    for step in zip(*shards):
        items = [pairs.__getitems__(batch) for batch in step]
        plan = [(*_parse(it["anchor"]), _parse(it["positive"])[1]) for batch in items for it in batch]
        kinds.add(_step_kind([(e, a, p) for e, a, p in plan]))
        assert all(_parse(it["anchor"])[0] == _parse(it["positive"])[0] for batch in items for it in batch)
        assert len({e for e, _, _ in plan}) == len(plan)  # disjoint examples over the global batch
    assert kinds == {"mono", "cross"}


@pytest.mark.parametrize("cached", [False, True])
def test_trainer_steps_with_hybrid_batches(tiny_model, tmp_path, cached):
    from sentence_transformers import SentenceTransformerTrainingArguments

    tiny_model.train()
    ds = datasets.Dataset.from_dict(_parallel_rows(24, missing={(2, "fr"), (4, "de")}))
    if cached:
        loss = CachedHybridMNRLoss(tiny_model, mini_batch_size=3, backend="torch")
    else:
        loss = HybridMNRLoss(tiny_model, backend="torch")
    # cached: 4 steps; plain: two whole epochs, which must differ (the trainer reaches the sampler's set_epoch)
    steps = {"max_steps": 4} if cached else {"num_train_epochs": 2}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=6, learning_rate=1e-3, **steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=3, use_cpu=True,
        disable_tqdm=True,
    )
    trainer = HybridSentenceTransformerTrainer(
        model=tiny_model, args=args, train_dataset=ds, loss=loss, hybrid=HybridBatching(mode="hybrid", mono_prob=0.5),
        eval_dataset=ds.select(range(12)),  # row-wise evaluation, metadata columns dropped
    )
    seen = []
    collate = trainer.data_collator

    def recording_collator(features):
        seen.append([dict(f) for f in features])
        return collate(features)

    trainer.data_collator = recording_collator
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    per_epoch = len(trainer.get_hybrid_batch_sampler())
    assert len(losses) == (4 if cached else 2 * per_epoch) and all(math.isfinite(v) and v > 0 for v in losses)
    assert any(abs(v - math.log(6)) > 1e-2 for v in losses)  # not the degenerate all-equal-logits value
    assert any(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters())
    assert len(seen) >= len(losses)
    if not cached:
        assert len(seen) == 2 * per_epoch and seen[:per_epoch] != seen[per_epoch:]
        for epoch in (seen[:per_epoch], seen[per_epoch:]):  # each example at most once per epoch
            examples = [_parse(f["anchor"])[0] for batch in epoch for f in batch]
            assert len(examples) == len(set(examples))
    for batch in seen:
        assert len(batch) == 6 and all(list(f) == ["anchor", "positive"] for f in batch)  # no id/lang columns
        plan = []
        for f in batch:
            (e, qlang), (e2, plang) = _parse(f["anchor"]), _parse(f["positive"])
            assert e == e2
            plan.append((e, qlang, plang))
        _step_kind(plan)
        assert len({e for e, _, _ in plan}) == len(plan)
    trainer.data_collator = collate
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    tiny_model.eval()


def test_trainer_rejects_bad_train_dataset(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformerTrainingArguments

    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    ds = datasets.Dataset.from_dict({"anchor": ["a"], "positive": ["b"], "lang": ["en"]})
    with pytest.raises(ValueError, match="id_column"):
        HybridSentenceTransformerTrainer(model=tiny_model, args=args, train_dataset=ds,
                                         loss=HybridMNRLoss(tiny_model, backend="torch"))
    with pytest.raises(TypeError, match="hybrid"):
        HybridSentenceTransformerTrainer(model=tiny_model, args=args, train_dataset=ds, hybrid={"mode": "mono"})


# ---- two processes under torchrun (opt-in: about a minute on a shared 2-core CPU) -----------------------

_TORCHRUN_SCRIPT = r'''
import json, os, sys, pathlib
import torch, torch.distributed as dist
torch.set_num_threads(1)
import datasets
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
import tests.test_integration_st as T
from helpers import tiny_bert
from hybridfast.integrations.sentence_transformers import (CachedHybridMNRLoss, HybridMNRLoss,
                                                           HybridSentenceTransformerTrainer)

out = pathlib.Path(sys.argv[1]); folder = out / "model"; rank = int(os.environ["RANK"])
args = SentenceTransformerTrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=3,
    learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=3, use_cpu=True,
    disable_tqdm=True, ddp_backend="gloo")
if rank == 0:
    tiny_bert(folder, T.VOCABULARY, dropout=0.0)
dist.barrier()
transformer = Transformer(str(folder), max_seq_length=32)
model = SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu").eval()
features = T._batch(model, batch=5, negatives=1, seed=rank)
parity = {}
for sym in (False, True):
    ref = st_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True,
        directions=("query_to_doc", "doc_to_query") if sym else ("query_to_doc",),
        partition_mode="per_direction" if sym else "joint")
    r, gr = T._loss_and_grads(model, ref, features)
    for name, loss in (("plain", HybridMNRLoss(model, symmetric=sym, gather_across_devices=True, backend="torch")),
                       ("cached", CachedHybridMNRLoss(model, symmetric=sym, gather_across_devices=True,
                                                      mini_batch_size=2, backend="torch"))):
        v, g = T._loss_and_grads(model, loss, features)
        parity[f"{name} symmetric={sym}"] = [abs(float(v - r)), max(float((g[k] - gr[k]).abs().max()) for k in gr)]
model.train()
trainer = HybridSentenceTransformerTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(
    T._parallel_rows(40)), loss=CachedHybridMNRLoss(model, mini_batch_size=2, gather_across_devices=True))
seen, collate = [], trainer.data_collator
def record(features):
    seen.append([(*T._parse(f["anchor"]), T._parse(f["positive"])[1]) for f in features])
    return collate(features)
trainer.data_collator = record
trainer.train()
result = {"parity": parity, "seen": seen, "world": trainer.accelerator.num_processes,
          "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
          "param_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, result)
if rank == 0:
    (out / "result.json").write_text(json.dumps(gathered))
'''


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HYBRIDFAST_DDP_TESTS") != "1", reason="opt-in: HYBRIDFAST_DDP_TESTS=1")
def test_torchrun_two_processes(tmp_path):
    """gather_across_devices parity with ST on every rank, and trainer steps where the two ranks share each
    step's batch kind and get disjoint examples."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                    str(tmp_path)], check=True, env=env, cwd=root, timeout=600)
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        for name, (value_diff, grad_diff) in r["parity"].items():
            assert value_diff < 1e-5 and grad_diff < 1e-4, name
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]  # DDP kept the replicas identical
    for step in zip(ranks[0]["seen"], ranks[1]["seen"]):
        plan = [tuple(t) for batch in step for t in batch]
        _step_kind(plan)
        assert len({e for e, _, _ in plan}) == len(plan) == 8
