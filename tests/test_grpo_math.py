"""grpo.py's small pure functions: advantages, KL estimators, clipped surrogate, aggregation, scoring.
Every expected number is worked out by hand in the test."""
import math

import pytest
import torch

from grpo import Batch, _nanstd, aggregate, group_advantages, kl_penalty, merge_rounds, per_token_loss, score
from rollout import Rollout

NAN = float("nan")
EPS = 1e-4


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


# -----------------------------------------------------------------------------
# group_advantages

R = torch.tensor([1., 0., 0., 1., 1., 1., 1., 0.])   # two groups of G = 4


def test_group_advantages_scale_group_hand_values():
    """(R - mean_g) / (unbiased std_g + 1e-4).
    Group 1 [1,0,0,1]: mean 0.5, squared deviations 4 * 0.25 = 1, var = 1/3, std = 0.577350.
    Group 2 [1,1,1,0]: mean 0.75, squared deviations 3 * 0.0625 + 0.5625 = 0.75, var = 0.25, std = 0.5."""
    s1, s2 = math.sqrt(1 / 3), 0.5
    exp = [0.5 / (s1 + EPS), -0.5 / (s1 + EPS), -0.5 / (s1 + EPS), 0.5 / (s1 + EPS),
           0.25 / (s2 + EPS), 0.25 / (s2 + EPS), 0.25 / (s2 + EPS), -0.75 / (s2 + EPS)]
    assert close(group_advantages(R, 4, "group"), exp)
    # the biased (n) std would give 0.5/0.5 = 1.0 for group 1: make sure that is not what we get
    assert not close(group_advantages(R, 4, "group")[0], 1.0, 1e-3)


def test_group_advantages_scale_batch_hand_values():
    """Centred by the group mean, divided by the unbiased std of all 8 rewards:
    mean 5/8, squared deviations 5 * 0.375^2 + 3 * 0.625^2 = 1.875, var = 1.875 / 7, std = 0.517549."""
    sb = math.sqrt(1.875 / 7)
    centred = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    assert close(group_advantages(R, 4, "batch"), [c / (sb + EPS) for c in centred])


