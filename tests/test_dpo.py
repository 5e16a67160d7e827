"""dpo.py: every loss against hand-computed values, the implicit rewards, the update direction, the
cached reference, pair construction, JSONL encoding and errors, resume and the saved checkpoint.
Tiny configs, TEST_THREADS threads (tests/conftest.py)."""
import gc
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM

import dpo
import model as M
import data as D
import checkpoint as CK
import rewards
from conftest import FP32_RTOL, TEST_THREADS

LOG2 = math.log(2)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def quiet_dpo(**kw):
    base = dict(init="scratch", eval_n=0, save_every=0, threads=TEST_THREADS, batch_size=4, num_prompts=8,
                num_generations=4, max_new_tokens=10, warmup=1)
    return dpo.DPOConfig(**{**base, **kw})


def user(t):
    return [{"role": "user", "content": t}]


def assistant(t):
    return [{"role": "assistant", "content": t}]


ROWS = [  # every TRL layout: standard / conversational, explicit / implicit prompt
    {"prompt": "12+34=", "chosen": "46", "rejected": "47"},
    {"prompt": user("1+2"), "chosen": assistant("<answer>3</answer>"), "rejected": assistant("<answer>4</answer>")},
    {"chosen": user("5+5") + assistant("10"), "rejected": user("5+5") + assistant("55")},
    {"chosen": "2+2 is 4", "rejected": "2+2 is 22"},
    {"prompt": [{"role": "system", "content": "add"}] + user("9+1"), "chosen": assistant("10"),
     "rejected": assistant("91")},
    {"prompt": user("7+8"), "chosen": assistant("15"), "rejected": assistant("<think>7+8</think>78")},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -----------------------------------------------------------------------------
# The losses, by hand. h = [-1, 0, 2], beta = 0.5, so beta*h = x = [-0.5, 0, 1].
# softplus(z) = log(1 + e^z): -log sigmoid(x) = softplus(-x) = [0.9740770, log 2, 0.3132617].

H = torch.tensor([-1.0, 0.0, 2.0])
SP = [0.9740769841801067, LOG2, 0.31326168751822286]   # softplus(-x)


def test_sigmoid_loss_hand_values():
    """-log sigmoid(beta h)."""
    assert torch.allclose(dpo.sigmoid_loss(H, 0.5), torch.tensor(SP), atol=1e-6)


def test_cdpo_label_smoothing_hand_values():
    """cDPO, eps = 0.1: -(0.9) log sig(x) - 0.1 log sig(-x) = 0.9 softplus(-x) + 0.1 softplus(x), and
    softplus(x) = x + softplus(-x), so = softplus(-x) + 0.1 x: [0.9240770, log 2, 0.4132617]."""
    exp = [SP[0] - 0.05, LOG2, SP[2] + 0.1]
    assert torch.allclose(dpo.sigmoid_loss(H, 0.5, 0.1), torch.tensor(exp), atol=1e-6)


def test_robust_loss_hand_values():
    """rDPO, eps = 0.1: [0.9 softplus(-x) - 0.1 softplus(x)] / 0.8 = softplus(-x) - 0.1 x / 0.8:
    [1.0365770, log 2 (x = 0), 0.1882617]. With eps = 0 it is exactly the sigmoid loss."""
    exp = [SP[0] + 0.0625, LOG2, SP[2] - 0.125]
    assert torch.allclose(dpo.robust_loss(H, 0.5, 0.1), torch.tensor(exp), atol=1e-6)
    assert torch.allclose(dpo.robust_loss(H, 0.5, 0.0), dpo.sigmoid_loss(H, 0.5), atol=0)


def test_ipo_loss_hand_values():
    """(h - 1/(2 beta))^2 with beta = 0.5: target 1, so [4, 1, 1]; beta = 0.1: target 5, [36, 25, 9]."""
    assert torch.allclose(dpo.ipo_loss(H, 0.5), torch.tensor([4.0, 1.0, 1.0]))
    assert torch.allclose(dpo.ipo_loss(H, 0.1), torch.tensor([36.0, 25.0, 9.0]), atol=1e-5)


def test_hinge_loss_hand_values():
    """relu(1 - beta h): [1.5, 1, 0]."""
    assert torch.allclose(dpo.hinge_loss(H, 0.5), torch.tensor([1.5, 1.0, 0.0]))


def test_ipo_averages_log_probs_per_token():
    """TRL's IPO convention. Policy chosen sum -6 over 3 tokens, reference -9; rejected -4 over 2,
    reference -3. Averaged: h = (-2 - -3) - (-2 - -1.5) = 1.5, loss (1.5 - 1)^2 = 0.25 at beta 0.5,
    implicit rewards 0.5 * 1 and 0.5 * -0.5. Summed (what sigmoid uses): h = 3 + 1 = 4."""
    sums, lens = torch.tensor([-6.0, -4.0]), torch.tensor([3.0, 2.0])
    ref = torch.tensor([-9.0, -3.0])
    pi, rf = dpo.sequence_logps(sums, lens, "ipo"), dpo.sequence_logps(ref, lens, "ipo")
    assert pi.tolist() == [-2.0, -2.0] and rf.tolist() == [-3.0, -1.5]   # exact quotients: exact in IEEE
    loss, rc, rr = dpo.dpo_loss(pi[:1], pi[1:], rf[:1], rf[1:], 0.5, "ipo")
    assert loss.item() == pytest.approx(0.25) and rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.25)
    pi, rf = dpo.sequence_logps(sums, lens, "sigmoid"), dpo.sequence_logps(ref, lens, "sigmoid")
    assert pi.tolist() == [-6.0, -4.0]
    loss, _, _ = dpo.dpo_loss(pi[:1], pi[1:], rf[:1], rf[1:], 0.5, "sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)))   # -log sigmoid(0.5 * 4)


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "hinge"])
def test_implicit_reward_signs_and_gradient_direction(loss):
    """Implicit rewards are beta * (log pi - log pi_ref): positive for a chosen completion the policy
    now likes more than the reference, negative for a rejected one it likes less. At h = 0 every loss
    pushes log pi(chosen) up and log pi(rejected) down."""
    pi_c, pi_r = torch.tensor([-4.0], requires_grad=True), torch.tensor([-7.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-6.0])
    losses, rc, rr = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1, loss, 0.1 if loss == "robust" else 0.0)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert not rc.requires_grad and not rr.requires_grad
    assert losses.item() < dpo.dpo_loss(ref_c, ref_r, ref_c, ref_r, 0.1, loss, 0.1 if loss == "robust" else 0.0)[0].item()
    c0, r0 = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    l0, _, _ = dpo.dpo_loss(c0, r0, ref_c, ref_r, 0.1, loss, 0.1 if loss == "robust" else 0.0)
    l0.sum().backward()
    assert c0.grad.item() < 0 < r0.grad.item()


