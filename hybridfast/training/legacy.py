"""The old module `hybridfast.trainer` (an alias to this file, see hybridfast/__init__.py), kept for
one release. New code: `from hybridfast.training import TrainConfig, train`; nothing inside
the library imports this module. `train` here also calls the module-level `_after_step(step)`
after every step, which older callers and tests replace to interrupt a run.
"""
from hybridfast.training import (Collator, TrainConfig, batch_kind, gradcache_step, list_checkpoints,  # noqa: F401
                                 plain_step, prefetch, prepare)
from hybridfast.training import loop as _loop

__all__ = ["TrainConfig", "train", "prepare", "Collator", "batch_kind", "prefetch", "plain_step", "gradcache_step",
           "list_checkpoints", "MAX_GRAD_NORM", "enable_checkpointing"]
from hybridfast.training.steps import MAX_GRAD_NORM, enable_checkpointing  # noqa: F401


def _after_step(step):
    """Replaced by callers that need to act after every step (kept for the old import path)."""


def train(config: TrainConfig, on_step=None):
    """hybridfast.training.train; `on_step` defaults to this module's `_after_step`."""
    return _loop.train(config, on_step=on_step if on_step is not None else (lambda step: _after_step(step)))
