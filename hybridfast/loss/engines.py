"""The engines behind HybridContrastiveLoss (hybridfast/loss/dispatch.py chooses one).

One *term* of the loss (kernels/contrastive.py has the maths) is computed by:

- the chunked engine (`chunked_term`): per chunk of C rows of A, S = A_c @ B^T as
  a GEMM with fp32 output, a *row function* that turns S into lse, the positive
  logit and G*s = s * w * (softmax - onehot), then two GEMMs dA_c = (G*s) @ B and
  dB += (G*s)^T @ A_c. Extra memory is one chunk, never B x N. Two row functions:
  `rows_torch` (in-place PyTorch ops; CPU and the "torch" backend) and the Triton
  `_chunk_rows_kernel` (backend "chunked" on CUDA, and under TRITON_INTERPRET=1).
- the fused engine (`fused_term`, backend "triton"): tiled online log-sum-exp
  forward and a recompute-and-scatter backward, all in Triton.

Cosine similarity: `Term.a_scale` / `b_scale` are 1/|row|; S is scaled in place
(never a normalised copy of B) and the gradients come out as r * g_u (see
hybridfast/loss/function.py). Half-precision GEMM operands G are kept in [-s, s]:
the largest weight and column scale are divided out before the cast and multiplied
back into the fp32 GEMM results (fp16 G would otherwise flush to zero at large B).

One TF32 rule (`loss_precision`): fp32 inputs get IEEE fp32 products in every
engine, whatever torch's global matmul precision; half inputs use tensor cores
with fp32 accumulation.
"""
import contextlib

import torch

ENGINE_BACKENDS = ("torch", "chunked", "triton")
HALF = (torch.float16, torch.bfloat16)
# columns of dB per accumulation GEMM when G is half: bounds the fp32 temporary to
# DB_BLOCK x D (torch.addmm cannot add a half product into an fp32 buffer in place)
DB_BLOCK = 8192


class Term:
    """Rows A[a_idx] (or A) scored against all rows of B; see kernels/contrastive.py.

    a_scale [rows of A] / b_scale [rows of B]: inverse norms for cosine similarity, or None.
    """

    def __init__(self, A, B, a_pos, a_idx=None, a_key=None, a_grp=None, b_key=None, b_grp=None,
                 a_scale=None, b_scale=None):
        self.A, self.B, self.a_pos, self.a_idx = A, B, a_pos, a_idx
        self.a_key, self.a_grp, self.b_key, self.b_grp = a_key, a_grp, b_key, b_grp
        self.a_scale, self.b_scale = a_scale, b_scale

    @property
    def rows(self) -> int:
        return self.a_pos.shape[0]


