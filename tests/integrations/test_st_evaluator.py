"""HybridRetrievalEvaluator: sentence-transformers' evaluator protocol over hybridfast's evaluation."""
import math

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from hybridfast.data import RetrievalBenchmark  # noqa: E402
from hybridfast.evaluation.evaluator import RetrievalEvaluator  # noqa: E402
from hybridfast.integrations.sentence_transformers import HybridRetrievalEvaluator  # noqa: E402
from helpers import tiny_bert  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LANGS = ("de", "en")
N = 8


def word(lang, i):
    return f"{lang}{i}"


def benchmark():
    """Question i in both languages ("x<i> <lang>word"), one relevant sentence per language."""
    queries = {l: {f"q{i}": f"x{i} {word(l, i)}" for i in range(N)} for l in LANGS}
    candidates = {l: {f"{l}-{i}": (f"x{i} {word(l, i)} {word(l, (i + 1) % N)}", "") for i in range(N)}
                  for l in LANGS}
    qrels = {f"q{i}": {f"{l}-{i}" for l in LANGS} for i in range(N)}
    return RetrievalBenchmark(queries, candidates, qrels, name="Toy-R")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    words = [f"x{i}" for i in range(N)] + [word(l, i) for l in LANGS for i in range(N)]
    folder = tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", words, dropout=0.0)
    transformer = Transformer(str(folder), max_seq_length=16)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    return SentenceTransformer(modules=[transformer, Pooling(dim(), "mean")], device="cpu")


def test_protocol_names_and_values(tiny_st, tmp_path):
    ev = HybridRetrievalEvaluator(benchmark(), name="xquad-r", batch_size=4)
    assert ev.primary_metric == "xquad-r_multi_map" and ev.greater_is_better
    metrics = ev(tiny_st, output_path=str(tmp_path), epoch=1, steps=2)
    assert "xquad-r_multi_map" in metrics and "xquad-r_mono_ndcg@10" in metrics
    assert "xquad-r_cross_recall@10" in metrics and "xquad-r_multi_rank_distance" in metrics
    assert all(k.startswith("xquad-r_") for k in metrics) and all(math.isfinite(v) for v in metrics.values())
    assert ev.primary_metric in metrics
    assert (tmp_path / "xquad-r_results_epoch1_steps2.json").is_file()
    # the same numbers as RetrievalEvaluator on the model's own (normalised) embeddings
    ref_ev = RetrievalEvaluator(benchmark(), show_progress=False)
    texts_q = [benchmark().queries[l][q] for l, q in ref_ev.query_rows]
    q = tiny_st.encode(texts_q, normalize_embeddings=True)
    c = tiny_st.encode(ref_ev.candidate_texts, normalize_embeddings=True)
    ref = ref_ev.evaluate_embeddings(q, c)
    for setting, values in ref.summary.items():
        for m, v in values.items():
            assert metrics[f"xquad-r_{setting}_{m}"] == pytest.approx(v, abs=1e-6), (setting, m)
    # a lower-is-better primary metric; names default to the benchmark's
    rd = HybridRetrievalEvaluator(benchmark(), primary_metric="multi_rank_distance")
    assert rd.name == "toy-r" and rd.primary_metric == "toy-r_multi_rank_distance" and not rd.greater_is_better
    with pytest.raises(ValueError, match="primary_metric"):
        HybridRetrievalEvaluator(benchmark(), primary_metric="mono_rank_distance")
    with pytest.raises(ValueError, match="primary_metric"):
        HybridRetrievalEvaluator(benchmark(), settings=("mono",), primary_metric="multi_map")
    with pytest.raises(ValueError, match="name"):
        HybridRetrievalEvaluator(benchmark(), name="two words")


def test_trains_two_steps_in_sentence_transformer_trainer(tiny_st, tmp_path):
    """Used as evaluator= in SentenceTransformerTrainer: the metrics reach the trainer's logs."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    rows = [{"anchor": f"x{i} {word(l, i)}", "positive": f"x{i} {word(l, i)} {word(l, (i + 1) % N)}"}
            for l in LANGS for i in range(N)]
    train = datasets.Dataset.from_list(rows)
    ev = HybridRetrievalEvaluator(benchmark(), name="xquad-r", batch_size=8)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, eval_strategy="steps",
        eval_steps=1, logging_steps=1, save_strategy="no", report_to=[], learning_rate=1e-3, seed=0,
        dataloader_num_workers=0, use_cpu=True)
    trainer = SentenceTransformerTrainer(model=tiny_st, args=args, train_dataset=train,
                                         loss=MultipleNegativesRankingLoss(tiny_st), evaluator=ev)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_xquad-r_multi_map" in h]
    assert [h["step"] for h in evals] == [1, 2]
    for h in evals:
        for key in ("eval_xquad-r_mono_map", "eval_xquad-r_cross_ndcg@10", "eval_xquad-r_multi_rank_distance"):
            assert key in h and np.isfinite(h[key])
    assert ev.last_result is not None and set(ev.last_result.summary) == {"mono", "cross", "multi"}


def test_works_as_evaluator_of_the_hybrid_trainer(tiny_st, tmp_path):
    from sentence_transformers import SentenceTransformerTrainingArguments

    from hybridfast.integrations.sentence_transformers import (HybridBatching, HybridMNRLoss,
                                                               HybridSentenceTransformerTrainer)

    rows = {"id": [], "lang": [], "anchor": [], "positive": []}
    for i in range(N):
        for l in LANGS:
            rows["id"].append(f"q{i}")
            rows["lang"].append(l)
            rows["anchor"].append(f"x{i} {word(l, i)}")
            rows["positive"].append(f"x{i} {word(l, i)} {word(l, (i + 1) % N)}")
    ev = HybridRetrievalEvaluator(benchmark(), name="toy", batch_size=8, primary_metric="cross_map")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, eval_strategy="steps",
        eval_steps=2, logging_steps=1, save_strategy="no", report_to=[], learning_rate=1e-3, seed=0,
        use_cpu=True, disable_tqdm=True)
    trainer = HybridSentenceTransformerTrainer(
        model=tiny_st, args=args, train_dataset=datasets.Dataset.from_dict(rows),
        loss=HybridMNRLoss(tiny_st, backend="torch"), hybrid=HybridBatching(mode="hybrid", mono_prob=0.5),
        evaluator=ev)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_toy_cross_map" in h]
    assert len(evals) == 1 and evals[0]["step"] == 2 and np.isfinite(evals[0]["eval_toy_multi_map"])
    assert ev.primary_metric == "toy_cross_map"