def test_group_advantages_scale_none_and_rloo():
    """none: just centred. rloo: R_i - mean of the other three, e.g. 1 - (0+0+1)/3 = 2/3,
    0 - (1+1+1)/3 = -1; with scale group it is then divided by the group std."""
    assert close(group_advantages(R, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    rloo = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    assert close(group_advantages(R, 4, "none", estimator="rloo"), rloo)
    s1, s2 = math.sqrt(1 / 3), 0.5
    scaled = [v / (s1 + EPS) for v in rloo[:4]] + [v / (s2 + EPS) for v in rloo[4:]]
    assert close(group_advantages(R, 4, "group", estimator="rloo"), scaled)


def test_group_advantages_degenerate_groups():
    """G = 1, all-equal groups and all-NaN groups give exactly zero advantages. Exact by construction:
    G = 1 and NaN rows are zeroed by a where; four equal fp32 values a = 0.7f add up to exactly 4a in
    either possible order, ((a+a)+a)+a or (a+a)+(a+a) (checked), so the mean is a, every deviation 0
    and 0 / (0 + eps) = 0, whatever order the CPU's sum kernel uses."""
    assert torch.equal(group_advantages(torch.tensor([1., 0., 3.]), 1, "group"), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([1., 0., 3.]), 1, "none", estimator="rloo"), torch.zeros(3))
    same = torch.tensor([0.7, 0.7, 0.7, 0.7, 1., 0., 1., 0.])
    adv = group_advantages(same, 4, "group")
    assert torch.equal(adv[:4], torch.zeros(4))
    assert (adv[4:] != 0).all()
    all_nan = torch.tensor([NAN, NAN, NAN, NAN, 1., 0., 0., 1.])
    for scale in ("group", "batch", "none"):
        for est in ("grpo", "rloo"):
            adv = group_advantages(all_nan, 4, scale, estimator=est)
            assert torch.isfinite(adv).all()
            assert torch.equal(adv[:4], torch.zeros(4))


def test_group_advantages_nan_excluded_from_statistics():
    """A NaN reward gets advantage 0 and is left out of its group's mean and std.
    [1, NaN, 0, 0]: n = 3, mean 1/3, squared deviations 4/9 + 1/9 + 1/9 = 2/3, var = 1/3.
    rloo: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -1/2. A group with one scored sample gets 0."""
    r = torch.tensor([1., NAN, 0., 0., NAN, 5., NAN, NAN])
    s = math.sqrt(1 / 3)
    assert close(group_advantages(r, 4, "group"), [(2 / 3) / (s + EPS), 0, (-1 / 3) / (s + EPS), (-1 / 3) / (s + EPS),
                                                    0, 0, 0, 0])
    assert close(group_advantages(r, 4, "none", estimator="rloo"), [1, 0, -0.5, -0.5, 0, 0, 0, 0])
    # batch std over the 4 scored rewards [1, 0, 0, 5]: mean 1.5, sq dev 0.25+2.25+2.25+12.25 = 17, var 17/3
    sb = math.sqrt(17 / 3)
    assert close(group_advantages(r, 4, "batch"), [(2 / 3) / (sb + EPS), 0, (-1 / 3) / (sb + EPS),
                                                    (-1 / 3) / (sb + EPS), 0, 0, 0, 0])


def test_group_advantages_bad_scale():
    """An unknown scale_rewards value is an error, not a silent default."""
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(R, 4, "std")


def test_nanstd():
    """Unbiased std per row ignoring NaN; 0 for rows with fewer than 2 values."""
    x = torch.tensor([[1., 0., 0., 1.], [NAN, 2., 4., NAN], [NAN, NAN, NAN, NAN], [5., NAN, NAN, NAN]])
    assert close(_nanstd(x), [math.sqrt(1 / 3), math.sqrt(2), 0, 0])


# -----------------------------------------------------------------------------
# kl_penalty

def test_kl_penalty_hand_values():
    """x = logp - ref. k1 = x, k2 = x^2/2, k3 = exp(-x) + x - 1."""
    logp = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
    ref = torch.zeros(3, dtype=torch.float64)
    assert close(kl_penalty(logp, ref, "k1"), [0.5, -0.3, 0.0], 1e-12)
    assert close(kl_penalty(logp, ref, "k2"), [0.125, 0.045, 0.0], 1e-12)
    # exp(-0.5) = 0.6065306597, exp(0.3) = 1.3498588076
    assert close(kl_penalty(logp, ref, "k3"), [0.6065306597 - 0.5, 1.3498588076 - 1.3, 0.0], 1e-9)
    # only the difference matters
    assert close(kl_penalty(logp + 2.0, ref + 2.0, "k3"), kl_penalty(logp, ref, "k3"), 1e-12)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_k3_non_negative():
    """k3 >= 0 everywhere, 0 only at x = 0 (unlike k1, which is negative for x < 0)."""
    # integers / 100: x[1000] is exactly 0 (linspace's start + i * step may be fused into an FMA and
    # leave ~2e-16 there, depending on the CPU's vectorized kernel), the others are within 1 ulp of i / 100
    x = torch.arange(-1000, 1001, dtype=torch.float64) / 100
    k3 = kl_penalty(x, torch.zeros_like(x), "k3")
    assert (k3 >= 0).all()
    assert k3[1000] == 0 and (k3[torch.arange(2001) != 1000] > 0).all()


# -----------------------------------------------------------------------------
# per_token_loss

def test_per_token_loss_clipping_values_grads_and_indicators():
    """One token per row, eps_low 0.2, eps_high 0.28:
    row 0: ratio 1.5, A=+2 -> clipped above: loss -(1.28)(2) = -2.56, zero grad, clip_high
    row 1: ratio 0.5, A=-2 -> clipped below: loss -(0.8)(-2) = 1.6, zero grad, clip_low
    row 2: ratio 1.1, A=+2 -> inside: loss -2.2, d loss/d logp = -A*ratio = -2.2
    row 3: ratio 1.5, A=-2 -> min picks the unclipped term: loss 3.0, grad 3.0, no indicator
    row 4: ratio 0.5, A=+2 -> unclipped: loss -1.0, grad -1.0
    row 5: ratio 0.9, A=-1 -> inside: loss 0.9, grad 0.9"""
    ratios = torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5, 0.9], dtype=torch.float64)
    A = torch.tensor([2., -2., 2., -2., 2., -1.], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], dtype=torch.float64)[:, None]
    logp = (old + ratios.log()[:, None]).clone().requires_grad_(True)
    mask = torch.ones(6, 1, dtype=torch.float64)
    loss, st = per_token_loss(logp, old, A, mask, 0.2, 0.28)
    assert close(loss[:, 0].detach(), [-2.56, 1.6, -2.2, 3.0, -1.0, 0.9], 1e-9)
    assert close(st["ratio"][:, 0].detach(), ratios, 1e-9)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert close(g[:, 0], [0.0, 0.0, -2.2, 3.0, -1.0, 0.9], 1e-9)
    assert g[0, 0] == 0 and g[1, 0] == 0
    assert st["clip_high"][:, 0].tolist() == [1, 0, 0, 0, 0, 0]
    assert st["clip_low"][:, 0].tolist() == [0, 1, 0, 0, 0, 0]
    assert st["kl"] is None


