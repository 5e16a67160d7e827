"""kernels/: the Triton kernels against their plain-PyTorch references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (numpy, fp32: the interpreter has no bf16 math),
so these tests exercise the very kernel code CI cannot compile. triton reads the variable when a kernel
is decorated, i.e. when kernels.logprob is first imported: the trainers import the kernel modules only
for CUDA tensors, so on a CPU machine this file is the first to import them. With a GPU the same tests
run on it (fp32, full-precision dots), and the bf16 / large-shape tests below run too.
"""
import json
import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
if not CUDA and "kernels.logprob" in sys.modules and not sys.modules["kernels.logprob"].INTERPRET:
    pytest.skip("kernels.logprob was imported before TRITON_INTERPRET was set", allow_module_level=True)

import grpo  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402
from conftest import TEST_THREADS, dot_tol, unit_roundoff  # noqa: E402
from kernels.advantage import group_advantages_triton  # noqa: E402
from kernels.logprob import Tiles, dlogits, fused_logprob, logprob_reference, row_stats  # noqa: E402
from kernels.loss_head import fused_loss_head, loss_head_reference  # noqa: E402
from rollout import Rollout  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def problem(N, H, V, seed=0, ignored=0.3):
    """x (N, H), W (V, H) in float64 at realistic scales, targets with ~30% ignore_index rows, and
    random upstream gradients for log p and entropy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.2
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignored] = -100
    return x, W, y, torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)


def run(fn, x, W, y, g_lp, g_ent, T, dtype, **kw):
    xd = x.detach().to(DEV, dtype).requires_grad_()
    Wd = W.detach().to(DEV, dtype).requires_grad_()
    lp, ent = fn(xd, Wd, y.to(DEV), T, entropy=True, **kw)
    ((lp * g_lp.to(DEV, lp.dtype)).sum() + (ent * g_ent.to(DEV, ent.dtype)).sum()).backward()
    return [t.detach().double().cpu() for t in (lp, ent, xd.grad, Wd.grad)]


@pytest.fixture
def switch(monkeypatch):
    """switch(True/False): the kernels on / off for every tensor, CPU ones included (under the
    interpreter); the default mode comes back after the test."""
    monkeypatch.setattr(kernels, "active", lambda t: kernels._mode == "auto")
    yield lambda on: kernels.set_mode("auto" if on else "off")
    kernels.set_mode("auto")


def close(a, b, tol=1e-5, name=""):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


# -----------------------------------------------------------------------------
# Log-probs

@pytest.mark.parametrize("N,H,V,T,tiles", [
    (1, 64, 1000, 1.0, {}),
    (37, 80, 1003, 0.7, {}),
    (130, 64, 1003, 1.3, {"v_per_split": 256}),       # 4 vocabulary splits, combined afterwards
    (130, 80, 1000, 0.7, {"block_h": 32, "v_per_split": 512}),   # H tail masked (80 = 2 x 32 + 16)
])
def test_logprob_entropy_and_grads_match_float64(N, H, V, T, tiles):
    """log p, entropy, dX and dW (gradient of sum(g1 log p + g2 entropy)) against float64 autograd."""
    x, W, y, g1, g2 = problem(N, H, V)
    ref = run(logprob_reference, x, W, y, g1, g2, T, torch.float64)
    out = run(fused_logprob, x, W, y, g1, g2, T, torch.float32, tiles=Tiles(**tiles), chunk_rows=50)
    for name, a, b in zip(("logp", "entropy", "dX", "dW"), out, ref):
        close(a, b, name=name)
    valid = y != -100
    assert (out[0][~valid] == 0).all() and (out[2][~valid] == 0).all()    # ignored rows: 0, no gradient
    assert (out[0][valid] < 0).all() and (out[1][valid] > 0).all()


HEADS = {"bias": dict(bias=True), "scale": dict(scale=0.3), "softcap": dict(softcap=2.0),
         "all": dict(bias=True, scale=1.7, softcap=3.0)}   # Phi / Cohere, Granite / Gemma 2 and 3


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_model_heads_match_float64(head):
    """The model's head in the kernels (bias, logit scale, soft cap: kernels.head_logits), at logits of
    about +-2 std, where a cap of 2-3 bends them: log p, entropy and the gradients of x, W and the bias,
    for fused_logprob and for the fused loss head (2 row chunks), against float64 autograd."""
    N, H, V = 37, 80, 1003
    x, W, y, g1, g2 = problem(N, H, V, seed=5)
    b = torch.randn(V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def grads(fn, dtype, loss_head=False, **kw):
        xd, Wd, bd = (t.detach().to(DEV, dtype).requires_grad_() for t in (x, W, b))
        h = {**head, "bias": bd if head.get("bias") else None}
        if loss_head:   # an SFT-like loss: sum of g1-weighted log-probs
            out = fn(xd.view(1, N, H), Wd, y.view(1, N).to(DEV), lambda lp, rows: lp * g1.to(DEV, lp.dtype)[rows],
                     lambda lt: lt.sum(), 0.7, **h, **kw)
            out[0].backward()
            out = [out[0], out[1].view(-1)]
        else:
            out = list(fn(xd, Wd, y.to(DEV), 0.7, entropy=True, **h, **kw))
            ((out[0] * g1.to(DEV, out[0].dtype)).sum() + (out[1] * g2.to(DEV, out[1].dtype)).sum()).backward()
        out += [xd.grad, Wd.grad] + ([bd.grad] if head.get("bias") else [])
        return [t.detach().double().cpu() for t in out]

    tiles = dict(tiles=Tiles(), chunk_rows=20)
    for name, a, r in zip(("logp", "entropy", "dX", "dW", "dbias"), grads(fused_logprob, torch.float32, **tiles),
                          grads(logprob_reference, torch.float64)):
        close(a, r, name=name)
    for name, a, r in zip(("loss", "logp", "dX", "dW", "dbias"),
                          grads(fused_loss_head, torch.float32, True, **tiles),
                          grads(loss_head_reference, torch.float64, True)):
        close(a, r, name="loss head " + name)


def test_logprob_without_entropy_in_the_loss():
    """entropy=False returns log p alone; its gradient is the log p term only."""
    x, W, y, g1, _ = problem(37, 64, 1003, seed=1)
    xd, Wd = x.float().to(DEV).requires_grad_(), W.float().to(DEV).requires_grad_()
    (fused_logprob(xd, Wd, y.to(DEV), 0.7) * g1.float().to(DEV)).sum().backward()
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    (logprob_reference(xr, Wr, y, 0.7) * g1).sum().backward()
    close(xd.grad.double().cpu(), xr.grad)
    close(Wd.grad.double().cpu(), Wr.grad)


def test_all_ignored_batch_gives_zeros():
    x, W, y, g1, g2 = problem(37, 64, 1000, ignored=1.0)
    lp, ent, dx, dw = run(fused_logprob, x, W, y, g1, g2, 1.0, torch.float32)
    assert (lp == 0).all() and (ent == 0).all() and (dx == 0).all() and (dw == 0).all()


def test_grad_and_nograd_passes_are_bitwise_equal():
    """The old/reference log-probs (no grad) and the training pass are the same numbers, so GRPO's
    ratio is exactly 1 on-policy; and the backward's chunking changes the gradients by rounding only."""
    x, W, y, _, _ = problem(130, 80, 1003, seed=2, ignored=0.0)
    x, W, y = x.float().to(DEV), W.float().to(DEV), y.to(DEV)
    with torch.no_grad():
        a, ea = fused_logprob(x, W, y, 0.7, entropy=True)
    xg = x.clone().requires_grad_()
    b, eb = fused_logprob(xg, W, y, 0.7, entropy=True)
    # Bitwise by construction: grad mode only decides whether autograd records the call; the forward is
    # the same launch of the same kernel on the same inputs and shapes (no atomics, fixed-order loops).
    assert torch.equal(a, b) and torch.equal(ea, eb)
    b.sum().backward()
    xh = x.clone().requires_grad_()
    fused_logprob(xh, W, y, 0.7, chunk_rows=16).sum().backward()
    # dX = dlogits @ W: dlogits is elementwise (the same numbers with either chunking), the matmul over
    # V = 1003 runs on 16-row instead of 130-row blocks, which may add in another order. With g = 1,
    # dlogits_v = (onehot_v - p_v) / T, so sum_v |dlogits_v| <= 2 / T and sum_v |dlogits_v W_vh| <=
    # (2 / T) max_v |W_vh|: the two are within dot_tol(V, that) (tests/conftest.py). Seen: 9e-7, ~0.4% of it.
    tol = dot_tol(1003, 2 / 0.7 * W.abs().max(0).values)                      # (H,)
    assert ((xg.grad - xh.grad).abs() <= tol).all()


