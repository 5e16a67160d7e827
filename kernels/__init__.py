"""Triton kernels for the two hot spots of post-training, each beside its plain-PyTorch reference:

    logprob.py    per-token log p(target) (+ entropy) straight from hidden states and the lm_head,
                  never materialising the (N, V) logits; exact backward
    loss_head.py  the SFT NLL and the GRPO clipped surrogate (+ KL) with the gradient computed in the
                  forward (three matmuls)
    advantage.py  group-relative advantages in one launch, no host sync

One switch decides who runs: `set_mode("auto")` (the default: kernels for CUDA tensors, the PyTorch
references elsewhere) or `set_mode("off")` (references everywhere). The kernel modules import triton
lazily, only when a CUDA tensor asks for them, so CPU runs never touch triton.
"""
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
