"""A half-precision inference copy of a loaded encoder, laid out for the GEMMs that do the work.

Why a copy and not autocast: on a CPU with native bf16 (AVX512-BF16, AMX) the linear
layers are ~90% of an encoder's FLOPs, and PyTorch's bf16 `addmm` spends as long again
around the GEMM as inside it: it copies the broadcast bias into the output first, and a
transposed bf16 weight (nn.Linear keeps [out, in]) is reordered on every call. Measured
on the development CPU (AMD EPYC, 2 cores, multilingual-e5-small, 64 XQuAD-R passages
at 128 tokens, one run): fp32 10.5 s, bf16 weights 7.8 s, bf16 with the weights stored
transposed and the bias added in place 3.2 s. `PackedLinear` is that layout.

The copy holds no gradients and is rebuilt when the source model's weights change
(PyTorch bumps a tensor's version on every in-place update, so an optimizer step shows).
Pooling and normalisation stay in fp32 in the caller (Encoder.pool).
"""
import copy
import functools
import os
import platform

import torch
from torch import nn


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W^T stored contiguous ([in, out]) and the bias added in place."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().to(dtype).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype).clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y.add_(self.bias)


def _pack(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:  # subclasses (LoRA, quantized) keep their own forward
            setattr(module, name, PackedLinear(child, dtype))
        else:
            _pack(child, dtype)


def weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or updated in place."""
    return tuple((id(p), p._version) for p in model.parameters())


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype` for inference only, its nn.Linear layers packed (see the module doc)."""
    packed = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    _pack(packed, dtype)
    return packed


CPU_BF16_ENV = "HYBRIDFAST_CPU_BF16"  # "0": never bf16 on the CPU by default; "1": always


def cpu_bf16_native() -> bool:
    """Does this CPU compute bf16 dot products natively (AVX512-BF16 or AMX-BF16)?

    Without them bf16 GEMMs are emulated and slower than fp32, so "auto" stays fp32.
    $HYBRIDFAST_CPU_BF16 (0 or 1) overrides the detection, e.g. for bit-reproducible runs
    across machines; the test suite sets 0 so results do not depend on the CPU.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"${CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
    return _cpu_flags_have_bf16()


@functools.lru_cache(maxsize=None)
def _cpu_flags_have_bf16() -> bool:
    """Read once from /proc/cpuinfo (Linux); other systems report False."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        return False
    return False
