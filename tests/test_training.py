"""End-to-end behaviour of sft.py and grpo.py on the tiny model: losses, update direction, resume,
learning, and the errors raised before training starts. Small configs, TEST_THREADS threads
(tests/conftest.py)."""
import gc
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import grpo
import model as M
import data as D
import checkpoint as CK
import rollout
import sft
from conftest import FP32_RTOL, TEST_THREADS


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


TOY = "toy_rewards:digit_fraction"   # a dense reward, so a model trained from scratch gets signal


def quiet_grpo(**kw):
    base = dict(init="scratch", num_prompts=4, num_generations=4, max_new_tokens=12, eval_n=0, eval_every=0,
                sample_every=0, save_every=0, threads=TEST_THREADS)
    return grpo.GRPOConfig(**{**base, **kw})


# -----------------------------------------------------------------------------
# SFT

def test_sft_loss_hand_value():
    """Token-mean NLL over completion tokens: (1 + 2 + 4) / 3; an all-zero mask gives 0, not NaN."""
    logp = torch.tensor([[-1., -2., -3.], [-4., -5., -6.]])
    mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    assert sft.sft_loss(logp, mask).item() == pytest.approx(7 / 3)
    assert sft.sft_loss(logp, torch.zeros_like(mask)).item() == 0.0


def test_sft_loss_is_completion_only(tiny):
    """Computing log-probs over the whole sequence with prompt columns masked out gives the same loss
    as the completion-only layout, and changing prompt-token log-probs does not change it; the EOS
    of every example is inside the loss mask."""
    m, tok = tiny
    ex = [D.encode_example(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": c}])
          for p, c in (("12+34", "<think>x</think><answer>46</answer>"), ("1+2", "<answer>3</answer>"))]
    ids, attn, cmask = D.collate(ex, tok.pad_token_id, "cpu")
    T, C = ids.shape[1], cmask.shape[1]
    P = T - C
    with torch.no_grad():
        lp_c = M.token_logprobs(m, ids, attn, C)
        lp_all = M.token_logprobs(m, ids, attn, T - 1)           # predicts columns 1..T-1
    full_mask = torch.zeros(len(ex), T - 1)
    full_mask[:, P - 1:] = cmask                               # column t is predicted at index t-1
    loss = sft.sft_loss(lp_c, cmask)
    assert torch.allclose(sft.sft_loss(lp_all, full_mask), loss, atol=1e-6)
    changed = lp_all.clone()
    changed[:, :P - 1] -= 7.0                                  # prompt tokens
    assert torch.allclose(sft.sft_loss(changed, full_mask), loss, atol=1e-6)
    changed[:, P - 1] -= 7.0                                   # the first completion token does count
    assert not torch.allclose(sft.sft_loss(changed, full_mask), loss, atol=1e-3)
    for i, (_, c) in enumerate(ex):
        assert ids[i, P + len(c) - 1] == tok.eos_token_id and cmask[i, len(c) - 1] == 1


def test_sft_learns(tmp_path):
    """30 steps of SFT on the built-in addition traces cut the loss well below its start (~ln 105)."""
    out = str(tmp_path / "sft")
    sft.main(sft.SFTConfig(out=out, steps=30, batch_size=16, num_examples=200, eval_n=0, save_every=0,
                           threads=TEST_THREADS, warmup=5))
    ms = metrics(os.path.join(out, "sft_metrics.jsonl"))
    assert [m["step"] for m in ms] == list(range(1, 31))
    first, last = ms[0]["loss"], sum(m["loss"] for m in ms[-3:]) / 3
    assert first > 4.0                         # a random model is ~uniform over 105 tokens
    assert last < 0.6 * first, (first, last)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert CK.load_state(out)["step"] == 30
    with open(os.path.join(out, "sft_result.json")) as f:
        assert json.load(f) == {}


# -----------------------------------------------------------------------------
# GRPO update direction and masking

def test_grpo_step_moves_logprobs_in_the_direction_of_the_advantage():
    """One SGD step on the GRPO loss with A = +1 for one completion and -1 for another raises the
    summed log-prob of the first and lowers that of the second; A = 0 rows are left alone by the loss."""
    torch.manual_seed(0)
    m, tok = M.load("tiny", seed=0)
    prompts = [D.encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("12+34", "345+678") for _ in range(2)]
    m.eval()
    r = rollout.generate(m, tok, prompts, max_new_tokens=8)
    m.train()
    C = r.completion_ids.shape[1]
    mask = r.completion_mask
    adv = torch.tensor([1.0, 0.0, 0.0, -1.0])

    def seq_logp():
        with torch.no_grad():
            return (M.token_logprobs(m, r.input_ids, r.attention_mask, C) * mask).sum(1)

    before = seq_logp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    logp = M.token_logprobs(m, r.input_ids, r.attention_mask, C)
    lt, _ = grpo.per_token_loss(logp, logp.detach(), adv, mask, 0.2, 0.28)
    loss = grpo.aggregate(lt, mask, "dapo", 4, int(mask.sum()), C)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[3] < before[3] - 1e-3, (before, after)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_all_masked_batch_changes_nothing(loss_type):
    """With every completion token masked: loss 0, every gradient exactly 0, and an AdamW step
    (weight_decay 0, as in grpo.py) leaves every parameter bit-for-bit unchanged."""
    torch.manual_seed(0)
    m, tok = M.load("tiny", seed=0)
    prompts = [D.encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("12+34", "1+2")]
    r = rollout.generate(m, tok, prompts, max_new_tokens=6)
    C = r.completion_ids.shape[1]
    mask = torch.zeros_like(r.completion_mask)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    logp = M.token_logprobs(m, r.input_ids, r.attention_mask, C)
    lt, _ = grpo.per_token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.28)
    loss = grpo.aggregate(lt, mask, loss_type, 2, int(mask.sum()), C)
    assert loss.item() == 0.0                      # exact: every term is multiplied by a mask of 0
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in m.parameters())
    opt.step()                                     # zero moments -> an update of exactly 0 (no weight decay)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_accumulation_equals_full_batch_gradient(loss_type):
    """What grpo.main does with --micro-batch: backward on each micro-batch's aggregate (with the full
    batch's normalisers) accumulates exactly the full-batch parameter gradient."""
    torch.manual_seed(0)
    m, tok = M.load("tiny", seed=0)
    prompts = [D.encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("12+34", "5+6", "789+1", "3")
               for _ in range(2)]
    r = rollout.generate(m, tok, prompts, max_new_tokens=8)
    B, C = r.completion_mask.shape
    mask = r.completion_mask.clone()
    mask[2, 3:] = 0.0
    n_tok = int(mask.sum())
    adv = torch.tensor([1.0, -1.0, 0.3, -0.3, 2.0, -2.0, 0.0, 0.5])

    def grads(slices):
        m.zero_grad(set_to_none=True)
        for s in slices:
            logp = M.token_logprobs(m, r.input_ids[s], r.attention_mask[s], C)
            lt, _ = grpo.per_token_loss(logp, logp.detach(), adv[s], mask[s], 0.2, 0.28)
            grpo.aggregate(lt, mask[s], loss_type, B, n_tok, C).backward()
        return [p.grad.clone() for p in m.parameters()]

    full = grads([slice(0, B)])
    micro = grads([slice(0, 3), slice(3, 6), slice(6, 8)])
    assert any(g.abs().max() > 0 for g in full)
    # The same sums in another grouping (3 backward passes over 3 + 3 + 2 rows, accumulated, vs one):
    # within FP32_RTOL (tests/conftest.py) of the size of the terms, taken as each tensor's largest
    # gradient (seen: <= 6e-7 of it). Elementwise-relative would not do: an element that cancels to ~0
    # keeps the rounding of its large terms.
    for a, b in zip(full, micro):
        assert (a - b).abs().max() <= FP32_RTOL * b.abs().max()


