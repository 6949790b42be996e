"""HybridContrastiveLoss: both backends against the float64 reference.

The Triton backend runs in the interpreter on CPU (TRITON_INTERPRET=1, set by
conftest) at small shapes only; large shapes and half precision on Triton need CUDA.
"""
import math

import pytest
import torch

from hybridfast._backends import triton_available_for
from hybridfast.loss import HybridContrastiveLoss, hybrid_contrastive_loss, reference_contrastive_loss

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
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=what)


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


def test_auto_backend_on_cpu_is_torch_and_matches():
    q, p, labels, _, _ = make_inputs(B=10, D=12, seed=11)
    torch.testing.assert_close(hybrid_contrastive_loss(q, p, labels),
                               hybrid_contrastive_loss(q, p, labels, backend="torch"))
    from hybridfast.loss.module import _pick_backend

    assert _pick_backend("auto", q) == "torch"


def test_gather_without_process_group_is_local():
    q, p, labels, _, _ = make_inputs(B=6, D=8, seed=12)
    with pytest.warns(RuntimeWarning, match="not initialised"):
        gathered = hybrid_contrastive_loss(q, p, labels, gather_across_devices=True)
    torch.testing.assert_close(gathered, hybrid_contrastive_loss(q, p, labels))


# ----------------------------------------------------------------------------- bad inputs

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


def test_triton_backend_rejects_float64():
    q, p, _, _, _ = make_inputs(B=4, D=8, dtype=torch.float64)
    if not triton_available_for(q):
        pytest.skip("Triton not usable on CPU here")
    with pytest.raises(TypeError, match="float64"):
        hybrid_contrastive_loss(q, p, backend="triton")


# ----------------------------------------------------------------------------- kernel pieces and the auto choice

@needs_triton
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [0, 3])
def test_chunk_rows_kernel_matches_torch(g_dtype, groups):
    # the chunked engine's row kernel on its own, incl. a separate half-precision G as on CUDA
    from hybridfast.kernels.contrastive import chunk_rows

    g = torch.Generator().manual_seed(21)
    C, N, s = 13, 301, 20.0  # N crosses several row blocks of the interpreter's tiles
    S = torch.randn(C, N, generator=g) * 0.3
    a_pos = torch.randint(0, N, (C,), generator=g)
    w = torch.rand(C, generator=g)
    kw = {}
    z = S.double() * s
    if groups:
        kw = dict(a_key=a_pos, a_grp=torch.randint(0, groups, (C,), generator=g),
                  b_grp=torch.randint(0, groups, (N,), generator=g))
        kill = (kw["b_grp"][None, :] == kw["a_grp"][:, None]) & (torch.arange(N)[None, :] != a_pos[:, None])
        z = z.masked_fill(kill, float("-inf"))
    G = S.clone() if g_dtype == torch.float32 else torch.empty(C, N, dtype=g_dtype)
    lse, pos, ds = chunk_rows(S.clone() if g_dtype != torch.float32 else G, G, torch.tensor(s), a_pos, w, **kw)
    rows = torch.arange(C)
    expected_g = torch.softmax(z, dim=1)
    expected_g[rows, a_pos] -= 1
    expected_g *= w[:, None].double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos.double(), S.double()[rows, a_pos] * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.double(), (expected_g * S.double()).sum(1), rtol=1e-4, atol=1e-5)
    rtol, atol = TOL[g_dtype] if g_dtype != torch.float32 else (1e-5, 1e-6)
    torch.testing.assert_close(G.double(), expected_g * s, rtol=rtol, atol=atol * s)


@needs_triton
@pytest.mark.parametrize("groups", [0, 4])
def test_forward_split_over_n_equals_one_pass(groups):
    # CUDA splits B over programs when the rows alone leave SMs idle; the combine must be exact
    from hybridfast.kernels.contrastive import contrastive_lse

    q, p, labels, qg, pg = make_inputs(B=19, negatives=5, D=24, seed=22, groups=groups)
    kw = dict(a_key=labels, a_grp=qg, b_grp=pg) if groups else {}
    scale = torch.tensor(20.0)
    base = contrastive_lse(q, p, scale, labels, **kw, n_splits=1)
    for splits in (2, 5, 40):  # 40 slices of 114 columns: most slices hold no column of some block
        got = contrastive_lse(q, p, scale, labels, **kw, n_splits=splits)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rows = torch.arange(19)
    torch.testing.assert_close(base[1], 20.0 * (q @ p.T)[rows, labels], rtol=1e-5, atol=1e-4)


