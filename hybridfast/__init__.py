"""hybridfast: fast hybrid-batch training and evaluation of multilingual dense retrievers.

Public names are imported lazily so that `import hybridfast` stays cheap (no
transformers import) and never touches a GPU.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "HybridContrastiveLoss": "hybridfast.loss",
    "hybrid_contrastive_loss": "hybridfast.loss",
    "HybridBatchSampler": "hybridfast.sampler",
    "Encoder": "hybridfast.encoder",
    "RetrievalEvaluator": "hybridfast.evaluator",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridfast' has no attribute {name!r}")


def __dir__():
    return __all__
