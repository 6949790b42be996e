"""The contrastive loss of hybrid batch training (InfoNCE on in-batch and hard negatives).

    module.py     HybridContrastiveLoss / hybrid_contrastive_loss: option checks, temperature,
                  the all-gather across ranks
    function.py   the autograd Function, input checks, the two terms, the cosine normalisation backward
    engines.py    the engines: chunked rows (PyTorch or the Triton row kernel), the fused Triton engine
    dispatch.py   the one place backend="auto" is decided, and the chunk budget
    reference.py  `reference_contrastive_loss`: the fp64 yardstick; `relative_error` for gradients

Kernels live in `hybridfast.kernels.contrastive` (Triton only, no autograd).
"""
from hybridfast.loss.function import MAX_SCALE, REDUCTIONS, SIMILARITIES
from hybridfast.loss.module import BACKENDS, HybridContrastiveLoss, hybrid_contrastive_loss
from hybridfast.loss.reference import reference_contrastive_loss

__all__ = ["HybridContrastiveLoss", "hybrid_contrastive_loss", "reference_contrastive_loss", "BACKENDS",
           "MAX_SCALE", "SIMILARITIES", "REDUCTIONS"]
