"""Adaptive thinking: the built-in adapt task (budget tags, a NoThinking mode, prompts that force a mode),
rewards.thinking_stats by hand, and grpo.py logging the thinking/* metrics of a step from its own texts."""
import json
import os
import random

import grpo
import rewards
from conftest import TEST_THREADS


def test_carries_by_hand():
    assert [rewards.carries(a, b) for a, b in [(410, 537), (586, 257), (999, 1), (100, 100), (15, 85)]] == [0, 2, 3, 0, 2]


def test_adapt_problems_and_cold_start_traces():
    """Free problems: easy ones have no carry, hard ones one or more; the answer is right, the trace opens with
    the tag of its mode; the cold start draws 70% hard problems (so the scratchpad is learned), forces a mode in
    ~30% of prompts, and the teacher obeys it. Shares from 1,000-2,000 draws: binomial std <= 1.5%, bands ~3.5 std."""
    rng = random.Random(0)
    free = [rewards.make_adapt(rng) for _ in range(2000)]
    for p in free:
        a, b = map(int, p.prompt.split("+"))
        assert p.answer == str(a + b) and p.question == p.prompt
        assert (p.columns["difficulty"] == "easy") == (rewards.carries(a, b) == 0) == (p.columns["carries"] == 0)
        assert rewards.accuracy_reward(None, [p.trace], answer=[p.answer]) == [1.0]
        if p.trace.startswith("[Easy]"):
            assert p.trace == f"[Easy]<think></think><answer>{a + b}</answer>" and p.columns["difficulty"] == "easy"
        else:
            assert p.trace == "[Hard]" + rewards.addition_trace(a, b)
    easy = [p for p in free if p.columns["difficulty"] == "easy"]
    assert 0.77 < len(easy) / len(free) < 0.83                                   # easy_share 0.8
    assert 0.56 < sum(p.trace.startswith("[Hard]") for p in easy) / len(easy) < 0.64  # think_easy 0.6
    cold = [rewards.COLD_START["adapt"](random.Random(i)) for i in range(1000)]
    forced = [p for p in cold if p.prompt != p.question]
    assert 0.25 < len(forced) / len(cold) < 0.35
    assert 0.25 < sum(p.columns["difficulty"] == "easy" for p in cold) / len(cold) < 0.35   # cold start: 70% hard
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
