"""Triton kernels for the two hot spots of post-training, each beside its plain-PyTorch reference:

    logprob.py    per-token log p(target) (+ entropy) straight from hidden states and the lm_head,
                  never materialising the (N, V) logits; exact backward
    loss_head.py  the SFT NLL and the GRPO clipped surrogate (+ KL) with the gradient computed in the
                  forward (three matmuls)
    advantage.py  group-relative advantages in one launch, no host sync

One switch decides who runs: `set_mode("auto")` (the default: kernels for CUDA tensors, the PyTorch
references elsewhere) or `set_mode("off")` (references everywhere). The kernel modules import triton
lazily, only when a CUDA tensor asks for them, so CPU runs never touch triton.

What they compute from hidden states x is the model's own logits, `head_logits` below: every causal LM
in transformers ends in x @ W.T (+ a bias), some then scale the result or soft-cap it (model.output_head
reads which from the model). The kernels apply the same three steps tile by tile.
"""
import torch

MODES = ("auto", "off")
_mode = "auto"


def set_mode(mode):
    global _mode
    if mode not in MODES:
        raise ValueError(f"--kernels must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def active(t):
    """True when tensor t should go through the Triton kernels."""
    return _mode == "auto" and t.is_cuda


def head_logits(x, W, bias=None, scale=1.0, softcap=0.0):
    """The logits a causal LM's forward makes of its last hidden states: z = (x @ W.T + bias) * scale, then
    softcap * tanh(z / softcap) when softcap > 0 (Gemma 2/3). x (n, H), W (V, H), bias (V,) or None ->
    (n, V). The matmul and the bias in x's dtype, as the model's nn.Linear does; the rest in fp32 (at least)."""
    z = torch.nn.functional.linear(x, W, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z
