"""sentence-transformers integration: the fused loss and hybrid batches inside SentenceTransformerTrainer.

Install with ``pip install hybridfast[st]``. The pieces:

* :class:`HybridMNRLoss` -- drop-in for ``losses.MultipleNegativesRankingLoss`` (``symmetric=True``: for
  ``MultipleNegativesSymmetricRankingLoss``, i.e. ``directions=("query_to_doc", "doc_to_query")``,
  ``partition_mode="per_direction"``) computed by :class:`hybridfast.HybridContrastiveLoss` with
  ``temperature = 1 / scale``. Same inputs (anchor, positive, optional negative columns), same value.
* :class:`CachedHybridMNRLoss` -- the GradCache memory profile of ``CachedMultipleNegativesRankingLoss``.
  Mini-batches are embedded without a graph, the fused loss (which never materialises a B x N logits
  matrix) gives loss and embedding gradients at full batch, then every mini-batch is re-embedded with a
  graph under the same RNG state and the cached gradients are pushed through it.
* :class:`HybridSentenceTransformerTrainer` (+ :class:`HybridBatching`) -- runs the C++
  :class:`hybridfast.HybridBatchSampler` over a ``datasets.Dataset`` whose rows carry an example id and a
  language per text column, so every step is monolingual or cross-lingual as in the paper.
* :func:`parallel_pairs_dataset` -- hybridfast's training data (``load_training_pairs``) as such a dataset.

Why a trainer subclass rather than ``SentenceTransformerTrainingArguments(batch_sampler=...)``: that hook
can only choose row indices, while a cross-lingual slot takes its anchor from one row (query language)
and its positive from another (passage language), and the id/language columns must not reach the data
collator (it tokenizes every column it gets). The subclass overrides only ``get_train_dataloader``.

Supported dataset layouts (one row = one text pair in some languages; rows sharing ``id_column`` are
translations of one example):

* *per-language rows*: ``id, lang, anchor, positive[, negative...]`` (one ``lang`` column for the row);
* *language per text column*: ``id, anchor, anchor_lang, positive, positive_lang[, negative...]`` (for
  instance an already cross-lingual pair per row). Any row whose anchor is in language x can serve the
  anchor, any row whose positive is in y can serve the positive (the first such row is used).

Example e is available in language l when some row of e has its anchor in l and some row has its
positive in l. Negative columns are taken from the positive's row (so they are in the passage language).
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

try:
    import datasets
    from sentence_transformers import SentenceTransformerTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hybridfast.integrations.sentence_transformers needs sentence-transformers, datasets and accelerate: "
        "pip install 'hybridfast[st]'"
    ) from exc

from hybridfast.gradcache import GradCache  # noqa: E402
from hybridfast.rules import MODES as _MODES  # noqa: E402
from hybridfast.rules import check_languages, check_number  # noqa: E402

try:  # recent sentence-transformers share one forward across like-shaped candidate columns
    from sentence_transformers.base.losses.merged_forward import embed_columns as _st_embed_columns
except ImportError:  # older versions: one forward per column
    _st_embed_columns = None

__all__ = [
    "HybridMNRLoss",
    "CachedHybridMNRLoss",
    "HybridBatching",
    "HybridPairIndex",
    "HybridPairDataset",
    "HybridSTBatchSampler",
    "HybridSentenceTransformerTrainer",
    "parallel_pairs_dataset",
]

_SIMILARITIES = ("cos", "dot")

_CITATION = """
@misc{elmahdy2024synergistic,
      title={Synergistic Approach for Simultaneous Optimization of Monolingual, Cross-lingual, and Multilingual Information Retrieval},
      author={Adel Elmahdy and Sheng-Chieh Lin and Amin Ahmad},
      year={2024},
      eprint={2408.10536},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2408.10536},
}
"""


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------

def _embed_columns(model: nn.Module, features: list[dict[str, Any]]) -> list[Tensor]:
    if _st_embed_columns is not None:
        return list(_st_embed_columns(model, features))
    return [model(f)["sentence_embedding"] for f in features]


def _make_fused_loss(scale, similarity, symmetric, gather_across_devices, backend, loss_kwargs):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
    from hybridfast.loss import MAX_SCALE, HybridContrastiveLoss

    if scale > MAX_SCALE:
        # ST applies any scale; HybridContrastiveLoss caps the logit scale (docs/architecture.md, README), so values differ
        warnings.warn(
            f"scale={scale:g} is above HybridContrastiveLoss's cap of {MAX_SCALE:g}: the loss uses scale "
            f"{MAX_SCALE:g} and will not equal MultipleNegativesRankingLoss(scale={scale:g})",
            stacklevel=3,
        )

    return HybridContrastiveLoss(
        temperature=1.0 / float(scale),
        similarity=similarity,
        symmetric=bool(symmetric),
        reduction="mean",
        gather_across_devices=bool(gather_across_devices),
        backend=backend,
        **loss_kwargs,
    )


def _split_columns(embeddings: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """ST layout -> HybridContrastiveLoss layout: q = anchors, p = cat([positives, negatives_1, ...])."""
    if len(embeddings) < 2:
        raise ValueError(
            f"sentence_features must hold at least 2 columns (anchor, positive[, negatives...]), got {len(embeddings)}"
        )
    return embeddings[0], torch.cat(list(embeddings[1:]), dim=0)


class HybridMNRLoss(nn.Module):
    """MultipleNegativesRankingLoss computed by the fused HybridContrastiveLoss.

    Args:
        model: the SentenceTransformer being trained.
        scale: logits are ``sim * scale`` (``temperature = 1 / scale``); 20 = ST's default (temperature 0.05).
            HybridContrastiveLoss caps the scale at 100 (a warning says so above it; ST has no cap).
        symmetric: add the positive -> anchors term and average the two directions, exactly as
            ``MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction")`` / ``MultipleNegativesSymmetricRankingLoss``: the backward term
            ranks each positive (never a hard negative) against all anchors of the batch.
        gather_across_devices: all-gather candidates (and anchors for ``symmetric``) with gradient, like ST's
            flag of the same name.
        similarity: "cos" (ST's ``cos_sim``) or "dot" (``dot_score``).
        backend: "auto" | "triton" | "torch", passed to HybridContrastiveLoss.
        **loss_kwargs: further HybridContrastiveLoss options (``learn_temperature``, ``chunk_size``). A learnt
            temperature is trained by SentenceTransformerTrainer (it optimises loss parameters too), but under
            DDP its gradient is not averaged across processes (DDP wraps only the model).

    Inputs follow ST: ``forward(sentence_features, labels)`` with columns (anchor, positive[, negative_1,
    ..., negative_k]); ``labels`` is ignored (the positive of anchor i is row i of the positive column).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        similarity: str = "cos",
        backend: str = "auto",
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = _make_fused_loss(scale, similarity, symmetric, gather_across_devices, backend, loss_kwargs)
        self.scale = float(scale)
        self.loss_kwargs = dict(loss_kwargs)
        self.symmetric = bool(symmetric)
        self.gather_across_devices = bool(gather_across_devices)
        self.similarity = similarity
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns, got {len(features)}")
        return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        q, p = _split_columns(embeddings)
        return self.loss_fn(q, p)

    @property
    def temperature(self) -> float:
        """The temperature in use (the learnt one with ``learn_temperature=True``)."""
        return float(self.loss_fn.temperature)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity": self.similarity,
            "symmetric": self.symmetric,
            "gather_across_devices": self.gather_across_devices,
            "backend": self.backend,
            **self.loss_kwargs,
        }

    @property
    def citation(self) -> str:
        return _CITATION


