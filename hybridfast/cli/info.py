"""`hybridfast info`: versions and which optional parts are active."""
import json


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _auto_backend(info) -> str:
    import os

    from hybridfast.loss.dispatch import ENV_BACKEND, backend_choices

    forced = os.environ.get(ENV_BACKEND)
    if forced:
        return f"{forced} (forced by ${ENV_BACKEND})"
    if not info["triton"]:
        return "torch (chunked engine, PyTorch rows; Triton absent)"
    text = ("on CUDA: the fastest of chunked / triton / torch, timed on the first call per shape bucket; "
            "elsewhere: torch (chunked engine, PyTorch rows)")
    made = backend_choices()  # only what this process measured
    if made:
        text += "; chosen here: " + ", ".join(f"{k} -> {v['backend']}" for k, v in made.items())
    return text


def _bf16_text(info) -> str:
    from hybridfast.models.packed import CPU_BF16_ENV

    if info["cuda_bf16"]:
        return "CUDA bf16: evaluation, demo and study run in bf16; train with --bf16"
    if info["cpu_bf16_native"]:
        how = f"forced by ${CPU_BF16_ENV}=1" if info["cpu_bf16_forced"] else "AVX512-BF16 / AMX found"
        return f"CPU, {how}: evaluation, demo and study run in bf16 (--fp32 / --precision fp32 opt out)"
    why = (f"forced off by ${CPU_BF16_ENV}=0" if info["cpu_bf16_forced"]
           else "no AVX512-BF16 / AMX (bf16 would be emulated, slower than fp32)")
    return f"no: {why}; everything runs in fp32"


def run(args) -> int:
    from hybridfast._backends import report

    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    triton = info["triton"] or "not installed"
    if info["triton"]:
        triton += " (interpreted on CPU: TRITON_INTERPRET=1)" if info["triton_interpreted"] else ""
    rows = [
        ("hybridfast", info["hybridfast"]),
        ("python", info["python"]),
        ("torch", info["torch"]),
        ("transformers", info["transformers"] or "not installed"),
        ("numpy", info["numpy"]),
        ("CUDA device", info["cuda_device"] or "none (CPU only)"),
        ("Triton", triton),
        ("bf16 (precision auto)", _bf16_text(info)),
        ("loss backend (auto)", _auto_backend(info)),
        ("C++ sampler + search (hybridfast._C)", "built" if info["cpp_extension"] else "MISSING: reinstall with a C++17 compiler"),
        ("memory (train, demo, study)", info["malloc"]),
        ("faiss", (info["faiss"] + (" (GPU)" if info["faiss_gpu"] else " (CPU)")) if info["faiss"] else "not installed (pip install hybridfast[faiss])"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
