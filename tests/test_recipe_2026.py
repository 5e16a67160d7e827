"""The 2026 recipe switches of grpo.py, each against numbers worked out by hand: CISPO and SAPO losses and
gradients, the rollout (sampler/trainer) correction at token and sequence level (an exact no-op when the two
agree), DeepSeek-V3.2's off-policy sequence mask, the high-entropy token mask, the entropy bonus, and the
mismatch metrics; then one GRPO step with each switch on."""
import json
import math
import os

import pytest
import torch

import grpo
import model as M
from conftest import TEST_THREADS
from grpo import (high_entropy_mask, mismatch_stats, off_policy_sequence_mask, per_token_loss,
                  rollout_correction_weights)
from rollout import Rollout


def grad_of(loss_type, logp0, old, adv, **kw):
    logp = logp0.clone().requires_grad_(True)
    lt, st = per_token_loss(logp, old, adv, torch.ones_like(logp), 0.2, 0.28, loss_type=loss_type, **kw)
    lt.sum().backward()
    return lt.detach(), logp.grad, st


def test_cispo_clips_the_weight_not_the_gradient():
    """Ratios 0.5, 1.0, 2.0 (log rho = log 0.5, 0, log 2), A = +1 then -1. CISPO: l = -min(rho, 1.28) A log pi, the
    weight detached: d l / d log pi = -min(rho, 1.28) A, so the clipped token (rho = 2) still gets -1.28 A where
    the surrogate gives it 0; no lower bound (rho = 0.5 keeps 0.5)."""
    old = torch.zeros(2, 3)
    logp0 = torch.log(torch.tensor([[0.5, 1.0, 2.0], [0.5, 1.0, 2.0]]))
    adv = torch.tensor([1.0, -1.0])
    lt, g, st = grad_of("cispo", logp0, old, adv)
    w = torch.tensor([0.5, 1.0, 1.28])
    assert torch.allclose(g, torch.stack([-w, w]), atol=1e-6)
    assert torch.allclose(lt, torch.stack([-w * logp0[0], w * logp0[1]]), atol=1e-6)
    assert st["clip_high"].tolist() == [[0, 0, 1], [0, 0, 0]] and st["clip_low"].sum() == 0
    _, g_ppo, _ = grad_of("dapo", logp0, old, adv)
    assert g_ppo[0, 2] == 0 and g[0, 2] != 0      # the surrogate drops that token's gradient; CISPO keeps it


