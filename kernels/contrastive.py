"""Triton kernels for the contrastive (InfoNCE) similarity-and-loss step.

Maths. One *term* of the loss is a set of rows i of a matrix A (optionally picked
through an index, A[a_idx[i]]) scored against every row j of a matrix B:

    z_ij   = s * <A_i, B_j>                       s = logit scale = 1 / temperature
    kept_ij = not (HAS_GROUPS and b_grp[j] == a_grp[i] and b_key[j] != a_key[i])
    lse_i  = log sum_{j kept} exp(z_ij)           (online, tile by tile over j)
    pos_i  = z_{i, a_pos[i]}                      (the positive, always kept)

The query->passage term is A = queries, B = passages, a_pos = a_key = labels,
b_key = j. The passage->query (symmetric) term is A = passages picked at the
labels, B = all queries, a_pos = the query's own index, a_key = labels,
b_key = labels of every query. Both share one forward and one backward kernel.

Given per-row weights w_i (dL/dloss_i, the reduction folded in), the backward
recomputes each [BLOCK_M, BLOCK_N] tile of z and forms

    G_ij = w_i * (kept_ij * exp(z_ij - lse_i) - [j == a_pos[i]])      (= dL/dz_ij)
    dA_i += s * sum_j G_ij B_j,   dB_j += s * sum_i G_ij A_i,   ds += sum_ij G_ij <A_i, B_j>

dA/dB are fp32 buffers updated with atomic adds (one program per tile, so the
full matrix is never held and the scatter through a_idx handles repeated
labels); ds is written as one partial per program and summed by the caller.

Known limits:
- the B x N logits are never stored: each tile is recomputed once in backward,
  so forward+backward costs 4 matmul-equivalents (as flash-attention does);
- atomic adds make dA/dB non-deterministic in the last bits, and their traffic,
  (N/BLOCK_N)*B*D + (B/BLOCK_M)*N*D fp32 adds, is the likely bottleneck at large
  B and N; tile sizes are not yet tuned on a device (none was available);
- cosine similarity is normalised in PyTorch before the kernels (one extra copy
  of q and p, differentiable by autograd);
- inputs must be fp32, bf16 or fp16 with unit stride along D; fp32 uses IEEE
  (not TF32) dots so that temperature 0.01 keeps fp32 accuracy;
- under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 before tl.dot (the
  interpreter's dot misreads bf16); on GPUs the tensor cores take bf16 directly;
- labels, keys and groups are int64 tensors; the running max starts at -1e30,
  not -inf, so a tile whose entries are all masked adds nothing instead of NaN.
"""
import torch
import triton
import triton.language as tl

# Running max starts here rather than at -inf so that a tile whose entries are
# all masked does not produce exp(-inf - -inf) = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_logits(A, B, src, cols, row_ok, col_ok, D, stride_a, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """<A[src], B[cols]> for one tile, fp32 accumulation, looping over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        d = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        a = tl.load(A + src[:, None] * stride_a + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * stride_b + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _keep_mask(cols, col_ok, a_grp, a_key, B_GRP, B_KEY,
               HAS_GROUPS: tl.constexpr, HAS_BKEY: tl.constexpr):
    keep = col_ok[None, :] & (a_key[:, None] == a_key[:, None])
    if HAS_GROUPS:
        b_grp = tl.load(B_GRP + cols, mask=col_ok, other=0)
        if HAS_BKEY:
            b_key = tl.load(B_KEY + cols, mask=col_ok, other=0)
        else:
            b_key = cols
        kill = (b_grp[None, :] == a_grp[:, None]) & (b_key[None, :] != a_key[:, None])
        keep = keep & (kill == 0)
    return keep