def test_bad_loss_options_fail_before_anything(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="--loss"):
        dpo.main(quiet_dpo(loss="kto", out=out))
    with pytest.raises(ValueError, match="label-smoothing"):
        dpo.main(quiet_dpo(loss="ipo", label_smoothing=0.1, out=out))
    with pytest.raises(ValueError, match="label-smoothing"):
        dpo.main(quiet_dpo(loss="robust", label_smoothing=0.5, out=out))
    assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# Pair construction from scored samples (k = 4 per prompt)

def test_build_pairs_from_scores():
    """Mixed prompts pair a best with a worst sample (first ones: ties go in sample order); all-correct
    and none-correct prompts give no pair and are counted; unscored (None) samples are left out."""
    scores = [1, 0, 1, 0,          # mixed: (0, 1); with 2 per prompt also (2, 3)
              1, 1, 1, 1,          # all correct
              0, 0, 0, 0,          # none correct
              None, 1, None, 0,    # None ignored: (13, 15)
              None, None, None, None,
              0.5, 1, 1, 0,        # a tie for best: the first of them, (21, 23)
              None, 1, 1, None]    # only correct among the scored ones
    pairs, counts = dpo.build_pairs(scores, 4)
    assert pairs == [(0, 1), (13, 15), (21, 23)]
    assert counts == {"all_correct": 2, "none_correct": 1, "unscored": 1}
    pairs2, counts2 = dpo.build_pairs(scores, 4, pairs_per_prompt=2)
    assert pairs2 == [(0, 1), (2, 3), (13, 15), (21, 23)] and counts2 == counts
    # three correct, one wrong: the wrong one is used once (disjoint pairs)
    assert dpo.build_pairs([1, 1, 0, 1], 4, pairs_per_prompt=4)[0] == [(0, 2)]


