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


# ----------------------------------------------------------------------------- first GPU run (issue 18)
# Each test names the finding of reviews/gpu-first-run.md it guards; all run on the CPU.

import math  # noqa: E402
import warnings  # noqa: E402

from hybridfast.loss import dispatch, engines  # noqa: E402
from hybridfast.loss.reference import GRAD_TOL, gradient_ok, relative_error  # noqa: E402

first_run = pytest.mark.gpu_first_run


@pytest.fixture
def timed_auto(monkeypatch):
    """backend="auto" takes the CUDA path (timing) on CPU tensors; the choices are reset afterwards."""
    monkeypatch.setattr(dispatch, "wants_timing", lambda q: True)
    before = dict(dispatch._choices)
    yield
    dispatch._choices.clear()
    dispatch._choices.update(before)


@first_run
@needs_triton
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_1_auto_under_no_grad_or_inference_mode_does_not_raise(timed_auto, mode):
    q, p, labels, _, _ = make_inputs(B=6, D=8, seed=31)
    expected = hybrid_contrastive_loss(q, p, labels, backend="torch")
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        got = hybrid_contrastive_loss(q, p, labels)  # a new bucket: the first evaluation of a run
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    key = dispatch.shape_key(q, p, False, False)
    # no_grad: timed under enable_grad and cached; inference_mode: not timed, not cached
    assert (key in dispatch._choices) == (mode == "no_grad")


@first_run
def test_3_an_engine_failing_to_compile_is_left_out_with_one_warning():
    class CompilationError(Exception):  # Triton's errors derive from Exception, not RuntimeError
        pass

    def run(name):
        if name == "triton":
            raise CompilationError("bf16 dot does not lower here")

    key = ("test-compile", "bf16", 8, 16, 16, "one", "nogroups")
    try:
        with pytest.warns(RuntimeWarning, match="'triton' failed while timed.*CompilationError"):
            choice = dispatch.choose(key, ["triton", "chunked"], run, lambda: None)
        assert choice == "chunked"
    finally:
        dispatch._choices.pop(key, None)
        dispatch._timings.pop(key, None)


@first_run
def test_3_gather_under_capture_names_the_option(monkeypatch):
    from hybridfast.loss import module

    monkeypatch.setattr(dispatch, "tracing", lambda: True)
    with pytest.raises(RuntimeError, match="gather_across_devices"):
        module._gather_sizes_equal(4, 8, torch.device("cpu"))


@first_run
@pytest.mark.parametrize("symmetric,reduction", [(False, "mean"), (True, "sum"), (True, "none")])
def test_11_no_host_sync_forward_and_backward_run_on_meta_tensors(symmetric, reduction):
    # any float()/bool()/.item() on a tensor raises on the meta device: this is the CPU stand-in for
    # "no host synchronisation per call" (and what CUDA-graph capture needs)
    q = torch.randn(12, 16, device="meta", requires_grad=True)
    p = torch.randn(24, 16, device="meta", requires_grad=True)
    labels = torch.arange(12, device="meta")
    groups = torch.zeros(12, dtype=torch.long, device="meta"), torch.zeros(24, dtype=torch.long, device="meta")
    loss = HybridContrastiveLoss(backend="torch", symmetric=symmetric, reduction=reduction)(q, p, labels, *groups)
    (loss.sum() if reduction == "none" else loss).backward()
    assert q.grad.shape == q.shape and p.grad.shape == p.shape


@first_run
@needs_triton
@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_4_fp16_gradient_operand_does_not_underflow(monkeypatch, backend):
    # tiny per-row weights (as s*w*softmax at B = N = 65536) flushed fp16 G to zero; CUDA's half
    # GEMM operands are emulated on the CPU for the chunked engines
    monkeypatch.setattr(engines, "gemm_dtype_for", lambda A, c: A.dtype if A.dtype in engines.HALF else c)
    q, p, labels, qg, pg = make_inputs(B=24, negatives=1, D=32, seed=32, groups=3, dtype=torch.float16)
    grads = []
    for fn in (lambda *a, **k: hybrid_contrastive_loss(*a, backend=backend, **k), reference_contrastive_loss):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = fn(qq, pp, labels, qg, pg, symmetric=True, reduction="none")
        (loss * 1e-9).sum().backward()  # upstream 1e-9: s * w * p_ij ~ 1e-10, far below fp16's 6e-8
        grads.append((qq.grad, pp.grad))
    for got, ref in zip(grads[0], grads[1]):
        assert gradient_ok(got.float() * 1e9, ref.double() * 1e9, torch.float16), relative_error(got, ref)


