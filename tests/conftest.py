"""Shared test setup.

Without CUDA the Triton kernels run in the interpreter on CPU tensors; the
variable must be set before triton is first imported, hence here.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Encoders compute in bf16 by default where the CPU has native bf16; the suite pins fp32 so
# that its results do not depend on the machine (subprocesses inherit it). The bf16 path is
# tested where it is chosen explicitly (tests/test_encoder.py).
os.environ["HYBRIDFAST_CPU_BF16"] = "0"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data_root():
    """Where the shared benchmark data lives: $HYBRIDFAST_DATA, else ../shared/data."""
    env = os.environ.get("HYBRIDFAST_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    return here.parent / "shared" / "data"


@pytest.fixture(scope="session")
def xquad_dir():
    path = data_root() / "xquad-r"
    if not (path / "en.json").exists():
        pytest.skip(f"XQuAD-R not found under {path} (set HYBRIDFAST_DATA)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread: on a shared 2-core CI machine,
    OpenMP threads spinning on 32-wide matmuls cost more than the work. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Tiny BERTs (with and without dropout) and toy parallel JSONL data (tests/helpers.py),
    built once for all training tests."""
    from helpers import toy_training_files

    return toy_training_files(tmp_path_factory.mktemp("toy"))
