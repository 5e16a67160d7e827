"""Fused per-token log-prob (+ entropy) of the target token, from hidden states and the lm_head.

    logp, ent = fused_logprob(x, W, targets, temperature=0.7, entropy=True)
    # x (N, H) bf16/fp32, W (V, H), targets (N,) int64 (ignore_index rows give 0) -> (N,) fp32, (N,) fp32
    logp = fused_logprob(x, W, targets, bias=b, scale=s, softcap=c)   # the model's own head (below)

z = x @ W.T / T, logp = z[y] - logsumexp(z), entropy = logsumexp(z) - E_p[z]. The naive path writes the
(N, V) logits (N = 16384, V = 151936: 10 GB in fp32); this one keeps them in registers.

The head is the model's own, kernels.head_logits: z = c * tanh((x @ W.T + b) * s / c) / T (no tanh when
c = 0: most models; Gemma 2/3 soft-cap at c = 30). Each fp32 tile gets the bias, the scale and the cap
in registers, and the backward multiplies by their derivative, s * (1 - tanh^2) / T; the bias gradient
is the column sum of the same dlogits. s and c are compile-time constants (one compilation per model).

Forward: one Triton program per (row block, vocabulary split). It computes a (BLOCK_N, BLOCK_V) tile of
logits with tl.dot over H, then folds it into per-row online-softmax statistics (running max m,
sum_j e^(z_j - m), sum_j e^(z_j - m) z_j, and the target logit when the target falls in the tile). Each
split writes its partial statistics; a fixed-order combine over the splits gives logsumexp, log p and
entropy. No atomics, and the split count depends on V only, so a row's result depends on that row alone:
the no-grad pass (old / reference log-probs) and the training pass are bitwise equal, and GRPO's ratio is
exactly 1 on-policy.

Backward (exact, no gradient filtering; four matmuls in all): per chunk of rows, a Triton kernel
recomputes the logits tile by tile and writes
    dlogits = [g_lp * (onehot_y - p) - g_ent * p * (z - E_p[z])] / T        (fp32 in registers)
into a (chunk, V) workspace in the input dtype, then cuBLAS does dX = dlogits @ W and
dW += dlogits.T @ x. Why cuBLAS for those two: they are plain GEMMs that cuBLAS runs at the floor, and
accumulating dW over row blocks inside a Triton kernel would need atomics (non-deterministic) or a
reduction buffer per row block. The workspace is the only memory beyond O(N + V*H): chunk_rows * V
elements (2048 x 151936 x 2 bytes = 0.6 GB by default).

Offsets are int64 (N * V > 2^31 at real sizes); the vocabulary tail is masked (V need not be a power of
two). Under TRITON_INTERPRET=1 the same kernels run on CPU in fp32 (the interpreter has no bf16 math).
"""
import os

import torch
import triton
import triton.language as tl

from kernels import head_logits


# -----------------------------------------------------------------------------
# Reference: plain PyTorch, chunked over rows. The specification the kernels are tested against.