@contextlib.contextmanager
def loss_precision():
    """IEEE fp32 GEMMs inside the loss (TF32 off), restored afterwards: the same numerics in
    every engine and every shape bucket (the fused kernel always uses IEEE fp32 dots)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------------- chunked engine

_out_dtype_ok = {}  # device -> does torch.mm(..., out_dtype=float32) run there?


def out_dtype_supported(device) -> bool:
    """Probed once per device on 2x2 tensors; an out-of-memory error is never taken for 'unsupported'."""
    key = str(device)
    if key not in _out_dtype_ok:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            _out_dtype_ok[key] = True
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_ok[key] = False
    return _out_dtype_ok[key]


def mm_fp32(a, b):
    """a @ b with an fp32 (or fp64) result: cuBLAS accumulates half inputs in fp32
    anyway, so asking for an fp32 output costs nothing and loses nothing."""
    if a.dtype not in HALF:
        return torch.mm(a, b)
    if out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def gemm_dtype_for(A, compute_dtype):
    """GEMM operands: the input dtype on CUDA (tensor cores, fp32 output); the compute dtype elsewhere."""
    return A.dtype if A.is_cuda and A.dtype in HALF else compute_dtype


def rows_torch(S, s, term, start, stop, w):
    """Row function in PyTorch, in place on S: returns (lse, pos, G*s or None, None).

    Scaled once, masked, exponentiated and turned into the gradient in the same
    [C, N] buffer (no second copy), so its memory is S alone. ds is left to the
    engine (None). `s` is a 0-dim tensor: no host read.
    """
    z = S.mul_(s)
    a_pos = term.a_pos[start:stop, None]
    if term.a_grp is not None:
        b_key = term.b_key if term.b_key is not None else torch.arange(S.shape[1], device=S.device)
        kill = term.b_grp[None, :] == term.a_grp[start:stop, None]
        kill &= b_key[None, :] != term.a_key[start:stop, None]
        z.masked_fill_(kill, float("-inf"))
        del kill
    pos = z.gather(1, a_pos).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    total = z.sub_(m).exp_().sum(dim=1, keepdim=True)
    lse = (m + total.log()).squeeze(1)
    if w is None:
        return lse, pos, None, None
    ws = w[:, None].to(z.dtype) * s
    z.mul_(ws / total)  # s * w * softmax over kept entries, one pass
    z.scatter_add_(1, a_pos, -ws)  # now s * dL/dz
    return lse, pos, z, None


def rows_triton(S, s, term, start, stop, w):
    """Row function as one Triton kernel (kernels/contrastive.py `_chunk_rows_kernel`)."""
    # imported here: `import hybridfast.loss` must not import Triton (slow, optional, and on a
    # CUDA machine it would initialise the driver's tools before the user asked for a kernel)
    from hybridfast.kernels.contrastive import chunk_rows

    gemm_dtype = gemm_dtype_for(term.A, torch.float32)
    # G in the input dtype feeds the two cuBLAS GEMMs at tensor-core speed; fp32 reuses S
    G = torch.empty(S.shape, dtype=gemm_dtype, device=S.device) if gemm_dtype in HALF and w is not None else S
    sl = slice(start, stop)
    lse, pos, ds = chunk_rows(
        S, G, s.detach().float().reshape(()), term.a_pos[sl].contiguous(), w,
        a_key=term.a_key[sl].contiguous() if term.a_grp is not None else None,
        a_grp=term.a_grp[sl].contiguous() if term.a_grp is not None else None,
        b_key=term.b_key, b_grp=term.b_grp)
    return lse, pos, (G if w is not None else None), (ds.sum() if ds is not None else None)


def _operand_scales(w, rb, gemm_dtype):
    """(w', rb', factor, wmax): w and rb divided by their largest magnitude when G is half, so
    that the cast operand lies in [-s, s]; `factor` (a device scalar or None) multiplies it back."""
    if gemm_dtype not in HALF or w is None:
        return w, rb, None, None
    wmax = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    factor = wmax
    if rb is not None:
        rbmax = rb.amax()
        rb, factor = rb / rbmax, wmax * rbmax
    return w / wmax, rb, factor, wmax


def _add_db(dB, G, Ac, factor):
    """dB += G^T @ Ac (times factor): in place when G is not half, else in column blocks."""
    if factor is None:
        dB.addmm_(G.T, Ac.to(G.dtype))
        return
    for j in range(0, G.shape[1], DB_BLOCK):
        blk = slice(j, j + DB_BLOCK)
        dB[blk] += mm_fp32(G[:, blk].T, Ac).mul_(factor)


def chunked_term(term, s, w, dA, dB, chunk_rows, compute_dtype, row_fn=rows_torch):
    """The chunked engine for one term: returns lse, pos, ds (and adds into dA, dB when w is given)."""
    A, n_a, ra_all = term.A, term.rows, term.a_scale
    gemm_dtype = gemm_dtype_for(A, compute_dtype)
    B = term.B.to(gemm_dtype)
    wn, rbn, factor, wmax = _operand_scales(w, term.b_scale, gemm_dtype)
    lse = torch.empty(n_a, dtype=compute_dtype, device=A.device)
    pos = torch.empty_like(lse)
    ds = torch.zeros((), dtype=compute_dtype, device=A.device)
    for start in range(0, n_a, chunk_rows):
        stop = min(start + chunk_rows, n_a)
        idx = term.a_idx[start:stop] if term.a_idx is not None else None
        rows = idx if idx is not None else slice(start, stop)
        Ac = A[rows]
        ra = ra_all[rows][:, None] if ra_all is not None else None
        Ac = (Ac.to(ra.dtype) * ra).to(gemm_dtype) if ra is not None else Ac.to(gemm_dtype)  # C x D only
        S = mm_fp32(Ac, B.T)
        if term.b_scale is not None:
            S.mul_(term.b_scale.to(S.dtype))  # cosine, in place
        lse_c, pos_c, G, ds_c = row_fn(S, s, term, start, stop, wn[start:stop] if w is not None else None)
        lse[start:stop], pos[start:stop] = lse_c, pos_c
        if w is None:
            del S
            continue
        if rbn is not None:
            G.mul_(rbn.to(G.dtype))  # columns: G o r_b, so that G @ B = sum_j G_ij u_j
        G = G.to(gemm_dtype)
        gA = mm_fp32(G, B)  # s * dL/du_c (cos) or s * dL/dA_c (dot), up to `factor`
        if factor is not None:
            gA.mul_(factor)
        if ds_c is None:  # <gA_i, A_i> / s = sum_j G_ij sim_ij (gA already times `factor`)
            ds_c = torch.vdot(gA.reshape(-1), Ac.to(gA.dtype).reshape(-1)) / s  # no [C, D] product
        elif wmax is not None:  # the row kernel saw w / wmax
            ds_c = ds_c * wmax
        ds += ds_c
        _add_db(dB, G, Ac, factor)
        if ra is not None:
            gA.mul_(ra.to(gA.dtype))
        if idx is not None:
            dA.index_put_((idx,), gA.to(dA.dtype), accumulate=True)  # repeated labels add up
        else:
            dA[start:stop] += gA
        del S, G  # freed before the next chunk's S is allocated: one chunk alive, not two
    return lse, pos, ds


# ----------------------------------------------------------------------------- fused engine

def fused_term(term, scale, w, dA, dB, chunk_rows, compute_dtype):
    """The fused Triton engine for one term (chunk_rows and compute_dtype unused: it tiles itself)."""
    from hybridfast.kernels.contrastive import contrastive_grads, contrastive_lse  # lazy, as in rows_triton

    kw = dict(a_idx=term.a_idx, a_key=term.a_key, a_grp=term.a_grp, b_key=term.b_key, b_grp=term.b_grp,
              a_scale=term.a_scale, b_scale=term.b_scale)
    A, B = term.A.contiguous(), term.B.contiguous()
    scale32 = scale.detach().float().reshape(())
    lse, pos = contrastive_lse(A, B, scale32, term.a_pos, **kw)
    ds = torch.zeros((), dtype=torch.float32, device=A.device)
    if w is not None:
        ds = contrastive_grads(A, B, scale32, lse, w, dA, dB, term.a_pos, **kw)
    return lse, pos, ds