# ---- GradCache (hybridfast.gradcache, shared with the native trainer) ----------------------------------

def _sync_context(model: nn.Module, last: bool):
    """DDP reduces gradients only on the last replayed mini-batch (and not at all inside an outer no_sync,
    e.g. during gradient accumulation)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if last and model.require_backward_grad_sync:
            return nullcontext()
        return model.no_sync()
    return nullcontext()


class CachedHybridMNRLoss(HybridMNRLoss):
    """GradCache form of :class:`HybridMNRLoss`: the batch size no longer bounds memory, only mini_batch_size.

    Same value and gradients as the uncached loss (tests compare both). Args as :class:`HybridMNRLoss`, plus
    ``mini_batch_size`` (rows per embedding forward) and ``show_progress_bar``. The two passes are
    :class:`hybridfast.gradcache.GradCache` (RNG replay, padding trimmed per mini-batch).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        mini_batch_size: int = 32,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        similarity: str = "cos",
        backend: str = "auto",
        show_progress_bar: bool = False,
        **loss_kwargs: Any,
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        super().__init__(model, scale=scale, symmetric=symmetric, gather_across_devices=gather_across_devices,
                         similarity=similarity, backend=backend, **loss_kwargs)
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar

    def _cache(self) -> GradCache:
        tokenizer = getattr(self.model, "tokenizer", None)
        return GradCache(
            lambda features: self.model(dict(features))["sentence_embedding"], self.mini_batch_size,
            trim_padding=getattr(tokenizer, "padding_side", "right") == "right", show_progress=self.show_progress_bar,
        )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns, got {len(features)}")
        cache = self._cache()
        grad_enabled = torch.is_grad_enabled()
        # (1) embed every mini-batch without a graph, remembering the RNG state each one started from.
        columns = cache.embed(features, requires_grad=grad_enabled)
        if not grad_enabled:
            return self.loss_fn(*_split_columns(columns))

        # (2) full-batch loss through the fused kernel; its gradients w.r.t. the embeddings are the cache.
        # A learnt temperature's gradient is held back too, so that it gets the same upstream scaling
        # (gradient accumulation, fp16 loss scale) as the model's, in step (3).
        params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn(*_split_columns(columns))
            grads = torch.autograd.grad(loss, columns + params, allow_unused=True)
        param_grads = list(zip(params, grads[len(columns):]))

        # (3) when the trainer back-propagates, re-embed with a graph and push the cached gradients through.
        out = loss.detach().requires_grad_()
        out.register_hook(partial(self._replay, cache, list(grads[:len(columns)]), param_grads))
        return out

    def _replay(self, cache: GradCache, grads, param_grads, grad_output: Tensor) -> None:
        for param, grad in param_grads:
            if grad is not None:
                grad = grad * grad_output.to(grad.dtype)
                param.grad = grad if param.grad is None else param.grad + grad
        cache.backward(grads, scale=grad_output, sync=partial(_sync_context, self.model))

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return _CITATION + """
@misc{gao2021scaling,
      title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
      author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
      year={2021},
      eprint={2101.06983},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/2101.06983},
}
"""