def logprob_reference(x, W, targets, temperature=1.0, entropy=False, ignore_index=-100, chunk_rows=4096,
                      bias=None, scale=1.0, softcap=0.0):
    """Same contract as fused_logprob, in plain PyTorch (autograd does the backward). Computes in the
    dtype of x upcast to at least fp32 (pass float64 tensors for a float64 reference)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logps, ents = [], []
    for i in range(0, x.shape[0], chunk_rows):
        z = head_logits(x[i:i + chunk_rows], W, bias, scale, softcap) / temperature   # (n, V)
        lse = torch.logsumexp(z, -1)
        logps.append(z.gather(-1, safe[i:i + chunk_rows, None])[:, 0] - lse)
        if entropy:
            ents.append(lse - (torch.softmax(z, -1) * z).sum(-1))
    zero = x.new_zeros(0, dtype=torch.promote_types(x.dtype, torch.float32))
    logp = torch.where(valid, torch.cat(logps) if logps else zero, 0.0)
    if not entropy:
        return logp
    return logp, torch.where(valid, torch.cat(ents) if ents else zero, 0.0)


# -----------------------------------------------------------------------------
# Kernels

@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    # (BLOCK_N, BLOCK_V) fp32 tile of x @ W.T, reduced over H in a fixed order (BLOCK_H steps).
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        xt = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _tanh(x):
    # tanh from one exp, (1 - e^-2|x|) / (1 + e^-2|x|) with the sign of x: e^-2|x| <= 1 never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _head(acc, b_ptr, cols, col_ok, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr,
          INV_T: tl.constexpr):
    # The model's logits / T from a fp32 tile of x @ W.T (kernels.head_logits): + bias, * scale, soft cap.
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE != 1.0:
        z = z * SCALE
    if CAP > 0:
        z = CAP * _tanh(z / CAP)
    return z * INV_T


@triton.jit
def _stats_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, z_ptr, N, V, H, stride_x, stride_w, stride_z, v_per_split,
                  num_row_blocks, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr,
                  INV_T: tl.constexpr, STORE_Z: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    # Program (row block, split). Row blocks vary fastest, so the programs in flight at one time read
    # the same slice of W (it stays in L2 while x, which is small, is re-read). num_row_blocks is a
    # runtime argument: each value of a constexpr is a compilation of its own (seconds on a GPU), and
    # the row count changes with every batch's completion length.
    pid = tl.program_id(0)
    pid_n = pid % num_row_blocks
    pid_s = pid // num_row_blocks
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)     # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)                   # sum e^(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)                   # sum e^(z - m) * z   (for the entropy)
    zy = tl.zeros((BLOCK_N,), tl.float32)                  # the target's logit, if in this split
    v_start = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _head(_logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                               BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC), b_ptr, cols, col_ok, HAS_BIAS, SCALE, CAP, INV_T)
        if STORE_Z:  # the fused loss head keeps the chunk's logits for its gradient pass
            tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])                     # 0 on the masked tail
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    # partials (4, splits, N): m, s, t, zy
    base = part_ptr + pid_s.to(tl.int64) * N + rows
    plane = tl.num_programs(0).to(tl.int64) // num_row_blocks * N
    tl.store(base, m, mask=row_ok)
    tl.store(base + plane, s, mask=row_ok)
    tl.store(base + 2 * plane, t, mask=row_ok)
    tl.store(base + 3 * plane, zy, mask=row_ok)


@triton.jit
def _dlogits_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, mu_ptr, glp_ptr, gent_ptr, z_ptr, dz_ptr,
                    N, V, H, stride_x, stride_w, stride_z, stride_dz, num_row_blocks,
                    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr, INV_T: tl.constexpr,
                    FROM_Z: tl.constexpr, HAS_GENT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    # dlogits = [g_lp (onehot - p) - g_ent p (z - mu)] dz/da for one (BLOCK_N, BLOCK_V) tile, where
    # a = x @ W.T + b and dz/da = scale (1 - tanh^2) / T (the head's derivative, tanh = z T / cap), computed in
    # fp32 and rounded once when stored (the target's 1 - p is never formed in low precision). FROM_Z:
    # z was stored in fp32 at z_ptr by _stats_kernel (z_ptr may be dz_ptr: overwritten in place);
    # otherwise the tile is recomputed from x and W.
    pid = tl.program_id(0)
    pid_n = pid % num_row_blocks
    pid_v = pid // num_row_blocks
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    ptrs = dz_ptr + rows[:, None] * stride_dz + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if FROM_Z:
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    else:
        z = _head(_logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_x, stride_w,
                               BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC), b_ptr, cols, col_ok, HAS_BIAS, SCALE, CAP, INV_T)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)     # 0 on ignored rows (set by the caller)
    p = tl.exp(z - lse[:, None])
    d = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        d -= ge[:, None] * p * (z - mu[:, None])
    dz_da = INV_T * SCALE
    if CAP > 0:
        t = z * (1.0 / (CAP * INV_T))                        # tanh((x @ W.T + b) * scale / cap)
        dz_da = dz_da * (1.0 - t * t)
    tl.store(ptrs, (d * dz_da).to(dz_ptr.dtype.element_ty), mask=ok)


# -----------------------------------------------------------------------------
# Launch helpers, shared with loss_head.py

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Tiles:
    """Tile sizes (any powers of two >= 16). GPU: 128 x 128 logit tiles, 64-wide steps over H, 8192-column
    vocabulary splits (untuned: no GPU has timed them yet). The interpreter (tests on CPU) runs each
    program in numpy: blocks of 16 rows x 256 columns and a single split keep the tiny test shapes fast."""

    def __init__(self, block_n=None, block_v=None, block_h=None, v_per_split=None, num_warps=8, num_stages=3):
        small = INTERPRET
        self.block_n = block_n or (16 if small else 128)
        self.block_v = block_v or (256 if small else 128)
        self.block_h = block_h or 64
        # Vocabulary per split: a function of V only (never of N), so each row's statistics are computed
        # in the same order whatever the batch: the batch invariance behind bitwise-equal passes.
        # 8192 columns: 19 splits at V = 151936, enough programs to fill an H100/H200 at N >= 1024.
        self.v_per_split = v_per_split or (1 << 30 if small else 8192)
        self.num_warps, self.num_stages = num_warps, num_stages


def _launch_kw(tiles):
    return {} if INTERPRET else {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def _dot_prec(x):
    # fp32 inputs: full-precision products (the fp32 path is the accuracy reference); for bf16 inputs
    # the setting is ignored (bf16 tensor-core products, fp32 accumulation).
    return "ieee" if x.dtype == torch.float32 else "tf32"


PLAIN = (None, 1.0, 0.0)   # the head (bias, scale, softcap) of a model whose logits are just x @ W.T


def _head_args(head, W, temperature):
    """The kernels' head arguments: the bias pointer (W's when there is none: never read) and the
    compile-time flags. Python floats as constexprs: as runtime arguments they could become fp64."""
    bias, scale, softcap = head
    return (bias if bias is not None else W), dict(HAS_BIAS=bias is not None, SCALE=float(scale),
                                                   CAP=float(softcap), INV_T=1.0 / temperature)


def _check(x, W, targets, head=PLAIN):
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"kernels/logprob.py: x must be (N, H) and W (V, H), "
                         f"got {tuple(x.shape)} and {tuple(W.shape)}")
    if head[0] is not None and head[0].shape != (W.shape[0],):
        raise ValueError(f"kernels/logprob.py: the bias must be ({W.shape[0]},), got {tuple(head[0].shape)}")
    if head[2] < 0:
        raise ValueError(f"kernels/logprob.py: softcap must be >= 0 (0 = none), got {head[2]}")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"kernels/logprob.py: targets must be ({x.shape[0]},), got {tuple(targets.shape)}")
    if x.dtype != W.dtype:
        raise ValueError(f"kernels/logprob.py: x is {x.dtype} but W is {W.dtype}")


def row_stats(x, W, targets, temperature, ignore_index, tiles, z_out=None, head=PLAIN):
    """Forward statistics of rows x (n, H): (logp, entropy, lse, mu) each (n,) fp32, where
    mu = E_p[z]. With z_out (n, V) given, the logits z (the head's, / T) are written there too."""
    n, H = x.shape
    V = W.shape[0]
    if n == 0:
        return tuple(torch.zeros(0, device=x.device, dtype=torch.float32) for _ in range(4))
    v_per_split = triton.cdiv(min(tiles.v_per_split, V), tiles.block_v) * tiles.block_v
    splits = triton.cdiv(V, v_per_split)
    row_blocks = triton.cdiv(n, tiles.block_n)
    part = torch.empty(4, splits, n, device=x.device, dtype=torch.float32)
    z = z_out if z_out is not None else part  # unused pointer when not storing
    b, head_kw = _head_args(head, W, temperature)
    _stats_kernel[(row_blocks * splits,)](
        x, W, b, targets, part, z, n, V, H, x.stride(0), W.stride(0), z.stride(0) if z_out is not None else 0,
        v_per_split, num_row_blocks=row_blocks, **head_kw, STORE_Z=z_out is not None,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=tiles.block_h, DOT_PREC=_dot_prec(x),
        **_launch_kw(tiles))
    m, s, t, zy = part.unbind(0)                       # each (splits, n)
    mx = m.max(0).values                               # fixed-order combine over splits
    scale = torch.exp(m - mx)
    S = (s * scale).sum(0)
    lse = mx + torch.log(S)
    mu = (t * scale).sum(0) / S
    valid = targets != ignore_index
    logp = torch.where(valid, zy.sum(0) - lse, 0.0)
    ent = torch.where(valid, lse - mu, 0.0)
    return logp, ent, lse, mu


def dlogits(x, W, targets, lse, mu, g_lp, g_ent, temperature, tiles, out, z=None, head=PLAIN):
    """Write the (n, V) gradient of sum(g_lp * logp + g_ent * entropy) w.r.t. the raw logits
    x @ W.T + bias (before scale, cap and temperature) into out (in out's dtype): dX = out @ W,
    dW = out.T @ x, dbias = out.sum(0). z: the (n, V) logits stored by row_stats(z_out=), fp32 (it may
    be out itself, then overwritten); None: recomputed from x and W. Why fp32: lse comes from the fp32
    tile, and a bf16 z (off by up to 0.125 at |z| ~ 30) gives p = exp(z - lse) rows that sum to 0.9-1.1,
    so 1 - p of a confident target can even change sign."""
    n, H = x.shape
    V = W.shape[0]
    if z is not None and z.dtype != torch.float32:
        raise ValueError(f"kernels/logprob.py: dlogits needs the stored logits z in float32, got {z.dtype}")
    row_blocks = triton.cdiv(n, tiles.block_n)
    grid = (row_blocks * triton.cdiv(V, tiles.block_v),)
    b, head_kw = _head_args(head, W, temperature)
    _dlogits_kernel[grid](
        x, W, b, targets, lse, mu, g_lp, g_ent if g_ent is not None else g_lp, z if z is not None else out, out,
        n, V, H, x.stride(0), W.stride(0), z.stride(0) if z is not None else 0, out.stride(0), row_blocks,
        **head_kw, FROM_Z=z is not None, HAS_GENT=g_ent is not None, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
        BLOCK_H=tiles.block_h, DOT_PREC=_dot_prec(x), **_launch_kw(tiles))
    return out


def grad_accumulators(x, W, bias=None):
    # dW (and dbias) accumulate over row chunks: in fp32 for half-precision weights, so many chunks round once.
    dX = torch.empty_like(x)
    dW = torch.zeros(W.shape, device=W.device, dtype=torch.promote_types(W.dtype, torch.float32))
    db = None if bias is None else torch.zeros(bias.shape, device=bias.device, dtype=dW.dtype)
    return dX, dW, db


def chunk_matmuls(dz, x, W, dX, dW, i, j, db=None):
    # The two cuBLAS GEMMs of a chunk: dX[i:j] = dz @ W, dW += dz.T @ x[i:j]; and dbias += column sums
    torch.mm(dz, W, out=dX[i:j])
    if db is not None:
        db.add_(dz.sum(0, dtype=db.dtype))
    if dW.dtype == dz.dtype:
        dW.addmm_(dz.T, x[i:j])
        return
    try:  # bf16 inputs, fp32 output: the chunk's contribution is never rounded to bf16
        dW.add_(torch.mm(dz.T, x[i:j], out_dtype=dW.dtype))
    except (RuntimeError, TypeError):  # a build without mm(out_dtype=): round each chunk's share once
        dW.add_(torch.mm(dz.T, x[i:j]))


# -----------------------------------------------------------------------------
# The autograd function

class FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, targets, scale, softcap, temperature, ignore_index, want_entropy, chunk_rows, tiles):
        head = (bias, scale, softcap)
        logp, ent, lse, mu = row_stats(x, W, targets, temperature, ignore_index, tiles, head=head)
        ctx.save_for_backward(x, W, bias, targets, lse, mu)
        ctx.cfg = (scale, softcap, temperature, ignore_index, want_entropy, chunk_rows, tiles)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        x, W, bias, targets, lse, mu = ctx.saved_tensors
        scale, softcap, temperature, ignore_index, want_entropy, chunk_rows, tiles = ctx.cfg
        valid = targets != ignore_index
        g_lp = torch.where(valid, g_lp, 0.0).float().contiguous() if g_lp is not None else valid.float() * 0
        if g_ent is not None and want_entropy:
            g_ent = torch.where(valid, g_ent, 0.0).float().contiguous()
        else:
            g_ent = None
        n, V = x.shape[0], W.shape[0]
        dX, dW, db = grad_accumulators(x, W, bias)
        work = torch.empty(min(chunk_rows, max(n, 1)), V, device=x.device, dtype=x.dtype)  # the one chunk
        for i in range(0, n, chunk_rows):
            j = min(i + chunk_rows, n)
            dz = dlogits(x[i:j], W, targets[i:j], lse[i:j], mu[i:j], g_lp[i:j],
                         None if g_ent is None else g_ent[i:j], temperature, tiles, work[:j - i],
                         head=(bias, scale, softcap))
            chunk_matmuls(dz, x, W, dX, dW, i, j, db)
        return (dX, dW.to(W.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None, None, None)


def fused_logprob(x, W, targets, temperature=1.0, entropy=False, ignore_index=-100, chunk_rows=2048, tiles=None,
                  bias=None, scale=1.0, softcap=0.0):
    """log softmax(z)[targets] (N,) fp32 [, entropy (N,) fp32] with z the model's logits / temperature,
    z = head_logits(x, W, bias, scale, softcap) / temperature (plain x @ W.T / T by default); rows whose
    target is ignore_index give 0 and get no gradient. Differentiable in x, W and bias (entropy too)."""
    _check(x, W, targets, (bias, scale, softcap))
    x, W = x.contiguous(), W.contiguous()
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous().long()
    logp, ent = FusedLogprob.apply(x, W, bias, targets, float(scale), float(softcap), float(temperature),
                                   int(ignore_index), bool(entropy), int(chunk_rows), tiles or Tiles())
    return (logp, ent) if entropy else logp


# -----------------------------------------------------------------------------
# Benchmark: python -m kernels.logprob [N H V]   (CUDA)

if __name__ == "__main__":
    import sys
    import time
    if not torch.cuda.is_available():
        sys.exit("kernels/logprob.py benchmark needs a CUDA GPU (tests run the kernels on CPU: "
                 "TRITON_INTERPRET=1 pytest tests/test_kernels.py)")
    N, H, V = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (16384, 896, 151936)
    torch.manual_seed(0)
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")

    def bench(fn, iters=10):
        fn(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters * 1e3

    def fwd_bwd():
        x.grad = W.grad = None
        (fused_logprob(x, W, y) * g).sum().backward()

    with torch.no_grad():
        t_mm = bench(lambda: x @ W.T)
        t_f = bench(lambda: fused_logprob(x, W, y))
    t_fb = bench(fwd_bwd, 5)
    print(f"N={N} H={H} V={V} bf16  x@W.T {t_mm:.2f} ms  fused fwd {t_f:.2f} ms ({t_f / t_mm:.2f}x)  "
          f"fwd+bwd {t_fb:.2f} ms")
