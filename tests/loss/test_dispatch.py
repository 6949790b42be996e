"""hybridfast.loss.dispatch: the one place backend="auto" is decided, and the chunk budget."""
import pytest
import torch

from loss_cases import (BACKENDS, TOL, assert_matches, check, cuda, make_inputs, needs_triton,  # noqa: F401
                        run_both)
from hybridfast._backends import triton_available_for  # noqa: F401
from hybridfast.loss import HybridContrastiveLoss, hybrid_contrastive_loss, reference_contrastive_loss  # noqa: F401


def test_auto_backend_on_cpu_is_torch_and_matches():
    q, p, labels, _, _ = make_inputs(B=10, D=12, seed=11)
    torch.testing.assert_close(hybrid_contrastive_loss(q, p, labels),
                               hybrid_contrastive_loss(q, p, labels, backend="torch"))
    from hybridfast.loss import dispatch

    assert dispatch.pick("auto", q) == "torch"


def test_triton_backend_rejects_float64():
    q, p, _, _, _ = make_inputs(B=4, D=8, dtype=torch.float64)
    if not triton_available_for(q):
        pytest.skip("Triton not usable on CPU here")
    with pytest.raises(TypeError, match="float64"):
        hybrid_contrastive_loss(q, p, backend="triton")


def test_time_candidates_picks_fastest_and_skips_out_of_memory():
    import time

    from hybridfast.loss import dispatch as loss_engines

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
        assert loss_engines.choose(key, ["torch", "triton", "chunked"], run, lambda: None) == "chunked"
        calls.clear()
        assert loss_engines.choose(key, ["torch"], run, lambda: None) == "chunked"  # cached per bucket
        assert calls == []
        assert loss_engines.backend_choices()["/".join(map(str, key))]["backend"] == "chunked"
    finally:
        loss_engines._choices.pop(key, None)
        loss_engines._timings.pop(key, None)


@needs_triton
def test_measured_choice_times_the_real_engines():
    # the code path "auto" takes on CUDA, run on CPU tensors (Triton interpreted): every engine
    # runs forward+backward on detached copies, the fastest is cached for the bucket
    from hybridfast.loss import dispatch as loss_engines

    q, p, labels, qg, pg = make_inputs(B=8, negatives=1, D=16, seed=23, groups=2)
    scale = torch.tensor(20.0)
    args = [q, p, scale, labels, qg, pg, 0, 8, True, "none", True]
    key = loss_engines.shape_key(q, p, True, True)
    try:
        choice = loss_engines.measure(args, True, True, None, torch.float32, None)
        assert choice in ("torch", "chunked", "triton")
        assert set(loss_engines._timings[key]) == {"torch", "chunked", "triton"}
        assert q.grad is None and p.grad is None  # timing never touches the caller's tensors
    finally:
        loss_engines._choices.pop(key, None)
        loss_engines._timings.pop(key, None)


def test_shape_key_buckets_powers_of_two():
    from hybridfast.loss.dispatch import shape_key

    a = shape_key(torch.empty(1000, 768), torch.empty(3000, 768), True, False)
    b = shape_key(torch.empty(1024, 768), torch.empty(4096, 768), True, False)
    c = shape_key(torch.empty(1025, 768), torch.empty(4096, 768), True, False)
    assert a == b != c
    assert shape_key(torch.empty(8, 4), torch.empty(8, 4), False, True)[-2:] == ("one", "groups")


def test_env_forces_backend_and_rejects_unknown(monkeypatch):
    from hybridfast.loss import dispatch

    q, p, labels, _, _ = make_inputs(B=10, D=12, seed=11)
    monkeypatch.setenv("HYBRIDFAST_LOSS_BACKEND", "chunked")
    assert dispatch.pick("auto", q) == "chunked"
    assert dispatch.pick("torch", q) == "torch"  # an explicit backend wins over the variable
    torch.testing.assert_close(hybrid_contrastive_loss(q, p, labels),
                               hybrid_contrastive_loss(q, p, labels, backend="torch"))
    monkeypatch.setenv("HYBRIDFAST_LOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="HYBRIDFAST_LOSS_BACKEND"):
        hybrid_contrastive_loss(q, p, labels)


def test_chunk_memory_sets_the_chunk_rows():
    from hybridfast.loss.dispatch import chunk_rows

    q = torch.empty(100, 8)
    assert chunk_rows("torch", q, 100, n_cols=1000, compute_dtype=torch.float32, chunk_size=None,
                      chunk_memory=40_000) == 10  # 40 kB / (1000 columns * 4 bytes)
    assert chunk_rows("torch", q, 100, 1000, torch.float32, chunk_size=3, chunk_memory=40_000) == 3
    assert chunk_rows("torch", q, 100, 10**9, torch.float32, None, 1) == 1  # never zero rows
    q2, p2, labels, _, _ = make_inputs(B=20, D=12, seed=3)
    small = hybrid_contrastive_loss(q2, p2, labels, chunk_memory=4 * 40 * 3)  # 3 rows per chunk
    torch.testing.assert_close(small, hybrid_contrastive_loss(q2, p2, labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_memory"):
        HybridContrastiveLoss(chunk_memory=0)
