"""Adaptive thinking: the built-in adapt task (budget tags, a NoThinking mode, prompts that force a mode),
rewards.thinking_stats by hand, and grpo.py logging the thinking/* metrics of a step from its own texts."""
import json
import math
import os
import random

import pytest

import grpo
import rewards
from conftest import TEST_THREADS


def test_carries_by_hand():
    assert [rewards.carries(a, b) for a, b in [(410, 537), (586, 257), (999, 1), (100, 100), (15, 85)]] == [0, 2, 3, 0, 2]


def test_adapt_problems_and_cold_start_traces():
    """Free problems: easy ones have no carry, hard ones one or more; the answer is right; the trace opens with
    the true bucket's tag (AdaCtrl's), then an empty think or the scratchpad: every hard problem and ~60% of the
    easy ones think. The cold start draws 50% hard problems (so the scratchpad is learned), forces a tag in ~30%
    of prompts, and the teacher obeys it, tag and mode. Shares from 1,000-2,000 draws: binomial std <= 1.6%,
    bands ~3.5 std."""
    rng = random.Random(0)
    free = [rewards.make_adapt(rng) for _ in range(2000)]
    for p in free:
        a, b = map(int, p.prompt.split("+"))
        assert p.answer == str(a + b) and p.question == p.prompt
        assert (p.columns["difficulty"] == "easy") == (rewards.carries(a, b) == 0) == (p.columns["carries"] == 0)
        assert rewards.accuracy_reward(None, [p.trace], answer=[p.answer]) == [1.0]
        tag = "[Easy]" if p.columns["difficulty"] == "easy" else "[Hard]"
        assert p.trace in (f"{tag}<think></think><answer>{a + b}</answer>", tag + rewards.addition_trace(a, b))
        assert p.columns["difficulty"] == "easy" or "<think></think>" not in p.trace
    easy = [p for p in free if p.columns["difficulty"] == "easy"]
    assert 0.77 < len(easy) / len(free) < 0.83                                   # easy_share 0.8
    assert 0.56 < sum("<think></think>" not in p.trace for p in easy) / len(easy) < 0.64  # think_easy 0.6
    cold = [rewards.COLD_START["adapt"](random.Random(i)) for i in range(1000)]
    forced = [p for p in cold if p.prompt != p.question]
    assert 0.25 < len(forced) / len(cold) < 0.35
    assert 0.45 < sum(p.columns["difficulty"] == "easy" for p in cold) / len(cold) < 0.55   # cold start: 50% hard
    free_easy = [p for p in cold if p.prompt == p.question and p.columns["difficulty"] == "easy"]
    assert all(p.trace.startswith("[Easy]") for p in free_easy)
    assert 0.4 < sum("<think></think>" in p.trace for p in free_easy) / len(free_easy) < 0.6  # half answered at once
    for p in forced:
        tag = p.prompt[len(p.question) + 1:]
        assert tag in ("[Easy]", "[Hard]") and p.trace.startswith(tag)
        assert ("<think></think>" in p.trace) == (tag == "[Easy]")


def test_cold_start_stream_never_holds_a_held_out_question():
    held = rewards.held_out("adapt", 300)
    stream = rewards.ProblemStream("adapt", seed=3, exclude=held, cold_start=True)
    qs = {p.question for p in held}
    assert all(p.prompt == p.question for p in held)                              # held-out prompts are free
    assert not any(p.question in qs for p in stream.take(3000))


def test_thinking_stats_hand_values():
    comps = ["[Easy]<think></think><answer>7</answer>", "[Hard]<think>3+4=7</think><answer>7</answer>",
             "<think>3+4=8</think><answer>8</answer>", "[easy]<think> </think><answer>9</answer>"]
    lengths, correct = [10, 20, 30, 12], [1.0, 1.0, 0.0, None]
    s = rewards.thinking_stats(comps, lengths, correct, ["easy", "hard", "hard", "easy"])
    assert s["thinking/rate"] == (2.0, 4) and s["thinking/skip_rate"] == (2.0, 4)   # the 3rd thinks, 4th skips
    assert s["thinking/length/think"] == (50.0, 2) and s["thinking/length/no_think"] == (22.0, 2)
    assert s["thinking/tag_rate/easy"] == (2.0, 4)
    assert s["thinking/length/easy_tag"] == (22.0, 2) and s["thinking/length/hard_tag"] == (20.0, 1)
    assert s["thinking/length/no_tag"] == (30.0, 1)
    assert s["thinking/length/easy"] == (22.0, 2) and s["thinking/length/hard"] == (50.0, 2)
    assert s["thinking/accuracy/easy"] == (1.0, 1) and s["thinking/accuracy/hard"] == (1.0, 2)   # None abstains
    assert "thinking/accuracy/easy" not in rewards.thinking_stats(comps, lengths, correct)       # no buckets