# -----------------------------------------------------------------------------
# SFT end to end

def test_sft_resume_after_crash_gives_the_same_run(tmp_path, monkeypatch):
    """SFT interrupted after the step-2 checkpoint and resumed ends with the same weights and the same
    step-3/4 losses as an uninterrupted run."""
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    kw = dict(steps=4, save_every=2, batch_size=8, num_examples=50, eval_n=0, threads=TEST_THREADS, warmup=2)
    ma, _, _ = sft.main(sft.SFTConfig(out=a, **kw))
    real_collate, calls = sft.collate, []

    def crashing_collate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in step 3")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(sft, "collate", crashing_collate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.main(sft.SFTConfig(out=b, **kw))
    monkeypatch.setattr(sft, "collate", real_collate)
    gc.collect()                                  # let the crashed run's log file be closed
    assert CK.load_state(b)["step"] == 2
    mb, _, _ = sft.main(sft.SFTConfig(out=b, resume=True, **kw))
    # Bitwise: the resumed run restores weights, AdamW state, schedule, RNG and data position exactly and
    # then runs the same code on the same shapes, on this machine, with the same thread count, as the
    # uninterrupted run did for steps 3-4: the same operations on the same numbers in the same order.
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    la = {m["step"]: m for m in metrics(os.path.join(a, "sft_metrics.jsonl"))}
    lb = {m["step"]: m for m in metrics(os.path.join(b, "sft_metrics.jsonl"))}
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for st in (3, 4):  # (bitwise, for the same reason)
        assert la[st]["loss"] == lb[st]["loss"] and la[st]["learning_rate"] == lb[st]["learning_rate"]