def test_compiled_variants_do_not_depend_on_the_row_count(monkeypatch):
    """On a GPU each distinct value of a constexpr argument is a compilation of its own (seconds), and
    the number of rows (B x completion length) changes with every GRPO batch: the constexpr arguments
    of every launch of the two logits kernels are the same for 37 rows as for 130 (forward + backward)."""
    import inspect

    import triton.language as tl

    import kernels.logprob as L
    launches = []

    class Spy:
        def __init__(self, kernel):
            fn = getattr(kernel, "fn", kernel)
            self.kernel = kernel
            self.const = {k for k, p in inspect.signature(fn).parameters.items() if p.annotation is tl.constexpr}

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append({k: v for k, v in kw.items() if k in self.const})
                return self.kernel[grid](*args, **kw)
            return launch
    for name in ("_stats_kernel", "_dlogits_kernel"):
        monkeypatch.setattr(L, name, Spy(getattr(L, name)))
    keys = []
    for N in (37, 130):
        x, W, y, g1, g2 = problem(N, 64, 1000, seed=N)
        launches.clear()
        run(fused_logprob, x, W, y, g1, g2, 0.7, torch.float32)
        keys.append(list(launches))
    assert len(keys[0]) == 2 and keys[0] == keys[1]


def test_model_logprobs_use_the_kernel_when_active(monkeypatch):
    """model.token_logprobs goes through the kernel when the switch says so, with the same numbers
    as the PyTorch path; set_mode('off') turns it back."""
    kernels.set_mode("off")
    m, tok = M.load("tiny", device=DEV, dtype=torch.float32, seed=0)
    ids = torch.randint(10, len(tok), (3, 12))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0
    ids, attn = ids.to(DEV), attn.to(DEV)
    ref = M.token_logprobs(m, ids, attn, 6, temperature=0.8)
    kernels.set_mode("auto")
    calls = []
    monkeypatch.setattr(kernels, "active", lambda t: calls.append(1) or kernels._mode == "auto")
    lp = M.token_logprobs(m, ids, attn, 6, temperature=0.8)
    assert calls                                   # the kernel ran ...
    close(lp, ref)                                 # ... and gave the same numbers
    kernels.set_mode("off")
    try:  # the very call that made ref, again (same code, inputs and shapes): bitwise
        assert torch.equal(M.token_logprobs(m, ids, attn, 6, temperature=0.8), ref)
    finally:
        kernels.set_mode("auto")
    with pytest.raises(ValueError, match="--kernels"):
        kernels.set_mode("on")


