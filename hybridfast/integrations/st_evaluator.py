"""HybridRetrievalEvaluator: hybridfast's retrieval evaluation as a sentence-transformers evaluator.

It follows ST's evaluator protocol (``SentenceEvaluator``): ``evaluator(model,
output_path=None, epoch=-1, steps=-1) -> dict`` of metrics whose names carry the
evaluator's ``name`` as a prefix (``xquad-r_multi_map``, ``xquad-r_mono_ndcg@10``,
...), a ``primary_metric`` (the prefixed name of the one used for model selection)
and ``greater_is_better``. So it works as ``evaluator=`` of ``SentenceTransformerTrainer``
(and of ``HybridSentenceTransformerTrainer``): the trainer logs every metric as
``eval_<name>_<setting>_<metric>`` and can keep the best checkpoint by it.

Inside, a `hybridfast.evaluation.evaluator.RetrievalEvaluator` built once on the benchmark does
the work (exact search, trec_eval-equal metrics); the model encodes queries with
``encode_query`` and candidates with ``encode_document`` (ST >= 5; plain ``encode``
before), with the given prompts. Embeddings are L2-normalised when the model's
similarity function is cosine (ST's default), so retrieval ranks by the model's own
similarity.
"""
import math
import re
from pathlib import Path
from typing import Optional, Sequence

try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.evaluation import SentenceEvaluator

from hybridfast.evaluation.evaluator import SETTINGS, RetrievalEvaluator
from hybridfast.evaluation.metrics import LOWER_IS_BETTER, METRICS, MULTI_METRICS

__all__ = ["HybridRetrievalEvaluator"]


def _default_name(benchmark) -> str:
    name = str(getattr(benchmark, "name", "") or "retrieval")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "retrieval"


class _ModelEncoder:
    """encode_queries / encode_passages over a SentenceTransformer, as RetrievalEvaluator wants."""

    def __init__(self, model, ev):
        self.model, self.ev = model, ev
        fn = getattr(model, "similarity_fn_name", None)
        self.normalize = fn in (None, "cosine")

    def _encode(self, texts, kind):
        ev = self.ev
        prompt = ev.query_prompt if kind == "query" else ev.passage_prompt
        prompt_name = ev.query_prompt_name if kind == "query" else ev.passage_prompt_name
        fn = getattr(self.model, "encode_query" if kind == "query" else "encode_document", None)
        if fn is None:  # sentence-transformers < 5
            fn = self.model.encode
        kwargs = dict(batch_size=ev.batch_size, show_progress_bar=ev.show_progress_bar, convert_to_numpy=True,
                      normalize_embeddings=self.normalize)
        if prompt is not None:
            kwargs["prompt"] = prompt
        if prompt_name is not None:
            kwargs["prompt_name"] = prompt_name
        return fn(list(texts), **kwargs)

    def encode_queries(self, texts):
        return self._encode(texts, "query")

    def encode_passages(self, texts):
        return self._encode(texts, "document")


class HybridRetrievalEvaluator(SentenceEvaluator):
    """Mono / cross / multilingual retrieval metrics of a SentenceTransformer on a RetrievalBenchmark.

    Args:
        benchmark: a `hybridfast.data.RetrievalBenchmark` (LAReQA, BEIR, MIRACL readers).
        name: metric prefix (default: the benchmark's name, e.g. "xquad-r").
        settings: subset of ("mono", "cross", "multi").
        primary_metric: "<setting>_<metric>" used for model selection (default "multi_map",
            or "<first setting>_map"); rank_distance makes greater_is_better False.
        query_prompt / passage_prompt, query_prompt_name / passage_prompt_name: passed to
            the model's encode (e.g. "query: " / "passage: " for E5 models).
        batch_size, show_progress_bar: encoding.
        languages, search, device, chunk_size: as for RetrievalEvaluator.
        write_json: with an output_path, write the full result there as
            ``<name>_results_epoch<e>_steps<s>.json``.
    Calling it returns {"<name>_<setting>_<metric>": value} for every summary metric.
    """

    def __init__(self, benchmark, name: Optional[str] = None, settings: Sequence[str] = SETTINGS,
                 primary_metric: Optional[str] = None, query_prompt: Optional[str] = None,
                 passage_prompt: Optional[str] = None, query_prompt_name: Optional[str] = None,
                 passage_prompt_name: Optional[str] = None, batch_size: int = 32, show_progress_bar: bool = False,
                 languages=None, search: str = "auto", device: str = "auto", chunk_size=None,
                 write_json: bool = True):
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name or any(c.isspace() for c in name)):
            raise ValueError(f"name must be a non-empty string without spaces, got {name!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for arg, value in (("query_prompt", query_prompt), ("passage_prompt", passage_prompt),
                           ("query_prompt_name", query_prompt_name), ("passage_prompt_name", passage_prompt_name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{arg} must be a str or None, got {type(value).__name__}")
        self.evaluator = RetrievalEvaluator(benchmark, settings=settings, search=search, device=device,
                                            show_progress=False, languages=languages, chunk_size=chunk_size)
        self.settings = self.evaluator.settings  # mono only where query ids are not shared
        self.name = name or _default_name(benchmark)
        if primary_metric is None:
            primary_metric = "multi_map" if "multi" in self.settings else f"{self.settings[0]}_map"
        setting, _, metric = str(primary_metric).partition("_")
        allowed = MULTI_METRICS if setting == "multi" else METRICS
        if setting not in self.settings or metric not in allowed:
            raise ValueError(f"primary_metric must be '<setting>_<metric>' with setting in {list(self.settings)} "
                             f"and metric in {list(allowed)}, got {primary_metric!r}")
        self.primary_metric = f"{self.name}_{primary_metric}"  # prefixed, as the returned keys
        self.greater_is_better = metric not in LOWER_IS_BETTER
        self.query_prompt, self.passage_prompt = query_prompt, passage_prompt
        self.query_prompt_name, self.passage_prompt_name = query_prompt_name, passage_prompt_name
        self.batch_size, self.show_progress_bar = batch_size, bool(show_progress_bar)
        self.write_json = bool(write_json)
        self.last_result = None

    def __call__(self, model, output_path: Optional[str] = None, epoch: int = -1, steps: int = -1) -> dict:
        result = self.evaluator.evaluate(_ModelEncoder(model, self))
        self.last_result = result
        metrics = {f"{setting}_{m}": float(v) for setting, values in result.summary.items()
                   for m, v in values.items() if not (isinstance(v, float) and math.isnan(v))}
        if output_path is not None and self.write_json:
            Path(output_path).mkdir(parents=True, exist_ok=True)
            result.to_json(Path(output_path) / f"{self.name}_results_epoch{epoch}_steps{steps}.json")
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def get_config_dict(self) -> dict:
        return {"settings": list(self.settings), "query_prompt": self.query_prompt,
                "passage_prompt": self.passage_prompt}

    def __repr__(self):
        return f"HybridRetrievalEvaluator(name={self.name!r}, settings={list(self.settings)}, " \
               f"primary_metric={self.primary_metric!r})"