def test_on_policy_pairs_chosen_correct_rejected_wrong(monkeypatch, tiny):
    """sample_pairs scores samples with the task checker and keeps the exact sampled token ids: every
    chosen completion scores 1 and every rejected 0, under the same prompt."""
    m, tok = tiny
    calls = {}

    def checker(prompts, completions, answer=None, **kw):   # "correct" = an even number of characters
        calls["n"] = len(completions)
        return [float(len(c) % 2 == 0) for c in completions]

    monkeypatch.setitem(rewards.REWARD_FUNCS, "accuracy", checker)   # the task's checker, by name
    torch.manual_seed(0)
    cfg = quiet_dpo(pairs_per_prompt=1)
    problems = rewards.ProblemStream("add", seed=5).take(8)
    pairs, shown, stats = dpo.sample_pairs(m, tok, problems, cfg)
    assert calls["n"] == 8 * 4
    assert stats["pairs/num"] == len(pairs) > 0
    assert stats["pairs/num"] + stats["pairs/all_correct"] + stats["pairs/none_correct"] == 8
    prompts = {tuple(D.encode_prompt(tok, p.row()["prompt"])) for p in problems}
    for p in pairs:
        assert tuple(p.prompt) in prompts
        c = tok.decode(p.chosen, skip_special_tokens=True)
        r = tok.decode(p.rejected, skip_special_tokens=True)
        assert len(c) % 2 == 0 and len(r) % 2 == 1
        for ids in (p.chosen, p.rejected):   # EOS only at the end, if at all (truncated samples have none)
            assert tok.eos_token_id not in ids[:-1]
    assert shown and len(shown[0]["chosen"]) % 2 == 0


# -----------------------------------------------------------------------------
# JSONL rows -> ids and masks

def test_rows_tokenize_to_expected_ids_and_masks(tok):
    """Every layout gives exact ids: conversational through the chat template (its <eos> is the EOS;
    no second one), standard strings with EOS appended; implicit prompts split at the shared message
    prefix / the shared string prefix (a space goes with the completion, as in TRL). The batch is
    [chosen; rejected] rows, [left-padded prompt | right-padded completion], masks on completion + EOS."""
    v, eos, pad = tok.get_vocab(), tok.eos_token_id, tok.pad_token_id
    ids = lambda s: [v[ch if ch != " " else "\u0120"] for ch in s]  # byte-level BPE spells space as U+0120
    U, A, S = v["<|user|>"], v["<|assistant|>"], v["<|system|>"]
    enc = [dpo.encode_pair(tok, r, 1024) for r in ROWS]
    assert enc[0] == dpo.Pair(ids("12+34="), ids("46") + [eos], ids("47") + [eos])
    ans = lambda d: [v["<answer>"]] + ids(d) + [v["</answer>"], eos]
    assert enc[1] == dpo.Pair([U] + ids("1+2") + [A], ans("3"), ans("4"))
    assert enc[2] == dpo.Pair([U] + ids("5+5") + [A], ids("10") + [eos], ids("55") + [eos])
    assert enc[3] == dpo.Pair(ids("2+2 is"), ids(" 4") + [eos], ids(" 22") + [eos])
    assert enc[4] == dpo.Pair([S] + ids("add") + [U] + ids("9+1") + [A], ids("10") + [eos], ids("91") + [eos])
    ids_, attn, mask = dpo.collate_pairs(enc[2:4], pad, "cpu")
    P, C = 6, 4   # longest prompt "2+2 is", longest completion " 22" + EOS
    assert ids_.tolist() == [
        [pad, U] + ids("5+5") + [A] + ids("10") + [eos, pad],      # chosen of pair 0
        ids("2+2 is") + ids(" 4") + [eos, pad],                    # chosen of pair 1
        [pad, U] + ids("5+5") + [A] + ids("55") + [eos, pad],      # rejected of pair 0
        ids("2+2 is") + ids(" 22") + [eos]]                        # rejected of pair 1
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert attn[:, :P].tolist() == [[0, 1, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1], [1] * 6]
    assert torch.equal(attn[:, P:], mask.long()) and ids_.shape == (4, P + C)


