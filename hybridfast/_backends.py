"""Optional parts, detected once on first use (never at import time).

Each probe returns a short status string or None; `fallback_warning` emits one
clear warning per missing part instead of one per call.
"""
import functools
import importlib.util
import os
import warnings

_warned = set()


def fallback_warning(key: str, message: str) -> None:
    """Warn once per process about a missing optional part."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_version():
    """Triton's version if it imports, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install counts as absent
        return None
    return triton.__version__


def triton_available_for(tensor) -> bool:
    """Can the Triton kernels run on this tensor's device?"""
    if triton_version() is None:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and triton_interpreted()


@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled hybridfast._C module, or None."""
    try:
        from hybridfast import _C
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def faiss_module():
    """faiss (GPU or CPU build) or None."""
    if importlib.util.find_spec("faiss") is None:
        return None
    try:
        import faiss
    except Exception:
        return None
    return faiss


def faiss_has_gpu() -> bool:
    faiss = faiss_module()
    return bool(faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)


def resolve_device(device="auto"):
    """'auto' -> cuda if available else cpu; anything else passed to torch.device."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def report() -> dict:
    """What is installed and active, for `hybridfast info` and bench results."""
    import platform

    import numpy
    import torch

    import hybridfast

    info = {
        "hybridfast": hybridfast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version(),
        "triton_interpreted": triton_interpreted(),
        "cpp_extension": cpp_extension() is not None,
        "faiss": getattr(faiss_module(), "__version__", None),
        "faiss_gpu": faiss_has_gpu(),
        "malloc": _malloc_text(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info.update(bf16_support(info["cuda"]))
    return info


def _malloc_text() -> str:
    from hybridfast import _malloc

    try:
        return _malloc.plan()[1]
    except ValueError as e:
        return f"INVALID: {e}"


def bf16_support(cuda: bool) -> dict:
    """Where bf16 is computed natively, hence what precision="auto" picks (evaluation, demo, study)."""
    import torch

    from hybridfast.models.packed import CPU_BF16_ENV, _cpu_flags_have_bf16, cpu_bf16_native

    forced = os.environ.get(CPU_BF16_ENV, "").strip() in ("0", "1")
    return {"cpu_bf16_native": cpu_bf16_native(), "cpu_bf16_flags": _cpu_flags_have_bf16(),
            "cpu_bf16_forced": forced,
            "cuda_bf16": bool(cuda and torch.cuda.is_bf16_supported())}