@triton.jit
def _row_info(A_IDX, A_POS, A_KEY, A_GRP, rows, row_ok,
              HAS_AIDX: tl.constexpr, HAS_GROUPS: tl.constexpr):
    if HAS_AIDX:
        src = tl.load(A_IDX + rows, mask=row_ok, other=0)
    else:
        src = rows
    a_pos = tl.load(A_POS + rows, mask=row_ok, other=-1)
    if HAS_GROUPS:
        a_grp = tl.load(A_GRP + rows, mask=row_ok, other=0)
        a_key = tl.load(A_KEY + rows, mask=row_ok, other=0)
    else:
        a_grp = a_pos
        a_key = a_pos
    return src, a_pos, a_grp, a_key


@triton.jit
def _contrastive_fwd_kernel(
    A, B, A_IDX, A_POS, A_KEY, A_GRP, B_KEY, B_GRP, SCALE, LSE, POS,
    n_a, n_b, D, stride_a, stride_b,
    HAS_AIDX: tl.constexpr, HAS_BKEY: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M rows of A: online log-sum-exp over all of B."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_a
    src, a_pos, a_grp, a_key = _row_info(A_IDX, A_POS, A_KEY, A_GRP, rows, row_ok, HAS_AIDX, HAS_GROUPS)
    s = tl.load(SCALE).to(tl.float32)

    m_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, n_b, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_b
        z = _tile_logits(A, B, src, cols, row_ok, col_ok, D, stride_a, stride_b,
                         BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST) * s
        keep = _keep_mask(cols, col_ok, a_grp, a_key, B_GRP, B_KEY, HAS_GROUPS, HAS_BKEY)
        pos += tl.sum(tl.where(cols[None, :] == a_pos[:, None], z, 0.0), axis=1)
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log(tl.where(row_ok, l_i, 1.0)), mask=row_ok)  # padded rows have l_i = 0
    tl.store(POS + rows, pos, mask=row_ok)