def test_no_double_bos_or_eos_with_a_bos_tokenizer():
    """A tokenizer that adds BOS itself and a template that writes it: one BOS per prompt, one EOS
    per completion, in both layouts."""
    tok = M.build_char_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok.chat_template = "{{ bos_token }}" + M.CHAT_TEMPLATE
    for row in ROWS:
        p = dpo.encode_pair(tok, row, 1024)
        assert p.prompt[0] == bos and p.prompt.count(bos) == 1, row
        for c in (p.chosen, p.rejected):
            assert c[-1] == eos and c.count(eos) == 1 and bos not in c, row


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "1+2", "chosen": "3"}, "missing field 'rejected'"),
    ({"prompt": "1+2", "chosen": assistant("3"), "rejected": assistant("4")}, "both be strings"),
    ({"prompt": user("1+2"), "chosen": assistant("3"), "rejected": user("4")}, "must end with a 'assistant'"),
    ({"chosen": user("1+2") + assistant("3"), "rejected": user("1+3") + assistant("4")}, "share every message"),
    ({"chosen": assistant("3"), "rejected": assistant("4")}, "share every message"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prefix"),
    ({"chosen": "abc", "rejected": user("x") + assistant("y")}, "both be strings"),
    ({"prompt": "1+2=", "chosen": "3" * 30, "rejected": "4"}, "> --max-length 20"),
])
def test_encode_pair_errors(tok, row, msg):
    with pytest.raises(ValueError, match=msg):
        dpo.encode_pair(tok, row, 20)


def test_malformed_line_fails_with_file_and_line_before_training(tmp_path):
    """A bad row stops the run with file:line before anything is written to --out (no config, no
    metrics, no reference cache)."""
    out = str(tmp_path / "out")
    bad_json = write_rows(tmp_path / "a.jsonl", ROWS[:2])
    with open(bad_json, "a") as f:
        f.write('{"prompt": "1+\n')
    with pytest.raises(D.DataError, match=r"a\.jsonl:3: malformed JSON"):
        dpo.main(quiet_dpo(data=bad_json, out=out))
    bad_row = write_rows(tmp_path / "b.jsonl", ROWS[:3] + [{"chosen": "abc", "rejected": "xyz"}] + ROWS[3:])
    with pytest.raises(D.DataError, match=r"b\.jsonl:4: implicit prompt: .* share no prefix"):
        dpo.main(quiet_dpo(data=bad_row, out=out))
    assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# Training

@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "hinge"])
def test_one_step_raises_the_margin(tiny, loss):
    """From policy == reference (h = 0 for every pair), one AdamW step on the DPO loss of a batch of
    pairs raises h, the chosen-minus-rejected log-ratio margin, for the batch and for most pairs."""
    m, tok = tiny
    pairs = [dpo.encode_pair(tok, r, 1024) for r in ROWS]
    ref = dpo.reference_logps(m, pairs, tok.pad_token_id, "cpu", micro_batch=4)   # (6, 2)

    def margins(grad):
        with torch.set_grad_enabled(grad):
            sums, lens = dpo.pair_logps(m, pairs, tok.pad_token_id, "cpu")
        pi = dpo.sequence_logps(sums, lens, loss)
        rf = dpo.sequence_logps(ref.T.reshape(-1), lens, loss)
        return pi, rf, (pi[:6] - rf[:6]) - (pi[6:] - rf[6:])

    pi, rf, h0 = margins(True)
    # the cache is the same model, h = 0 up to rounding: this forward pads the 6 pairs together, the cache
    # 4 + 2; each sequence log-prob within FP32_RTOL of its size (tests/conftest.py, as in the test below)
    assert (h0.abs() <= FP32_RTOL * (rf[:6].abs() + rf[6:].abs())).all(), h0
    losses, _, _ = dpo.dpo_loss(pi[:6], pi[6:], rf[:6], rf[6:], 0.1, loss, 0.1 if loss == "robust" else 0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    losses.mean().backward()
    opt.step()
    _, _, h1 = margins(False)
    assert h1.mean() > h0.mean() + 0.05, (h0, h1)
    assert (h1 > h0).sum() >= 4, (h0, h1)


def test_jsonl_run_with_model_path_and_cached_reference(tmp_path):
    """python dpo.py --model PATH --data pairs.jsonl: starts from PATH (--init left at its default),
    caches the reference log-probs in OUT/ref_logps.pt, and those equal a live forward of PATH's
    model, pair by pair, to rounding. Step 1 is at policy == reference: loss log 2 and margin 0, up to
    rounding. Metrics use TRL's names."""
    base = str(tmp_path / "base")
    m0, tok = M.load("tiny", seed=3)
    CK.save(m0, tok, base)
    data = write_rows(tmp_path / "pairs.jsonl", ROWS)
    out = str(tmp_path / "out")
    beta = dpo.DPOConfig.beta
    dpo.main(dpo.DPOConfig(model=base, data=data, out=out, steps=3, batch_size=4, micro_batch=2, lr=1e-3,
                           warmup=1, threads=TEST_THREADS, save_every=0))
    cache = torch.load(os.path.join(out, "ref_logps.pt"), weights_only=False)
    live, tok = M.load(base)                      # (the tokenizer as PATH has it)
    pairs = [dpo.encode_pair(tok, r, 1024) for r in ROWS]
    assert cache["fingerprint"] == dpo.fingerprint(pairs) and cache["ref"].shape == (6, 2)
    # The same model scores the same tokens, with other padding and batching: a summed log-prob of n
    # tokens, each within FP32_RTOL of its own size (tests/conftest.py), is within FP32_RTOL * |sum|
    # (all terms are negative). Here |sum| <= 39: <= 4.6e-3; seen: 3.8e-6 (1 ulp).
    tol = FP32_RTOL * cache["ref"].abs()                                      # (6, 2)
    with torch.no_grad():
        for i, p in enumerate(pairs):             # one pair at a time: other padding than the cache's
            sums, _ = dpo.pair_logps(live, [p], tok.pad_token_id, "cpu")
            assert ((cache["ref"][i] - sums).abs() <= tol[i]).all(), (i, cache["ref"][i], sums)
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    assert [x["step"] for x in ms] == [1, 2, 3]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "loss", "grad_norm", "learning_rate", "step_time"):
        assert all(k in x for x in ms), k
    # Step 1, policy == reference: each pair's h = (pi_c - ref_c) - (pi_r - ref_r) is a difference of two
    # evaluations with other padding (this step's micro-batches are not the cache's), so |h| <= h_max =
    # FP32_RTOL * max(|ref_c| + |ref_r|) as above; margin = beta * mean h, and the loss
    # mean softplus(-beta h) is log 2 within beta/2 * h_max (|d softplus| <= 1) + rounding of log 2.
    # rewards/accuracies is then the sign of that noise: not checked here (see the test below).
    h_max = FP32_RTOL * float(cache["ref"].abs().sum(1).max())
    assert abs(ms[0]["rewards/margins"]) <= beta * h_max, ms[0]
    assert abs(ms[0]["loss"] - LOG2) <= beta / 2 * h_max + 1e-6, ms[0]
    assert 0.0 <= ms[0]["rewards/accuracies"] <= 1.0
    assert ms[-1]["rewards/margins"] > 0
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f) == {}


