"""Evaluation during training (every --save-steps and at the end) that leaves training as it was.

The evaluator is built once (its text layout is reused at every checkpoint); the model's
train/eval mode and every RNG stream (Python, numpy, torch, CUDA) are restored afterwards,
so a run with --eval takes exactly the same steps as one without.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from hybridfast.evaluation.evaluator import RetrievalEvaluator
from hybridfast.training import checkpoint as ckpt


class PeriodicEvaluator:
    """RetrievalEvaluator built once (its text layout is reused), run without
    disturbing training's RNG streams or train/eval mode."""

    def __init__(self, benchmark):
        self.benchmark, self.evaluator = benchmark, None

    def __call__(self, encoder):
        if self.evaluator is None:
            self.evaluator = RetrievalEvaluator(self.benchmark, device=encoder.device, show_progress=False)
        was_training = encoder.training
        encoder.eval()
        try:
            with preserved_rng(), torch.no_grad():
                result = self.evaluator.evaluate(encoder)
        finally:
            encoder.train(was_training)
        flat = {f"eval/{setting}/{metric}": float(v) for setting, metrics in result.summary.items()
                for metric, v in metrics.items()}
        return result, flat


@contextmanager
def preserved_rng():
    """Run something (evaluation) without disturbing any RNG stream of training."""
    states = ckpt.all_rng_states()
    try:
        yield
    finally:
        ckpt.restore_rng_states(states)