@triton.jit
def _contrastive_bwd_kernel(
    A, B, A_IDX, A_POS, A_KEY, A_GRP, B_KEY, B_GRP, SCALE, LSE, W, DA, DB, DS_PART,
    n_a, n_b, D, stride_a, stride_b, stride_da, stride_db,
    HAS_AIDX: tl.constexpr, HAS_BKEY: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (BLOCK_M rows of A, BLOCK_N rows of B) tile: recompute, then scatter-add."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_a
    col_ok = cols < n_b
    src, a_pos, a_grp, a_key = _row_info(A_IDX, A_POS, A_KEY, A_GRP, rows, row_ok, HAS_AIDX, HAS_GROUPS)
    s = tl.load(SCALE).to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    w = tl.load(W + rows, mask=row_ok, other=0.0)  # w = 0 silences padded rows

    sim = _tile_logits(A, B, src, cols, row_ok, col_ok, D, stride_a, stride_b,
                       BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    keep = _keep_mask(cols, col_ok, a_grp, a_key, B_GRP, B_KEY, HAS_GROUPS, HAS_BKEY)
    prob = tl.exp(tl.where(keep, sim * s - lse[:, None], float("-inf")))
    is_pos = (cols[None, :] == a_pos[:, None]).to(tl.float32)
    g = w[:, None] * (prob - is_pos)  # dL/dz, exactly 0 where masked
    # sim is finite everywhere (masked loads are zeros), so g * sim never makes NaN.
    n_pid_n = tl.num_programs(1).to(tl.int64)
    tl.store(DS_PART + pid_m * n_pid_n + pid_n, tl.sum(tl.sum(g * sim, axis=1), axis=0))

    if UPCAST:
        gs = g * s
    else:
        gs = (g * s).to(A.dtype.element_ty)  # like flash-attention's P: half-precision operand, fp32 accumulate
    for start_d in range(0, D, BLOCK_D):
        d = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        b = tl.load(B + cols[:, None] * stride_b + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        a = tl.load(A + src[:, None] * stride_a + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            da = tl.dot(gs, b, input_precision="ieee")
            db = tl.dot(tl.trans(gs), a, input_precision="ieee")
        else:
            da = tl.dot(gs, b)
            db = tl.dot(tl.trans(gs), a)
        tl.atomic_add(DA + src[:, None] * stride_da + d[None, :], da, mask=row_ok[:, None] & d_ok[None, :])
        tl.atomic_add(DB + cols[:, None] * stride_db + d[None, :], db, mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _config(is_cuda: bool, dtype: torch.dtype, D: int, backward: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).

    CUDA half precision: 128-row tiles (the backward's 128x128 tile halves the atomic
    traffic of 64x64). Every CUDA choice compiles for sm90 without register spills
    (tests/test_loss.py checks it ahead of time); none is tuned on a device yet.
    fp32 takes IEEE dots and smaller tiles. The interpreter prefers big D-blocks: fewer Python-level steps.
    """
    if not is_cuda:
        return 32, 32, min(256, max(16, triton.next_power_of_2(D))), 4, 1
    if dtype == torch.float32:
        return (64, 64, 32, 8, 2) if backward else (32, 64, 32, 4, 2)
    return (128, 128, 64, 8, 2) if backward else (128, 64, 64, 8, 3)


def _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp):
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend supports float32/bfloat16/float16 inputs, got {A.dtype}")
    if A.stride(1) != 1 or B.stride(1) != 1:
        raise ValueError("A and B must be contiguous along the last dimension")
    n_a = a_pos.shape[0]
    dummy = a_pos  # never read: the matching constexpr flag is off
    groups = a_grp is not None
    args = (A, B, a_idx if a_idx is not None else dummy, a_pos,
            a_key if groups else dummy, a_grp if groups else dummy,
            b_key if b_key is not None else dummy, b_grp if groups else dummy)
    flags = dict(HAS_AIDX=a_idx is not None, HAS_BKEY=b_key is not None, HAS_GROUPS=groups,
                 IEEE=A.dtype == torch.float32,
                 # the interpreter's tl.dot misreads bfloat16 operands (Triton 3.x), so upcast there
                 UPCAST=A.dtype == torch.bfloat16 and not A.is_cuda)
    return n_a, args, flags


def contrastive_lse(A, B, scale, a_pos, a_idx=None, a_key=None, a_grp=None, b_key=None, b_grp=None):
    """Forward of one term: (lse [n_a], pos [n_a]) in fp32. Index/key/group tensors are int64."""
    n_a, args, flags = _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp)
    D = A.shape[1]
    lse = torch.empty(n_a, dtype=torch.float32, device=A.device)
    pos = torch.empty_like(lse)
    bm, bn, bd, warps, stages = _config(A.is_cuda, A.dtype, D, backward=False)
    grid = (triton.cdiv(n_a, bm),)
    _contrastive_fwd_kernel[grid](*args, scale, lse, pos, n_a, B.shape[0], D, A.stride(0), B.stride(0),
                                  **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return lse, pos


def contrastive_grads(A, B, scale, lse, w, dA, dB, a_pos, a_idx=None, a_key=None, a_grp=None,
                      b_key=None, b_grp=None):
    """Backward of one term: adds s*G@B into dA (rows a_idx or 0..n_a), s*G^T@A into dB; returns ds.

    dA and dB are fp32 accumulators the caller owns; ds is d(loss)/d(scale) as a 0-dim fp32 tensor.
    """
    n_a, args, flags = _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp)
    D = A.shape[1]
    bm, bn, bd, warps, stages = _config(A.is_cuda, A.dtype, D, backward=True)
    grid = (triton.cdiv(n_a, bm), triton.cdiv(B.shape[0], bn))
    ds_part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=A.device)
    _contrastive_bwd_kernel[grid](*args, scale, lse, w.float().contiguous(), dA, dB, ds_part,
                                  n_a, B.shape[0], D, A.stride(0), B.stride(0), dA.stride(0), dB.stride(0),
                                  **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return ds_part.sum()