def test_grpo_logs_thinking_metrics_that_match_its_samples(tmp_path):
    """A step on adapt from scratch logs thinking/*: shares in [0, 1], and the step's mean length lies
    between the means of its buckets, and of its modes (each is a mean over a part of the batch)."""
    out = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(task="adapt", init="scratch", out=out, steps=1, num_prompts=2, num_generations=2,
                              max_new_tokens=8, eval_n=0, sample_every=1, threads=TEST_THREADS, save_every=0))
    m = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert 0.0 <= m["thinking/rate"] <= 1.0 and 0.0 <= m["thinking/tag_rate/easy"] <= 1.0
    for parts in (("easy", "hard"), ("think", "no_think"), ("easy_tag", "hard_tag", "no_tag")):
        means = [m[f"thinking/length/{p}"] for p in parts if f"thinking/length/{p}" in m]
        assert means and min(means) - 1e-9 <= m["completions/mean_length"] <= max(means) + 1e-9
    assert {k for k in m if k.startswith("rewards/")} == {"rewards/accuracy/mean", "rewards/accuracy/std",
                                                           "rewards/accuracy/abstained"}   # no format reward here


def test_no_thinking_metrics_on_a_plain_task(tmp_path):
    out = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(task="add2", init="scratch", out=out, steps=1, num_prompts=2, num_generations=2,
                              max_new_tokens=4, eval_n=0, sample_every=0, threads=TEST_THREADS, save_every=0))
    m = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert m["completions/mean_length"] > 0 and not [k for k in m if k.startswith("thinking/")]


def test_mode_prefix_logprobs_are_the_uniform_mixture(tok):
    """pi_IS by hand: [Easy] and [Hard] share '[' (log 1) and part at the next token (log 1/2); of ab|ac|bd,
    ab agrees with 2 of 3 on 'a' (log 2/3), then with 1 of those 2 (log 1/2): each prefix has mass 1/3."""
    cfg = grpo.GRPOConfig(mode_prefixes="[Easy]|[Hard]", rollout_correction="tis")
    (easy, le), (hard, lh) = grpo.mode_prefixes(cfg, tok)
    assert tok.decode(easy) == "[Easy]" and tok.decode(hard) == "[Hard]"
    assert le == lh == [0.0, math.log(0.5), 0.0, 0.0, 0.0, 0.0]
    three = grpo.mode_prefixes(grpo.GRPOConfig(mode_prefixes="ab|ac|bd", rollout_correction="tis",
                                               rollout_correction_cap=3.0, num_generations=6), tok)
    assert [lp for _, lp in three] == [[math.log(2 / 3), math.log(0.5)]] * 2 + [[math.log(1 / 3), 0.0]]
    assert sum(math.exp(sum(lp)) for _, lp in three) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("flags, says", [
    (dict(mode_prefixes="[Easy]|[Hard]"), "--rollout-correction tis"),
    (dict(mode_prefixes="[Easy]|[Hard]", rollout_correction="tis", num_generations=3), "multiple"),
    (dict(mode_prefixes="[Easy]", rollout_correction="tis"), "two or more"),
    (dict(mode_prefixes="a|b|c|d", rollout_correction="tis"), "cap must be >= 4")])
def test_mode_prefix_flags_that_cannot_work(flags, says):
    problems = [msg for ok, msg in grpo.check_config(grpo.GRPOConfig(**flags)) if not ok]
    assert problems and says in problems[0]


def test_mode_prefixes_of_different_lengths_are_refused(tok):
    for spec, limit in (("[Easy]|<think>", 48), ("[Easy]|[Hard]", 6)):
        with pytest.raises(grpo.ConfigError, match="same number of tokens"):
            grpo.mode_prefixes(grpo.GRPOConfig(mode_prefixes=spec, rollout_correction="tis", max_new_tokens=limit), tok)