def test_reward_accuracy_is_strict_chosen_above_rejected(tmp_path, monkeypatch):
    """rewards/accuracies follows TRL: the fraction of pairs whose chosen reward is strictly above the
    rejected one, so a tie counts as not accurate. Decided on exact rewards, through dpo.main's own metric
    code: dpo_loss is given the policy log-probs pi = ref exactly (x - x = 0 in IEEE: both rewards exactly
    0, a tie) or pi_c = ref_c + 1, pi_r = ref_r - 1 (rewards ~ +beta and -beta, a clear win); the losses
    (and the training) stay the real ones. Step 1: every pair tied -> 0; step 2: every pair wins -> 1;
    step 3: per micro-batch of 2, a tie and a win -> 1/2. Margins exactly 0, then ~2 beta and ~beta."""
    real, calls = dpo.dpo_loss, []

    def exact_rewards(pi_c, pi_r, ref_c, ref_r, beta, *args):
        losses, _, _ = real(pi_c, pi_r, ref_c, ref_r, beta, *args)
        step = len(calls) // 2                    # two micro-batches per step
        calls.append(1)
        d = [torch.zeros_like(ref_c), torch.ones_like(ref_c), torch.tensor([0.0, 1.0])][step]
        _, rc, rr = real(ref_c + d, ref_r - d, ref_c, ref_r, beta, *args)
        return losses, rc, rr

    monkeypatch.setattr(dpo, "dpo_loss", exact_rewards)
    out = str(tmp_path / "out")
    dpo.main(quiet_dpo(data=write_rows(tmp_path / "pairs.jsonl", ROWS), out=out, steps=3, batch_size=4,
                       micro_batch=2))
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    beta = dpo.DPOConfig.beta
    assert [x["rewards/accuracies"] for x in ms] == [0.0, 1.0, 0.5]
    assert ms[0]["rewards/margins"] == 0.0 and ms[0]["rewards/chosen"] == ms[0]["rewards/rejected"] == 0.0
    # (ref + 1) - ref is 1 to within an ulp of |ref| (< 64 here: <= 3.8e-6 relative)
    assert ms[1]["rewards/margins"] == pytest.approx(2 * beta, rel=1e-4)
    assert ms[2]["rewards/margins"] == pytest.approx(beta, rel=1e-4)


