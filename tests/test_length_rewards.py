"""rewards.py's length-aware rewards (adaptive thinking): Kimi k1.5's group length penalty, Yeo et al.'s
cosine length-scaled reward, AdaCtrl's budget tag, AdaptThink's NoThinking bonus. Every expected value is worked out by hand in a comment."""
import math

import pytest

import rewards
from rewards import budget_tag_reward, cosine_length_reward, group_length_penalty

R2 = math.sqrt(2.0)


def done(ans, tag=""):
    """A completion in R1 format answering `ans`, opened by `tag`."""
    return f"{tag}<think>x</think><answer>{ans}</answer>"


def ids(*lengths):
    return [[1] * n for n in lengths]


# -----------------------------------------------------------------------------
# length_penalty (Kimi k1.5)

def test_length_penalty_hand_values_group_of_four():
    """Lengths 10, 20, 30, 40, samples 0 and 2 correct. min_len 10, max_len 40, so
    lambda = 0.5 - (len - 10) / 30 = 0.5, 1/6, -1/6, -0.5.
    correct 10 -> 0.5; wrong 20 -> min(0, 1/6) = 0; correct 30 -> -1/6; wrong 40 -> min(0, -0.5) = -0.5:
    a correct answer longer than the group's middle length is penalised too, a wrong one is never paid."""
    f = group_length_penalty()
    got = f(["p"] * 4, [done(5), done(4), done(5), done(4)], completion_ids=ids(10, 20, 30, 40),
            answer=["5"] * 4, group=[0, 0, 0, 0])
    assert got == pytest.approx([0.5, 0.0, -1 / 6, -0.5], rel=1e-12)


def test_length_penalty_all_lengths_equal_is_zero():
    """max_len = min_len: Kimi sets the length reward to 0 for every sample, correct or not."""
    f = group_length_penalty()
    got = f(["p"] * 3, [done(5), done(4), done(5)], completion_ids=ids(7, 7, 7), answer=["5"] * 3)
    assert got == [0.0, 0.0, 0.0]


def test_length_penalty_group_given_vs_inferred():
    """All four correct, lengths 5, 15, 5, 25.
    inferred from prompts a, a, b, b: groups {5, 15} and {5, 25}: lambda 0.5, -0.5 in each.
    group=[0, 1, 0, 1] wins over the prompts: {5, 5} (equal: 0, 0) and {15, 25} (0.5, -0.5).
    group=[0, 0, 0, 0]: one group, min 5, max 25: 0.5 - (len - 5) / 20 = 0.5, 0, 0.5, -0.5."""
    f = group_length_penalty()
    comps, cids, ans = [done(5)] * 4, ids(5, 15, 5, 25), ["5"] * 4
    assert f(["a", "a", "b", "b"], comps, completion_ids=cids, answer=ans) == [0.5, -0.5, 0.5, -0.5]
    got = f(["a", "a", "b", "b"], comps, completion_ids=cids, answer=ans, group=[0, 1, 0, 1])
    assert got == [0.0, 0.5, 0.0, -0.5]
    assert f(["a", "a", "b", "b"], comps, completion_ids=cids, answer=ans, group=[0] * 4) == [0.5, 0.0, 0.5, -0.5]
    # conversational prompts are compared whole: equal conversations are one group
    conv = [[{"role": "user", "content": "a"}]] * 2 + [[{"role": "user", "content": "b"}]] * 2
    assert f(conv, comps, completion_ids=cids, answer=ans) == [0.5, -0.5, 0.5, -0.5]


def test_length_penalty_no_answer_abstains_and_single_sample_is_zero():
    """No answer column -> None for all; a row whose answer is None abstains, the rest of the batch is
    scored (lengths 10, 30: lambda 0.5, -0.5). A group of one (grpo's fault fallback): 0.0 either way."""
    f = group_length_penalty()
    assert f(["p"] * 2, [done(5)] * 2, completion_ids=ids(10, 30)) == [None, None]
    got = f(["p", "p", "q", "q"], [done(5)] * 4, completion_ids=ids(10, 30, 10, 30), answer=[None, None, "5", "5"])
    assert got == [None, None, 0.5, -0.5]
    assert f(["p"], [done(5)], completion_ids=ids(10), answer=["5"], group=[3]) == [0.0]
    assert f(["p"], [done(4)], completion_ids=ids(10), answer=["5"], group=[3]) == [0.0]


def test_length_rewards_need_completion_ids():
    with pytest.raises(ValueError, match="completion_ids"):
        group_length_penalty()(["p"], [done(5)], answer=["5"])
    with pytest.raises(ValueError, match="completion_ids"):
        cosine_length_reward(max_new_tokens=8)(["p"], [done(5)], answer=["5"])
    with pytest.raises(ValueError, match="group has 1 ids for 2"):
        group_length_penalty()(["p"] * 2, [done(5)] * 2, completion_ids=ids(1, 2), answer=["5"] * 2, group=[0])