def test_per_token_loss_log_ratio_clamped():
    """log ratio is clamped to +-20: a huge ratio stays finite (exp(20)) instead of overflowing."""
    logp = torch.tensor([[100.0]], requires_grad=True)
    loss, st = per_token_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.28)
    assert torch.isfinite(loss).all()
    assert math.isclose(st["ratio"].item(), math.exp(20), rel_tol=1e-5)


def test_gspo_sequence_ratio():
    """level='sequence': one ratio per row, exp(mean over masked tokens of log ratio).
    Row 0: log ratios [0.2, -0.1, 5.0 (masked)] -> exp(0.05) on all three tokens.
    Row 1: log ratios [0.3, 0.1, 0.2] all masked in -> exp(0.2).
    Unclipped (wide eps): loss = -ratio * A; the gradient w.r.t. each masked-in logp of the summed
    masked loss is -A * ratio * (L tokens) * (1/L) = -A * ratio; masked tokens get 0."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[0.2, -0.1, 5.0], [0.3, 0.1, 0.2]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1., 1., 0.], [1., 1., 1.]], dtype=torch.float64)
    A = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, st = per_token_loss(logp, old, A, mask, 10.0, 10.0, level="sequence")
    r0, r1 = math.exp(0.05), math.exp(0.2)
    assert close(st["ratio"].detach(), [[r0] * 3, [r1] * 3], 1e-12)
    assert close(loss.detach(), [[-r0] * 3, [2 * r1] * 3], 1e-12)
    (g,) = torch.autograd.grad((loss * mask).sum(), logp)
    assert close(g, [[-r0, -r0, 0.0], [2 * r1, 2 * r1, 2 * r1]], 1e-12)
    # with GSPO's small eps the sequence ratio exp(0.05) is clipped as a whole: -(1 + 4e-4) * A
    loss, st = per_token_loss(logp, old, A, mask, 3e-4, 4e-4, level="sequence")
    assert close(loss[0].detach(), [-(1 + 4e-4)] * 3, 1e-12)
    assert st["clip_high"][0].tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        per_token_loss(logp, old, A, mask, 0.2, 0.28, level="tokens")


def test_per_token_loss_with_kl():
    """beta > 0 adds beta * k3(logp - ref) to every token, and its gradient beta * (1 - exp(-x))."""
    torch.manual_seed(0)
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, dtype=torch.float64)
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    base, _ = per_token_loss(logp, logp.detach(), A, mask, 0.2, 0.28)
    with_kl, st = per_token_loss(logp, logp.detach(), A, mask, 0.2, 0.28, ref_logp=ref, beta=0.04)
    x = (logp - ref).detach()
    k3 = torch.exp(-x) + x - 1
    assert close(st["kl"].detach(), k3, 1e-12)
    assert close((with_kl - base).detach(), 0.04 * k3, 1e-12)
    (g_kl,) = torch.autograd.grad((with_kl - base).sum(), logp)
    assert close(g_kl, 0.04 * (1 - torch.exp(-x)), 1e-12)
    _, st1 = per_token_loss(logp, logp.detach(), A, mask, 0.2, 0.28, ref_logp=ref, beta=0.1, kl_estimator="k1")
    assert close(st1["kl"].detach(), x, 1e-12)


# -----------------------------------------------------------------------------
# aggregate

LOSS_TOK = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
MASK = torch.tensor([[1., 1., 1.], [1., 0., 0.]])


def test_aggregate_hand_values():
    """Rows of lengths 3 and 1, losses [1,2,3] and [4,(5),(6)]:
    grpo    = mean of row means = (2 + 4) / 2 = 3
    dapo    = token sum / tokens = (1+2+3+4) / 4 = 2.5
    dr_grpo = token sum / (B * max_len) = 10 / (2 * 5) = 1.0"""
    assert aggregate(LOSS_TOK, MASK, "grpo", 2, 4, 5).item() == pytest.approx(3.0)
    assert aggregate(LOSS_TOK, MASK, "dapo", 2, 4, 5).item() == pytest.approx(2.5)
    assert aggregate(LOSS_TOK, MASK, "dr_grpo", 2, 4, 5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(LOSS_TOK, MASK, "bnpo", 2, 4, 5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_aggregate_micro_batches_sum_to_full_batch(loss_type):
    """Aggregates of micro-batches (with the full batch's normalisers) sum to the full-batch aggregate."""
    g = torch.Generator().manual_seed(0)
    B, C = 7, 9
    lt = torch.randn(B, C, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3, 9])
    mask = (torch.arange(C)[None] < lengths[:, None]).double()
    n_tok = int(mask.sum())
    full = aggregate(lt, mask, loss_type, B, n_tok, C)
    for cuts in ([0, 3, 7], [0, 1, 2, 5, 7], [0, 7]):
        parts = sum(aggregate(lt[a:b], mask[a:b], loss_type, B, n_tok, C) for a, b in zip(cuts, cuts[1:]))
        assert torch.allclose(parts, full, atol=1e-12, rtol=0)