def test_sft_from_jsonl(tmp_path):
    """SFT reads JSONL rows in both layouts (prompt/completion strings and messages) and trains on them."""
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "1+2=", "completion": "3"},
            {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2"},
                          {"role": "assistant", "content": "<answer>4</answer>"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    sft.main(sft.SFTConfig(data=str(data), out=out, steps=10, batch_size=2, eval_n=0, threads=TEST_THREADS, warmup=1))
    ms = metrics(os.path.join(out, "sft_metrics.jsonl"))
    assert ms[-1]["loss"] < ms[0]["loss"]
    # num_tokens: "3"+EOS = 2, and "<answer>4</answer>"+EOS = 4
    assert all(m["num_tokens"] == 6 for m in ms)
    with pytest.raises(D.DataError, match=r"sft\.jsonl:2: .*unknown role"):
        data.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
        sft.main(sft.SFTConfig(data=str(data), out=str(tmp_path / "out2"), steps=1, eval_n=0,
                               threads=TEST_THREADS))
    assert not os.path.exists(os.path.join(str(tmp_path / "out2"), "sft_metrics.jsonl"))


# -----------------------------------------------------------------------------
# GRPO end to end

def test_grpo_resume_gives_the_same_run(tmp_path):
    """4 steps straight (checkpoint at 2) == 2 steps, then --resume to 4: same final weights and the same
    step-3/4 metrics. The checkpoint loads with from_pretrained and equals the returned model."""
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    # a dense reward, PPO-style reuse and a KL term, so every piece of state matters
    kw = dict(save_every=2, reward_funcs=TOY, lr=1e-3, num_iterations=2, beta=0.04)
    ma, _, _ = grpo.main(quiet_grpo(out=a, steps=4, **kw))
    grpo.main(quiet_grpo(out=b, steps=2, **kw))
    assert CK.load_state(b)["step"] == 2
    mb, _, _ = grpo.main(quiet_grpo(out=b, steps=4, resume=True, **kw))
    wa = load_file(os.path.join(a, "model.safetensors"))
    wb = load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    # Bitwise: the resumed run restores weights, Adam state, schedule, sampling RNG and prompt position
    # exactly, then runs steps 3-4 with the same code on the same shapes, on this machine, with the same
    # thread count as the straight run: the same operations on the same numbers in the same order.
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = metrics(os.path.join(a, "metrics.jsonl")), metrics(os.path.join(b, "metrics.jsonl"))
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):
        for k in ("reward", "loss", "num_tokens", "grad_norm", "entropy", "completions/mean_length",
                  "learning_rate", "kl", "ratio"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
    # the training run did change the weights
    assert any(not torch.equal(wa[k], v) for k, v in M.load("tiny")[0].state_dict().items() if k in wa)
    # the checkpoint is a plain HF directory: from_pretrained gives the model grpo.main returned
    hf = AutoModelForCausalLM.from_pretrained(a)
    sd = hf.state_dict()                          # (a saved copy of the same tensors: exact)
    assert all(torch.equal(sd[k], v) for k, v in ma.state_dict().items())
    assert all(torch.equal(sd[k], v) for k, v in mb.state_dict().items())
    assert CK.load_state(a)["step"] == 4 and CK.load_state(b)["step"] == 4


def test_grpo_custom_reward_function_learns_from_scratch(tmp_path):
    """--reward-funcs module:function loads a user reward; with that dense reward (fraction of digit
    characters) 12 GRPO steps from the untrained model raise the reward clearly."""
    out = str(tmp_path / "g")
    grpo.main(quiet_grpo(out=out, steps=12, num_generations=8, reward_funcs=TOY, lr=3e-3))
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    r = [m["reward"] for m in ms]
    assert ms[0]["rewards/" + TOY + "/mean"] == pytest.approx(r[0])
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.2, r


def test_grpo_logs_the_counts_a_reward_function_reports(tmp_path):
    """A reward function that returns its values with `.metrics` (code_reward: runs, timeouts) gets
    those counts logged as rewards/<fn>/<key>, summed over the step's calls: one call per step here."""
    out = str(tmp_path / "g")
    name = "toy_rewards:counted"
    grpo.main(quiet_grpo(out=out, steps=2, reward_funcs=name))
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    assert [m[f"rewards/{name}/calls"] for m in ms] == [1, 1]
    assert [m[f"rewards/{name}/scored"] for m in ms] == [16, 16]          # 4 prompts x 4 completions


def test_grpo_says_when_there_is_no_learning_signal(tmp_path, capsys):
    """From the untrained model every group scores 0 on the built-in task (frac_reward_zero_std = 1 at
    every step): the run says so on stderr after 5 steps, once. A run with a dense reward, whose groups
    always differ, does not."""
    grpo.main(quiet_grpo(out=str(tmp_path / "a"), steps=6))
    err = capsys.readouterr().err
    assert err.count("warning: no learning signal") == 1, err[-2000:]
    assert grpo.no_signal_warning([1.0] * 4) is None and grpo.no_signal_warning([1.0] * 4 + [0.9]) is None
    assert grpo.no_signal_warning([0.5] + [0.96] * 5) is not None
    grpo.main(quiet_grpo(out=str(tmp_path / "b"), steps=6, reward_funcs="toy_rewards:first_char"))
    assert "no learning signal" not in capsys.readouterr().err


def test_grpo_missing_init_dir(tmp_path):
    """A non-default --init that does not exist is an error; nothing is trained."""
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        grpo.main(quiet_grpo(init=str(tmp_path / "nope"), out=out))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_grpo_bad_jsonl_fails_before_training(tmp_path):
    """A malformed prompts file fails with file:line before any step; so does a too-long prompt."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n" + '{"prompt": "1+' + "\n")
    out = str(tmp_path / "out")
    with pytest.raises(D.DataError, match=r"prompts\.jsonl:2: malformed JSON"):
        grpo.main(quiet_grpo(data=str(data), out=out))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    data.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(D.DataError, match=r"prompts\.jsonl:2: missing field 'prompt'"):
        grpo.main(quiet_grpo(data=str(data), out=out))
    data.write_text(json.dumps({"prompt": "123456789", "answer": "3"}) + "\n")
    with pytest.raises(D.DataError, match=r"prompts\.jsonl:1: prompt has 9 tokens > --max-prompt-length 5"):
        grpo.main(quiet_grpo(data=str(data), out=out, max_prompt_length=5))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_grpo_jsonl_prompts_train(tmp_path):
    """JSONL prompts (standard strings + answer column) drive a short run: the accuracy and format
    rewards are logged and the checkpoint loads with from_pretrained."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(6)))
    out = str(tmp_path / "out")
    grpo.main(quiet_grpo(data=str(data), out=out, steps=2, num_prompts=2, num_generations=2, max_new_tokens=6))
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in ms] == [1, 2]
    assert "rewards/accuracy/mean" in ms[0] and "rewards/format/mean" in ms[0]
    assert all(m["num_tokens"] > 0 for m in ms)
    AutoModelForCausalLM.from_pretrained(out)


def test_format_reward_with_prefilling_chat_template():
    """format_reward's docstring: when the chat template pre-fills '<think>' (Qwen3 / R1-distill), a
    well-formed completion still scores 1. Scored the way grpo.main scores a conversational batch."""
    tok = M.build_char_tokenizer()
    tok.chat_template = M.CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}")
    msgs = [{"role": "user", "content": "1+2"}]
    ids = D.encode_prompt(tok, msgs)
    assert tok.decode(ids).endswith("<think>")           # the template really pre-fills the tag
    completion = "1+2=3</think><answer>3</answer>"        # what the model writes after the prefill
    names, funcs, weights = grpo.resolve_reward_funcs(quiet_grpo())
    assert names == ["accuracy", "format"]
    cols = {"answer": ["3"], "prompt_text": tok.batch_decode([ids])}   # the columns grpo.main passes
    per_fn, R = grpo.score(funcs, weights, [msgs], [completion], [tok(completion).input_ids], cols)
    assert per_fn[0].tolist() == [1.0, 1.0]


def test_grpo_held_out_evaluation_bookkeeping(tmp_path):
    """With eval_n > 0: accuracy before, every eval_every steps and after; result.json and the saved
    history agree, and the final checkpoint carries the whole history."""
    out = str(tmp_path / "g")
    _, _, summary = grpo.main(quiet_grpo(out=out, steps=2, eval_n=5, eval_every=1, max_new_tokens=6))
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    assert res["n"] == 5 and [h["step"] for h in res["history"]] == [0, 1, 2]
    assert res["held_out_accuracy_before"] == res["history"][0]["held_out_accuracy"]
    assert res["held_out_accuracy_after"] == res["history"][-1]["held_out_accuracy"]
    assert all(0.0 <= h["held_out_accuracy"] <= 1.0 for h in res["history"])
    ms = metrics(os.path.join(out, "metrics.jsonl"))
    assert "held_out_accuracy" in ms[0] and "held_out_accuracy" not in ms[1]   # the last step: 'after' instead
    assert CK.load_state(out)["history"] == res["history"]