# --------------------------------------------------------------------------------------------------------
# Hybrid batches over a datasets.Dataset
# --------------------------------------------------------------------------------------------------------

_LABEL_COLUMNS = ("label", "labels", "score", "scores")  # what ST's collator treats as labels, not text


@dataclasses.dataclass
class HybridBatching:
    """How :class:`HybridSentenceTransformerTrainer` batches its train dataset.

    mode, mono_prob, lang_weights: as :class:`hybridfast.HybridBatchSampler` (``lang_weights``: None, "size",
        a sequence in ``languages`` order or a dict keyed by language code, missing languages weigh 0).
    id_column: rows sharing this value are translations of one example.
    lang_columns: None (auto: ``{column}_lang`` for the anchor and positive columns if present, else a
        ``lang``/``language`` column), one column name (the language of the whole row), or a dict
        ``{text_column: lang_column}`` naming at least the anchor and positive columns.
    text_columns: the ST input columns in order (anchor, positive, negatives...); default: every other column.
    group_column: optional; examples of one group (e.g. an article) never share a global batch.
    languages: restrict to / order these languages (default: every language found, sorted).
    seed: None -> the trainer's ``args.seed``. drop_last: keep only full batches (required with several
        processes, so each step has one batch per rank).
    """

    mode: str = "hybrid"
    mono_prob: float = 0.5
    lang_weights: str | Mapping[str, float] | Sequence[float] | None = None
    id_column: str = "id"
    lang_columns: str | Mapping[str, str] | None = None
    text_columns: Sequence[str] | None = None
    group_column: str | None = None
    languages: Sequence[str] | None = None
    seed: int | None = None
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        check_number("mono_prob", self.mono_prob, 0.0, 1.0)
        if not isinstance(self.id_column, str):
            raise TypeError(f"id_column must be a column name (str), got {type(self.id_column).__name__}")


