"""Fused loss head: a token-level loss (the SFT negative log-likelihood, the GRPO clipped surrogate
+ KL) straight from hidden states and the lm_head, with the gradient for x and W computed during the
forward.

    loss, logp, ent = fused_loss_head(hidden, W, targets, per_token, reduce, temperature)
    # sft.py:  per_token = lambda lp, rows: lp;            reduce = lambda lp: sft_loss(lp, mask)
    # grpo.py: per_token = per_token_loss on the rows;     reduce = lambda l: aggregate(l, mask, ...)

Why a separate path from kernels/logprob.py: when each token's loss depends only on that token's
log-prob, d loss / d logp is known as soon as the forward has logp. So each chunk of rows does: logits
tile by tile in Triton (online log-sum-exp; the chunk's logits kept in a (chunk, V) fp32 workspace) ->
per-token loss and d loss / d logp ((chunk,) vectors) -> dlogits = w g (onehot - p) / T from the stored
logits, written in the input dtype (over the logits themselves for fp32 inputs, to a second (chunk, V)
workspace for bf16: 6 bytes per logit, 1.9 GB at 2048 x 151936) -> cuBLAS dX = dlogits @ W,
dW += dlogits.T @ x. The logits stay fp32 because lse is the fp32 one: p from bf16-rounded logits
would not sum to 1 (see kernels.logprob.dlogits). Three matmuls in all,
against four for log-prob forward + backward (which has to recompute the logits). backward() only
scales the stored dX, dW by the upstream scalar gradient.

The per-token loss and the reduction are the trainer's own functions, so the head cannot drift from
them: d loss / d logp comes from autograd on (chunk,) vectors (exact: same clamps, same tie rule of
min), and the reduction, linear in the per-token losses for every loss_type, is turned into per-token
weights w once per micro-batch (its gradient at 0). GSPO's sequence-level ratio couples the tokens of a
sequence, and DPO's loss is not a sum of per-token terms: both keep the log-prob function.
"""
import torch

from kernels.logprob import Tiles, _check, chunk_matmuls, dlogits, grad_accumulators, logprob_reference, row_stats


# -----------------------------------------------------------------------------
# Reference: the same loss in plain PyTorch (what the trainers do with --kernels off)

def loss_head_reference(hidden, W, targets, per_token, reduce, temperature=1.0, bias=None, scale=1.0, softcap=0.0):
    """reduce(per_token(logp)) with logp from kernels.logprob.logprob_reference; autograd does the rest."""
    B, C, H = hidden.shape
    logp, ent = logprob_reference(hidden.reshape(-1, H), W, targets.reshape(-1), temperature, entropy=True,
                                  bias=bias, scale=scale, softcap=softcap)
    loss = reduce(per_token(logp, slice(0, B * C)).view(B, C))
    return loss, logp.detach().view(B, C), ent.detach().view(B, C)


# -----------------------------------------------------------------------------
# The autograd function: gradient in the forward

def reduction_weights(reduce, shape, device):
    """w (B, C) with reduce(l) == sum(w * l) for a reduction that is linear in the per-token losses
    (every loss_type is): the gradient of reduce at l = 0. Costs one tiny autograd call, no host sync."""
    with torch.enable_grad():
        u = torch.zeros(shape, device=device, dtype=torch.float32, requires_grad=True)
        (w,) = torch.autograd.grad(reduce(u), u)
    return w


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, targets, per_token, w, scale, softcap, temperature, ignore_index, chunk_rows, tiles):
        n, V = x.shape[0], W.shape[0]
        head = (bias, scale, softcap)
        dX, dW, db = grad_accumulators(x, W, bias)
        logp_all = torch.zeros(n, device=x.device, dtype=torch.float32)
        ent_all = torch.zeros_like(logp_all)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        rows = min(chunk_rows, max(n, 1))                     # the one chunk: fp32 logits, dlogits in x's dtype
        zbuf = torch.empty(rows, V, device=x.device, dtype=torch.float32)
        work = zbuf if x.dtype == torch.float32 else torch.empty(rows, V, device=x.device, dtype=x.dtype)
        for i in range(0, n, chunk_rows):
            j = min(i + chunk_rows, n)
            z = zbuf[:j - i]
            logp, ent, lse, mu = row_stats(x[i:j], W, targets[i:j], temperature, ignore_index, tiles, z_out=z,
                                           head=head)
            # per-token loss and d loss / d logp: elementwise on (chunk,) vectors, so autograd here is
            # exact and cheap, and follows the trainer's own formula (clamps, tie rules) by construction
            with torch.enable_grad():
                lp = logp.detach().requires_grad_()
                l = per_token(lp, slice(i, j)) * w[i:j]
                (g,) = torch.autograd.grad(l.sum(), lp)
            valid = targets[i:j] != ignore_index
            loss += torch.where(valid, l.detach(), 0.0).sum()
            g = torch.where(valid, g, 0.0).float().contiguous()
            dz = dlogits(x[i:j], W, targets[i:j], lse, mu, g, None, temperature, tiles, work[:j - i], z=z,
                         head=head)
            chunk_matmuls(dz, x, W, dX, dW, i, j, db)
            logp_all[i:j], ent_all[i:j] = logp, ent
        ctx.save_for_backward(dX, dW.to(W.dtype), None if db is None else db.to(bias.dtype))
        ctx.mark_non_differentiable(logp_all, ent_all)
        return loss, logp_all, ent_all

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        dX, dW, db = ctx.saved_tensors
        scaled = [None if t is None else (g_loss * t).to(t.dtype) for t in (dX, dW, db)]
        return (*scaled, None, None, None, None, None, None, None, None, None)


def fused_loss_head(hidden, W, targets, per_token, reduce, temperature=1.0, ignore_index=-100, chunk_rows=2048,
                    tiles=None, bias=None, scale=1.0, softcap=0.0):
    """loss = reduce(per_token(logp, rows).view(B, C)) from hidden (B, C, H), W (V, H), targets (B, C);
    logp under the model's head (bias, scale, softcap: kernels.head_logits), as in fused_logprob.

    per_token(lp (n,), rows): the losses of the flattened rows `rows` (a slice of range(B*C)) given their
    log-probs; must be elementwise in lp (the token-level GRPO ratio, the SFT NLL; not GSPO).
    reduce(loss_tok (B, C)) -> scalar: linear in loss_tok (grpo.aggregate, sft.sft_loss).
    Returns (loss, logp (B, C), entropy (B, C)); loss is differentiable in hidden, W and bias, logp and
    entropy are detached statistics (bitwise equal to kernels.logprob.fused_logprob's)."""
    B, C, H = hidden.shape
    x = hidden.reshape(-1, H).contiguous()
    t = targets.reshape(-1).contiguous().long()
    _check(x, W, t, (bias, scale, softcap))
    w = reduction_weights(reduce, (B, C), hidden.device).reshape(-1)
    loss, logp, ent = _FusedHead.apply(x, W.contiguous(), None if bias is None else bias.contiguous(), t, per_token,
                                       w, float(scale), float(softcap), float(temperature), int(ignore_index),
                                       int(chunk_rows), tiles or Tiles())
    return loss, logp.view(B, C), ent.view(B, C)
