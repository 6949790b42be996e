"""Triton kernels for the contrastive (InfoNCE) similarity-and-loss step.

(Over the project's 450-line bound on purpose, one of its stated exceptions: one op in one
file, as DESIGN.md's style rule 1 and flash-attention's ops/triton files have it: the maths
and the cost model below, the kernels, their autotune configs and the launchers. Split, the
cost model and the configs it prices would sit apart from the code they describe.)

Maths. One *term* of the loss is a set of rows i of a matrix A (optionally picked
through an index, A[a_idx[i]]) scored against every row j of a matrix B:

    z_ij   = s * <A_i, B_j>                       s = logit scale = 1 / temperature
    kept_ij = not (HAS_GROUPS and b_grp[j] == a_grp[i] and b_key[j] != a_key[i])
    lse_i  = log sum_{j kept} exp(z_ij)           (online, tile by tile over j)
    pos_i  = z_{i, a_pos[i]}                      (the positive, always kept)

The query->passage term is A = queries, B = passages, a_pos = a_key = labels,
b_key = j. The passage->query (symmetric) term is A = passages picked at the
labels, B = all queries, a_pos = the query's own index, a_key = labels,
b_key = labels of every query. Every kernel here serves both terms.

Given per-row weights w_i (dL/dloss_i, the reduction folded in), the gradients are

    G_ij = w_i * (kept_ij * exp(z_ij - lse_i) - [j == a_pos[i]])      (= dL/dz_ij)
    dA_i += s * sum_j G_ij B_j,   dB_j += s * sum_i G_ij A_i,   ds += sum_ij G_ij <A_i, B_j>

Two engines compute them (hybridfast/loss/engines.py drives both):

* fused (backend "triton"): `_contrastive_fwd_kernel` streams B past BLOCK_M rows
  of A with an online log-sum-exp (split over N into partial (m, l, pos) when the
  rows alone fill less than two waves of SMs); `_contrastive_bwd_kernel` recomputes
  each [BLOCK_M, BLOCK_N] tile of z and scatters s*G@B and s*G^T@A with *relaxed*
  fp32 atomics (the default acq_rel ordering puts MEMBAR.ALL.GPU before every
  atomic; nothing here reads what another program adds, so no fence is needed).
  Never stores B x N. Both are autotuned (dtype, D, power-of-two buckets of the
  row counts and the flags) over config lists that tests/loss/test_kernels.py compiles
  for sm90 ahead of time: no spills, shared memory within 227 KiB, wgmma for half.
* chunked (backend "chunked", Liger-Kernel's fused-linear-cross-entropy shape):
  per chunk of C rows, S = A_c @ B^T by cuBLAS with fp32 output, then
  `_chunk_rows_kernel` (one program per row, two passes over its S row) applies
  scale, labels and the group mask, writes lse and the positive logit, and writes
  G*s in the input dtype; then cuBLAS again: dA_c = (G*s) @ B, dB += (G*s)^T @ A_c.

Cost model (B query rows, N passage rows, D dims, e bytes per input element,
one term, forward + backward with gradients; F = 2*B*N*D flops = one matmul).
"Extra memory" = peak beyond the inputs and the gradient buffers returned
(hybridfast.loss.dispatch.estimated_extra_bytes is this column in code):

    engine    flops        extra memory                                B x N traffic (bytes)   atomic fp32 adds
    eager     3F (6BND)    B*N*(4 + 4 + e) (logits, softmax grad, cast) ~5 passes of B*N*4     none
    fused     4F (8BND)    A: (B + N)*D*4 fp32 accumulators            none                    (N/BLOCK_N)*B*D
                           (first call per bucket: autotune clones,                            + (B/BLOCK_M)*N*D
                           another A)
    chunked   3F (6BND)    A + C*N*(4 + e') + C*D*8 + min(N, 8192)*D*4  B*N*(12 + 3e)           none
                           (S fp32, G in the input dtype e' = e on CUDA half, else G reuses S;
                           scaled A_c and dA_c; the dB GEMM's fp32 temporary, half only)

A = 0 for fp32 inputs (the accumulators are the returned gradients). Cosine adds
no copy: 1/|q|, 1/|p| are row/column scales ((B + N)*4 bytes) and the normalisation
backward runs once, in row blocks of 4096. The chunk budget C*N*(4 + e') is a
third of A, between 64 and 512 MiB, on CUDA (48 MiB on the CPU). ESTIMATE at B =
N = 65536, D = 768, bf16: A = 384 MiB; fused 0.375 GiB; chunked 384 + 128 + ~1 +
24 MiB = 0.52 GiB (< 0.6 GiB). Measured on the CPU path (fp32, B = N = 8192,
D = 256, 128 MiB chunks): within 10% of this model (tests/loss/test_gpu.py). No GPU
figure here is measured.

ESTIMATES, not measurements (no GPU was available when they were written): at
D = 768, B = N = 16384, bf16 on an H100 SXM (~700 TFLOP/s for large cuBLAS GEMMs,
~3 TB/s HBM), F = 0.41 TFLOP. Chunked ~ 3F/700T + 4.8 GB/3 TB/s ~ 1.8 + 1.6 =
3.4 ms. Fused ~ 4F/700T = 2.4 ms of dots plus 2 * 128 * 16384 * 768 = 3.2e9 atomic
adds at 128x128 tiles (12.9 GB of L2 reduction traffic). bench/gpu_suite.py
measures all of them and `backend="auto"` picks by timing on the device, not by
this model.

Known limits:
- the fused backward recomputes z (4 matmul-equivalents, as flash-attention does),
  and at D = 768 no [BLOCK_M, D] fp32 accumulator fits in registers, so dA/dB
  must be scattered with atomics (flash-attention's atomic-free backward needs
  D <= 256); atomic adds make dA/dB non-deterministic in the last bits;
- cosine similarity: the kernels take raw rows and RA/RB inverse norms (HAS_SCALES);
- the half-precision operand G is s * (w / max w) * (softmax - onehot) (times
  RA/max RA and RB/max RB): in [-s, s], so fp16 does not flush it to zero at large
  B; the maxima multiply the fp32 dot results back before the atomic adds;
- inputs must be fp32, bf16 or fp16 with unit stride along D; fp32 uses IEEE
  (not TF32) dots, and the chunked engine turns TF32 off around its GEMMs too
  (one rule for every engine);
- under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 before tl.dot (the
  interpreter's dot misreads bf16), and no autotuning happens (fixed CPU tiles);
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
    A, B, A_IDX, A_POS, A_KEY, A_GRP, B_KEY, B_GRP, RA, RB, SCALE, M_PART, L_PART, POS_PART,
    n_a, n_b, D, stride_a, stride_b, A_BUCKET, B_BUCKET,
    HAS_AIDX: tl.constexpr, HAS_BKEY: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALES: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, k): BLOCK_M rows of A against the k-th of num_programs(1) slices of B.

    Writes the slice's running max m, sum l = sum exp(z - m) and positive logit into
    row k of the [splits, n_a] partial buffers; the launcher combines the slices.
    A_BUCKET / B_BUCKET are autotuning keys only (power-of-two sizes).
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    span = tl.cdiv(tl.cdiv(n_b, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    lo = split * span
    hi = tl.minimum(lo + span, n_b)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_a
    src, a_pos, a_grp, a_key = _row_info(A_IDX, A_POS, A_KEY, A_GRP, rows, row_ok, HAS_AIDX, HAS_GROUPS)
    s = tl.load(SCALE).to(tl.float32)
    if HAS_SCALES:  # cosine: 1/|A_i| and 1/|B_j| scale the tile (no normalised copy of A or B)
        ra = tl.load(RA + src, mask=row_ok, other=0.0)

    m_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < hi
        z = _tile_logits(A, B, src, cols, row_ok, col_ok, D, stride_a, stride_b,
                         BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
        if HAS_SCALES:  # the backward recomputes z with these very operations: prob = exp(z - lse) stays exact
            z = z * ra[:, None] * tl.load(RB + cols, mask=col_ok, other=0.0)[None, :]
        z = z * s
        keep = _keep_mask(cols, col_ok, a_grp, a_key, B_GRP, B_KEY, HAS_GROUPS, HAS_BKEY)
        pos += tl.sum(tl.where(cols[None, :] == a_pos[:, None], z, 0.0), axis=1)
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = split * n_a + rows
    tl.store(M_PART + out, m_i, mask=row_ok)
    tl.store(L_PART + out, l_i, mask=row_ok)
    tl.store(POS_PART + out, pos, mask=row_ok)


BWD_GROUP_M = 8  # row blocks per launch group of the backward (see _grouped_tile)


@triton.jit
def _grouped_tile(GROUP_M: tl.constexpr):
    """(row block, column block) of a backward program in a grouped order: axis 1 picks a group of
    GROUP_M row blocks, axis 0 (launched fastest) walks it row block first, then column block.
    Row-major order (row block fastest over all rows) made every co-resident program scatter into
    the same DB[cols] tile (review finding 13); here programs launched together span GROUP_M row
    tiles and many column tiles, and a group's A and B tiles are reused from L2 (Triton's matmul
    swizzle). Only constexpr divisions, on launch indices: no registers held (a runtime division
    cost the fp32 configs spills). A last, partial group runs a few row blocks past n_a: their
    rows are masked (row_ok) and add nothing."""
    local = tl.program_id(0)
    return tl.program_id(1) * GROUP_M + local % GROUP_M, local // GROUP_M


# Over 60 lines on purpose: one Triton program is one compiled unit, and the order of its
# recompute (z, softmax), the fp32 G tile and the two scatters is what the cost model above
# counts; @jit helpers would inline to the same PTX while hiding that order.
@triton.jit
def _contrastive_bwd_kernel(
    A, B, A_IDX, A_POS, A_KEY, A_GRP, B_KEY, B_GRP, RA, RB, SCALE, LSE, W, CONSTS, DA, DB, DS_PART,
    n_a, n_b, D, stride_a, stride_b, stride_da, stride_db, A_BUCKET, B_BUCKET,
    HAS_AIDX: tl.constexpr, HAS_BKEY: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALES: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per (BLOCK_M rows of A, BLOCK_N rows of B) tile: recompute, then scatter-add.
    Tiles are launched in groups of GROUP_M row blocks (_grouped_tile), so programs running at
    the same time add into many DB column tiles, not all into one.

    W is w / max|w| and CONSTS = [max|w|, max RA, max RB]: the half-precision operand
    s * G * RA/max RA * RB/max RB lies in [-s, s] (no fp16 underflow at large B), and the
    fp32 dot results are multiplied back by the maxima before the atomic adds.
    """
    pid_m, pid_n = _grouped_tile(GROUP_M)
    pid_m = pid_m.to(tl.int64)
    pid_n = pid_n.to(tl.int64)
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
    mult = tl.load(CONSTS).to(tl.float32)
    if HAS_SCALES:
        ra = tl.load(RA + src, mask=row_ok, other=0.0)
        rb = tl.load(RB + cols, mask=col_ok, other=0.0)
        ra_max = tl.load(CONSTS + 1).to(tl.float32)
        rb_max = tl.load(CONSTS + 2).to(tl.float32)
        sim = sim * ra[:, None] * rb[None, :]
        mult = mult * ra_max * rb_max
    keep = _keep_mask(cols, col_ok, a_grp, a_key, B_GRP, B_KEY, HAS_GROUPS, HAS_BKEY)
    prob = tl.exp(tl.where(keep, sim * s - lse[:, None], float("-inf")))
    is_pos = (cols[None, :] == a_pos[:, None]).to(tl.float32)
    g = w[:, None] * (prob - is_pos)  # dL/dz, exactly 0 where masked
    # sim is finite everywhere (masked loads are zeros), so g * sim never makes NaN.
    # one slot per program (the slots are only summed): the launch index, read again here rather
    # than kept live through the loop below
    slot = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(DS_PART + slot, tl.sum(tl.sum(g * sim, axis=1), axis=0))

    gs = g * s
    if HAS_SCALES:  # G o (ra/max) x (rb/max): dA = ra * sum_j G rb B, dB = rb * sum_i G ra A
        gs = gs * (ra / ra_max)[:, None] * (rb / rb_max)[None, :]
    if not UPCAST:
        gs = gs.to(A.dtype.element_ty)  # like flash-attention's P: half-precision operand, fp32 accumulate
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
        da = da * mult
        db = db * mult
        # relaxed: no program reads what others add until the kernel ends, so the
        # default acq_rel ordering (a GPU-wide fence per atomic) buys nothing
        tl.atomic_add(DA + src[:, None] * stride_da + d[None, :], da, mask=row_ok[:, None] & d_ok[None, :],
                      sem="relaxed")
        tl.atomic_add(DB + cols[:, None] * stride_db + d[None, :], db, mask=col_ok[:, None] & d_ok[None, :],
                      sem="relaxed")


