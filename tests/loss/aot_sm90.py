"""Compile every CUDA config of kernels/contrastive.py for an H100 (sm90) on the CPU.

Run by tests/test_loss.py in a subprocess without TRITON_INTERPRET. For each
(kernel, dtype, config, flag set) it prints one JSON line with what the compiler
emitted: spill bytes from Triton's bundled `ptxas -v`, shared memory, whether the
PTX holds wgmma, atomics, acq_rel orderings or membar/fence instructions. Exit
code 3 (with the reason on the last line) when Triton's NVIDIA tools are absent.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(f"Triton cannot compile ahead of time here: {exc}")
    sys.exit(3)

from hybridfast.kernels import contrastive as K

try:  # the ptxas Triton itself uses for sm90 (its bundled one; "ptxas-blackwell" in Triton 3.5+)
    from triton.backends.nvidia.compiler import get_ptxas
    PTXAS = get_ptxas(90).path
except Exception:  # older Triton: one bundled ptxas
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
INT_PTRS = {"A_IDX", "A_POS", "A_KEY", "A_GRP", "B_KEY", "B_GRP"}
FP32_PTRS = {"RA", "RB", "CONSTS", "SCALE", "M_PART", "L_PART", "POS_PART", "LSE", "POS", "W", "DA", "DB", "DS_PART", "DS_ROW", "S"}
ELT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SPILL = re.compile(r"(\d+) bytes spill (?:stores|loads)")


def signature(kernel, elt, consts):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("A", "B", "G"):
            sig[name] = f"*{elt}"
        elif name in INT_PTRS:
            sig[name] = "*i64"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        else:
            sig[name] = "i64"
    return sig


def compile_one(kernel, elt, consts, warps, stages, sizes_divisible=False):
    sig = signature(kernel, elt, consts)
    # what the JIT assumes at run time for 16-aligned pointers, strides and D; the row counts
    # too with sizes_divisible (the JIT specialises sizes that are multiples of 16)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n] != "constexpr" and (sizes_divisible or n not in ("n_a", "n_b"))}
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    report = out.stdout + out.stderr
    atomics = re.findall(r"\b(?:atom|red)\.global\.[\w.]*", ptx)
    return dict(spill_bytes=sum(int(n) for n in SPILL.findall(report)), shared_bytes=compiled.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, atomics=len(atomics),
                vector_loads=len(re.findall(r"\bld\.global\.v[24]\.", ptx)),
                vector_stores=len(re.findall(r"\bst\.global\.v[24]\.", ptx)),
                relaxed_atomics=sum(".relaxed." in a for a in atomics),
                acq_rel=bool(re.search(r"\b(?:atom|red)\.[\w.]*acq_rel", ptx)),
                # memory-ordering fences only: wgmma's own fence.proxy.async / wgmma.fence are not
                membar=bool(re.search(r"\bmembar\.|\bfence\.(?:sc|acq_rel)\b", ptx)),
                ptxas=[line.strip() for line in report.splitlines() if "spill" in line or "Used" in line][:4])


def main() -> int:
    if not os.path.exists(PTXAS):
        print(f"Triton's NVIDIA backend tools are absent (no {PTXAS})")
        return 3
    for (pass_, precision), configs in K.CUDA_CONFIGS.items():
        kernel = K._contrastive_fwd_kernel if pass_ == "fwd" else K._contrastive_bwd_kernel
        dtypes = (torch.float32,) if precision == "fp32" else (torch.bfloat16, torch.float16)
        for dtype in dtypes:
            for flags in (False, True):
                for m, n, d, warps, stages in configs:
                    consts = dict(HAS_AIDX=flags, HAS_BKEY=flags, HAS_GROUPS=flags, HAS_SCALES=flags,
                                  IEEE=dtype == torch.float32,
                                  UPCAST=False, BLOCK_M=m, BLOCK_N=n, BLOCK_D=d)
                    if pass_ == "bwd":
                        consts["GROUP_M"] = K.BWD_GROUP_M
                    row = compile_one(kernel, ELT[dtype], consts, warps, stages)
                    print(json.dumps(dict(kernel=pass_, dtype=ELT[dtype], config=[m, n, d, warps, stages],
                                          flags=flags, **row)), flush=True)
    for n_b in (1024, 2048, 65536):  # every (BLOCK_N, num_warps) the row heuristic can pick
        block, warps = K.rows_config(n_b)
        for dtype in ELT:
            for flags in (False, True):
                consts = dict(HAS_BKEY=flags, HAS_GROUPS=flags, HAS_W=True, BLOCK_N=block)
                for divisible in (False, True):
                    row = compile_one(K._chunk_rows_kernel, ELT[dtype], consts, warps, 1, sizes_divisible=divisible)
                    print(json.dumps(dict(kernel="rows", dtype=ELT[dtype], config=[block, warps], flags=flags,
                                          n_b_divisible_by_16=divisible, **row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
