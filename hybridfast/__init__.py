"""hybridfast: fast hybrid-batch training and evaluation of multilingual dense retrievers.

Public names are imported lazily so that `import hybridfast` stays cheap (no
transformers import) and never touches a GPU.
"""
import os
import sys
import warnings
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec

__version__ = "0.1.0"

_EXPORTS = {
    "HybridContrastiveLoss": "hybridfast.loss",
    "hybrid_contrastive_loss": "hybridfast.loss",
    "HybridBatchSampler": "hybridfast.sampler",
    "Encoder": "hybridfast.encoder",
    "RetrievalEvaluator": "hybridfast.evaluation",
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

# Old module paths (before the subpackages), kept for one release (removed in 0.3). The old
# name resolves to the *same* module object as the new one, so monkeypatching either patches
# both; importing it warns with the new path. Library code imports none of them.
MOVED_MODULES = {
    "hybridfast.evaluator": "hybridfast.evaluation.evaluator",
    "hybridfast.search": "hybridfast.evaluation.search",
    "hybridfast.metrics": "hybridfast.evaluation.metrics",
    "hybridfast.trec": "hybridfast.evaluation.trec",
    "hybridfast.plots": "hybridfast.evaluation.plots",
    "hybridfast.train_data": "hybridfast.data.pairs",
    "hybridfast.beir": "hybridfast.data.beir",
    "hybridfast.demo": "hybridfast.study.demo",
    "hybridfast.trainer": "hybridfast.training.legacy",
}


class _MovedModuleFinder(MetaPathFinder, Loader):
    """Resolves the old paths of MOVED_MODULES to their new modules, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} is deprecated and will be removed in hybridfast 0.3; import {new} instead",
                      DeprecationWarning, stacklevel=2)
        return import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridfast' has no attribute {name!r}")


def __dir__():
    return __all__
