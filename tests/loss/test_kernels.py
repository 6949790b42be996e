"""kernels/contrastive.py on its own: the row kernel, the split-N forward, and the sm90 lowering (no GPU)."""
import pytest
import torch

from loss_cases import (BACKENDS, TOL, assert_matches, check, cuda, make_inputs, needs_triton,  # noqa: F401
                        run_both)
from hybridfast._backends import triton_available_for  # noqa: F401
from hybridfast.loss import HybridContrastiveLoss, hybrid_contrastive_loss, reference_contrastive_loss  # noqa: F401


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
