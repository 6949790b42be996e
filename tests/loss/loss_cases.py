"""Shared builders and checks of the tests/loss/ files (imported as `loss_cases`).

The Triton backend runs in the interpreter on CPU (TRITON_INTERPRET=1, set by
conftest) at small shapes only; large shapes and half precision on Triton need CUDA.
"""
import pytest
import torch

from hybridfast._backends import triton_available_for
from hybridfast.loss import hybrid_contrastive_loss, reference_contrastive_loss
from hybridfast.loss.reference import GRAD_TOL, relative_error

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not triton_available_for(torch.empty(0)) and not torch.cuda.is_available(),
                                  reason="Triton neither on CUDA nor interpreted")
# "chunked" runs its Triton row kernel where Triton runs (interpreted here), else its PyTorch one
BACKENDS = ["torch", pytest.param("chunked", marks=needs_triton), pytest.param("triton", marks=needs_triton)]

# (rtol, atol) for the loss and for gradients, per input dtype. Half precision
# rounds the inputs (and Triton's tile products); accumulation is fp32 everywhere.
TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-4, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (5e-3, 3e-3),
}


def make_inputs(B=37, negatives=1, D=100, dtype=torch.float32, device="cpu", seed=0, groups=0, shuffle=True):
    """Queries, passages in the sentence-transformers layout, labels and optional groups."""
    g = torch.Generator().manual_seed(seed)
    N = B * (1 + negatives)
    q = torch.randn(B, D, generator=g)
    p = torch.randn(N, D, generator=g)
    p[:B] += 1.5 * q  # positives are close to their queries, as after some training
    labels = torch.randperm(N, generator=g)[:B] if shuffle else None
    qg = pg = None
    if groups:
        qg = torch.randint(0, groups, (B,), generator=g)
        pg = torch.randint(0, groups, (N,), generator=g)
    to = dict(device=device)
    out = [q.to(dtype=dtype, **to), p.to(dtype=dtype, **to), None if labels is None else labels.to(**to),
           None if qg is None else qg.to(**to), None if pg is None else pg.to(**to)]
    return out


def check(actual, expected, dtype, what):
    """Elementwise closeness, and for non-scalars the relative Frobenius error of
    hybridfast.loss.reference (GRAD_TOL): the elementwise atol alone passes a zero gradient
    whose entries are all below it (reviews/gpu-first-run.md, finding 5)."""
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=what)
    if expected.numel() > 1 and float(expected.abs().max()) > 1e-9:  # not an exactly-zero gradient
        err = relative_error(actual, expected)
        assert err <= GRAD_TOL[dtype], f"{what}: relative Frobenius error {err:.3g}"


def run_both(q, p, labels, qg, pg, temperature, upstream, backend, **opts):
    """Loss and gradients (q, p, temperature) of the backend and of the reference."""
    results = []
    engine_opts = {k: opts.pop(k) for k in ("chunk_size", "chunk_memory") if k in opts}
    for fn in (lambda *a, **k: hybrid_contrastive_loss(*a, backend=backend, **engine_opts, **k),
               reference_contrastive_loss):
        qq = q.detach().clone().requires_grad_(True)
        pp = p.detach().clone().requires_grad_(True)
        t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
        loss = fn(qq, pp, labels, qg, pg, temperature=t, **opts)
        if upstream == "last":
            loss.sum().backward()  # grad_output is exactly 1 for mean/sum
        else:
            g = torch.linspace(-2.0, 3.0, loss.numel(), dtype=torch.float64).reshape(loss.shape)
            (loss * g.to(loss.dtype)).sum().backward()
        results.append((loss.detach(), qq.grad, pp.grad, t.grad))
    return results


def assert_matches(results, dtype):
    (loss, gq, gp, gt), (rloss, rq, rp, rt) = results
    check(loss, rloss, dtype, "loss")
    check(gq, rq, dtype, "grad q")
    check(gp, rp, dtype, "grad p")
    check(gt, rt, dtype, "grad temperature")


