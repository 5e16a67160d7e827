"""Tool calls inside the rollout (tools.py, rollout.ToolLoop): the spliced output sits exactly where the loss
mask is 0, gets no gradient, and is what the tool returned (cut at its limit); calls per completion, errors,
timeouts and hostile programs cost only their row; greedy rollout with tools equals a slow reference; the
sampler's log-probs equal the trainer's on model-written tokens; SFT masks the outputs of tool traces; a
GRPO run with tools resumes exactly."""
import json
import os
import random
import re
import time
from types import SimpleNamespace

import pytest
import torch

import grpo
import model as M
import rewards
import sft
import tools
from conftest import FP32_RTOL, TEST_THREADS
from rollout import generate


class Scripted(torch.nn.Module):
    """A stand-in policy that writes the text script[i] in row i, one token per step, whatever it is fed
    (tool output included): every position of a rollout is known in advance. Its sampling log-prob is 0."""

    def __init__(self, tok, scripts):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = [tok(s, add_special_tokens=False).input_ids + [tok.eos_token_id] for s in scripts]
        self.V, self.eos, self.t = len(tok), tok.eos_token_id, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=None,
                cache=None):
        logits = torch.full((input_ids.shape[0], 1, self.V), -1e4)
        for i, ids in enumerate(self.ids):
            logits[i, 0, ids[self.t] if self.t < len(ids) else self.eos] = 0.0
        self.t += 1
        return SimpleNamespace(logits=logits, cache=None)


@pytest.fixture(scope="module")
def tok():
    return M.build_char_tokenizer()


def roll(tok, scripts, fn=tools.calculator, **spec):
    prompts = [tok("1", add_special_tokens=False).input_ids] * len(scripts)
    t = tools.Tools(fn, tools.ToolSpec(**spec), tok)
    return generate(Scripted(tok, scripts), tok, prompts, 64, greedy=True, tools=t)


def texts(tok, r):
    return tok.batch_decode(r.completion_ids, skip_special_tokens=True)


def test_spliced_output_is_exactly_where_the_loss_mask_is_zero(tok):
    """Row 0 calls the calculator; the model's own 'xxxx' after the call is replaced by the tool's '<o>1791</o>'
    (11 tokens) and the model then goes on with its script, shifted by nothing: forced tokens replace, one per
    step. Row 1 never calls. Loss mask: 0 exactly on those 11 positions; completion mask 1 there."""
    r = roll(tok, ["<c>37*48+15</c>" + "#" * 11 + "<answer>1791</answer>", "<answer>5</answer>"])
    got = texts(tok, r)
    assert got[0] == "<c>37*48+15</c><o>1791</o><answer>1791</answer>" and got[1] == "<answer>5</answer>"
    call_end = len(tok("<c>37*48+15</c>", add_special_tokens=False).input_ids)
    zeros = (r.loss_mask[0] == 0) & (r.completion_mask[0] == 1)
    assert zeros.nonzero().flatten().tolist() == list(range(call_end, call_end + 11))
    assert torch.equal(r.loss_mask[1], r.completion_mask[1])
    assert r.tool_stats["calls"].tolist() == [1, 0] and r.tool_stats["forced_tokens"].tolist() == [11, 0]
    assert (r.logprobs[0][zeros] == 0).all()


def test_limits_errors_and_cut_outputs(tok):
    """A third call over max_calls=2 gets no output (counted over_limit); a bad expression answers 'error: ...'
    (counted); an output longer than max_output_tokens is cut and ends with the marker."""
    r = roll(tok, ["<c>1+1</c>" + "#" * 8 + "<c>2+2</c>" + "#" * 8 + "<c>3+3</c>", "<c>1/0</c>" + "#" * 30],
             max_calls=2, max_output_tokens=20)
    got = texts(tok, r)
    assert got[0] == "<c>1+1</c><o>2</o><c>2+2</c><o>4</o><c>3+3</c>"
    assert r.tool_stats["over_limit"].tolist() == [1, 0] and r.tool_stats["calls"].tolist() == [2, 1]
    assert got[1] == "<c>1/0</c><o>error: not...</o>" + "#" * 10                  # 20 tokens: cut, marked
    assert r.tool_stats["errors"].tolist() == [0, 1]
    assert r.tool_stats["forced_tokens"][1] == 20                                 # cut at the limit


def test_a_hanging_tool_costs_its_timeout_and_its_row_only(tok):
    def slow(call):
        if call == "hang":
            time.sleep(30)
        return "ok"
    t0 = time.monotonic()
    r = roll(tok, ["<c>hang</c>", "<c>fine</c>"], fn=slow, timeout=0.5, max_output_tokens=40)
    assert time.monotonic() - t0 < 5
    assert texts(tok, r) == ["<c>hang</c><o>error: timed out after 0.5 s</o>", "<c>fine</c><o>ok</o>"]
    assert r.tool_stats["timeouts"].tolist() == [1, 0]