@first_run
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_4_grad_scaler_factor_is_not_inf_in_fp16(backend):
    q, p, labels, _, _ = make_inputs(B=16, D=24, seed=33, dtype=torch.float16)
    unit, scaled = [], []
    for factor, out in ((1.0, unit), (2.0 ** 16, scaled)):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        (hybrid_contrastive_loss(qq, pp, labels, backend=backend) * factor).backward()  # GradScaler.scale
        out.extend([qq.grad, pp.grad])
    for u, s in zip(unit, scaled):
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s.float() / 2 ** 16, u.float(), rtol=2e-3, atol=1e-6)


@first_run
def test_5_gradient_check_rejects_zero_and_perturbed_gradients():
    # magnitudes of the old GPU cases: every entry below the old absolute tolerances (1e-4, 2e-2)
    g = torch.randn(4096, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-5
    noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    perturbed = g + 0.1 * noise * g.norm() / noise.norm()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert gradient_ok(g.clone(), g, dtype)
        assert not gradient_ok(torch.zeros_like(g), g, dtype)
        assert not gradient_ok(perturbed, g, dtype)
    assert relative_error(perturbed, g) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(AssertionError):
        check(torch.zeros_like(g), g, torch.bfloat16, "zero gradient")  # the tests' own check


@first_run
def test_8_fp32_loss_gemms_ignore_the_global_tf32_setting(monkeypatch):
    seen = []
    real_mm = torch.mm

    def spy(*a, **k):
        seen.append(torch.get_float32_matmul_precision())
        return real_mm(*a, **k)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what HF/ST tf32=True sets
    try:
        monkeypatch.setattr(torch, "mm", spy)
        q, p, labels, _, _ = make_inputs(B=8, D=16, seed=34)
        hybrid_contrastive_loss(q.requires_grad_(True), p, labels, backend="torch").backward()
        monkeypatch.undo()
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(before)


@first_run
def test_9_out_of_memory_does_not_disable_the_fp32_output_gemm(monkeypatch):
    calls = []
    real_mm = torch.mm

    def fake_mm(a, b, **kw):
        calls.append(kw.get("out_dtype"))
        if kw and len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_mm(a.float(), b.float())

    monkeypatch.setitem(engines._out_dtype_ok, "cpu", True)  # as probed on a GPU
    monkeypatch.setattr(torch, "mm", fake_mm)
    a = torch.randn(4, 4, dtype=torch.bfloat16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engines.mm_fp32(a, a)
    engines.mm_fp32(a, a)
    assert calls == [torch.float32, torch.float32] and engines._out_dtype_ok["cpu"] is True


@first_run
def test_16_every_chunked_gemm_has_an_fp32_output(monkeypatch):
    monkeypatch.setattr(engines, "gemm_dtype_for", lambda A, c: A.dtype if A.dtype in engines.HALF else c)
    calls = []
    real = engines.mm_fp32
    monkeypatch.setattr(engines, "mm_fp32", lambda a, b: calls.append(a.dtype) or real(a, b))
    q, p, labels, _, _ = make_inputs(B=8, D=16, seed=35, dtype=torch.bfloat16)
    hybrid_contrastive_loss(q.requires_grad_(True), p, labels, backend="torch", chunk_size=4).backward()
    # per chunk: S, dA and dB all through mm_fp32 (no bf16-output GEMM with K = N)
    assert len(calls) == 3 * 2 and set(calls) == {torch.bfloat16}


@first_run
def test_26_forced_backend_that_cannot_run_names_the_variable(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available_for", lambda t: False)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    q, p, _, _, _ = make_inputs(B=4, D=8)
    with pytest.raises(RuntimeError, match="HYBRIDFAST_LOSS_BACKEND"):
        hybrid_contrastive_loss(q, p)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "chunked")
    with pytest.raises(TypeError, match="HYBRIDFAST_LOSS_BACKEND"):
        hybrid_contrastive_loss(q.double(), p.double())


@first_run
def test_12_bf16_autocast_training_steps_feed_bf16_to_the_loss(monkeypatch):
    from hybridfast.gradcache import GradCache
    from hybridfast.loss import function
    from hybridfast.training.steps import plain_step

    seen = []
    real = function.run_terms
    monkeypatch.setattr(function, "run_terms", lambda q_all, *a: seen.append(q_all.dtype) or real(q_all, *a))
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16)

    class Enc(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, x):
            return lin(x)

    loss_fn = HybridContrastiveLoss(backend="torch")
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    plain_step(Enc(), loss_fn, dict(x=x), dict(x=y), None, None, amp_dtype=torch.bfloat16)
    cache = GradCache(lambda f: lin(f["x"]), 3, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    q, p = cache.embed([dict(x=x, attention_mask=torch.ones(6, 2)), dict(x=y, attention_mask=torch.ones(6, 2))])
    loss_fn(q, p).backward()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert q.grad.dtype == torch.bfloat16 and lin.weight.grad is not None


@first_run
def test_10_cost_model_meets_the_memory_target_at_65536():
    B = N = 65536
    D = 768
    for name in ("triton", "chunked", "torch"):
        budget = dispatch.chunk_budget(torch.empty(0, D, device="meta"), B, N, cuda=True)
        assert budget == 128 << 20  # a third of the 384 MiB of accumulators
        extra = dispatch.estimated_extra_bytes(name, B, N, D, False, 2, budget, cuda=True)
        assert extra < 0.6 * 2 ** 30, (name, extra / 2 ** 30)


@first_run
def test_10_measured_cpu_extra_memory_matches_the_cost_model():
    # the CPU path at a scaled size: resident-set peak during forward+backward, minus the gradient
    # buffers it returns, against estimated_extra_bytes (fp32: the accumulators are the gradients)
    from bench.utils import peak_memory_bytes

    B = N = 8192
    D = 256
    budget = 128 << 20  # two chunks of 4096 rows: the chunk dominates, as at 65536 on a GPU
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g).requires_grad_(True)
    p = torch.randn(N, D, generator=g).requires_grad_(True)

    def step():
        hybrid_contrastive_loss(q, p, backend="torch", chunk_memory=budget).backward()

    step()  # warm-up: thread pools and allocator caches outside the measurement
    q.grad = p.grad = None
    measured = peak_memory_bytes(step, torch.device("cpu")) - 2 * B * D * 4
    predicted = dispatch.estimated_extra_bytes("torch", B, N, D, False, 4, budget, cuda=False)
    assert abs(measured - predicted) <= 0.1 * predicted, (measured / 2 ** 20, predicted / 2 ** 20)


def _launch_order_kernel():
    """A kernel that records _grouped_tile's (row block, column block) per program, in launch
    order (module-level names: Triton resolves a jit function's callees through its module's globals)."""
    global _grouped_tile
    import triton
    import triton.language as tl

    from kernels.contrastive import _grouped_tile

    @triton.jit
    def order(OUT, GROUP_M: tl.constexpr):
        pm, pn = _grouped_tile(GROUP_M)
        slot = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # CUDA's linear block order
        tl.store(OUT + 2 * slot, pm)
        tl.store(OUT + 2 * slot + 1, pn)

    return order


@first_run
@needs_triton
@pytest.mark.parametrize("n_m, n_n", [(16, 16), (13, 5), (3, 40), (1, 7), (9, 1)])
def test_13_backward_launch_order_spreads_column_tiles(n_m, n_n):
    """The backward's tile order (kernels.contrastive._grouped_tile on the launch grid
    _bwd_grid builds, run in the interpreter): every (row block, column block) exactly once (a
    last partial group adds masked row blocks past the end), and programs launched together
    scatter into many DB column tiles and at most GROUP_M row tiles. Row-major order put every
    co-resident program on one column tile. (The speed-up itself can only be measured on a GPU.)"""
    from kernels.contrastive import BWD_GROUP_M, _bwd_grid

    group = BWD_GROUP_M
    grid = _bwd_grid(n_m * 32, n_n * 64, 32, 64)
    out = torch.full((grid[0] * grid[1], 2), -1, dtype=torch.int64)
    _launch_order_kernel()[grid](out, GROUP_M=group)
    tiles = [tuple(t) for t in out.tolist()]
    real = [t for t in tiles if t[0] < n_m]
    assert sorted(real) == [(m, n) for m in range(n_m) for n in range(n_n)]
    assert len(tiles) - len(real) < group * n_n  # padding: part of one group at most
    wave = real[:4 * group]  # programs resident at the same time
    assert len({m for m, _ in wave}) <= max(group, -(-len(wave) // n_n))  # (one column block: rows only)
    assert len({n for _, n in wave}) >= min(n_n, len(wave) // min(group, n_m))
