"""Shared fixtures and helpers.

Threads: every test runs on TEST_THREADS CPU threads (environment variable, default 1: the suite has to
stay fast on a 2-core machine that is busy with other work). `TEST_THREADS=2 python -m pytest -q` runs
the same suite with two intra-op threads, which changes how some CPU kernels split their reductions:
the suite must pass both ways, so no test may depend on the rounding of one thread count. The trainer
configs in the tests pass `threads=TEST_THREADS` (sft/grpo/dpo main call torch.set_num_threads with it);
the exception is tests/test_distributed.py, whose two worker processes keep one thread each (two
processes already use both cores; the one-process reference runs with one thread as well).

Floating point: a test never asserts bitwise equality between two different computations (other
shapes, chunkings, paddings, kernels, thread counts); it compares with a tolerance derived from the
arithmetic (see dot_tol). Bitwise checks are kept only where the same code runs on the same shapes on
the same machine (resume == uninterrupted run, the same call twice), or where IEEE arithmetic makes
the result exact by construction; each says why in a comment. Greedy decodings of two different
implementations are compared with greedy_agreement, which accepts a difference only at a near-tie.
"""
import math
import os

import pytest
import torch

import model as M

TEST_THREADS = int(os.environ.get("TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _test_threads():
    # sft.main / grpo.main / dpo.main set the thread count from their config; put it back after every test.
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture
def tiny():
    """A fresh built-in tiny model (random weights, seed 0) and its tokenizer."""
    return M.load("tiny", seed=0)


@pytest.fixture(scope="session")
def tok():
    return M.build_char_tokenizer()


# -----------------------------------------------------------------------------
# Rounding tolerances

def unit_roundoff(dtype=torch.float32):
    """u = 2^-24 for fp32, 2^-53 for fp64: the relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def dot_tol(n, abs_sum, dtype=torch.float32):
    """How far two evaluations of the same length-n sum (dot product) in `dtype` can be apart when they
    add in different orders (blocking, chunking, threads): each is within gamma_n * sum|terms| of the
    exact value (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5; gamma_n = n u / (1 - n u)),
    so the two are within 2 gamma_n * sum|terms|. abs_sum: sum |x_i y_i| (a number or a tensor)."""
    nu = n * unit_roundoff(dtype)
    return 2 * nu / (1 - nu) * abs_sum


# Two fp32 evaluations of the same forward quantity (a logit, a token log-prob) that differ only in
# padding, batch width, chunking, KV cache vs full forward, kernels or thread count add the same terms in
# other orders. Every reduction in the tiny test models is shorter than 1024 terms (hidden size 128, MLP
# width 512, vocabulary 105, sequences <= 64), and each is within gamma_K * sum|terms| of its exact value,
# so two orders are within 2 gamma_1024 = 2 * 1024 * 2^-24 ~ 1.2e-4 of the terms' magnitude. That is the
# relative tolerance used on such quantities, taken relative to their own magnitude (a row of logits: its
# largest |logit|; a log-prob z_y - logsumexp(z) ~ -log V: at least the size of its terms, as |z| <~ 1).
# It is a worst-case bound per reduction; what is observed is ~100x smaller (HF generate's scores vs a
# plain forward: <= 2e-5 at |logit| <= 26; a DPO pair's summed log-probs with other padding: 1 ulp).
FP32_RTOL = 2 * 1024 * 2 ** -24


def logprob_tol(dz, S, V, dtype=torch.float32):
    """Tolerances (log p, entropy) between two evaluations of log p = z_y - lse(z) and of the entropy
    lse - E_p[z] over V classes, from logits that differ by at most dz and have |z| <= S (numbers or
    per-row tensors). log p: z_y and lse each move by <= dz, plus each evaluation's own rounding of lse
    (its V-term sum is within gamma_V relative, i.e. absolute in the log: dot_tol(V, 1) for the two) and
    a few ulps of |lse| <= S + log V. Entropy: lse and E_p[z] both move by E_p[dz] to first order; what
    is left is Cov_p(z, dz) <= 2S * 2dz, plus the rounding of its two V-term sums."""
    r = 8 * unit_roundoff(dtype) * (S + math.log(V))
    return (2 * dz + dot_tol(V, 1.0, dtype) + r,
            4 * S * dz + dot_tol(V, S, dtype) + dot_tol(V, 1.0, dtype) + r)


def model_logprob_tol(model, input_ids, attention_mask, temperature=1.0):
    """logprob_tol for two fp32 evaluations of a model's token log-probs (and entropies) of these
    sequences at this temperature that differ in padding, batch width, KV cache vs full forward, chunking
    or threads: the logits z / T are within FP32_RTOL * S of each other, S = max |z| / T (one forward)."""
    with torch.no_grad():
        z = model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=M.position_ids(attention_mask)).logits
    S = float(z.abs().max()) / temperature
    return logprob_tol(FP32_RTOL * S, S, z.shape[-1])


# -----------------------------------------------------------------------------
# Greedy decoding: token for token, except at a near-tie

def greedy_agreement(model, prompt_ids, prompt_mask, got, want, pad_id, suppress=(), rtol=FP32_RTOL):
    """Check two greedy decodings of the same left-padded prompts (prompt_ids, prompt_mask (B, P)):
    completions got, want (B, C1), (B, C2), pad after a row's EOS. A row must equal want token for token,
    or else, at its first difference t, be a near-tie: under the logits of want's prefix (one plain forward,
    fp32), got's token at t is within rtol * max|logit| of the best (suppressed ids excluded): two
    computations of the same logits may swap a near-tie of the argmax (FP32_RTOL). Returns a
    (B,) bool tensor: the rows that are identical (the usual case: then both tensors are equal)."""
    C = max(got.shape[1], want.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, C - x.shape[1]), value=pad_id)
    g, w = pad(got).cpu(), pad(want).cpu()
    same = (g == w).all(1)
    if bool(same.all()):
        return same
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, w.to(prompt_ids.device)], 1)
    attn = torch.cat([prompt_mask, torch.ones_like(w, device=prompt_mask.device)], 1)  # causal: positions <= t
    with torch.no_grad():                                                             # are real tokens
        logits = model(input_ids=ids, attention_mask=attn, position_ids=M.position_ids(attn)).logits
    logits = logits[:, P - 1:P - 1 + C].float().cpu()
    if suppress:
        logits[..., list(suppress)] = float("-inf")
    for b in (~same).nonzero().flatten().tolist():
        t = int((g[b] != w[b]).nonzero()[0])
        row = logits[b, t]
        gap = float(row.max() - row[g[b, t]])
        scale = float(row[torch.isfinite(row)].abs().max())
        assert gap <= rtol * max(scale, 1.0), f"row {b} differs at step {t}: not a near-tie (gap {gap:.3g})"
    return same
