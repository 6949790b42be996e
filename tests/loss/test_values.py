"""HybridContrastiveLoss: every option and odd shape against the float64 reference; bad inputs."""
import math

import pytest
import torch

from loss_cases import (BACKENDS, TOL, assert_matches, check, cuda, make_inputs, needs_triton,  # noqa: F401
                        run_both)
from hybridfast._backends import triton_available_for  # noqa: F401
from hybridfast.loss import HybridContrastiveLoss, hybrid_contrastive_loss, reference_contrastive_loss  # noqa: F401


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("groups", [0, 4])
@pytest.mark.parametrize("similarity,upstream", [("cos", "last"), ("cos", "scaled"), ("dot", "scaled")])
def test_every_option_matches_reference(backend, reduction, symmetric, groups, similarity, upstream):
    # B=37, D=100, one hard negative each, shuffled labels: odd sizes everywhere
    q, p, labels, qg, pg = make_inputs(groups=groups)
    if similarity == "dot":
        q, p = q / 4, p / 4  # keep dot-product logits in a trainable range
    results = run_both(q, p, labels, qg, pg, 0.05, upstream, backend, similarity=similarity,
                       symmetric=symmetric, reduction=reduction)
    assert_matches(results, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_temperatures(backend, temperature, symmetric):
    q, p, labels, qg, pg = make_inputs(B=20, negatives=2, D=48, seed=1, groups=3)
    results = run_both(q, p, labels, qg, pg, temperature, "scaled", backend, symmetric=symmetric)
    assert_matches(results, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_labels_hard_negative_layout(backend):
    q, p, _, _, _ = make_inputs(B=16, negatives=3, D=32, shuffle=False)
    results = run_both(q, p, None, None, None, 0.05, "last", backend, symmetric=True)
    assert_matches(results, torch.float32)
    # arange labels: explicitly passing them changes nothing
    explicit = hybrid_contrastive_loss(q, p, torch.arange(16), backend=backend)
    torch.testing.assert_close(explicit, hybrid_contrastive_loss(q, p, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_removing_most_negatives(backend):
    # two groups over 75 passages: about half of every denominator is masked out
    q, p, labels, qg, pg = make_inputs(B=25, negatives=2, D=40, seed=2, groups=2)
    results = run_both(q, p, labels, qg, pg, 0.05, "scaled", backend, symmetric=True, reduction="none")
    assert_matches(results, torch.float32)
    masked = hybrid_contrastive_loss(q, p, labels, qg, pg, backend=backend)
    unmasked = hybrid_contrastive_loss(q, p, labels, backend=backend)
    assert masked < unmasked  # fewer negatives, smaller loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_negative_masked_gives_zero_loss_not_nan(backend):
    q, p, labels, _, _ = make_inputs(B=8, negatives=1, D=16, seed=3)
    qg = torch.zeros(8, dtype=torch.long)
    pg = torch.zeros(16, dtype=torch.long)
    qq = q.clone().requires_grad_(True)
    loss = hybrid_contrastive_loss(qq, p, labels, qg, pg, backend=backend, symmetric=True, reduction="none")
    # both directions see only the positive: log(exp(z)) - z, zero up to rounding
    torch.testing.assert_close(loss, torch.zeros(8), rtol=0, atol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_identical_embeddings(backend, symmetric):
    # every logit equal: loss = log(number of candidates) exactly, gradients finite
    B, N = 12, 30
    q = torch.ones(B, 24).requires_grad_(True)
    p = torch.ones(N, 24).requires_grad_(True)
    loss = hybrid_contrastive_loss(q, p, backend=backend, symmetric=symmetric, reduction="none")
    expected = 0.5 * (math.log(N) + math.log(B)) if symmetric else math.log(N)
    torch.testing.assert_close(loss, torch.full((B,), expected), rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    (loss, gq, gp, gt), (rloss, rq, rp, rt) = run_both(q.detach(), p.detach(), None, None, None, 0.05, "scaled",
                                                       backend, symmetric=symmetric)
    check(gq, rq, torch.float32, "grad q")
    check(gp, rp, torch.float32, "grad p")
    # exactly 0 in exact arithmetic; dL/dt = -dL/ds / t^2 amplifies fp32 rounding of sum(G * sim) by 400
    assert abs(float(gt)) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_labels(backend):
    # two queries sharing one positive (duplicates in a batch): the symmetric column term still matches
    q, p, _, qg, pg = make_inputs(B=10, negatives=1, D=16, seed=4, groups=3)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 5, 19, 7, 8])
    results = run_both(q, p, labels, qg, pg, 0.1, "scaled", backend, symmetric=True)
    assert_matches(results, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_small(backend, dtype):
    q, p, labels, qg, pg = make_inputs(B=24, negatives=1, D=40, seed=5, groups=3, dtype=dtype)
    results = run_both(q, p, labels, qg, pg, 0.05, "scaled", backend, symmetric=True)
    # the reference sees the same rounded inputs, so only compute differs
    assert results[0][0].dtype == torch.float32
    assert results[0][1].dtype == dtype
    assert_matches(results, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_embeddings_loop_over_d(backend):
    # D=4096 crosses many D-blocks in the kernels' inner loop
    q, p, labels, qg, pg = make_inputs(B=5, negatives=2, D=4096, seed=13, groups=2)
    results = run_both(q, p, labels, qg, pg, 0.05, "scaled", backend, symmetric=True)
    assert_matches(results, torch.float32)


@pytest.mark.parametrize("backend,examples", [("torch", 25), pytest.param("chunked", 8, marks=needs_triton),
                                              pytest.param("triton", 8, marks=needs_triton)])
def test_random_shapes_property(backend, examples):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True)
    @hypothesis.given(B=st.integers(1, 24), extra=st.integers(0, 30), D=st.integers(4, 70), groups=st.integers(0, 4),
                      symmetric=st.booleans(), seed=st.integers(0, 2**16), chunk=st.sampled_from([None, 1, 7]))
    def prop(B, extra, D, groups, symmetric, seed, chunk):
        # D >= 4: with D = 1 cosine is +-1 and fp32 normalize-backward noise dominates the ~0 gradient
        g = torch.Generator().manual_seed(seed)
        q, p = torch.randn(B, D, generator=g), torch.randn(B + extra, D, generator=g)
        labels = torch.randint(0, B + extra, (B,), generator=g)
        qg = torch.randint(0, groups, (B,), generator=g) if groups else None
        pg = torch.randint(0, groups, (B + extra,), generator=g) if groups else None
        opts = dict(chunk_size=chunk) if backend != "triton" else {}
        results = run_both(q, p, labels, qg, pg, 0.1, "scaled", backend, symmetric=symmetric, reduction="none",
                           **opts)
        assert_matches(results, torch.float32)

    prop()


@pytest.mark.parametrize("backend", ["torch", pytest.param("chunked", marks=needs_triton)])
def test_chunked_engine_chunk_sizes_agree(backend):
    q, p, labels, qg, pg = make_inputs(B=37, negatives=2, D=20, seed=6, groups=5)
    outs = []
    for chunk in (1, 5, 37, None):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = hybrid_contrastive_loss(qq, pp, labels, qg, pg, symmetric=True, backend=backend, chunk_size=chunk)
        loss.backward()
        outs.append((loss.detach(), qq.grad, pp.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("symmetric,reduction", [(False, "mean"), (True, "sum"), (True, "none")])
def test_gradcheck_torch_backend(symmetric, reduction):
    q, p, labels, qg, pg = make_inputs(B=5, negatives=1, D=6, seed=7, groups=2, dtype=torch.float64)
    q.requires_grad_(True)
    p.requires_grad_(True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def fn(q, p, t):
        return hybrid_contrastive_loss(q, p, labels, qg, pg, temperature=t, symmetric=symmetric,
                                       reduction=reduction, backend="torch", chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, p, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_learnable_temperature(backend):
    q, p, labels, qg, pg = make_inputs(B=16, negatives=1, D=32, seed=8, groups=3)
    module = HybridContrastiveLoss(temperature=0.07, learn_temperature=True, symmetric=True, backend=backend)
    assert isinstance(module.log_scale, torch.nn.Parameter)
    assert module.temperature == pytest.approx(0.07)
    loss = module(q, p, labels, qg, pg)
    loss.backward()
    log_scale = module.log_scale.detach().double().requires_grad_(True)
    ref = reference_contrastive_loss(q, p, labels, qg, pg, temperature=torch.exp(-log_scale), symmetric=True)
    ref.backward()
    check(loss.detach(), ref.detach(), torch.float32, "loss")
    check(module.log_scale.grad, log_scale.grad, torch.float32, "grad log_scale")
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    opt.step()
    assert module.temperature != pytest.approx(0.07)


def test_scale_is_capped_at_100():
    q, p, labels, _, _ = make_inputs(B=8, D=16, seed=9)
    capped = hybrid_contrastive_loss(q, p, labels, temperature=0.001, backend="torch")
    at_cap = hybrid_contrastive_loss(q, p, labels, temperature=0.01, backend="torch")
    torch.testing.assert_close(capped, at_cap)
    module = HybridContrastiveLoss(temperature=0.001, learn_temperature=True, backend="torch")
    module(q, p, labels).backward()
    assert module.log_scale.grad == 0  # beyond the cap the scale does not move
    assert module.temperature == pytest.approx(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_functional_and_no_grad(backend):
    q, p, labels, qg, pg = make_inputs(B=12, D=20, seed=10, groups=2)
    module = HybridContrastiveLoss(temperature=0.05, reduction="sum", backend=backend)
    expected = hybrid_contrastive_loss(q, p, labels, qg, pg, reduction="sum", backend=backend)
    with torch.no_grad():
        got = module(q, p, labels, qg, pg)
    torch.testing.assert_close(got, expected)
    assert "temperature=0.05" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_loss(backend):
    # a bf16 autocast region around the training step must not lower the loss's own precision
    q, p, labels, qg, pg = make_inputs(B=12, D=20, seed=14, groups=2)
    expected = hybrid_contrastive_loss(q, p, labels, qg, pg, symmetric=True, backend=backend)
    qq = q.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hybrid_contrastive_loss(qq, p, labels, qg, pg, symmetric=True, backend=backend)
    got.backward()
    torch.testing.assert_close(got, expected)
    assert qq.grad.dtype == torch.float32 and torch.isfinite(qq.grad).all()


def test_gather_without_process_group_is_local():
    q, p, labels, _, _ = make_inputs(B=6, D=8, seed=12)
    with pytest.warns(RuntimeWarning, match="not initialised"):
        gathered = hybrid_contrastive_loss(q, p, labels, gather_across_devices=True)
    torch.testing.assert_close(gathered, hybrid_contrastive_loss(q, p, labels))


def _bad_cases():
    q, p = torch.randn(4, 8), torch.randn(6, 8)
    i = torch.arange(4)
    return [
        (dict(q=q, p=p, temperature=0.0), ValueError, "temperature"),
        (dict(q=q, p=p, temperature=-1.0), ValueError, "temperature"),
        (dict(q=q, p=p, temperature=float("nan")), ValueError, "temperature"),
        (dict(q=q, p=p, temperature=torch.tensor(float("nan"))), ValueError, "temperature"),
        (dict(q=q, p=p, temperature="hot"), TypeError, "temperature"),
        (dict(q=q, p=torch.randn(6, 9)), ValueError, "dimension"),
        (dict(q=q, p=torch.randn(3, 8)), ValueError, "N >= B"),
        (dict(q=torch.randn(0, 8), p=p), ValueError, "q is empty"),
        (dict(q=q, p=p, labels=torch.tensor([0, 1, 2, 6])), ValueError, "labels"),
        (dict(q=q, p=p, labels=torch.tensor([0, 1, -1, 2])), ValueError, "labels"),
        (dict(q=q, p=p, labels=torch.arange(3)), ValueError, "labels"),
        (dict(q=q, p=p, labels=torch.zeros(4)), TypeError, "labels"),
        (dict(q=q, p=p, query_groups=torch.arange(3), passage_groups=torch.arange(6)), ValueError, "query_groups"),
        (dict(q=q, p=p, query_groups=i, passage_groups=torch.arange(5)), ValueError, "passage_groups"),
        (dict(q=q, p=p, query_groups=i), ValueError, "passage_groups"),
        (dict(q=q, p=p.double()), TypeError, "dtype"),
        (dict(q=q, p=p.to("meta")), ValueError, "device"),
        (dict(q=q.long(), p=p.long()), TypeError, "q"),
        (dict(q=q[0], p=p), ValueError, "q"),
        (dict(q=q.numpy(), p=p), TypeError, "q"),
        (dict(q=q, p=p, similarity="l2"), ValueError, "similarity"),
        (dict(q=q, p=p, reduction="max"), ValueError, "reduction"),
        (dict(q=q, p=p, backend="cuda"), ValueError, "backend"),
        (dict(q=q, p=p, chunk_size=0), ValueError, "chunk_size"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    kwargs, error, match = _bad_cases()[case]
    with pytest.raises(error, match=match):
        hybrid_contrastive_loss(**kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=0), "temperature"), (dict(reduction="avg"), "reduction"),
                                          (dict(similarity="euclid"), "similarity"), (dict(backend="x"), "backend")])
def test_bad_module_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridContrastiveLoss(**kwargs)