def test_opened_rollout_is_the_prefix_then_what_generate_writes_after_it(tiny):
    """The completion is the row's prefix, then the greedy continuation of prompt + prefix: the same call on
    the same shapes, so equal exactly; the prefix is in both masks with the given log-probs."""
    import torch
    from rollout import generate
    tiny, tok = tiny
    prompts = [tok("12+34", add_special_tokens=False).input_ids, tok("5+6", add_special_tokens=False).input_ids]
    pre = [(tok("[E", add_special_tokens=False).input_ids, [0.0, -0.5]),
           (tok("[H", add_special_tokens=False).input_ids, [0.0, -0.5])]
    r = generate(tiny, tok, prompts, 8, greedy=True, prefixes=pre)
    plain = generate(tiny, tok, [p + ids for p, (ids, _) in zip(prompts, pre)], 6, greedy=True)
    assert torch.equal(r.input_ids, plain.input_ids) and r.prompt_len == plain.prompt_len - 2
    assert [tok.decode(c[:2]) for c in r.completion_ids] == ["[E", "[H"]
    assert torch.equal(r.completion_mask[:, 2:], plain.completion_mask) and r.completion_mask[:, :2].eq(1).all()
    assert r.loss_mask[:, :2].tolist() == [[0.0, 1.0]] * 2        # '[' was certain: out of the loss; E / H chosen
    # bitwise: opened() runs this very generate call on prompt + prefix (same code, same shapes), and the
    # mask is 0 / 1 from the sampled ids, not a float result
    assert torch.equal(r.loss_mask[:, 2:], plain.loss_mask)
    assert r.logprobs[:, :2].tolist() == [[0.0, -0.5]] * 2 and torch.equal(r.logprobs[:, 2:], plain.logprobs)
    with pytest.raises(ValueError, match="no room"):
        generate(tiny, tok, prompts, 2, greedy=True, prefixes=pre)


def test_mode_prefixes_teach_a_mode_the_policy_never_samples(tmp_path, tok):
    """An untrained model gives '[' ~1/V, so on-policy GRPO never sees "[E" and cannot learn that it pays.
    With --mode-prefixes "[E|[H" every group holds both, half each, and the IS-weighted gradient raises
    log pi(E | '[') - log pi(H | '['), the choice itself (what the greedy policy would take after '[')."""
    import torch
    from data import encode_prompt
    from model import load
    out = str(tmp_path / "g")
    cfg = grpo.GRPOConfig(task="add2", init="scratch", out=out, steps=6, num_prompts=4, num_generations=4,
                          max_new_tokens=4, eval_n=0, sample_every=1, threads=TEST_THREADS, save_every=0, lr=3e-3,
                          reward_funcs="toy_rewards:opens_easy", mode_prefixes="[E|[H", rollout_correction="tis")
    trained = grpo.main(cfg)[0]
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert samples and all(s["completion"].startswith(("[E", "[H")) for s in samples)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert all(r["rewards/toy_rewards:opens_easy/mean"] == 0.5 for r in rows)   # exactly half of every group

    @torch.no_grad()
    def preference(model):   # mean over prompts of log pi(E | prompt, '[') - log pi(H | prompt, '[')
        E_, H_, B_ = (tok.convert_tokens_to_ids(c) for c in "EH[")
        ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": q}]) + [B_] for q in ("12+34", "56+78")])
        lp = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        return float((lp[:, E_] - lp[:, H_]).mean())
    start, _ = load("tiny", seed=0)          # --init scratch at --seed 0: the model the run started from
    assert preference(trained) > preference(start) + 1.0


def test_held_out_thinking_metrics_by_hand(tok):
    """evaluate.thinking on greedy completions: lengths re-encoded + EOS, a score >= 1 counts as right."""
    import evaluate as E
    rows = [{"difficulty": "easy"}, {"difficulty": "hard"}]
    comps = ["[Easy]<think></think><answer>7</answer>", "[Hard]<think>3+4=7</think><answer>7</answer>"]
    m = E.thinking(rows, comps, [1.0, 0.0], tok)
    n0, n1 = (len(tok(c, add_special_tokens=False).input_ids) + 1 for c in comps)   # + EOS
    assert n1 - n0 == len("3+4=7")                                  # the scratchpad, one token per character
    assert m["mean_length"] == (n0 + n1) / 2 and m["thinking/length/easy"] == n0 and m["thinking/length/hard"] == n1
    assert m["thinking/rate"] == 0.5 and m["thinking/accuracy/easy"] == 1.0 and m["thinking/accuracy/hard"] == 0.0
    assert E.thinking([{}, {}], comps, [1.0, 0.0], tok) == {}   # no difficulty column: nothing to bucket


def test_grpo_held_out_logs_thinking(tmp_path):
    out = str(tmp_path / "g")
    _, _, summary = grpo.main(grpo.GRPOConfig(task="adapt", init="scratch", out=out, steps=1, num_prompts=2,
                                              num_generations=2, max_new_tokens=8, eval_n=4, sample_every=0,
                                              threads=TEST_THREADS, save_every=0))
    for h in summary["history"]:                                   # before and after
        assert 0.0 <= h["held_out/thinking/rate"] <= 1.0 and 1 <= h["held_out/mean_length"] <= 9
