"""The foundation: import is cheap and GPU-free, the C++ module is built, the CLI works."""
import json
import subprocess
import sys

import pytest


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_does_not_pull_heavy_modules_or_touch_cuda():
    # Importing the package (and the kernels subpackage) must not import transformers
    # or triton, nor initialise CUDA: those happen on first use only.
    out = run_python(
        "import sys, hybridfast, hybridfast.kernels\n"
        "import torch\n"
        "print(json.dumps({m: m in sys.modules for m in ('transformers', 'triton')}"
        " | {'cuda_init': torch.cuda.is_initialized()}))".replace("print(", "import json; print(", 1)
    )
    assert json.loads(out) == {"transformers": False, "triton": False, "cuda_init": False}


def test_public_names_resolve_lazily():
    import hybridfast

    assert set(hybridfast.__all__) >= {
        "HybridContrastiveLoss", "hybrid_contrastive_loss", "HybridBatchSampler",
        "Encoder", "RetrievalEvaluator"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybridfast.nope  # noqa: B018


def test_cpp_extension_is_built_and_deterministic():
    from hybridfast import _C

    # splitmix64 reference values (Vigna's constants), fixed across compilers.
    assert _C.splitmix64(0) == 0xE220A8397B1DCDAF
    assert _C.splitmix64(1) == 0x910A2DEC89025CC1


def test_info_reports_active_parts():
    out = subprocess.run([sys.executable, "-m", "hybridfast", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["cpp_extension"] is True
    assert info["torch"].startswith("2.")
    for key in ("cuda", "triton", "triton_interpreted", "faiss", "transformers"):
        assert key in info
    text = subprocess.run([sys.executable, "-m", "hybridfast", "info"],
                          capture_output=True, text=True, check=True).stdout
    assert "C++ sampler + search (hybridfast._C)" in text and "built" in text


def test_cli_requires_a_subcommand_and_lists_them():
    res = subprocess.run([sys.executable, "-m", "hybridfast"], capture_output=True, text=True)
    assert res.returncode == 2
    helptext = subprocess.run([sys.executable, "-m", "hybridfast", "--help"],
                              capture_output=True, text=True, check=True).stdout
    for name in ("data", "train", "evaluate", "study", "demo", "info"):
        assert name in helptext


@pytest.mark.parametrize("forced, native", [("1", True), ("0", False)])
def test_info_states_bf16_support(forced, native):
    """`hybridfast info` says whether precision "auto" means bf16 here and why (the detection,
    or $HYBRIDFAST_CPU_BF16 forcing it)."""
    import os

    env = dict(os.environ, HYBRIDFAST_CPU_BF16=forced)
    info = json.loads(subprocess.run([sys.executable, "-m", "hybridfast", "info", "--json"], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert info["cpu_bf16_native"] is native and info["cpu_bf16_forced"] is True
    assert isinstance(info["cpu_bf16_flags"], bool) and info["cuda_bf16"] is False
    text = subprocess.run([sys.executable, "-m", "hybridfast", "info"], env=env,
                          capture_output=True, text=True, check=True).stdout
    line = next(l for l in text.splitlines() if l.startswith("bf16 (precision auto)"))
    assert ("run in bf16" in line) is native and ("HYBRIDFAST_CPU_BF16" in line)