def _is_lang_column(name: str) -> bool:
    return name in ("lang", "language") or name.endswith("_lang")


class HybridPairIndex:
    """Maps (example, language) to dataset rows for the anchor and for the positive side.

    Attributes: ``languages`` (list[str]), ``ids`` (example id per example index), ``availability``
    (bool [E, L]), ``anchor_row`` / ``positive_row`` (int64 [E, L], -1 where absent), ``groups``
    (int64 [E] or None), ``text_columns`` and ``meta_columns`` (what the collator must not see).
    """

    def __init__(self, dataset: Any, config: HybridBatching | None = None) -> None:
        config = config or HybridBatching()
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        names = list(dataset.column_names)
        if config.id_column not in names:
            raise ValueError(
                f"id_column={config.id_column!r} is not a column of the dataset (columns: {names}); "
                "hybrid batches need an id shared by the rows that are translations of one example"
            )
        if config.group_column is not None and config.group_column not in names:
            raise ValueError(f"group_column={config.group_column!r} is not a column of the dataset (columns: {names})")

        text_columns = self._text_columns(names, config)
        anchor_col, positive_col = text_columns[0], text_columns[1]
        lang_of = self._lang_columns(names, text_columns, config)
        for column in text_columns:
            self._check_string_column(dataset, column, "text_columns")
        self.text_columns = text_columns
        self.meta_columns = [c for c in names if c not in text_columns]

        ids = dataset[config.id_column]
        anchor_langs = self._langs(dataset, lang_of[anchor_col])
        positive_langs = self._langs(dataset, lang_of[positive_col])
        if config.languages is not None:
            languages = check_languages(list(config.languages) if not isinstance(config.languages, str)
                                        else config.languages)
        else:
            languages = sorted(set(anchor_langs) | set(positive_langs))
        lang_code = {lang: i for i, lang in enumerate(languages)}

        example_of: dict[Any, int] = {}
        example = np.fromiter((example_of.setdefault(i, len(example_of)) for i in ids), np.int64, len(ids))
        self.ids = list(example_of)
        n_examples = len(self.ids)
        self.languages = languages
        self.anchor_row = self._first_rows(example, anchor_langs, lang_code, n_examples)
        self.positive_row = self._first_rows(example, positive_langs, lang_code, n_examples)
        self.availability = (self.anchor_row >= 0) & (self.positive_row >= 0)
        if not self.availability.any():
            raise ValueError(
                f"no example has both its {anchor_col!r} and its {positive_col!r} in one of the languages "
                f"{languages} (language columns {lang_of[anchor_col]!r}, {lang_of[positive_col]!r})"
            )
        empty = [lang for lang, has in zip(languages, self.availability.any(axis=0)) if not has]
        if empty:  # as hybridfast.train_data: a language needs data
            message = (f"languages: {empty} have no example with both its {anchor_col!r} and its {positive_col!r} "
                       f"in that language; leave them out (languages={[l for l in languages if l not in empty]})")
            if config.languages is not None:  # named by the user: refused
                raise ValueError(message)
            warnings.warn(message + "; they are never sampled", stacklevel=3)  # found in a column only
        self.groups = None
        if config.group_column is not None:
            self.groups = self._groups(dataset[config.group_column], example, n_examples, config.group_column)
        self.lang_of = lang_of

    @staticmethod
    def _text_columns(names: list[str], config: HybridBatching) -> list[str]:
        if config.text_columns is not None:
            text_columns = list(config.text_columns)
            missing = [c for c in text_columns if c not in names]
            if missing:
                raise ValueError(f"text_columns {missing} are not columns of the dataset (columns: {names})")
        else:
            skip = {config.id_column, config.group_column, *_LABEL_COLUMNS, "dataset_name"}
            if isinstance(config.lang_columns, str):
                skip.add(config.lang_columns)
            elif isinstance(config.lang_columns, Mapping):
                skip.update(config.lang_columns.values())
            text_columns = [c for c in names if c not in skip and not _is_lang_column(c)]
        if len(text_columns) < 2:
            raise ValueError(
                f"text_columns must name at least an anchor and a positive column, got {text_columns} "
                f"(dataset columns: {names})"
            )
        return text_columns

    @staticmethod
    def _lang_columns(names: list[str], text_columns: list[str], config: HybridBatching) -> dict[str, str]:
        anchor_col, positive_col = text_columns[:2]
        spec = config.lang_columns
        if spec is None:
            if all(f"{c}_lang" in names for c in (anchor_col, positive_col)):
                spec = {c: f"{c}_lang" for c in text_columns if f"{c}_lang" in names}
            elif "lang" in names or "language" in names:
                spec = "lang" if "lang" in names else "language"
            else:
                raise ValueError(
                    f"no language column found: expected {anchor_col + '_lang'!r} and {positive_col + '_lang'!r}, "
                    f"or a 'lang' column (dataset columns: {names}); pass lang_columns=..."
                )
        if isinstance(spec, str):
            if spec not in names:
                raise ValueError(f"lang_columns={spec!r} is not a column of the dataset (columns: {names})")
            return {c: spec for c in text_columns}
        if not isinstance(spec, Mapping):
            raise TypeError(f"lang_columns must be None, a column name or a dict, got {type(spec).__name__}")
        for column in (anchor_col, positive_col):
            if column not in spec:
                raise ValueError(f"lang_columns has no entry for text column {column!r} (got {dict(spec)})")
        for text, lang in spec.items():
            if lang not in names:
                raise ValueError(
                    f"lang_columns[{text!r}]={lang!r} is not a column of the dataset (columns: {names})"
                )
        return {c: spec.get(c, spec[positive_col]) for c in text_columns}

    @staticmethod
    def _check_string_column(dataset: Any, column: str, what: str) -> None:
        feature = getattr(dataset, "features", {}).get(column)
        dtype = getattr(feature, "dtype", None)
        if dtype is not None and dtype not in ("string", "large_string"):
            raise ValueError(f"{what}: column {column!r} must hold text, but its type is {dtype}")

    @staticmethod
    def _langs(dataset: Any, column: str) -> list[str]:
        values = dataset[column]
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise ValueError(
                f"language column {column!r} must hold non-empty language codes (str); row {bad} has {values[bad]!r}"
            )
        return values

    @staticmethod
    def _first_rows(example: np.ndarray, langs: list[str], lang_code: dict[str, int], n_examples: int) -> np.ndarray:
        n_langs = len(lang_code)
        code = np.fromiter((lang_code.get(lang, -1) for lang in langs), np.int64, len(langs))
        keep = np.flatnonzero(code >= 0)  # languages outside `languages` are ignored
        table = np.full(n_examples * n_langs, -1, dtype=np.int64)
        flat, first = np.unique(example[keep] * n_langs + code[keep], return_index=True)
        table[flat] = keep[first]  # the first row holding (example, language) serves it
        return table.reshape(n_examples, n_langs)

    @staticmethod
    def _groups(values: list[Any], example: np.ndarray, n_examples: int, column: str) -> np.ndarray:
        group_of: dict[Any, int] = {}
        codes = np.fromiter((group_of.setdefault(v, len(group_of)) for v in values), np.int64, len(values))
        groups = np.full(n_examples, -1, dtype=np.int64)
        groups[example[::-1]] = codes[::-1]  # reversed so the first row of each example wins
        if np.any(groups[example] != codes):
            bad = int(np.flatnonzero(groups[example] != codes)[0])
            raise ValueError(f"group_column={column!r}: rows of one example disagree on the group (row {bad})")
        return groups

    def rows(self, plan: np.ndarray) -> list[tuple[int, int]]:
        """(example, query_lang, passage_lang) tuples -> (anchor row, positive row) keys."""
        plan = np.asarray(plan, dtype=np.int64).reshape(-1, 3)
        anchors = self.anchor_row[plan[:, 0], plan[:, 1]]
        positives = self.positive_row[plan[:, 0], plan[:, 2]]
        if (anchors < 0).any() or (positives < 0).any():
            raise RuntimeError("the sampler chose a language an example does not have (availability mismatch)")
        return list(zip(anchors.tolist(), positives.tolist()))