def test_on_policy_gradient_is_reinforce_with_baseline():
    """With old_logp = logp.detach() (one iteration), rho = 1, the dapo loss is -sum_i A_i L_i / N and
    its gradient w.r.t. logp is -A_i * mask / N: REINFORCE with the group baseline."""
    torch.manual_seed(0)
    B, C = 3, 5
    logp = (-torch.rand(B, C, dtype=torch.float64) * 3).requires_grad_(True)
    A = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    lengths = torch.tensor([5, 2, 3])
    mask = (torch.arange(C)[None] < lengths[:, None]).double()
    N = int(mask.sum())  # 10
    lt, st = per_token_loss(logp, logp.detach(), A, mask, 0.2, 0.28)
    loss = aggregate(lt, mask, "dapo", B, N, C)
    assert torch.equal(st["ratio"], torch.ones(B, C, dtype=torch.float64))   # exp(x - x) = exp(0) = 1, exactly
    assert loss.item() == pytest.approx(-(1.0 * 5 - 0.5 * 2 + 2.0 * 3) / 10)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -A[:, None] * mask / N, atol=1e-15, rtol=0)


# -----------------------------------------------------------------------------
# score

def test_score_weighted_sum_and_abstain():
    """Weighted sum over reward functions; None is NaN in per_fn and left out of the sum; a row where
    every function abstains is NaN. Columns and completion_ids reach the functions as keywords."""
    seen = {}

    def f1(prompts, completions, **kw):
        seen.update(kw)
        return [1.0, 0.0, None, 0.5]

    def f2(prompts, completions, **kw):
        return [0.5, None, None, 1.0]

    per_fn, total = score([f1, f2], torch.tensor([1.0, 0.1]), ["p"] * 4, ["c"] * 4, [[1], [2], [3], [4]],
                          {"answer": ["a"] * 4})
    assert per_fn.shape == (4, 2)
    assert per_fn[0].tolist() == [1.0, 0.5]
    assert per_fn[1, 0] == 0.0 and math.isnan(per_fn[1, 1])
    assert torch.isnan(per_fn[2]).all()
    assert total[0].item() == pytest.approx(1.05)
    assert total[1].item() == 0.0
    assert math.isnan(total[2].item())
    assert total[3].item() == pytest.approx(0.6)
    assert seen["completion_ids"] == [[1], [2], [3], [4]] and seen["answer"] == ["a"] * 4