def test_forward_splits_fill_two_waves():
    from hybridfast.kernels.contrastive import MAX_SPLITS, forward_splits

    assert forward_splits(n_row_programs=1000, n_b=65536, num_sms=132) == 1  # rows already fill the GPU
    assert forward_splits(n_row_programs=32, n_b=65536, num_sms=132) == 9  # ceil(264 / 32)
    assert forward_splits(n_row_programs=1, n_b=65536, num_sms=132) == MAX_SPLITS
    assert forward_splits(n_row_programs=1, n_b=1000, num_sms=132) == 2  # >= 512 columns per slice


def test_time_candidates_picks_fastest_and_skips_out_of_memory():
    import time

    from hybridfast.loss import engines as loss_engines

    calls = []

    def run(name):
        calls.append(name)
        if name == "triton":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        time.sleep({"chunked": 0.002, "torch": 0.02}[name])

    seconds = loss_engines.time_candidates(["torch", "triton", "chunked"], run, sync=lambda: None, repeats=2)
    assert set(seconds) == {"torch", "chunked"}
    assert seconds["chunked"] < seconds["torch"]
    assert calls.count("torch") == 3  # one warm-up, then the timed repeats
    key = ("test-device", "bf16", 8, 16, 16, "one", "nogroups")
    try:
        assert loss_engines.choose_backend(key, ["torch", "triton", "chunked"], run, lambda: None) == "chunked"
        calls.clear()
        assert loss_engines.choose_backend(key, ["torch"], run, lambda: None) == "chunked"  # cached per bucket
        assert calls == []
        assert loss_engines.backend_choices()["/".join(map(str, key))]["backend"] == "chunked"
    finally:
        loss_engines._choices.pop(key, None)
        loss_engines._timings.pop(key, None)


@needs_triton
def test_measured_choice_times_the_real_engines():
    # the code path "auto" takes on CUDA, run on CPU tensors (Triton interpreted): every engine
    # runs forward+backward on detached copies, the fastest is cached for the bucket
    from hybridfast.loss import engines as loss_engines
    from hybridfast.loss.module import _measured_backend

    q, p, labels, qg, pg = make_inputs(B=8, negatives=1, D=16, seed=23, groups=2)
    scale = torch.tensor(20.0)
    args = [q, p, scale, labels, qg, pg, 0, 8, True, "none"]
    key = loss_engines.shape_key(q, p, True, True)
    try:
        choice = _measured_backend(args, True, True, None, torch.float32, None)
        assert choice in ("torch", "chunked", "triton")
        assert set(loss_engines._timings[key]) == {"torch", "chunked", "triton"}
        assert q.grad is None and p.grad is None  # timing never touches the caller's tensors
    finally:
        loss_engines._choices.pop(key, None)
        loss_engines._timings.pop(key, None)


def test_shape_key_buckets_powers_of_two():
    from hybridfast.loss.engines import shape_key

    a = shape_key(torch.empty(1000, 768), torch.empty(3000, 768), True, False)
    b = shape_key(torch.empty(1024, 768), torch.empty(4096, 768), True, False)
    c = shape_key(torch.empty(1025, 768), torch.empty(4096, 768), True, False)
    assert a == b != c
    assert shape_key(torch.empty(8, 4), torch.empty(8, 4), False, True)[-2:] == ("one", "groups")