def parallel_pairs_dataset(pairs: Any, hard_negatives: int = 0) -> "datasets.Dataset":
    """hybridfast training data (``hybridfast.train_data.ParallelPairs``, e.g. from
    ``load_training_pairs("xquad-r")``) as a per-language-rows ``datasets.Dataset`` for
    :class:`HybridSentenceTransformerTrainer`: columns ``id, lang, group, anchor, positive[, negative_1..k]``.

    ``group`` joins examples that share a positive text (``pairs.groups``; else each example is its own);
    pass ``HybridBatching(group_column="group")`` so such false negatives never meet in a batch.
    ``hard_negatives=k`` keeps each row's first k negatives; every row must have at least k.
    """
    for name in ("example_ids", "languages", "availability", "query", "positive", "negatives"):
        if not hasattr(pairs, name):
            raise TypeError(f"pairs must be a hybridfast.train_data.ParallelPairs, got {type(pairs).__name__}")
    if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
        raise ValueError(f"hard_negatives must be an int >= 0, got {hard_negatives!r}")
    columns: dict[str, list] = {"id": [], "lang": [], "group": [], "anchor": [], "positive": []}
    groups = getattr(pairs, "groups", None)
    if groups is None:  # no duplicates: every example is its own group
        groups = np.arange(len(pairs.example_ids))
    negative_columns = [f"negative_{k + 1}" for k in range(hard_negatives)]
    for name in negative_columns:
        columns[name] = []
    for e, l in zip(*np.nonzero(np.asarray(pairs.availability))):
        e, l = int(e), int(l)
        columns["id"].append(str(pairs.example_ids[e]))
        columns["lang"].append(pairs.languages[l])
        columns["anchor"].append(pairs.query(e, l))
        columns["positive"].append(pairs.positive(e, l))
        columns["group"].append(int(groups[e]))
        if negative_columns:
            negatives = pairs.negatives(e, l)
            if len(negatives) < hard_negatives:
                raise ValueError(
                    f"hard_negatives={hard_negatives}: example {pairs.example_ids[e]!r} in {pairs.languages[l]!r} "
                    f"has only {len(negatives)} negatives"
                )
            for name, text in zip(negative_columns, negatives):
                columns[name].append(text)
    return datasets.Dataset.from_dict(columns)


