"""The built-in demonstration (README, Results): the careless teacher behind the cold-start traces,
and a short SFT -> GRPO run whose held-out accuracy must rise by far more than its noise."""
import re

import model as M
import rewards
import sft


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