def test_env_forces_backend_and_rejects_unknown(monkeypatch):
    from hybridfast.loss.module import _pick_backend

    q, p, labels, _, _ = make_inputs(B=10, D=12, seed=11)
    monkeypatch.setenv("HYBRIDFAST_LOSS_BACKEND", "chunked")
    assert _pick_backend("auto", q) == "chunked"
    assert _pick_backend("torch", q) == "torch"  # an explicit backend wins over the variable
    torch.testing.assert_close(hybrid_contrastive_loss(q, p, labels),
                               hybrid_contrastive_loss(q, p, labels, backend="torch"))
    monkeypatch.setenv("HYBRIDFAST_LOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="HYBRIDFAST_LOSS_BACKEND"):
        hybrid_contrastive_loss(q, p, labels)


def test_chunk_memory_sets_the_chunk_rows():
    from hybridfast.loss.module import _chunk_rows

    q = torch.empty(100, 8)
    assert _chunk_rows("torch", q, n_cols=1000, compute_dtype=torch.float32, chunk_size=None,
                       chunk_memory=40_000) == 10  # 40 kB / (1000 columns * 4 bytes)
    assert _chunk_rows("torch", q, 1000, torch.float32, chunk_size=3, chunk_memory=40_000) == 3
    assert _chunk_rows("torch", q, 10**9, torch.float32, None, 1) == 1  # never zero rows
    q2, p2, labels, _, _ = make_inputs(B=20, D=12, seed=3)
    small = hybrid_contrastive_loss(q2, p2, labels, chunk_memory=4 * 40 * 3)  # 3 rows per chunk
    torch.testing.assert_close(small, hybrid_contrastive_loss(q2, p2, labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_memory"):
        HybridContrastiveLoss(chunk_memory=0)


# ----------------------------------------------------------------------------- GPU lowering without a GPU

def _aot_report():
    """Compile every CUDA config of every kernel for sm90 in a subprocess (no interpreter); one JSON row each."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_sm90.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    return run, [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the kernels for real")
def test_every_cuda_config_lowers_fast_for_sm90():
    # What the compiler emits for an H100, checked on the CPU: relaxed atomics (no
    # acq_rel, no membar), wgmma for half-precision dots, no spills, smem <= 227 KiB.
    from hybridfast._backends import triton_version

    if triton_version() is None:
        pytest.skip("Triton not installed")
    run, rows = _aot_report()
    if run.returncode == 3:
        pytest.skip(run.stdout.strip().splitlines()[-1])  # Triton's NVIDIA tools are absent: says which
    assert run.returncode == 0, run.stderr[-3000:]
    from hybridfast.kernels.contrastive import CUDA_CONFIGS

    # every tuned config x 2 flag sets; fp32 configs for fp32, half configs for both bf16 and fp16
    n_fp32 = sum(len(CUDA_CONFIGS[(p, "fp32")]) for p in ("fwd", "bwd"))
    n_half = sum(len(CUDA_CONFIGS[(p, "half")]) for p in ("fwd", "bwd"))
    assert len([r for r in rows if r["kernel"] != "rows"]) == 2 * (n_fp32 + 2 * n_half) > 0
    # 3 row configs x 3 dtypes x 2 flag sets x (N a multiple of 16 or not)
    assert len([r for r in rows if r["kernel"] == "rows"]) == 3 * 3 * 2 * 2
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} {r['config']} flags={r['flags']}"
        assert r["spill_bytes"] == 0, ("register spills", where, r["ptxas"])
        assert r["shared_bytes"] <= 227 * 1024, ("shared memory", where)
        if r["kernel"] == "bwd":
            assert r["atomics"] > 0 and r["relaxed_atomics"] == r["atomics"], ("atomics not relaxed", where)
            assert not r["acq_rel"] and not r["membar"], ("fenced atomics", where)
        else:
            assert r["atomics"] == 0, where
        if r["kernel"] in ("fwd", "bwd") and r["dtype"] in ("bf16", "fp16"):
            assert r["wgmma"], ("half-precision dot without wgmma", where)
        if r["kernel"] == "rows" and r["n_b_divisible_by_16"]:
            # the memory-bound row pass reads S and writes G with 128-bit accesses
            assert r["vector_loads"] > 0 and r["vector_stores"] > 0, ("scalar row pass", where)


# ----------------------------------------------------------------------------- CUDA (skip here)

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