def test_a_hostile_program_in_a_python_call_is_contained(tok):
    """The python tool runs each call in the sandbox: a program that tries to kill its parent and one that
    loops get an error output; the row beside them gets its answer."""
    import sandbox
    if not sandbox.probe().get("runs", True):
        pytest.skip("this machine cannot run the sandbox")
    r = roll(tok, ["<c>import os,signal;os.kill(os.getppid(),9)</c>" + "#" * 20,
                   "<c>while True: pass</c>" + "#" * 20, "<c>print(6*7)</c>" + "#" * 8],
             fn=lambda c: tools.python(c, timeout=1.0), timeout=10.0, max_output_tokens=30)
    got = texts(tok, r)
    assert got[2] == "<c>print(6*7)</c><o>42</o>"
    assert "<o>error" in got[1] and r.tool_stats["errors"][1] == 1


def test_tool_output_is_never_structure(tok):
    """An output containing the EOS or a role token's text is spliced as characters, so the row goes on."""
    r = roll(tok, ["<c>x</c>" + "#" * 20 + "<answer>1</answer>"], fn=lambda c: "<eos><|user|>")
    assert texts(tok, r)[0].endswith("<answer>1</answer>") and r.completion_mask[0].sum() > 20


def test_sft_masks_the_outputs_of_tool_traces(tok):
    """tools.output_mask on a calc trace: 0 on exactly the '<o>1791</o>' tokens; sft.load_examples attaches it."""
    trace = "<c>37*48+15</c><o>1791</o><answer>1791</answer>"
    ids = tok(trace, add_special_tokens=False).input_ids + [tok.eos_token_id]
    mask = tools.output_mask(tok, ids, tools.ToolSpec())
    start = len(tok("<c>37*48+15</c>", add_special_tokens=False).input_ids)
    assert [i for i, m in enumerate(mask) if m == 0] == list(range(start, start + 11))
    cfg = sft.SFTConfig(task="calc", tools="calculator", num_examples=4, eval_n=0)
    for p, c, m in sft.load_examples(cfg, tok):
        text = tok.decode([t for t, k in zip(c, m) if k == 0])
        assert text.startswith("<o>") and text.endswith("</o>")



def test_calc_traces_are_right_four_digit_and_mostly_product_only():
    """The calc teacher: every call's output is what the calculator returns, every product and total has 4
    digits (the fixed copy distance), the answer is the total, and about full_share = 25% of the traces
    hand the tool the whole expression (2,000 draws: binomial std 1%, so 20%..30% is a 5-sigma band)."""
    rng, full = random.Random(0), 0
    for _ in range(2000):
        p = rewards.make_calc(rng)
        a, b, c = map(int, p.prompt.replace("*", "+").split("+"))
        calls = list(zip(re.findall(r"<c>(.*?)</c>", p.trace), re.findall(r"<o>(.*?)</o>", p.trace)))
        assert len(calls) == 1 and tools.calculator(calls[0][0]) == calls[0][1]
        assert len(str(a * b)) == 4 and len(p.answer) == 4 and p.answer == str(a * b + c)
        assert rewards.extract_answer(p.trace) == p.answer
        full += calls[0][0] == p.prompt
    assert 0.20 < full / 2000 < 0.30

@pytest.fixture(scope="module")
def calc_model(tmp_path_factory):
    """The tiny model after a short SFT on the calc traces: it writes calls."""
    out = str(tmp_path_factory.mktemp("calc") / "sft")
    sft.main(sft.SFTConfig(task="calc", tools="calculator", steps=150, eval_n=0, save_every=0, threads=TEST_THREADS,
                           out=out))
    return out


def test_greedy_rollout_with_tools_equals_a_slow_reference(calc_model):
    """One row at a time: decode greedily to the end of a call, run it, append the call and its output to the
    prompt, decode again: the same tokens as the tool loop (or, at a first difference, a near-tie of the
    argmax: the reference recomputes the prefix in one forward, the loop from its cache)."""
    model, tok = M.load(calc_model)
    spec, t = tools.ToolSpec(), None
    t = tools.Tools(tools.calculator, spec, tok)
    from data import encode_prompt
    for p in rewards.held_out("calc", 4):
        prompt = encode_prompt(tok, p.row()["prompt"])
        loop = generate(model, tok, [prompt], 48, greedy=True, tools=t)
        got = loop.completion_ids[0][loop.completion_mask[0].bool()].tolist()
        ref, calls = [], 0
        while len(ref) < len(got):
            r = generate(model, tok, [prompt + ref], 48 - len(ref), greedy=True)
            new = r.completion_ids[0][r.completion_mask[0].bool()].tolist()
            text, cut = "", None
            for k in range(len(new)):                      # stop right after the first finished call
                text = tok.decode(ref + new[:k + 1])
                if t.call_text(text) is not None and calls < spec.max_calls:
                    cut = k + 1
                    break
            ref += new[:cut] if cut else new
            if cut is None:
                break
            calls += 1
            ref += t.output_ids(tools.calculator(t.call_text(text)))
        ref = ref[:len(got)]
        if got != ref:   # allowed only at a near-tie of the reference's own logits
            k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ref[:k]])).logits[0, -1].float()
            assert float(logits.max() - logits[got[k]]) <= FP32_RTOL * float(logits.abs().max()), (p.prompt, k)


