"""The GPU path: CUDA tests (skipped without a device) and the CPU regression tests of the
first-GPU-run review (reviews/gpu-first-run.md, marked gpu_first_run; interpreter, emulation, mocks)."""
import pytest
import torch

from loss_cases import (BACKENDS, TOL, assert_matches, check, cuda, make_inputs, needs_triton,  # noqa: F401
                        run_both)
from hybridfast._backends import triton_available_for  # noqa: F401
from hybridfast.loss import HybridContrastiveLoss, hybrid_contrastive_loss, reference_contrastive_loss  # noqa: F401


@cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_engines_match_reference(backend, dtype, symmetric):
    # chunk_size 100 makes the chunked engine loop (and scatter through the symmetric term's index)
    q, p, labels, qg, pg = make_inputs(B=333, negatives=2, D=100, dtype=dtype, device="cuda", groups=7)
    opts = dict(chunk_size=100) if backend == "chunked" else {}
    results = run_both(q, p, labels, qg, pg, 0.02, "scaled", backend, symmetric=symmetric, **opts)
    results = [[x.cpu() if x is not None else x for x in r] for r in results]
    assert_matches(results, dtype)


@cuda
@pytest.mark.parametrize("D", [768, 4096])
def test_gpu_triton_large_d(D):
    q, p, labels, qg, pg = make_inputs(B=37, negatives=3, D=D, dtype=torch.bfloat16, device="cuda", groups=5)
    results = run_both(q, p, labels, qg, pg, 0.05, "last", "triton", symmetric=True)
    results = [[x.cpu() for x in r] for r in results]
    assert_matches(results, torch.bfloat16)


@cuda
def test_gpu_large_batch_triton_equals_torch_backend():
    q, p, labels, qg, pg = make_inputs(B=4096, negatives=1, D=768, dtype=torch.bfloat16, device="cuda", groups=50)
    grads = []
    for backend in ("triton", "chunked", "torch"):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = hybrid_contrastive_loss(qq, pp, labels, qg, pg, symmetric=True, backend=backend)
        loss.backward()
        grads.append((loss.detach().float(), qq.grad.float(), pp.grad.float()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=1e-4)
    assert hybrid_contrastive_loss(q, p, labels).dtype == torch.float32  # auto: timed choice on CUDA
    from hybridfast.loss.engines import backend_choices

    assert backend_choices()  # the first auto call per bucket measured and recorded a choice
