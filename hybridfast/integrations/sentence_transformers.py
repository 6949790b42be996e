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

import inspect
import warnings
from functools import partial
from typing import Any, Iterable, Sequence

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

from hybridfast.gradcache import GradCache, ddp_sync  # noqa: E402
from hybridfast.loss import MAX_SCALE, HybridContrastiveLoss  # noqa: E402
from hybridfast.integrations.st_batching import (  # noqa: E402
    HybridBatching,
    HybridPairDataset,
    HybridPairIndex,
    HybridSTBatchSampler,
    parallel_pairs_dataset,
)

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
        backend: "auto" | "chunked" | "triton" | "torch", passed to HybridContrastiveLoss.
        **loss_kwargs: further HybridContrastiveLoss options (``learn_temperature``, ``chunk_size``,
            ``chunk_memory``). A learnt
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
        cache.backward(grads, scale=grad_output, sync=partial(ddp_sync, self.model))

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