def test_sampling_logprobs_equal_training_logprobs_on_model_tokens(calc_model):
    model, tok = M.load(calc_model)
    from data import encode_prompt
    ids = [encode_prompt(tok, p.row()["prompt"]) for p in rewards.held_out("calc", 8)]
    torch.manual_seed(0)
    r = generate(model, tok, ids, 48, tools=tools.Tools(tools.calculator, tools.ToolSpec(), tok))
    assert (r.loss_mask < r.completion_mask).any()                       # some output was spliced
    with torch.no_grad():
        lp = M.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask.shape[1])
    m = r.loss_mask.bool()
    assert torch.allclose(lp[m], r.logprobs[m], atol=1e-4, rtol=0)


def test_tool_output_gets_no_gradient(calc_model):
    """d loss / d log p is 0 on every spliced token, whatever the loss type."""
    model, tok = M.load(calc_model)
    from data import encode_prompt
    ids = [encode_prompt(tok, p.row()["prompt"]) for p in rewards.held_out("calc", 4)]
    torch.manual_seed(1)
    r = generate(model, tok, ids, 48, tools=tools.Tools(tools.calculator, tools.ToolSpec(), tok))
    spliced = (r.completion_mask == 1) & (r.loss_mask == 0)
    assert spliced.any()
    for loss_type in grpo.LOSS_TYPES:
        logp = r.logprobs.clone().requires_grad_(True)
        lt, _ = grpo.per_token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0, 0.5, -0.5]), r.loss_mask, 0.2, 0.28,
                                    loss_type=loss_type)
        grpo.aggregate(lt, r.loss_mask, loss_type, 4, int(r.loss_mask.sum()), 48).backward()
        assert (logp.grad[spliced] == 0).all() and (logp.grad[r.loss_mask.bool()] != 0).any()


def test_grpo_with_tools_logs_tool_use_and_resumes_exactly(tmp_path, calc_model):
    kw = dict(task="calc", tools="calculator", init=calc_model, num_prompts=4, num_generations=4, eval_n=0,
              sample_every=0, save_every=0, threads=TEST_THREADS)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    grpo.main(grpo.GRPOConfig(out=a, steps=3, **kw))
    grpo.main(grpo.GRPOConfig(out=b, steps=2, **kw))
    grpo.main(grpo.GRPOConfig(out=b, steps=3, resume=True, **kw))
    ma, mb = ([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (a, b))
    assert ma[0]["tools/frac_completions_with_call"] > 0.5 and 0 < ma[0]["tools/output_token_share"] < 1
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "step_time"))}
    assert [drop(m) for m in ma] == [drop(m) for m in mb]   # the same code on the same shapes: bitwise


def test_dpo_sums_log_probs_over_model_written_tokens_only(calc_model, monkeypatch):
    """On-policy pairs sampled with the calculator carry masks that are 0 on the spliced outputs; a pair's
    log-prob is the sum over the model's own tokens (checked against the per-token log-probs by hand).
    (The checker is replaced by the parity of the length, so that pairs exist after so short an SFT.)"""
    import dpo
    monkeypatch.setitem(rewards.REWARD_FUNCS, "accuracy",
                        lambda prompts, completions, **kw: [float(len(c) % 2 == 0) for c in completions])
    model, tok = M.load(calc_model)
    cfg = dpo.DPOConfig(task="calc", tools="calculator", num_generations=4, pairs_per_prompt=2)
    torch.manual_seed(0)
    pairs, _, _ = dpo.sample_pairs(model, tok, rewards.ProblemStream("calc", seed=3).take(16), cfg,
                                   tools.build(cfg, tok))
    used = [p for p in pairs if 0 in p.chosen_mask]                   # pairs whose chosen answer called the tool
    assert used, "the SFT model calls the calculator"
    pairs = used
    ids, attn, mask = dpo.collate_pairs(pairs[:2], tok.pad_token_id, "cpu")
    with torch.no_grad():
        sums, lens = dpo.pair_logps(model, pairs[:2], tok.pad_token_id, "cpu")
        lp = M.token_logprobs(model, ids, attn, mask.shape[1])
    assert torch.allclose(sums, (lp * mask).sum(1)) and lens.tolist() == mask.sum(1).tolist()
    assert lens[0] == sum(pairs[0].chosen_mask) < len(pairs[0].chosen)