def _crash_at(monkeypatch, n):
    """Make the n-th call of dpo.dpo_loss (one per step here) raise, as a crash in the middle of a run."""
    real, calls = dpo.dpo_loss, []

    def crashing(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)
    monkeypatch.setattr(dpo, "dpo_loss", crashing)
    return real


@pytest.mark.parametrize("save_every, crash", [(2, 5), (3, 4)])
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, save_every, crash):
    """On-policy, 2 rounds of 3 steps. Interrupted after the step-4 checkpoint (inside round 1: the
    round's pairs and reference come from the cache) or the step-3 one (at the round boundary: round
    1 is sampled after resuming, from the restored RNG and prompt stream), then --resume: same final
    weights and metrics as the uninterrupted run. The output loads with from_pretrained."""
    monkeypatch.setitem(rewards.REWARD_FUNCS, "accuracy",
                        lambda prompts, completions, **kw: [float(len(c) % 2 == 0) for c in completions])
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    kw = dict(steps=6, rounds=2, lr=3e-3, save_every=save_every)
    ma, _, _ = dpo.main(quiet_dpo(out=a, **kw))
    real = _crash_at(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpo.main(quiet_dpo(out=b, **kw))
    monkeypatch.setattr(dpo, "dpo_loss", real)
    gc.collect()                                  # let the crashed run's log files be closed
    assert CK.load_state(b)["step"] == crash - 1
    mb, _, _ = dpo.main(quiet_dpo(out=b, resume=True, **kw))
    # Bitwise: the resumed run restores weights, AdamW state, schedule, RNG, data position and the cached
    # reference exactly, and then runs the same code on the same shapes on this machine with the same
    # thread count as the uninterrupted run: the same operations on the same inputs, in the same order.
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in M.load("tiny")[0].state_dict().items() if k in wa)
    la = {x["step"]: x for x in metrics(os.path.join(a, "metrics.jsonl"))}
    lb = {x["step"]: x for x in metrics(os.path.join(b, "metrics.jsonl"))}
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    assert [la[s]["round"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    for s in range(crash, 7):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate", "pairs/num", "num_tokens"):
            assert la[s][k] == pytest.approx(lb[s][k], abs=1e-6), (s, k)
    hf = AutoModelForCausalLM.from_pretrained(a)
    sd = hf.state_dict()                          # (a saved copy of the same tensors: exact)
    assert all(torch.equal(sd[k], v) for k, v in ma.state_dict().items())
    assert all(torch.equal(sd[k], v) for k, v in mb.state_dict().items())


def test_resume_refuses_a_reference_cache_of_other_data(tmp_path, monkeypatch):
    """The cached reference belongs to the pairs it was computed for: resuming on a changed file fails
    instead of silently using wrong reference log-probs."""
    data = tmp_path / "pairs.jsonl"
    write_rows(data, ROWS)
    out = str(tmp_path / "out")
    kw = dict(data=str(data), out=out, steps=4, save_every=2)
    real = _crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpo.main(quiet_dpo(**kw))
    monkeypatch.setattr(dpo, "dpo_loss", real)
    gc.collect()
    write_rows(data, ROWS[::-1])
    with pytest.raises(ValueError, match="belongs to other pairs"):
        dpo.main(quiet_dpo(resume=True, **kw))


def test_micro_batches_accumulate_the_full_batch_gradient(tmp_path):
    """--micro-batch only splits the forward/backward: one pair per forward gives the same step-1 loss,
    metrics and gradient norm (of the accumulated gradient) as all four pairs in one forward."""
    data = write_rows(tmp_path / "pairs.jsonl", ROWS)
    runs = {}
    for mb in (1, 4):
        out = str(tmp_path / f"mb{mb}")
        dpo.main(quiet_dpo(data=data, out=out, steps=1, batch_size=4, micro_batch=mb, lr=1e-3))
        runs[mb] = metrics(os.path.join(out, "metrics.jsonl"))[0]
    # the same sums in other orders and paddings (tests/conftest.py: FP32_RTOL); seen: <= 1e-7 relative
    for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "num_tokens"):
        assert runs[1][k] == pytest.approx(runs[4][k], rel=FP32_RTOL, abs=1e-6), k
    assert runs[1]["grad_norm"] > 0


def test_missing_init_dir(tmp_path):
    """A non-default --init that does not exist is an error (only the default is built by sft.py)."""
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dpo.main(quiet_dpo(init=str(tmp_path / "nope"), out=out))
    assert not os.path.exists(out)
