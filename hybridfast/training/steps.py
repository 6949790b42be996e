"""One training step: embed, loss, backward; then the update (see docs/architecture.md).

`plain_step` embeds the whole batch with a graph. `gradcache_step` gives the same
gradients with the activation memory of one chunk (hybridfast.gradcache). Under torchrun
both run through DistributedDataParallel with one rule (hybridfast.gradcache.ddp_sync):
gradients are reduced in the last backward pass of the step. `update` clips at 1.0, refuses a non-finite loss or gradient
(training stops at the first one, before the weights are touched) and steps the
optimizer and the schedule.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch

from hybridfast.gradcache import GradCache, ddp_sync
from hybridfast.training import distributed

MAX_GRAD_NORM = 1.0


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stopped at `step` without applying it."""

    def __init__(self, step, what, value, note=""):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"step {step}: the {what} is {value} (not finite); training stopped before applying it. "
                         f"{note + ' ' if note else ''}Lower --lr (or use fp32) and start again.")


def autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def plain_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, amp_dtype=None, scaler=None, model=None):
    """Embed the whole batch with a graph, loss, backward. Returns the detached loss tensor
    (not a float: reading it would wait for the device). `model`: what to call for the
    forward (the DistributedDataParallel wrapper of `encoder` under torchrun)."""
    model = model if model is not None else encoder
    with autocast(encoder.device, amp_dtype):
        with ddp_sync(model, last=False):  # DDP prepares its reduction in the last forward only
            q = model(**q_in)
        with ddp_sync(model, last=True):
            p = model(**p_in)
    # no upcast: under --bf16 the loss takes bf16 embeddings (tensor-core GEMMs, fp32 accumulation inside)
    loss = loss_fn(q, p, query_groups=q_groups, passage_groups=p_groups)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def gradcache_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, chunk_size, amp_dtype=None, scaler=None,
                   model=None):
    """GradCache: the same gradients as plain_step with the activations of one chunk at a time;
    under DDP gradients are reduced once, in the last replayed chunk."""
    model = model if model is not None else encoder
    trim = getattr(encoder.tokenizer, "padding_side", "right") == "right"
    cache = GradCache(lambda features: model(**features), chunk_size, trim_padding=trim,
                      autocast=partial(autocast, encoder.device, amp_dtype))
    q, p = cache.embed([q_in, p_in])
    loss = loss_fn(q, p, query_groups=q_groups, passage_groups=p_groups)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    cache.backward([q.grad, p.grad], sync=partial(ddp_sync, model))
    return loss.detach()


def update(params, optimizer, scheduler, scaler, world, loss, step):
    """Clip, check, step (DDP has averaged the gradients in the backward pass). Raises
    TrainingDiverged (on every rank alike) when the loss or the gradient norm is not finite;
    the weights are then untouched. Reading the two numbers costs one device sync per step:
    the price of never training on NaN."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    loss_value = float(loss)
    # fp16: an inf gradient is the loss scaler's business (it skips the step and lowers the scale)
    norm_value = float(norm) if scaler is None else 0.0
    bad = not (math.isfinite(loss_value) and math.isfinite(norm_value))
    if distributed.any_rank(bad, world, loss.device):
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(step, "loss", loss_value)
        if not math.isfinite(norm_value):
            raise TrainingDiverged(step, "gradient norm", norm_value)
        raise TrainingDiverged(step, "loss on another process", "not finite")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def parameters_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def enable_checkpointing(model):
    """Activation (gradient) checkpointing of a Hugging Face model. Non-reentrant
    checkpoints restore the RNG state, so recomputed dropout masks match."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def param_groups(model, weight_decay):
    """No weight decay on biases and norm weights (1-D tensors), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