@triton.jit
def _row_kill(cols, ok, a_grp, a_key, B_GRP, B_KEY, HAS_BKEY: tl.constexpr):
    """Columns masked out of one row's denominator (same group, not the row's own key)."""
    b_grp = tl.load(B_GRP + cols, mask=ok, other=0)
    if HAS_BKEY:
        b_key = tl.load(B_KEY + cols, mask=ok, other=0)
    else:
        b_key = cols
    return (b_grp == a_grp) & (b_key != a_key)


@triton.jit
def _chunk_rows_kernel(
    S, G, A_POS, A_KEY, A_GRP, B_KEY, B_GRP, SCALE, W, LSE, POS, DS_ROW,
    n_b, stride_s, stride_g,
    HAS_BKEY: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row r of a chunk of raw dot products S: lse, positive logit and, with weights,
    G[r] = s * w_r * (softmax - onehot) in G's dtype and ds_r = sum_j G_rj S_rj / s.

    G may be S itself (fp32 inputs): each program reads a block of its own row
    before it overwrites it, and no program touches another's row.
    """
    r = tl.program_id(0).to(tl.int64)
    s = tl.load(SCALE).to(tl.float32)
    a_pos = tl.load(A_POS + r)
    if HAS_GROUPS:
        a_grp = tl.load(A_GRP + r)
        a_key = tl.load(A_KEY + r)
    else:
        a_grp = a_pos
        a_key = a_pos
    offs = tl.arange(0, BLOCK_N)  # int32 columns (n_b < 2**31) keep the loads vectorisable
    s_row = S + r * stride_s  # int64 row offsets: C * n_b may exceed 2**31
    g_row = G + r * stride_g
    m = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)  # per-lane online max and sum
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_b, BLOCK_N):
        cols = start + offs
        ok = cols < n_b
        z = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32) * s
        pos += tl.where(cols == a_pos, z, 0.0)
        keep = ok
        if HAS_GROUPS:
            keep = keep & (_row_kill(cols, ok, a_grp, a_key, B_GRP, B_KEY, HAS_BKEY) == 0)
        z = tl.where(keep, z, _NEG_BIG)
        m_new = tl.maximum(m, z)
        l = l * tl.exp(m - m_new) + tl.where(keep, tl.exp(z - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(l * tl.exp(m - m_row), axis=0))
    tl.store(LSE + r, lse)
    tl.store(POS + r, tl.sum(pos, axis=0))
    if HAS_W:
        w = tl.load(W + r).to(tl.float32)
        ds = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, n_b, BLOCK_N):
            cols = start + offs
            ok = cols < n_b
            raw = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
            keep = ok
            if HAS_GROUPS:
                keep = keep & (_row_kill(cols, ok, a_grp, a_key, B_GRP, B_KEY, HAS_BKEY) == 0)
            prob = tl.exp(tl.where(keep, raw * s - lse, _NEG_BIG))  # masked columns may exceed lse: no exp overflow
            g = w * (prob - (cols == a_pos).to(tl.float32))
            ds += g * raw
            tl.store(g_row + cols, (g * s).to(G.dtype.element_ty), mask=ok)
        tl.store(DS_ROW + r, tl.sum(ds, axis=0))


# ----------------------------------------------------------------------------- configs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages): the autotuning spaces on CUDA.
# Every entry compiles for sm90 without register spills and within 227 KiB of shared
# memory, and the half-precision ones lower to wgmma (tests/test_loss.py checks it on
# the CPU for every dtype and flag combination, via tests/aot_sm90.py). Dropped ahead
# of time because ptxas spills (Triton 3.9, sm90): forward 128x256 / 256x128 and a
# 4-warp 64x128 (half, with groups); backward 128x128 with 2 stages (half, with
# groups: 16 bytes) and 64x64/4 warps (fp32: 5.5 KB); fp32 32x32/4 warps and
# 64x64/8 warps; backward half 128x128/8 warps/1 stage since the cosine scales moved into the
# kernel (64 bytes with every flag on, 255 registers), and backward fp32 64x32/4 warps (24 bytes). None of these is tuned on a device yet: the autotuner picks.
CUDA_CONFIGS = {
    ("fwd", "half"): [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (64, 128, 64, 8, 3)],
    ("bwd", "half"): [(64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2)],
    ("fwd", "fp32"): [(32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (32, 128, 32, 8, 2), (16, 64, 32, 4, 2)],
    ("bwd", "fp32"): [(32, 64, 32, 4, 2), (32, 32, 32, 2, 2), (32, 64, 16, 4, 2)],
}
AUTOTUNE_KEY = ["D", "A_BUCKET", "B_BUCKET", "HAS_AIDX", "HAS_BKEY", "HAS_GROUPS", "HAS_SCALES"]  # + tensor dtypes (Triton adds them)
MAX_SPLITS = 64


def _interpreter_tiles(D):
    """Fixed tiles under TRITON_INTERPRET=1, where nothing is timed: fewer Python-level steps."""
    return 32, 32, min(256, max(16, triton.next_power_of_2(D)))


def _triton_configs(pass_, precision):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=d), num_warps=w, num_stages=st)
            for m, n, d, w, st in CUDA_CONFIGS[(pass_, precision)]]


def _autotuned(kernel, pass_, precision):
    restore = ["M_PART", "L_PART", "POS_PART"] if pass_ == "fwd" else ["DA", "DB", "DS_PART"]
    # restore_value: timing runs must not leave their sums in the buffers the real run adds into
    return triton.autotune(configs=_triton_configs(pass_, precision), key=AUTOTUNE_KEY, restore_value=restore)(kernel)


_TUNED = {(p, prec): _autotuned(k, p, prec) for p, k in (("fwd", _contrastive_fwd_kernel), ("bwd", _contrastive_bwd_kernel))
          for prec in ("half", "fp32")}


def chosen_configs():
    """What the autotuners picked so far in this process: {(pass, precision): {key: config}}."""
    return {f"{p}-{prec}": {str(k): str(v) for k, v in tuner.cache.items()} for (p, prec), tuner in _TUNED.items()
            if tuner.cache}


def _bucket(n):
    return triton.next_power_of_2(max(1, int(n)))


def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_splits(n_row_programs, n_b, num_sms):
    """Slices of B per row block: enough programs for two waves of SMs, >= 512 columns each."""
    want = triton.cdiv(2 * num_sms, max(1, n_row_programs))
    return max(1, min(want, triton.cdiv(n_b, 512), MAX_SPLITS))


# ----------------------------------------------------------------------------- launchers

def _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp, a_scale=None, b_scale=None):
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend supports float32/bfloat16/float16 inputs, got {A.dtype}")
    if A.stride(1) != 1 or B.stride(1) != 1:
        raise ValueError("A and B must be contiguous along the last dimension")
    if (a_scale is None) != (b_scale is None):
        raise ValueError("a_scale and b_scale go together (cosine similarity) or not at all")
    n_a = a_pos.shape[0]
    dummy = a_pos  # never read: the matching constexpr flag is off
    groups = a_grp is not None
    scales = a_scale is not None
    fdummy = torch.empty(1, dtype=torch.float32, device=A.device)
    args = (A, B, a_idx if a_idx is not None else dummy, a_pos,
            a_key if groups else dummy, a_grp if groups else dummy,
            b_key if b_key is not None else dummy, b_grp if groups else dummy,
            a_scale.float().contiguous() if scales else fdummy, b_scale.float().contiguous() if scales else fdummy)
    flags = dict(HAS_AIDX=a_idx is not None, HAS_BKEY=b_key is not None, HAS_GROUPS=groups, HAS_SCALES=scales,
                 IEEE=A.dtype == torch.float32,
                 # the interpreter's tl.dot misreads bfloat16 operands (Triton 3.x), so upcast there
                 UPCAST=A.dtype == torch.bfloat16 and not A.is_cuda)
    return n_a, args, flags


def _precision(dtype):
    return "fp32" if dtype == torch.float32 else "half"


def contrastive_lse(A, B, scale, a_pos, a_idx=None, a_key=None, a_grp=None, b_key=None, b_grp=None,
                    n_splits=None, a_scale=None, b_scale=None):
    """Forward of one term: (lse [n_a], pos [n_a]) in fp32. Index/key/group tensors are int64;
    a_scale [rows of A] / b_scale [n_b] multiply row i / column j of the logits (cosine: 1/|x|).

    `n_splits`: slices of B computed by separate programs and combined here (None: on
    CUDA enough for two waves of SMs, 1 in the interpreter).
    """
    n_a, args, flags = _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp, a_scale, b_scale)
    n_b, D = B.shape[0], A.shape[1]
    sizes = (n_a, n_b, D, A.stride(0), B.stride(0), _bucket(n_a), _bucket(n_b))
    if A.is_cuda:
        tuner = _TUNED[("fwd", _precision(A.dtype))]
        sms = _num_sms(A.device)
        if n_splits is None:
            def splits(meta):
                return forward_splits(triton.cdiv(n_a, meta["BLOCK_M"]), n_b, sms)
            most = max(splits(dict(BLOCK_M=c.kwargs["BLOCK_M"])) for c in tuner.configs)
        else:
            splits, most = (lambda meta: n_splits), n_splits
        parts = _partials(most, n_a, A.device)
        tuner[lambda meta: (triton.cdiv(n_a, meta["BLOCK_M"]), splits(meta))](*args, scale, *parts, *sizes, **flags)
    else:
        most = n_splits or 1
        parts = _partials(most, n_a, A.device)
        bm, bn, bd = _interpreter_tiles(D)
        _contrastive_fwd_kernel[(triton.cdiv(n_a, bm), most)](*args, scale, *parts, *sizes, **flags,
                                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    m, l, pos = parts
    top = m.amax(dim=0)
    lse = top + (l * torch.exp(m - top)).sum(dim=0).log()  # slices with no kept column have l = 0
    return lse, pos.sum(dim=0)


def _partials(n_splits, n_a, device):
    """(m, l, pos) slices, initialised so that a slice no program writes adds nothing."""
    return (torch.full((n_splits, n_a), -1.0e30, dtype=torch.float32, device=device),
            torch.zeros((n_splits, n_a), dtype=torch.float32, device=device),
            torch.zeros((n_splits, n_a), dtype=torch.float32, device=device))


def contrastive_grads(A, B, scale, lse, w, dA, dB, a_pos, a_idx=None, a_key=None, a_grp=None,
                      b_key=None, b_grp=None, a_scale=None, b_scale=None):
    """Backward of one term: adds s*G@B into dA (rows a_idx or 0..n_a), s*G^T@A into dB; returns ds.

    dA and dB are fp32 accumulators the caller owns; ds is d(loss)/d(scale) as a 0-dim fp32 tensor.
    With scales (cosine) dA_i gets a_scale_i * s * sum_j G_ij b_scale_j B_j (the gradient w.r.t.
    the unit vector times 1/|A_i|) and likewise dB; the caller applies the normalisation backward.
    """
    n_a, args, flags = _common(A, B, a_idx, a_pos, a_key, a_grp, b_key, b_grp, a_scale, b_scale)
    n_b, D = B.shape[0], A.shape[1]
    sizes = (n_a, n_b, D, A.stride(0), B.stride(0), dA.stride(0), dB.stride(0), _bucket(n_a), _bucket(n_b))
    w = w.float()
    wmax = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)  # a device scalar: no host read
    one = torch.ones((), dtype=torch.float32, device=A.device)
    consts = torch.stack([wmax, args[8].amax() if a_scale is not None else one,
                          args[9].amax() if b_scale is not None else one])
    w = (w / wmax).contiguous()
    if A.is_cuda:
        tuner = _TUNED[("bwd", _precision(A.dtype))]
        most = max(_bwd_programs(n_a, n_b, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tuner.configs)
        ds_part = torch.zeros(most, dtype=torch.float32, device=A.device)  # unused slots stay 0
        grid = lambda meta: _bwd_grid(n_a, n_b, meta["BLOCK_M"], meta["BLOCK_N"])  # noqa: E731
        tuner[grid](*args, scale, lse, w, consts, dA, dB, ds_part, *sizes, **flags, GROUP_M=BWD_GROUP_M)
    else:
        bm, bn, bd = _interpreter_tiles(D)
        grid = _bwd_grid(n_a, n_b, bm, bn)
        ds_part = torch.zeros(_bwd_programs(n_a, n_b, bm, bn), dtype=torch.float32, device=A.device)
        _contrastive_bwd_kernel[grid](*args, scale, lse, w, consts, dA, dB, ds_part, *sizes, **flags,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP_M=BWD_GROUP_M)
    return ds_part.sum() * wmax


def _bwd_grid(n_a, n_b, block_m, block_n):
    """(GROUP_M x column blocks, row groups): the backward's grouped launch (see _grouped_tile)."""
    return BWD_GROUP_M * triton.cdiv(n_b, block_n), triton.cdiv(triton.cdiv(n_a, block_m), BWD_GROUP_M)


def _bwd_programs(n_a, n_b, block_m, block_n):
    g0, g1 = _bwd_grid(n_a, n_b, block_m, block_n)
    return g0 * g1


def rows_config(n_b):
    """(BLOCK_N, num_warps) of the row kernel: memory-bound, so a heuristic (as
    Liger-Kernel's calculate_settings) instead of timing runs, which would have to
    restore a chunk of S that the kernel overwrites in place. Its loads and stores are
    128-bit when N is a multiple of 16 (the JIT specialises such sizes; the sm90 test
    checks the PTX), 32-bit otherwise."""
    block = min(4096, max(16, triton.next_power_of_2(n_b)))
    return block, 4 if block <= 1024 else 8 if block <= 2048 else 16


def chunk_rows(S, G, scale, a_pos, w=None, a_key=None, a_grp=None, b_key=None, b_grp=None):
    """Row pass of the chunked engine over S [C, n_b] (raw fp32 dot products).

    Returns (lse [C], pos [C], ds [C] or None) in fp32; with `w` [C] it writes
    G = s * w * (softmax - onehot) into `G` (same shape; may be S itself).
    """
    C, n_b = S.shape
    if S.dtype != torch.float32 or S.stride(1) != 1 or G.stride(1) != 1:
        raise ValueError("S must be fp32 and S, G contiguous along the last dimension")
    lse = torch.empty(C, dtype=torch.float32, device=S.device)
    pos = torch.empty_like(lse)
    ds = torch.empty_like(lse) if w is not None else None
    groups = a_grp is not None
    dummy = a_pos
    block, warps = rows_config(n_b)
    if not S.is_cuda:
        block = min(block, 256)  # interpreter: small blocks are fastest to emulate
    _chunk_rows_kernel[(C,)](
        S, G, a_pos, a_key if groups else dummy, a_grp if groups else dummy,
        b_key if b_key is not None else dummy, b_grp if groups else dummy, scale,
        w.float().contiguous() if w is not None else lse, lse, pos, ds if ds is not None else lse,
        n_b, S.stride(0), G.stride(0),
        HAS_BKEY=b_key is not None, HAS_GROUPS=groups, HAS_W=w is not None, BLOCK_N=block, num_warps=warps)
    return lse, pos, ds
