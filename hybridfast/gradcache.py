"""GradCache (Gao et al. 2021, arXiv 2101.06983): a contrastive batch as large as the loss
allows, with the activation memory of one chunk. Used by the native trainer
(hybridfast.training.steps) and by the sentence-transformers integration
(CachedHybridMNRLoss); see docs/architecture.md.

    cache = GradCache(embed, chunk_size)         # embed(features) -> [rows, D]
    q, p = cache.embed([q_features, p_features])  # pass 1: no graph; leaves that take a gradient
    loss = loss_fn(q, p); loss.backward()         # full-batch loss: gradients w.r.t. q and p
    cache.backward([q.grad, p.grad])              # pass 2: re-embed chunk by chunk with a graph

Pass 1 records the RNG state each chunk started from; pass 2 replays it, so dropout
draws the same masks and the cached gradients belong to the embeddings being
re-computed (otherwise the result would silently differ from the full batch). Under
DistributedDataParallel pass `sync=partial(ddp_sync, model)`: gradients are reduced
once, in the last replayed chunk. After
pass 2 the RNG streams are where they were before it. With right padding, each chunk
drops the padding columns none of its rows use (shorter sequences, less work; the
attention mask hides them, so the embeddings do not change).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm


def ddp_sync(model, last: bool) -> ContextManager:
    """The one DDP rule of hybridfast: of the several backward passes of one step, only the
    last reduces gradients across processes (``model.no_sync()`` elsewhere, and everywhere
    inside an outer no_sync such as gradient accumulation). A no-op for a model that is not
    DistributedDataParallel."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if last and model.require_backward_grad_sync:
            return nullcontext()
        return model.no_sync()
    return nullcontext()


class RngState:
    """The CPU RNG and the CUDA RNGs of the devices the given tensors live on."""

    def __init__(self, tensors: Iterable[Any] = ()) -> None:
        self.cpu = torch.get_rng_state()
        self.devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.is_cuda})
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the streams are restored afterwards."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def row_count(features: Mapping[str, Any]) -> int:
    """Rows of a tokenised batch (input_ids / attention_mask, else the first 2-D tensor)."""
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    for value in features.values():
        if isinstance(value, Tensor) and value.ndim >= 2:
            return int(value.shape[0])
    raise ValueError("features: cannot find the batch dimension (no input_ids/attention_mask tensor)")


def row_chunks(features: Mapping[str, Any], size: int, trim_padding: bool = True) -> List[dict]:
    """`features` cut into chunks of `size` rows. Row-indexed tensors are sliced; anything else
    (scalars, per-batch metadata such as prompt lengths) passes as is. With `trim_padding`
    (right padding) a chunk keeps only the columns its longest row uses."""
    rows = row_count(features)
    mask = features.get("attention_mask")
    lengths = mask.sum(1).tolist() if trim_padding and isinstance(mask, Tensor) and mask.ndim == 2 else None
    width = mask.shape[1] if lengths is not None else None
    out = []
    for begin in range(0, rows, size):
        end = min(begin + size, rows)
        chunk = {k: (v[begin:end] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == rows else v)
                 for k, v in features.items()}
        if lengths is not None:
            used = max(1, int(max(lengths[begin:end])))
            chunk = {k: (v[:, :used] if isinstance(v, Tensor) and v.ndim == 2 and v.shape[1] == width else v)
                     for k, v in chunk.items()}
        out.append(chunk)
    return out


class GradCache:
    """Two-pass embedding of several feature columns (queries, passages, ...).

    embed: features -> embeddings [rows, D] (a model forward).
    chunk_size: rows per forward. trim_padding: see row_chunks (only for right padding).
    autocast: a factory of the context each forward runs in (mixed precision), or None.
    """

    def __init__(self, embed: Callable[[Mapping[str, Any]], Tensor], chunk_size: int, trim_padding: bool = True,
                 autocast: Optional[Callable[[], ContextManager]] = None, show_progress: bool = False) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.embed_fn, self.chunk_size, self.trim_padding = embed, chunk_size, trim_padding
        self.autocast = autocast or nullcontext
        self.show_progress = show_progress
        self._plan: List[List[dict]] = []
        self._states: List[List[RngState]] = []

    def embed(self, columns: Sequence[Mapping[str, Any]], requires_grad: bool = True) -> List[Tensor]:
        """Pass 1: each column's embeddings in the dtype the model gives (bf16 under bf16 autocast:
        the loss takes it as is and accumulates in fp32 itself), computed without a graph; leaves
        with requires_grad (when `requires_grad`) so a loss's backward fills their .grad."""
        self._plan = [row_chunks(f, self.chunk_size, self.trim_padding) for f in columns]
        self._states = []
        bar = tqdm(total=sum(len(c) for c in self._plan), desc="Embed chunks", disable=not self.show_progress)
        out = []
        with torch.no_grad():
            for chunks in self._plan:
                states, parts = [], []
                for chunk in chunks:
                    states.append(RngState(chunk.values()))
                    with self.autocast():
                        emb = self.embed_fn(chunk)
                    parts.append(emb)
                    bar.update(1)
                self._states.append(states)
                column = torch.cat(parts)
                out.append(column.requires_grad_() if requires_grad else column)
        bar.close()
        return out

    def backward(self, grads: Sequence[Optional[Tensor]], scale: Optional[Tensor] = None,
                 sync: Optional[Callable[[bool], ContextManager]] = None) -> None:
        """Pass 2: re-embed every chunk from its recorded RNG state with a graph and back-propagate
        its rows of `grads` (one per column; None: the column got no gradient). `scale` multiplies
        the gradients (an upstream gradient, e.g. from a loss scaler). `sync(last)` gives the
        context of each chunk's backward: DistributedDataParallel reduces gradients only in the
        last one (model.no_sync() elsewhere)."""
        if len(grads) != len(self._plan):
            raise ValueError(f"backward: {len(grads)} gradients for {len(self._plan)} embedded columns")
        work = [(chunk, state, grad) for chunks, states, grad in zip(self._plan, self._states, grads)
                if grad is not None for chunk, state in zip(chunks, states)]
        offsets = []
        for chunks, grad in zip(self._plan, grads):
            if grad is not None:
                begin = 0
                for chunk in chunks:
                    rows = row_count(chunk)
                    offsets.append((begin, begin + rows))
                    begin += rows
        with torch.enable_grad():
            for i, ((chunk, state, grad), (b, e)) in enumerate(zip(work, offsets)):
                with (sync(i == len(work) - 1) if sync is not None else nullcontext()), state.replay():
                    with self.autocast():
                        emb = self.embed_fn(chunk)
                    dtype = torch.promote_types(emb.dtype, torch.float32)
                    # d(sum(emb * g))/d(theta) = J^T g: the chain rule through the cached gradient g
                    surrogate = (emb.to(dtype) * grad[b:e].to(device=emb.device, dtype=dtype)).sum()
                    if scale is not None:
                        surrogate = surrogate * scale.to(dtype)
                    surrogate.backward()
        self._plan, self._states = [], []