def test_sapo_soft_gate_by_hand():
    """SAPO: l = -(4 / tau) sigmoid(tau (rho - 1)) A, tau_pos 1.0 for A > 0, tau_neg 1.05 otherwise. At rho = 1:
    l = -2 A / tau and d l / d log pi = -(4/tau) tau s (1 - s) rho A = -A, the surrogate's gradient. At rho = 2,
    A = 1: l = -4 sigmoid(1), gradient -4 sigmoid(1) (1 - sigmoid(1)) * 2: smaller than at rho = 1, not 0."""
    old = torch.zeros(2, 2)
    logp0 = torch.log(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    adv = torch.tensor([1.0, -1.0])
    lt, g, _ = grad_of("sapo", logp0, old, adv)
    s1 = 1 / (1 + math.exp(-1.0))
    s105 = 1 / (1 + math.exp(-1.05))
    assert lt[0].tolist() == pytest.approx([-2.0, -4 * s1], rel=1e-6)
    assert lt[1].tolist() == pytest.approx([2 / 1.05, 4 / 1.05 * s105], rel=1e-6)
    assert g[0].tolist() == pytest.approx([-1.0, -4 * s1 * (1 - s1) * 2], rel=1e-6)
    assert g[1].tolist() == pytest.approx([1.0, 4 * s105 * (1 - s105) * 2], rel=1e-6)


def test_rollout_correction_weights_by_hand():
    """log pi_trainer - log pi_sampler = [log 3, 0, log 0.5 | 0, 0, 0], last token of row 0 off the mask:
    token tis: min(w, 2) = [2, 1, 1 (masked: w = 1)]; token mis: w > 2 -> 0; sequence: w_0 = exp(log 3) = 3
    (the masked token does not count) -> tis 2, mis 0; row 1: 1. Equal log-probs: exactly 1 everywhere."""
    sampler = torch.zeros(2, 3)
    trainer = torch.log(torch.tensor([[3.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    tis = rollout_correction_weights(trainer, sampler, mask, "tis", "token", 2.0)
    mis = rollout_correction_weights(trainer, sampler, mask, "mis", "token", 2.0)
    close = lambda a, b: torch.allclose(a, torch.tensor(b), rtol=1e-6, atol=0)
    assert close(tis, [[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]]) and close(mis, [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert close(rollout_correction_weights(trainer, sampler, mask, "tis", "sequence", 2.0), [[2.0], [1.0]])
    assert close(rollout_correction_weights(trainer, sampler, mask, "mis", "sequence", 2.0), [[0.0], [1.0]])
    for mode in ("tis", "mis"):
        for level in ("token", "sequence"):
            w = rollout_correction_weights(sampler - 0.7, sampler - 0.7, mask, mode, level, 2.0)
            assert torch.equal(w, torch.ones_like(w))


def test_off_policy_mask_and_entropy_mask_by_hand():
    """Off-policy mask: mean_t (log pi_sampler - log pi_theta) = [0.6, 0.6, 0.1] with A = [-1, +1, -1] and
    threshold 0.5 drops only row 0 (negative and drifted). Entropy mask, top half: entropies 1..8 on eight valid
    tokens, the 0.5 quantile is 4.5: tokens with 5..8 kept; padding never."""
    logp = torch.zeros(3, 2)
    sampler = torch.tensor([[0.6, 0.6], [0.6, 0.6], [0.1, 0.1]])
    keep = off_policy_sequence_mask(logp, sampler, torch.tensor([-1.0, 1.0, -1.0]), torch.ones(3, 2), 0.5)
    assert keep.tolist() == [[0.0], [1.0], [1.0]]
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert high_entropy_mask(ent, mask, 0.5).tolist() == [[0, 0, 0], [0, 1, 1], [1, 1, 0]]


def test_mismatch_stats_by_hand():
    """x = log pi_trainer - log pi_sampler = 0.2: k3 = e^0.2 - 1 - 0.2 = 0.0214028, |x| = 0.2; 0 off the mask."""
    k3, ab = mismatch_stats(torch.full((1, 2), 0.2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert k3[0].tolist() == pytest.approx([math.exp(0.2) - 1.2, 0.0], rel=1e-5)
    assert ab[0].tolist() == pytest.approx([0.2, 0.0], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_batch():
    """The tiny model and one batch of 4 sampled rows, with the sampler's own log-probs."""
    torch.manual_seed(0)
    model, tok = M.load("tiny")
    from rollout import generate
    from data import encode_prompt
    ids = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in ("1+2", "34+5", "6+7", "8+90")]
    roll = generate(model, tok, ids, 6)
    return model, roll


def batch_of(roll, sampler=None):
    r = Rollout(roll.input_ids, roll.attention_mask, roll.completion_mask,
                roll.logprobs if sampler is None else sampler, roll.truncated, roll.prompt_len)
    return grpo.Batch(r, [None] * 4, [""] * 4, None, None, advantages=torch.tensor([1.0, -0.5, 0.25, -0.75]))


def loss_and_grads(cfg, model, batch):
    model.zero_grad(set_to_none=True)
    B, n = batch.roll.loss_mask.shape[0], int(batch.roll.loss_mask.sum())
    loss, st, ent = grpo.micro_batch_loss(cfg, model, batch, slice(0, B), B, n)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], st, ent.detach()


def test_correction_is_an_exact_no_op_when_sampler_and_trainer_agree(tiny_batch):
    """Sampler log-probs set to the trainer's own: every tis / mis weight is exactly 1, so loss and gradients
    are bitwise those without correction (the same code and shapes, times 1.0)."""
    model, roll = tiny_batch
    with torch.no_grad():
        own = M.token_logprobs(model, roll.input_ids, roll.attention_mask, roll.completion_mask.shape[1])
    own = own * roll.completion_mask
    base = loss_and_grads(grpo.GRPOConfig(max_new_tokens=6), model, batch_of(roll, own))
    for mode in ("tis", "mis"):
        for level in ("token", "sequence"):
            cfg = grpo.GRPOConfig(max_new_tokens=6, rollout_correction=mode, rollout_correction_level=level)
            got = loss_and_grads(cfg, model, batch_of(roll, own))
            assert torch.equal(got[0], base[0]) and all(torch.equal(a, b) for a, b in zip(got[1], base[1]))
            assert torch.equal(got[2]["weight"], torch.ones_like(got[2]["weight"]))


def test_an_injected_mismatch_is_measured_and_weighted(tiny_batch):
    """Sampler log-probs = trainer's - 0.3 on row 0 (w = e^0.3 = 1.35 there, 1 elsewhere): the mismatch stats
    read 0.3 on row 0's tokens; with token tis the loss equals the dapo loss recomputed by hand with weights
    1.35 on row 0 (on-policy: l_t = -w_t A, so the loss moves by -(0.35 A_0 L_0) / N)."""
    model, roll = tiny_batch
    mask = roll.completion_mask
    with torch.no_grad():
        own = M.token_logprobs(model, roll.input_ids, roll.attention_mask, mask.shape[1]) * mask
    shifted = own.clone()
    shifted[0] -= 0.3 * mask[0]
    cfg = grpo.GRPOConfig(max_new_tokens=6, rollout_correction="tis", rollout_correction_cap=2.0)
    loss, _, st, _ = loss_and_grads(cfg, model, batch_of(roll, shifted))
    base, _, _, _ = loss_and_grads(grpo.GRPOConfig(max_new_tokens=6), model, batch_of(roll, shifted))
    N, L0, A0 = float(mask.sum()), float(mask[0].sum()), 1.0
    assert float(loss - base) == pytest.approx(-(math.exp(0.3) - 1) * A0 * L0 / N, rel=1e-4)
    assert st["mismatch_abs"][0][mask[0].bool()].tolist() == pytest.approx([0.3] * int(L0), abs=1e-5)
    assert float(st["mismatch_abs"][1:].max()) < 1e-5


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy(tiny_batch):
    model, roll = tiny_batch
    b = batch_of(roll)
    base, _, _, ent = loss_and_grads(grpo.GRPOConfig(max_new_tokens=6), model, b)
    bonus, _, _, _ = loss_and_grads(grpo.GRPOConfig(max_new_tokens=6, entropy_coef=0.01), model, b)
    m = b.roll.loss_mask
    assert float(base - bonus) == pytest.approx(0.01 * float((ent * m).sum() / m.sum()), rel=1e-5)


@pytest.mark.parametrize("switches", [dict(loss_type="cispo", epsilon_high=4.0), dict(loss_type="sapo"),
                                      dict(rollout_correction="tis"),
                                      dict(rollout_correction="mis", rollout_correction_level="sequence"),
                                      dict(off_policy_mask_threshold=0.5, num_iterations=2),
                                      dict(top_entropy_quantile=0.2, entropy_coef=0.001)])
def test_one_grpo_step_with_each_switch(tmp_path, switches):
    out = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(init="scratch", out=out, steps=1, num_prompts=2, num_generations=4, max_new_tokens=8,
                              eval_n=0, sample_every=0, save_every=0, threads=TEST_THREADS, **switches))
    m = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert math.isfinite(m["loss"]) and m["mismatch/logp_diff_abs_max"] < 1e-3   # CPU: the same arithmetic
    if "rollout_correction" in switches or "top_entropy_quantile" in switches:
        assert 0 < m["policy_weight/mean"] <= 2.0
    if "top_entropy_quantile" in switches:
        assert m["policy_weight/frac_zero"] == pytest.approx(0.8, abs=0.1)   # the top 20% of tokens kept


def test_token_level_losses_refuse_the_sequence_ratio():
    with pytest.raises(grpo.ConfigError, match="--loss-type cispo is token-level"):
        grpo.main(grpo.GRPOConfig(loss_type="cispo", importance_sampling_level="sequence"))
