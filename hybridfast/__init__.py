"""hybridfast: fast hybrid-batch training and evaluation of multilingual dense retrievers.

Public names are imported lazily so that `import hybridfast` stays cheap (no
transformers import) and never touches a GPU.
"""
import os
import sys
from importlib import import_module
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec

__version__ = "0.1.0"

_EXPORTS = {
    "HybridContrastiveLoss": "hybridfast.loss",
    "hybrid_contrastive_loss": "hybridfast.loss",
    "HybridBatchSampler": "hybridfast.sampler",
    "Encoder": "hybridfast.encoder",
    "RetrievalEvaluator": "hybridfast.evaluator",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _mount_checkout_kernels():
    """Mount the top-level kernels/ folder of a source checkout as hybridfast.kernels.

    A wheel ships the Triton kernels as hybridfast/kernels/; a plain checkout (tests,
    notebooks with the repository root on sys.path) and `pip install -e .` keep them in
    kernels/ beside this package. kernels/ has no __init__.py on purpose: with the
    repository root on sys.path it is then at most a namespace portion, which any
    installed package named `kernels` (Hugging Face's kernel hub) wins over, and which
    transformers' availability check reports as absent.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(os.path.join(folder, "contrastive.py")):
        return  # an installed wheel (or no kernels at all)
    spec = ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = module_from_spec(spec)
    module.__doc__ = "Triton kernels and their launchers (no nn.Module, no autograd); mounted from kernels/."
    sys.modules[spec.name] = module
    globals()["kernels"] = module


_mount_checkout_kernels()


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridfast' has no attribute {name!r}")


def __dir__():
    return __all__
