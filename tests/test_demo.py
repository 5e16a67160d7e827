"""The built-in demonstration (README, Results): the careless teacher behind the cold-start traces,
and a short SFT -> GRPO run whose held-out accuracy must rise by far more than its noise."""
import json
import os
import re

import evaluate as E
import grpo
import rewards
import sft
from conftest import TEST_THREADS


def units_carry(prompt):
    a, b = prompt.split("+")
    return int(a[-1]) + int(b[-1]) >= 10


def test_slipped_trace_hand_values():
    """slip=True forgets the carry out of the units column, and only that one; the answer follows the
    (wrong) scratchpad, so the trace stays consistent with itself."""
    assert rewards.addition_trace(347, 285) == "<think>7+5=12,4+8+1=13,3+2+1=6</think><answer>632</answer>"
    assert rewards.addition_trace(347, 285, slip=True) == "<think>7+5=12,4+8=12,3+2+1=6</think><answer>622</answer>"
    assert rewards.addition_trace(999, 999, slip=True) == "<think>9+9=18,9+9=18,9+9+1=19</think><answer>1988</answer>"
    # no carry out of the units column: nothing to forget, the trace is the correct one
    assert rewards.addition_trace(341, 285, slip=True) == rewards.addition_trace(341, 285)
    assert rewards.accuracy_reward(None, [rewards.addition_trace(347, 285, slip=True)], answer=["632"]) == [0.0]


def test_cold_start_set_is_the_teacher_with_its_slips(tok):
    """sft.py's built-in set: every trace without a units carry is correct; of those with one, the share
    the teacher got wrong is teacher_slip (0.7) up to binomial noise (n ~ 1,800: std 0.011, bound 0.05);
    no held-out problem is among them."""
    cfg = sft.SFTConfig()
    examples = sft.load_examples(cfg, tok)
    assert len(examples) == cfg.num_examples
    held = {p.prompt for p in rewards.held_out(cfg.task, cfg.eval_n)}
    slipped = carries = 0
    for p_ids, c_ids in examples:
        prompt = re.search(r"(\d+\+\d+)", tok.decode(p_ids, skip_special_tokens=True)).group(1)
        trace = tok.decode(c_ids, skip_special_tokens=True)
        a, b = map(int, prompt.split("+"))
        assert prompt not in held
        if not units_carry(prompt):
            assert trace == rewards.addition_trace(a, b)
            continue
        carries += 1
        assert trace in (rewards.addition_trace(a, b), rewards.addition_trace(a, b, slip=True))
        slipped += trace == rewards.addition_trace(a, b, slip=True)
    assert carries > 1500
    assert abs(slipped / carries - cfg.teacher_slip) < 0.05, (slipped, carries)


def test_perfect_imitation_of_the_teacher_scores_the_share_without_a_units_carry():
    """A model that copies the teacher exactly (always slipping, since the slip is the teacher's more
    likely move) is right on exactly the held-out problems without a units carry: 294 of 500, the
    README's 58.8% for the cold start."""
    held = rewards.held_out("add", 500)
    copies = [rewards.addition_trace(*map(int, p.prompt.split("+")), slip=True) for p in held]
    acc = rewards.accuracy_reward(None, copies, answer=[p.answer for p in held])
    assert sum(acc) == sum(not units_carry(p.prompt) for p in held) == 294


# -----------------------------------------------------------------------------
# The demo in miniature: the learning test

def short_demo(out, seed, threads):
    """The README's story on 2-digit additions (--task add2), in about a minute on 2 cores: SFT on the
    careless teacher's traces (500 steps of 32, the default lr), then 12 GRPO steps (32 prompts x 8, the
    default lr). Returns held-out greedy accuracy before and after GRPO on 200 problems, and after GRPO
    on the subset with a units carry (the problems the teacher taught wrong)."""
    s, g = os.path.join(out, "sft"), os.path.join(out, "grpo")
    sft.main(sft.SFTConfig(task="add2", out=s, steps=500, eval_n=200, save_every=0, seed=seed, threads=threads))
    policy, tok = grpo.main(grpo.GRPOConfig(task="add2", init=s, out=g, steps=12, eval_n=200, eval_every=0,
                                            sample_every=0, save_every=0, seed=seed, threads=threads))[:2]
    with open(os.path.join(g, "result.json")) as f:
        res = json.load(f)
    carrying = [p for p in rewards.held_out("add2", 200) if units_carry(p.prompt)]
    after_carrying = E.evaluate(policy, tok, [p.row() for p in carrying], rewards.accuracy_reward, 48)[0]["accuracy"]
    return res["held_out_accuracy_before"], res["held_out_accuracy_after"], after_carrying


def test_sft_then_grpo_fixes_the_carry_the_teacher_forgot(tmp_path):
    """After the cold start, held-out accuracy is exactly imitation of the teacher (right only on the 111
    of 200 problems without a units carry: 55.5%, every carrying one wrong); 12 GRPO steps lift it by at
    least 10 points, and at least a quarter of the carrying problems become right.

    Why these bars. Measured with `python bench/short_demo_seeds.py` (seeds 0-4 x threads 1, 2; each
    seed gave the same numbers at both thread counts): before 55.5% in all 10 runs; after 99.5, 99.5,
    84.5, 97.0, 73.0% (gains +44, +44, +29, +41.5, +17.5 points), carrying problems right after GRPO
    98.9, 98.9, 65.2, 93.3, 39.3%. Without learning the gain is ~0 (a run that does not move stays
    within a few points of 55.5%; the binomial std of one accuracy on 200 problems is 3.5 points), so
    +10 is ~3 sigma above no learning and 7.5 points below the worst of the 10 runs; this test's seed
    (0) gains +44."""
    before, after, carry_after = short_demo(str(tmp_path), seed=0, threads=TEST_THREADS)
    without_carry = sum(not units_carry(p.prompt) for p in rewards.held_out("add2", 200)) / 200
    assert without_carry == 0.555
    assert abs(before - without_carry) <= 0.05, before      # the cold start imitates, mistakes included
    assert after >= before + 0.10, (before, after)          # RL fixes what the teacher taught wrong
    assert carry_after >= 0.25, carry_after