def test_length_penalty_through_call_reads_the_group_column():
    """rewards.call passes the `group` column as grpo.py builds it; an abstention becomes NaN."""
    got = rewards.call(group_length_penalty(), ["p"] * 4, [done(5), done(4), done(5), done(5)], ids(10, 20, 30, 40),
                       {"answer": ["5", "5", "5", None], "group": [0, 0, 0, 0]})
    # lambda over all four lengths: 0.5, 1/6, -1/6, -0.5; sample 1 is wrong (min(0, 1/6) = 0), 3 has no answer
    assert got[:3] == pytest.approx([0.5, 0.0, -1 / 6], rel=1e-12) and math.isnan(got[3])


# -----------------------------------------------------------------------------
# cosine_length (Yeo et al. 2025)

def test_cosine_length_hand_values():
    """L_max = 48, paper defaults: correct 2 -> 1, wrong -10 -> 0, exceed -10.
    CosFn(L) = r_L + (r_0 - r_L) (1 + cos(pi L / 48)) / 2, cos at L = 0, 12, 24, 36: 1, sqrt2/2, 0, -sqrt2/2
    correct: 2, 1 + (1 + sqrt2/2)/2 = 1.5 + sqrt2/4, 1.5, 1.5 - sqrt2/4
    wrong:   -10, -10 (1 + sqrt2/2)/2 = -5 - 2.5 sqrt2, -5, -5 + 2.5 sqrt2
    L = 48 (the limit: truncated) and beyond: -10, correct or not."""
    f = cosine_length_reward(max_new_tokens=48)
    lengths = (0, 12, 24, 36, 48, 60)
    right = f(["p"] * 6, [done(5)] * 6, completion_ids=ids(*lengths), answer=["5"] * 6)
    wrong = f(["p"] * 6, [done(4)] * 6, completion_ids=ids(*lengths), answer=["5"] * 6)
    assert right == pytest.approx([2.0, 1.5 + R2 / 4, 1.5, 1.5 - R2 / 4, -10.0, -10.0], rel=1e-12)
    assert wrong == pytest.approx([-10.0, -5 - 2.5 * R2, -5.0, -5 + 2.5 * R2, -10.0, -10.0], rel=1e-12)
    # shorter correct pays more; longer wrong is penalised less; every correct beats every wrong
    assert right[:4] == sorted(right[:4], reverse=True) and wrong[:4] == sorted(wrong[:4])
    assert min(right[:4]) > max(wrong[:4])


def test_cosine_length_own_values_and_no_answer():
    """r0_correct=1, rL_correct=0, r0_wrong=-1, rL_wrong=-0.5, r_exceed=-2, L_max=10:
    L=5 (cos = 0): correct 0 + (1 - 0)/2 = 0.5, wrong -0.5 + (-1 + 0.5)/2 = -0.75; L=9 wrong; L=10 -> -2.
    No answer column -> None; a missing answer abstains even past the limit."""
    f = cosine_length_reward(max_new_tokens=10, r0_correct=1.0, rL_correct=0.0, r0_wrong=-1.0, rL_wrong=-0.5,
                             r_exceed=-2.0)
    got = f(["p"] * 3, [done(5), done(4), done(5)], completion_ids=ids(5, 5, 10), answer=["5"] * 3)
    assert got == pytest.approx([0.5, -0.75, -2.0], rel=1e-12)
    assert f(["p"] * 2, [done(5)] * 2, completion_ids=ids(5, 10)) == [None, None]
    assert f(["p"] * 2, [done(5)] * 2, completion_ids=ids(5, 10), answer=["5", None]) == [pytest.approx(0.5), None]
    with pytest.raises(ValueError, match="max_new_tokens"):
        cosine_length_reward(max_new_tokens=0)


# -----------------------------------------------------------------------------
# budget_tag (AdaCtrl)

def test_budget_tag_hand_values_two_groups():
    """Group 0: 3 of 4 correct, 0.75 > 0.625 -> Easy. Group 1: 2 of 4, 0.5 -> Hard.
    consistent tag 1, the other tag 0, no tag at the start -1 (lower case and leading space are fine)."""
    f = budget_tag_reward()
    comps = [done(5, "[Easy]"), done(5, "[Hard]"), done(5), done(4, " [easy]"),         # answer 5
             done(7, "[Easy]"), done(7, "[Hard]"), "<think>[Hard]</think><answer>1</answer>", done(1, "[Hard]")]
    got = f(["a"] * 4 + ["b"] * 4, comps, answer=["5"] * 4 + ["7"] * 4, group=[0] * 4 + [1] * 4)
    assert got == [1.0, 0.0, -1.0, 1.0,
                   0.0, 1.0, -1.0, 1.0]
    # the same groups found from the prompts alone
    assert f(["a"] * 4 + ["b"] * 4, comps, answer=["5"] * 4 + ["7"] * 4) == got