# -----------------------------------------------------------------------------
# merge_rounds (dynamic sampling)

def _round(prompt_len, C, base, keep):
    """A fake rollout round of 2 groups x G=2 rows; token ids start at `base` so rows are traceable."""
    B = 4
    ids = torch.arange(base, base + B * (prompt_len + C)).view(B, prompt_len + C)
    cmask = torch.ones(B, C)
    cmask[1, -1] = 0.0                       # row 1 ends early
    attn = torch.cat([torch.ones(B, prompt_len, dtype=torch.long), cmask.long()], 1)
    logp = -(torch.arange(B * C, dtype=torch.float32).view(B, C) + base) * cmask   # traceable sampling log-probs
    roll = Rollout(ids, attn, cmask, logp, torch.tensor([True, False, False, True]), prompt_len)
    roll.loss_mask[3] = 0.0                  # a row the trainer dropped from the loss (e.g. truncated)
    R = torch.tensor([base + 0.0, base + 1.0, base + 2.0, base + 3.0])
    return Batch(roll, [f"p{base}_{i}" for i in range(B)], [f"t{base}_{i}" for i in range(B)], R[:, None].clone(), R,
                 torch.tensor(keep))


def test_merge_rounds_keeps_groups_in_order_and_pads():
    """Kept groups are taken in round order, at most P of them; prompts are left-padded and
    completions right-padded (with pad id, attention 0, completion mask 0) to the longest."""
    r1 = _round(3, 2, 100, [False, True])    # group 1 of round 1 kept
    r2 = _round(4, 3, 200, [True, True])     # both groups of round 2 kept; only the first fits (P=2)
    b = merge_rounds([r1, r2], 2, 2, pad_id=-1)
    merged, prompts, texts, per_fn, R = b.roll, b.prompts, b.texts, b.per_fn, b.rewards
    cmask, trunc = merged.completion_mask, merged.truncated
    assert merged.prompt_len == 4 and merged.input_ids.shape == (4, 7)
    assert prompts == ["p100_2", "p100_3", "p200_0", "p200_1"]
    assert texts == ["t100_2", "t100_3", "t200_0", "t200_1"]
    assert R.tolist() == [102.0, 103.0, 200.0, 201.0] and per_fn[:, 0].tolist() == R.tolist()
    row = r1.roll.input_ids[2].tolist()
    assert merged.input_ids[0].tolist() == [-1] + row + [-1]
    assert merged.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert cmask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert torch.equal(merged.input_ids[2:], r2.roll.input_ids[:2])
    assert trunc.tolist() == [False, True, True, False]
    # the sampling log-probs and the loss mask travel with their rows (0 on the padding)
    assert merged.logprobs[0].tolist() == r1.roll.logprobs[2].tolist() + [0.0]
    assert torch.equal(merged.logprobs[2:], r2.roll.logprobs[:2])
    assert merged.loss_mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_merge_rounds_nothing_kept_uses_last_round():
    """When no group had signal in any round, the last round is used as it is."""
    r1 = _round(3, 2, 100, [False, False])
    r2 = _round(4, 3, 200, [False, False])
    b = merge_rounds([r1, r2], 2, 2, pad_id=-1)
    assert torch.equal(b.roll.input_ids, r2.roll.input_ids) and torch.equal(b.roll.logprobs, r2.roll.logprobs)
    assert b.rewards.tolist() == [200.0, 201.0, 202.0, 203.0]