# -----------------------------------------------------------------------------
# Group advantages

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("rloo", [False, True])
def test_advantage_kernel_matches_reference(scale, rloo):
    g = torch.Generator().manual_seed(3)
    for P, G in [(6, 8), (5, 1), (300, 3)]:       # G = 1: nothing to compare, all zero
        r = torch.randn(P * G, generator=g)
        r[::7] = math.nan                           # unscorable completions
        r[:G] = math.nan                            # a whole group unscorable
        if G > 1:
            r[G:2 * G] = 0.5                        # a group with equal rewards: advantage 0
        ref = grpo.group_advantages_torch(r, G, scale, "rloo" if rloo else "grpo")
        # the trainer's own: r is a CPU tensor, so grpo.group_advantages runs group_advantages_torch, the
        # very function the reference is: same code, same input, bitwise
        assert torch.equal(ref, grpo.group_advantages(r, G, scale, "rloo" if rloo else "grpo"))
        out = group_advantages_triton(r.to(DEV), G, scale, rloo).cpu()
        close(out, ref, 1e-5)
        assert (out[:G] == 0).all() and not out.isnan().any()
        if G == 1:
            assert (out == 0).all()


def test_advantage_hand_computed():
    # one group [1, 2, 3, nan]: mean 2, unbiased std 1 -> (-1, 0, 1)/(1 + 1e-4), nan -> 0
    r = torch.tensor([1.0, 2.0, 3.0, math.nan])
    close(group_advantages_triton(r.to(DEV), 4).cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0]) / (1 + 1e-4))
    # RLOO without scaling: r_i - mean of the others
    close(group_advantages_triton(r.to(DEV), 4, "none", rloo=True).cpu(), torch.tensor([-1.5, 0.0, 1.5, 0.0]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages_triton(r, 4, "groups")


# -----------------------------------------------------------------------------
# The fused loss head, through the trainers' own code paths

def rollout_batch(tok, B=6, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok), (B, 5 + C), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0                                                # a left-padded prompt
    mask = (torch.rand(B, C, generator=g) > 0.25).float()
    mask[1] = 0                                                    # a sequence with no tokens
    return ids.to(DEV), attn.to(DEV), mask.to(DEV), torch.randn(B, generator=g).to(DEV)


def model_grads(m):
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("loss_type,off_policy,beta,kl", [
    ("grpo", False, 0.0, "k3"), ("dapo", True, 0.04, "k3"), ("dr_grpo", True, 0.1, "k1"), ("dapo", False, 0.1, "k2"),
    ("cispo", True, 0.0, "k3"), ("sapo", True, 0.04, "k3")])
def test_grpo_loss_head_matches_pytorch_loss(switch, loss_type, off_policy, beta, kl):
    """grpo.micro_batch_loss with the fused head == with log-probs + per_token_loss + aggregate: the
    loss, every logged statistic and the gradient of every parameter of the model."""
    m, tok = M.load("tiny", device=DEV, dtype=torch.float32, seed=0)
    ids, attn, mask, adv = rollout_batch(tok)
    B, C = mask.shape
    cfg = grpo.GRPOConfig(loss_type=loss_type, beta=beta, kl_estimator=kl, max_new_tokens=C + 2, temperature=0.9)
    switch(False)
    with torch.no_grad():
        base = M.token_logprobs(m, ids, attn, C, 0.9)
    g = torch.Generator().manual_seed(1)
    # off-policy: ratios spread across both clip edges
    old = base + 0.4 * torch.randn(B, C, generator=g).to(DEV) if off_policy else None
    ref = base + 0.3 * torch.randn(B, C, generator=g).to(DEV) if beta else None
    n_tok = int(mask.sum())

    def step():
        m.zero_grad(set_to_none=True)
        roll = Rollout(ids, attn, mask, torch.zeros_like(mask), torch.zeros(B, dtype=torch.bool), ids.shape[1] - C)
        batch = grpo.Batch(roll, [None] * B, [""] * B, None, None, advantages=adv, old_logp=old, ref_logp=ref)
        loss, st, ent = grpo.micro_batch_loss(cfg, m, batch, slice(0, B), B, n_tok)
        loss.backward()
        return loss.detach(), st, ent.detach(), model_grads(m)

    l0, st0, e0, g0 = step()
    switch(True)
    l1, st1, e1, g1 = step()
    close(l1, l0)
    close(e1, e0)
    for k in ("ratio", "clip_low", "clip_high", "kl"):
        if st0[k] is None:
            assert st1[k] is None
        else:
            close(st1[k], st0[k])
    if off_policy:   # both clip branches exercised (CISPO has no lower bound)
        assert (st0["clip_low"].sum() > 0) == (loss_type != "cispo") and st0["clip_high"].sum() > 0
    for a, b in zip(g1, g0):
        close(a, b)


def test_sft_loss_head_matches_pytorch_loss(switch):
    m, tok = M.load("tiny", device=DEV, dtype=torch.float32, seed=0)
    ids, attn, mask, _ = rollout_batch(tok, seed=2)
    switch(False)
    m.zero_grad()
    l0 = sft.batch_loss(m, ids, attn, mask)
    l0.backward()
    g0 = model_grads(m)
    switch(True)
    m.zero_grad()
    l1 = sft.batch_loss(m, ids, attn, mask)
    l1.backward()
    close(l1.detach(), l0.detach())
    for a, b in zip(model_grads(m), g0):
        close(a, b)


def test_loss_head_float64_reference_and_logp_vs_fused_logprob():
    """Against float64 autograd on raw tensors (odd shape, 3 row chunks, temperature 0.7); the head's
    log-probs are those of fused_logprob (the no-grad old-log-prob pass): to rounding with another row
    chunking, bitwise with the same one under the interpreter."""
    x, W, y, _, _ = problem(3 * 37, 80, 1003, seed=4, ignored=0.0)
    h, y = x.view(3, 37, 80), y.view(3, 37)
    mask = (torch.rand(3, 37, generator=torch.Generator().manual_seed(5)) > 0.3).double()
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    A = adv[:, None].expand(3, 37).reshape(-1)
    per_token = lambda lp, rows: -torch.exp((lp - lp.detach()).clamp(-20, 20)) * A[rows].to(lp.device, lp.dtype)
    reduce = lambda lt: grpo.aggregate(lt, mask.to(lt.device, lt.dtype), "grpo", 3, int(mask.sum()), 40)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    l0, lp0, _ = loss_head_reference(hr, Wr, y, per_token, reduce, 0.7)
    l0.backward()
    hf, Wf = h.float().to(DEV).requires_grad_(), W.float().to(DEV).requires_grad_()
    l1, lp1, _ = fused_loss_head(hf, Wf, y.to(DEV), per_token, reduce, 0.7, chunk_rows=40)
    l1.backward()
    close(l1.double().cpu(), l0)
    close(lp1.double().cpu(), lp0)
    close(hf.grad.double().cpu(), hr.grad)
    close(Wf.grad.double().cpu(), Wr.grad)
    xf, yf = hf.detach().view(-1, 80), y.to(DEV).view(-1)
    with torch.no_grad():
        whole = fused_logprob(xf, Wf, yf, 0.7).view(3, 37)
    # All 111 rows at once vs the head's chunks of 40: a row sits at another place in its row tile, and the
    # tile's matmul (BLAS under the interpreter, where the other CPU's differed; MMA on a GPU) need not add
    # in the same order there.
    # Each logit z_j = x.W_j / T is then within dot_tol(H, sum_h |x_h W_jh|) / T; logp = z_y - lse moves
    # by at most 2 max_j |dz_j|, plus the two roundings of the V-term sum inside lse (dot_tol(V, 1): a
    # relative error of the sum is an absolute one of its log) and a few ulps of |lse| <= max|z| + log V.
    a = (h.abs() @ W.abs().T).max(-1).values / 0.7                             # (3, 37): max_j sum_h |x W| / T
    tol = 2 * dot_tol(80, a) + dot_tol(1003, 1.0) + 8 * unit_roundoff() * (a + math.log(1003))
    assert ((whole.double().cpu() - lp1.double().cpu()).abs() <= tol).all()
    if not CUDA:
        # Bitwise by construction under the interpreter: the head's second chunk (rows 40-79) and
        # fused_logprob on the same 40 rows run the same kernel code (row_stats; STORE_Z only adds a store
        # of z) on the same inputs and tiles, i.e. the same numpy operations. (On a GPU they are two
        # compilations, STORE_Z being a constexpr, and may contract differently: the tolerance above only.)
        with torch.no_grad():
            assert torch.equal(fused_logprob(xf[40:80], Wf, yf[40:80], 0.7), lp1.view(-1)[40:80])


def test_dlogits_from_stored_fp32_logits_rounded_once_into_bf16():
    """The fused head's bf16 path: the statistics kernel stores the chunk's logits in fp32, dlogits reads
    them and writes into a separate bf16 workspace, rounding once: within one bf16 ulp (2^-7 relative;
    the interpreter truncates, a GPU rounds to nearest) of the fp32 gradient, which is the float64 one,
    the small g (1 - p) / T of confident targets included. The fp32 path overwrites the logits in place.
    Logits stored in bf16 are refused: p = exp(z_bf16 - lse_fp32) rows would not sum to 1."""
    x, W, y, g, _ = problem(37, 64, 1003, seed=9, ignored=0.2)
    W, T = W * 4, 0.7                                        # logits up to ~40: peaked distributions
    u = x @ W.T                                              # float64 reference logits
    y[:12] = u[:12].argmax(1)                                # confident targets
    p = torch.softmax(u / T, -1)
    assert (p[torch.arange(12), y[:12]] > 0.9).sum() >= 3
    g = torch.where(y != -100, g, 0.0)
    ref = g[:, None] * (torch.nn.functional.one_hot(y.clamp(min=0), 1003) - p) / T    # d sum(g log p) / d u
    xs, Ws, ys, gs, tiles = x.float().to(DEV), W.float().to(DEV), y.to(DEV), g.float().to(DEV), Tiles()
    z = torch.empty(37, 1003, device=DEV)
    _, _, lse, mu = row_stats(xs, Ws, ys, T, -100, tiles, z_out=z)
    half = torch.full((37, 1003), float("nan"), device=DEV, dtype=torch.bfloat16)
    dlogits(xs, Ws, ys, lse, mu, gs, None, T, tiles, half, z=z)
    with pytest.raises(ValueError, match="float32"):
        dlogits(xs, Ws, ys, lse, mu, gs, None, T, tiles, half, z=z.bfloat16())
    full = dlogits(xs, Ws, ys, lse, mu, gs, None, T, tiles, z, z=z)           # in place
    close(full.double().cpu(), ref, name="fp32 dlogits")
    assert ((half.float() - full).abs() <= full.abs() * 2 ** -7).all()


# -----------------------------------------------------------------------------
# GPU only: bf16 accuracy (Cut-Cross-Entropy's criterion) and int64 offsets

@gpu
def test_bf16_error_no_worse_than_pytorch_bf16():
    """|ours - fp32| <= |torch bf16 - fp32| + 1e-2 elementwise, for log p, entropy, dX, dW."""
    x, W, y, g1, g2 = problem(2048, 896, 32003, seed=6)
    gt = run(logprob_reference, x, W, y, g1, g2, 0.7, torch.float32)
    ref = run(logprob_reference, x, W, y, g1, g2, 0.7, torch.bfloat16)
    ours = run(fused_logprob, x, W, y, g1, g2, 0.7, torch.bfloat16)
    for name, o, r, t in zip(("logp", "entropy", "dX", "dW"), ours, ref, gt):
        assert ((o - t).abs() <= (r - t).abs() + 1e-2).all(), name


@gpu
def test_loss_head_bf16_error_no_worse_than_pytorch_bf16():
    """The fused loss head in bf16 (a weighted NLL), same criterion, for dX and dW. Peaked distributions
    (|logit| up to ~40 at T = 0.7): the regime where the head's stored logits must stay fp32."""
    x, W, y, g, _ = problem(2048, 896, 32003, seed=6)
    gd = g.float().to(DEV)
    per_token = lambda lp, rows: -lp * gd[rows].to(lp.dtype)
    reduce = lambda lt: lt.sum()

    def grads(fn, dtype):
        h = x.view(4, 512, 896).to(DEV, dtype).requires_grad_()
        Wd = W.to(DEV, dtype).requires_grad_()
        fn(h, Wd, y.view(4, 512).to(DEV), per_token, reduce, 0.7)[0].backward()
        return [t.detach().double().cpu() for t in (h.grad, Wd.grad)]
    gt = grads(loss_head_reference, torch.float32)
    ref = grads(loss_head_reference, torch.bfloat16)
    ours = grads(fused_loss_head, torch.bfloat16)
    for name, o, r, t in zip(("dX", "dW"), ours, ref, gt):
        assert ((o - t).abs() <= (r - t).abs() + 1e-2).all(), name


@gpu
def test_int64_offsets_beyond_2_pow_31():
    """N * V > 2^31 (Qwen2.5-0.5B vocabulary, 16384 rows), and one chunk of all N rows, so the (chunk, V)
    logits / dlogits workspaces of the backward and of the loss head have more than 2^31 elements: rows
    near the end are right (log p, dX), in fused_logprob and in the fused loss head."""
    N, H, V = 16384, 128, 151936
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(N, H, device="cuda", generator=g).bfloat16()
    W = (torch.randn(V, H, device="cuda", generator=g) * 0.1).bfloat16()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[-1] = V - 1
    with torch.no_grad():
        lp = fused_logprob(x, W, y)
        tail = logprob_reference(x[-64:].float(), W.float(), y[-64:])
    assert N * V > 2 ** 31 and lp.isfinite().all()
    close(lp[-64:], tail, 2e-2)
    xr = x[-64:].float().requires_grad_()
    logprob_reference(xr, W.float(), y[-64:]).sum().backward()
    xg = x.clone().requires_grad_()
    fused_logprob(xg, W, y, chunk_rows=N).sum().backward()
    close(xg.grad[-64:].float(), xr.grad, 2e-2, "fused_logprob dX")
    xh = x.clone().requires_grad_()
    loss, lph, _ = fused_loss_head(xh.view(1, N, H), W, y.view(1, N), lambda lp, rows: lp, lambda lt: lt.sum(),
                                   chunk_rows=N)
    loss.backward()
    # the head (STORE_Z) and fused_logprob are two compilations of the statistics kernel: to rounding, as
    # in test_loss_head_float64_reference_and_logp_vs_fused_logprob (bf16 products are exact in the fp32
    # accumulator, so fp32 bounds apply; a row's tiles and V-loop are the same in both)
    # (max_j sum_h |x_h W_jh| <= sum_h |x_h| max_j |W_jh|: no (N, V) matrix for the bound)
    a = x.float().abs() @ W.float().abs().max(0).values                          # (N,)
    tol = 2 * dot_tol(H, a) + dot_tol(V, 1.0) + 8 * unit_roundoff() * (a + math.log(V))
    assert ((lph.view(-1) - lp).abs() <= tol).all()
    close(xh.grad[-64:].float(), xr.grad, 2e-2, "loss head dX")


@pytest.mark.skipif(CUDA, reason="CPU run under the interpreter (on a GPU the trainers load bf16 models)")
def test_grpo_main_with_kernels_equals_without(tmp_path, monkeypatch):
    """Two GRPO steps of grpo.main (PPO reuse, KL to a reference, RLOO advantages) with every kernel
    switched in (advantages, old/ref log-probs, loss head) log the same metrics and end at the same
    weights as --kernels off."""
    kw = dict(init="scratch", num_prompts=2, num_generations=4, max_new_tokens=8, eval_n=0, eval_every=0,
              sample_every=0, save_every=0, threads=TEST_THREADS, steps=2, reward_funcs="toy_rewards:digit_fraction",
              lr=1e-3, num_iterations=2, beta=0.04, advantage="rloo", temperature=0.9)
    m_off, _, _ = grpo.main(grpo.GRPOConfig(out=str(tmp_path / "off"), kernels="off", **kw))
    used = []
    monkeypatch.setattr(kernels, "active", lambda t: used.append(1) or kernels._mode == "auto")
    m_on, _, _ = grpo.main(grpo.GRPOConfig(out=str(tmp_path / "on"), **kw))
    assert used
    read = lambda d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
    for a, b in zip(read("off"), read("on")):
        for k in ("reward", "loss", "grad_norm", "entropy", "kl", "ratio", "clip_ratio/region_mean"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    for p, q in zip(m_off.parameters(), m_on.parameters()):
        close(p.detach(), q.detach(), 1e-4)


@gpu
def test_gpu_bitwise_determinism_and_batch_invariance():
    """bf16 on the GPU: two calls are bitwise equal, a row's log p does not depend on the other rows of
    the batch, and the fused loss head's log p equals fused_logprob's to rounding (on-policy rho == 1
    up to rounding with --num-iterations > 1 too)."""
    x, W, y, _, _ = problem(4096, 896, 32003, seed=8, ignored=0.0)
    x, W, y = x.cuda().bfloat16(), W.cuda().bfloat16(), y.cuda()
    with torch.no_grad():
        a = fused_logprob(x, W, y)
        # the same launch on the same inputs: no atomics, every loop in a fixed order -> bitwise
        assert torch.equal(a, fused_logprob(x, W, y))
        # Batch invariance, bitwise by the kernel's construction: the same compiled kernel (the row count
        # is a runtime argument, not a constexpr), a row's logits come from tl.dot products of that row
        # alone (an MMA tile does not mix rows; the H loop has a fixed order), the V splits and their
        # combine depend on V only: no operation on a row involves another row or the row's position.
        assert torch.equal(a[1000:1300], fused_logprob(x[1000:1300], W, y[1000:1300]))
    _, lp, _ = fused_loss_head(x.view(8, 512, 896), W, y.view(8, 512), lambda lp, rows: lp, lambda lp: lp.sum())
    # the head is another compilation of the statistics kernel (STORE_Z): to rounding, as in
    # test_loss_head_float64_reference_and_logp_vs_fused_logprob (bf16 products are exact in fp32)
    s = (x.float().abs() @ W.float().abs().T).max(-1).values                    # (N,)
    tol = 2 * dot_tol(896, s) + dot_tol(32003, 1.0) + 8 * unit_roundoff() * (s + math.log(32003))
    assert ((lp.reshape(-1) - a).abs() <= tol).all()