def test_budget_tag_threshold_is_strict_and_group_of_one():
    """G=8 at the default 0.625: 5 correct is 0.625, not above: Hard. 6 correct, 0.75: Easy.
    A group of one is judged by its own correctness: correct -> Easy consistent, wrong -> Hard."""
    f = budget_tag_reward()
    five = [done(5, "[Easy]"), done(5, "[Hard]")] + [done(5)] * 3 + [done(4)] * 3
    assert f(["p"] * 8, five, answer=["5"] * 8)[:2] == [0.0, 1.0]
    six = [done(5, "[Easy]"), done(5, "[Hard]")] + [done(5)] * 4 + [done(4)] * 2
    assert f(["p"] * 8, six, answer=["5"] * 8)[:2] == [1.0, 0.0]
    assert f(["p"], [done(5, "[Easy]")], answer=["5"], group=[0]) == [1.0]
    assert f(["p"], [done(4, "[Easy]")], answer=["5"], group=[0]) == [0.0]
    assert f(["p"], [done(4, "[Hard]")], answer=["5"], group=[0]) == [1.0]


def test_budget_tag_own_values_and_no_answer():
    """easy_threshold=0.5: 2 of 4 (0.5) is not above it -> Hard; missing tag gives r_missing=-0.5."""
    f = budget_tag_reward(easy_threshold=0.5, r_consistent=2.0, r_inconsistent=-1.0, r_missing=-0.5)
    comps = [done(5, "[Hard]"), done(5, "[Easy]"), done(4), done(4, "[Hard]")]
    assert f(["p"] * 4, comps, answer=["5"] * 4) == [2.0, -1.0, -0.5, 2.0]
    assert f(["p"] * 4, comps) == [None] * 4
    assert f(["p", "p", "q", "q"], comps, answer=[None, None, "5", "5"]) == [None, None, -0.5, 2.0]  # q: 0/2 -> Hard
    with pytest.raises(ValueError, match="easy_threshold"):
        budget_tag_reward(easy_threshold=1.5)


# -----------------------------------------------------------------------------
# no_thinking (AdaptThink)

def test_no_thinking_bonus_hand_values():
    f = rewards.no_thinking_bonus(delta=0.1)
    comps = ["[Easy]<think></think><answer>5</answer>", "<think> \n</think><answer>5</answer>",   # empty: delta
             done(5, "[Hard]"), "<answer>5</answer>",                                       # thinks / no block
             "<think></think><answer>4</answer>"]                                           # wrong still gets it
    assert f(["p"] * 5, comps) == [0.1, 0.1, 0.0, 0.0, 0.1]
    # added to accuracy (the objective): on an easy group where both modes are right, NoThinking wins by
    # delta; on a hard group, a wrong NoThinking answer (0 + 0.1) loses to a right scratchpad (1 + 0)
    acc = rewards.accuracy_reward(None, comps[:3] + comps[4:], answer=["5"] * 4)
    assert [a + b for a, b in zip(acc, f(None, comps[:3] + comps[4:]))] == pytest.approx([1.1, 1.1, 1.0, 0.1])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delta"):
            rewards.no_thinking_bonus(delta=bad)


# -----------------------------------------------------------------------------
# --reward-funcs: each maker resolved by name, flags filling max_new_tokens

def test_length_makers_resolve_by_name():
    spec = ("length_penalty,cosine_length,cosine_length(max_new_tokens=96,r_exceed=-5),budget_tag(easy_threshold=0.5),"
            "no_thinking(delta=0.2)")
    names, funcs = rewards.resolve(spec, {"max_new_tokens": 48, "num_generations": 4})
    assert names == ["length_penalty", "cosine_length", "cosine_length", "budget_tag", "no_thinking"]
    lp, cos48, cos96, tag, nothink = funcs
    assert nothink(None, ["<think></think><answer>1</answer>", done(1)]) == [0.2, 0.0]
    comps = [done(5, "[Easy]"), done(5, "[Hard]"), done(5), done(4, "[Easy]")]   # 3 of 4 correct
    kw = dict(answer=["5"] * 4, group=[0] * 4)
    # lengths 10, 20, 30, 40: lambda 0.5, 1/6, -1/6, -0.5; sample 3 is wrong: min(0, -0.5)
    assert lp(["p"] * 4, comps, completion_ids=ids(10, 20, 30, 40), **kw) == pytest.approx([0.5, 1 / 6, -1 / 6, -0.5])
    # L_max 48 from the flag: 24 -> cos(pi/2) = 0 -> 1.5 (correct); 48 -> exceed -10; wrong at 24 -> -5
    assert cos48(["p"] * 4, comps, completion_ids=ids(24, 48, 0, 24), **kw) == pytest.approx([1.5, -10.0, 2.0, -5.0])
    # the spec's max_new_tokens=96 wins over the flag: 48 -> 1.5, 24 -> 1.5 + sqrt2/4, 96 -> the spec's -5
    assert cos96(["p"] * 4, comps, completion_ids=ids(48, 24, 96, 0), **kw) == \
        pytest.approx([1.5, 1.5 + R2 / 4, -5.0, -10.0], rel=1e-12)
    # 0.75 > 0.5 -> Easy: [Easy] 1, [Hard] 0, none -1, [Easy] on a wrong sample still 1
    assert tag(["p"] * 4, comps, **kw) == [1.0, 0.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="unknown parameter"):
        rewards.resolve("budget_tag(threshold=0.5)")
