"""The fp64 yardstick of the tests and of bench/gpu_suite.py, and how a gradient is judged.

`reference_contrastive_loss` is the contract's maths with the whole B x N matrix in
float64 (differentiable). `relative_error` is |got - ref|_F / |ref|_F: scaled by the
reference's own size, so a zero or 10%-perturbed gradient fails at every batch size
(an absolute tolerance of 2e-2 passed a zero gradient whose entries were all < 3e-3).
"""
import torch
import torch.nn.functional as F

from hybridfast.loss.function import MAX_SCALE, REDUCTIONS, SIMILARITIES, check_choice, check_inputs

# relative Frobenius error a gradient (or loss) may have, per input dtype
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def relative_error(got, ref) -> float:
    """|got - ref|_F / |ref|_F in float64 (|got|_F when ref is exactly zero)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(got - ref))
    return diff / scale if scale > 0 else diff


def gradient_ok(got, ref, dtype) -> bool:
    return relative_error(got, ref) <= GRAD_TOL[dtype]


def reference_contrastive_loss(q, p, labels=None, query_groups=None, passage_groups=None, temperature=0.05,
                               similarity="cos", symmetric=False, reduction="mean"):
    """The contract's maths in float64 with the whole B x N matrix (for tests; differentiable)."""
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("reduction", reduction, REDUCTIONS)
    labels, query_groups, passage_groups = check_inputs(q, p, labels, query_groups, passage_groups)
    q, p = q.double(), p.double()
    if similarity == "cos":
        q, p = F.normalize(q, dim=1), F.normalize(p, dim=1)
    t = temperature.double() if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    scale = (1.0 / t.to(q.device).reshape(())).clamp(max=MAX_SCALE)
    z = scale * (q @ p.T)
    rows = torch.arange(q.shape[0], device=q.device)
    if query_groups is not None:
        kill = passage_groups[None, :] == query_groups[:, None]
        kill[rows, labels] = False
        z = z.masked_fill(kill, float("-inf"))
    pos = z[rows, labels]
    loss = torch.logsumexp(z, dim=1) - pos
    if symmetric:
        # column labels[i] of z, against every query k (the mask is already in z)
        loss = 0.5 * (loss + torch.logsumexp(z[:, labels], dim=0) - pos)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()
