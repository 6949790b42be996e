"""The contrastive loss of hybrid batch training (InfoNCE on in-batch and hard negatives).

    module.py     HybridContrastiveLoss / hybrid_contrastive_loss: option checks, temperature,
                  cosine normalisation, the all-gather across ranks, the autograd function
    engines.py    the engines behind a backend: chunked rows (PyTorch or the Triton row kernel),
                  the fused Triton engine, and the measured `auto` choice
    reference     `reference_contrastive_loss`: the fp64 yardstick of the tests

Kernels live in `hybridfast.kernels.contrastive` (Triton only, no autograd).
"""
from hybridfast.loss.module import (BACKENDS, MAX_SCALE, REDUCTIONS, SIMILARITIES, HybridContrastiveLoss,
                                    hybrid_contrastive_loss, reference_contrastive_loss)

__all__ = ["HybridContrastiveLoss", "hybrid_contrastive_loss", "reference_contrastive_loss", "BACKENDS",
           "MAX_SCALE", "SIMILARITIES", "REDUCTIONS"]