class HybridPairDataset(torch.utils.data.Dataset):
    """Map-style view: key (anchor_row, positive_row) -> {anchor column: text, positive/negative columns: text}
    with the anchor from the first row and the other text columns from the second. Only text columns are
    returned, in order, so ST's collator builds (anchor, positive, negatives...) features from it."""

    def __init__(self, dataset: Any, index: HybridPairIndex) -> None:
        self.index = index
        self.anchor_column = index.text_columns[0]
        self.other_columns = index.text_columns[1:]
        self._anchors = dataset.select_columns([self.anchor_column])
        self._others = dataset.select_columns(self.other_columns)
        self._rows = len(dataset)

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        anchor_rows = [int(a) for a, _ in keys]
        positive_rows = [int(p) for _, p in keys]
        anchors = self._anchors[anchor_rows][self.anchor_column]
        others = self._others[positive_rows]
        return [
            {self.anchor_column: anchors[i], **{c: others[c][i] for c in self.other_columns}}
            for i in range(len(keys))
        ]


class HybridSTBatchSampler:
    """Batch sampler over :class:`HybridPairDataset` keys, driven by :class:`hybridfast.HybridBatchSampler`.

    ``batch_size`` is per process. Every process builds the same plan (same seed); per step it yields the
    batches of ranks 0..world_size-1 in turn, so accelerate's ``BatchSamplerShard`` (process r keeps every
    world_size-th batch, starting at r) hands rank r exactly its share of the global batch, and all ranks
    share the step's batch kind and languages. With ``split_batches=True`` it yields one global batch per
    step instead, which accelerate slices rank by rank.
    """

    def __init__(
        self,
        index: HybridPairIndex,
        batch_size: int,
        mode: str = "hybrid",
        mono_prob: float = 0.5,
        lang_weights: Mapping[str, float] | Sequence[float] | None = None,
        seed: int = 0,
        world_size: int = 1,
        split_batches: bool = False,
        drop_last: bool = True,
    ) -> None:
        from hybridfast.sampler import HybridBatchSampler

        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last must be True with several processes (each step needs one full batch per rank)")
        if isinstance(lang_weights, Mapping):  # {language: weight} -> one weight per index language
            unknown = sorted(set(lang_weights) - set(index.languages))
            if unknown:
                raise ValueError(f"lang_weights has languages {unknown} not in the dataset's {index.languages}")
            lang_weights = [float(lang_weights.get(lang, 0.0)) for lang in index.languages]
        self.index = index
        self.world_size = world_size
        self.split_batches = split_batches
        self.drop_last = drop_last
        self.per_rank_batch_size = batch_size
        # what accelerate's BatchSamplerShard reads: the size of one yielded batch
        self.batch_size = batch_size * world_size if split_batches else batch_size
        # Every rank's share is a fixed slice of one global plan, so one sampler serves all ranks.
        self.sampler = HybridBatchSampler(
            index.availability, batch_size, mode=mode, mono_prob=mono_prob, lang_weights=lang_weights,
            groups=index.groups, seed=seed, rank=0, world_size=world_size, drop_last=drop_last,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        steps = len(self.sampler)
        return steps if self.split_batches else steps * self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.sampler.plan()
        size = self.per_rank_batch_size
        for step in plan:
            step = step[step[:, 0] >= 0]  # a final partial batch (drop_last=False, one process) is -1 padded
            if self.split_batches:
                yield self.index.rows(step)
            else:
                for rank in range(self.world_size):
                    yield self.index.rows(step[rank * size:(rank + 1) * size])


def _split_batches(accelerator: Any) -> bool:
    config = getattr(accelerator, "dataloader_config", None)
    if config is not None and hasattr(config, "split_batches"):
        return bool(config.split_batches)
    return bool(getattr(accelerator, "split_batches", False))


class HybridSentenceTransformerTrainer(SentenceTransformerTrainer):
    """SentenceTransformerTrainer whose training batches come from the hybrid sampler.

    Same arguments as SentenceTransformerTrainer plus ``hybrid=HybridBatching(...)``. ``train_dataset`` must
    be a ``datasets.Dataset`` in one of the layouts in this module's docstring; its id/language/group columns
    are read here and dropped before the trainer (and its collator) sees the dataset. An ``eval_dataset``
    (Dataset) loses the same metadata columns and is evaluated row by row as usual.
    ``per_device_train_batch_size`` is the per-process batch; under accelerate/torchrun the world size
    comes from ``self.accelerator`` and every process gets its share of one global hybrid batch per step.
    ``args.batch_sampler`` is not used for training (the hybrid sampler replaces it); epochs reach the
    sampler through ``set_epoch`` and a resumed run skips the consumed batches of the current epoch.
    """

    def __init__(self, *args: Any, hybrid: HybridBatching | None = None, **kwargs: Any) -> None:
        if hybrid is None:
            hybrid = HybridBatching()
        if not isinstance(hybrid, HybridBatching):
            raise TypeError(f"hybrid must be a HybridBatching, got {type(hybrid).__name__}")
        bound = inspect.signature(SentenceTransformerTrainer.__init__).bind(None, *args, **kwargs)
        arguments = bound.arguments
        arguments.pop("self", None)
        train_dataset = arguments.get("train_dataset")
        if train_dataset is None:
            raise ValueError("train_dataset is required for HybridSentenceTransformerTrainer")
        self.hybrid = hybrid
        self.hybrid_index = HybridPairIndex(train_dataset, hybrid)
        self.hybrid_dataset = HybridPairDataset(train_dataset, self.hybrid_index)
        arguments["train_dataset"] = train_dataset.select_columns(self.hybrid_index.text_columns)
        eval_dataset = arguments.get("eval_dataset")
        if isinstance(eval_dataset, datasets.Dataset):
            meta = [c for c in self.hybrid_index.meta_columns if c in eval_dataset.column_names]
            if meta:
                arguments["eval_dataset"] = eval_dataset.remove_columns(meta)
        super().__init__(**arguments)

    def get_hybrid_batch_sampler(self) -> HybridSTBatchSampler:
        """The batch sampler of the train dataloader (world size and batch layout from the accelerator)."""
        accelerator = self.accelerator
        world_size = int(getattr(accelerator, "num_processes", 1))
        split = _split_batches(accelerator) and world_size > 1
        batch_size = self.args.train_batch_size
        if split:
            if batch_size % world_size:
                raise ValueError(f"train batch size {batch_size} must be divisible by {world_size} processes (split_batches)")
            batch_size //= world_size
        seed = self.args.seed if self.hybrid.seed is None else self.hybrid.seed
        return HybridSTBatchSampler(
            self.hybrid_index, batch_size, mode=self.hybrid.mode, mono_prob=self.hybrid.mono_prob,
            lang_weights=self.hybrid.lang_weights, seed=seed, world_size=world_size, split_batches=split,
            drop_last=self.hybrid.drop_last,
        )

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        args = self.args
        workers = args.dataloader_num_workers
        params: dict[str, Any] = {
            "batch_sampler": self.get_hybrid_batch_sampler(),
            "collate_fn": self.data_collator,
            "num_workers": workers,
            "pin_memory": args.dataloader_pin_memory,
        }
        if workers > 0:
            params["persistent_workers"] = args.dataloader_persistent_workers
            params["prefetch_factor"] = args.dataloader_prefetch_factor
        loader = torch.utils.data.DataLoader(self.hybrid_dataset, **params)
        # Full batches, one per rank per step: accelerate must not pad by cycling back to the first batches.
        self.accelerator.even_batches = False
        self._train_dataloader = self.accelerator.prepare(loader)
        return self._train_dataloader
from hybridfast.integrations.st_evaluator import HybridRetrievalEvaluator  # noqa: E402,F401  (issue 15)
