"""rewards.py: the safe evaluator, the reward functions and the built-in tasks. Pure Python, fast."""
import random
import re
import time
from fractions import Fraction

import pytest

import rewards
from rewards import (ProblemStream, accuracy_reward, countdown_reward, format_reward, held_out, make_addition,
                     make_countdown, safe_eval, soft_overlong_punishment)


# -----------------------------------------------------------------------------
# safe_eval

def test_safe_eval_exact_fractions():
    """Arithmetic is exact over Fractions, not floats."""
    assert safe_eval("1/3+1/6") == Fraction(1, 2)
    assert safe_eval("1/3") == Fraction(1, 3)
    assert safe_eval("2/4") == Fraction(1, 2)
    assert safe_eval("7/7") == 1
    assert safe_eval("2**10") == 1024
    assert safe_eval("2**-2") == Fraction(1, 4)
    assert safe_eval("0.5") == Fraction(1, 2)
    assert safe_eval("  3 * 4  ") == 12          # surrounding whitespace is fine


def test_safe_eval_precedence_and_unary():
    """Python precedence and associativity: * before +, ** right-associative and above unary minus."""
    assert safe_eval("2+3*4") == 14
    assert safe_eval("(2+3)*4") == 20
    assert safe_eval("10-4-3") == 3               # left-associative
    assert safe_eval("12/2/3") == 2               # left-associative
    assert safe_eval("2**3**2") == 512            # 2**(3**2)
    assert safe_eval("-2**2") == -4               # -(2**2)
    assert safe_eval("(-2)**2") == 4
    assert safe_eval("-3+5") == 2
    assert safe_eval("--3") == 3
    assert safe_eval("+4") == 4
    assert safe_eval("-(1-4)") == 3
    assert safe_eval("3*-2") == -6


@pytest.mark.parametrize("expr", [
    "__import__('os')", "a+1", "(1).real", "abs(-1)", "[1]", "1 if 1 else 2", "x", "True", "1j", "'a'",
    "1<2", "1//2", "5%3", "lambda: 1", "(1, 2)",
])
def test_safe_eval_refuses_non_arithmetic(expr):
    """Names, calls, attributes, comparisons, other operators and non-number constants give None."""
    assert safe_eval(expr) is None


@pytest.mark.parametrize("expr", ["1/0", "1/(2-2)", "0**-1", "1+", "", "(1", "3 4", "2**0.5", "10**19", "1e19"])
def test_safe_eval_errors_and_bounds_give_none(expr):
    """Division by zero, syntax errors, fractional exponents and out-of-bound values give None."""
    assert safe_eval(expr) is None


def test_safe_eval_length_and_depth_bounds():
    """Strings longer than MAX_EXPR_CHARS (200) and ASTs deeper than MAX_DEPTH (32) give None;
    just inside the bounds still evaluates. Non-strings give None."""
    assert rewards.MAX_EXPR_CHARS == 200
    assert safe_eval(" " * 199 + "7") == 7        # exactly 200 characters
    assert safe_eval(" " * 200 + "7") is None     # 201 characters
    assert safe_eval("1+" * 150 + "1") is None
    assert safe_eval("-" * 30 + "1") == 1         # 30 unary minus: depth 30
    assert safe_eval("-" * 40 + "1") is None      # depth 40 > 32
    assert safe_eval(10 ** 18) is None
    assert safe_eval(None) is None
    assert safe_eval("10**18") == 10 ** 18        # MAX_ABS itself is allowed


def test_safe_eval_huge_power_is_refused_fast():
    """9**9**9 is refused before it is computed (< 0.5 s), as are other huge exponents."""
    t = time.perf_counter()
    assert safe_eval("9**9**9") is None
    assert safe_eval("2**65") is None              # exponent bound 64
    assert safe_eval("(10**9)**(10**9)") is None
    assert time.perf_counter() - t < 0.5
    assert safe_eval("2**64") is None              # within the exponent bound but 1.8e19 > MAX_ABS
    assert safe_eval("2**59") == 2 ** 59


def test_safe_eval_decimals_are_exact():
    """The docstring promises decimals are evaluated exactly: 0.1+0.2 == 3/10, 0.001 == 1/1000."""
    assert safe_eval("0.1+0.2") == Fraction(3, 10)
    assert safe_eval("0.001") == Fraction(1, 1000)


def test_accuracy_reward_decimal_answers():
    """'0.1+0.2' equals the reference '0.3'; '0.0010' equals '0.001'."""
    comps = ["<answer>0.1+0.2</answer>", "<answer>0.0010</answer>"]
    assert accuracy_reward(["", ""], comps, answer=["0.3", "0.001"]) == [1.0, 1.0]


# -----------------------------------------------------------------------------
# accuracy_reward

def test_accuracy_reward_values():
    """1 for the right answer, 0 for a wrong or missing one, None (abstain) without a reference."""
    prompts = ["p"] * 6
    comps = ["<think>x</think><answer>42</answer>",
             "<think>x</think><answer>41</answer>",
             "<think>x</think>42",                        # no answer tag
             "<answer> 42 </answer>",                     # whitespace inside the tag
             "<answer>1</answer> then <answer>42</answer>",  # the last answer counts
             "<answer>42</answer>"]
    refs = ["42", "42", "42", "42", "42", None]
    assert accuracy_reward(prompts, comps, answer=refs) == [1.0, 0.0, 0.0, 1.0, 1.0, None]
    assert accuracy_reward(prompts[:2], comps[:2]) == [None, None]   # no answer column at all


def test_accuracy_reward_numeric_and_string_equality():
    """Numbers compare numerically (0.5 == 1/2, 6*7 == 42); non-numbers as stripped strings."""
    comps = ["<answer>0.5</answer>", "<answer>6*7</answer>", "<answer>Paris</answer>", "<answer>paris</answer>",
             "<answer>1/3</answer>"]
    refs = ["1/2", "42", " Paris ", "Paris", "0.333"]
    assert accuracy_reward([""] * 5, comps, answer=refs) == [1.0, 1.0, 1.0, 0.0, 0.0]


# -----------------------------------------------------------------------------
# countdown_reward

def test_countdown_reward_values():
    """1 only when every given number is used exactly once and the value equals the target."""
    nums, tgt = [2, 3, 4], 10
    cases = {
        "<answer>2*3+4</answer>": 1.0,            # correct
        "<answer>4*3-2</answer>": 1.0,            # another correct solution
        "<answer>(2+3)*4</answer>": 0.0,          # right numbers, wrong value (20)
        "<answer>2*5</answer>": 0.0,              # right value, wrong numbers
        "<answer>3+3+4</answer>": 0.0,            # 3 used twice, 2 unused, value 10
        "<answer>2*3+4+0</answer>": 0.0,          # an extra number
        "<answer>2*3+4+3-3</answer>": 0.0,        # right value, same set of numbers, 3 used three times
        "<answer>2*3</answer>": 0.0,              # a number missing
        "<answer>__import__('os')</answer>": 0.0,
        "<think>2*3+4</think>": 0.0,              # no answer tag
    }
    comps = list(cases)
    got = countdown_reward([""] * len(comps), comps, numbers=[nums] * len(comps), target=[tgt] * len(comps))
    assert got == list(cases.values())
    assert countdown_reward([""], comps[:1]) == [None]        # no columns: abstain
    # repeated given numbers must each be used: [3, 3, 4] -> 10 needs both 3s
    dup = ["<answer>3+3+4</answer>", "<answer>3+4+3</answer>", "<answer>3+4</answer>"]
    assert countdown_reward([""] * 3, dup, numbers=[[3, 3, 4]] * 3, target=[10, 10, 7]) == [1.0, 1.0, 0.0]


# -----------------------------------------------------------------------------
# format_reward

def test_format_reward_values():
    """R1 format scores 1; anything missing or extra scores 0."""
    comps = ["<think>a</think><answer>3</answer>",
             "  <think>a\nb</think>\n<answer>3</answer>\n",   # whitespace between/around is allowed
             "<answer>3</answer>",                             # missing think
             "<think>a</think><answer>3</answer> extra",       # trailing text
             "hi <think>a</think><answer>3</answer>",          # leading text
             "<think>a</think>",                               # missing answer
             "<answer>3</answer><think>a</think>"]             # wrong order
    assert format_reward(["p"] * len(comps), comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_format_reward_prefilled_think():
    """A prompt ending in a pre-filled '<think>' puts the tag back; without the prefill the same
    completion is malformed."""
    c = "reasoning</think><answer>3</answer>"
    assert format_reward(["Solve 1+2.<think>"], [c]) == [1.0]
    assert format_reward(["Solve 1+2.<think>\n"], [c]) == [1.0]
    assert format_reward(["Solve 1+2."], [c]) == [0.0]
    # a completion that repeats the tag is not given a second one
    assert format_reward(["x<think>"], ["<think>r</think><answer>3</answer>"]) == [1.0]


def test_format_reward_conversational_prompt():
    """Prompts given as message lists work the same way."""
    p = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"}]
    assert format_reward([p, p], ["<think>a</think><answer>3</answer>", "3"]) == [1.0, 0.0]
    pre = [{"role": "user", "content": "1+2<think>"}]
    assert format_reward([pre], ["r</think><answer>3</answer>"]) == [1.0]


# -----------------------------------------------------------------------------
# soft_overlong_punishment

def test_soft_overlong_punishment_hand_values():
    """L_max=20, L_cache=5: 0 up to 15 tokens, then -(n-15)/5, and -1 from 20 on."""
    f = soft_overlong_punishment(max_new_tokens=20, overlong_cache=5)
    ids = [[1] * n for n in (10, 15, 16, 18, 20, 21)]
    got = f(["p"] * 6, ["c"] * 6, completion_ids=ids)
    assert got == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0], abs=1e-12)


# -----------------------------------------------------------------------------
# tasks

STEP_RE = re.compile(r"^(\d)\+(\d)(?:\+(\d))?=(\d+)$")


@pytest.mark.parametrize("digits", [1, 3, 5])
def test_addition_trace_is_correct(digits):
    """Each think step adds one column right to left with the previous carry; the answer is a+b
    and is the concatenation of the column digits (plus the final carry)."""
    for seed in range(300):
        p = make_addition(random.Random(seed), digits=digits)
        a, b = map(int, p.prompt.split("+"))
        assert len(str(a)) == len(str(b)) == digits
        m = re.fullmatch(r"<think>(.*)</think><answer>(\d+)</answer>", p.trace)
        assert m, p.trace
        steps = m.group(1).split(",")
        assert len(steps) == digits
        carry, out = 0, []
        for i, s in enumerate(steps):
            da, db, c, total = STEP_RE.fullmatch(s).groups()
            assert int(da) == a // 10 ** i % 10 and int(db) == b // 10 ** i % 10
            assert int(c or 0) == carry and (c is None) == (carry == 0)
            assert int(total) == int(da) + int(db) + carry
            carry = int(total) // 10
            out.append(int(total) % 10)
        reconstructed = int((str(carry) if carry else "") + "".join(map(str, reversed(out))))
        assert reconstructed == a + b
        assert p.answer == m.group(2) == str(a + b)
        assert accuracy_reward([p.prompt], [p.trace], answer=[p.answer]) == [1.0]
        assert format_reward([p.prompt], [p.trace]) == [1.0]


def test_countdown_trace_solves_its_problem():
    """The trace answer scores 1 with countdown_reward, its steps are true equations, and the prompt
    lists the numbers and the target."""
    for seed in range(300):
        p = make_countdown(random.Random(seed))
        nums, tgt = p.columns["numbers"], p.columns["target"]
        assert p.prompt == f"{','.join(map(str, nums))}->{tgt}"
        assert countdown_reward([p.prompt], [p.trace], numbers=[nums], target=[tgt]) == [1.0]
        assert accuracy_reward([p.prompt], [p.trace], answer=[p.answer]) == [1.0]
        assert format_reward([p.prompt], [p.trace]) == [1.0]
        think = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", p.trace).group(1)
        for step in filter(None, think.split(",")):
            lhs, rhs = step.split("=")
            assert safe_eval(lhs) == int(rhs)
        row = p.row()
        assert row["prompt"] == [{"role": "user", "content": p.prompt}]
        assert row["numbers"] == nums and row["target"] == tgt and row["answer"] == p.answer


@pytest.mark.parametrize("task", ["add", "countdown"])
def test_held_out_deterministic_distinct_prefix_stable(task):
    """held_out is the same on every call, has n distinct prompts, and a smaller n is a prefix of a
    larger one (so SFT and GRPO with different eval_n exclude consistent sets)."""
    a, b = held_out(task, 200), held_out(task, 200)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert len(a) == 200 and len({p.prompt for p in a}) == 200
    assert [p.prompt for p in held_out(task, 50)] == [p.prompt for p in a[:50]]


def test_problem_stream_skips_held_out_countdown():
    """Over 3000 countdown draws (a small problem space, so held-out prompts do come up) the stream
    never yields a held-out prompt, and it did have to skip some."""
    held = held_out("countdown", 500)
    hs = {p.prompt for p in held}
    s = ProblemStream("countdown", seed=1, exclude=held)
    got = s.take(3000)
    assert not hs & {p.prompt for p in got}
    assert s.position > 3000                       # some draws were skipped
    raw = ProblemStream("countdown", seed=1)       # without exclusion those draws do appear
    assert hs & {p.prompt for p in raw.take(3000)}


def test_problem_stream_skips_held_out_tiny_space(monkeypatch):
    """With a 10-problem task, excluding 5 held-out prompts leaves exactly the other 5."""
    def tiny_task(rng):
        n = rng.randint(0, 9)
        return rewards.Problem(str(n), str(n), f"<think></think><answer>{n}</answer>")
    monkeypatch.setitem(rewards.TASKS, "tiny", tiny_task)
    held = held_out("tiny", 5)
    assert len({p.prompt for p in held}) == 5
    got = {p.prompt for p in ProblemStream("tiny", seed=0, exclude=held).take(500)}
    assert got == {str(i) for i in range(10)} - {p.prompt for p in held}


def test_problem_stream_seek_reproduces_continuation():
    """seek(position) after a restart gives exactly the problems an uninterrupted stream gives next."""
    held = held_out("countdown", 500)
    a = ProblemStream("countdown", seed=7, exclude=held)
    a.take(437)
    pos = a.position
    rest = a.take(200)
    b = ProblemStream("countdown", seed=7, exclude=held)
    b.seek(pos)
    assert b.position == pos
    assert [p.prompt for p in b.take(200)] == [p.prompt for p in rest]
    assert b.position == a.position
    # a different seed gives a different stream
    c = ProblemStream("countdown", seed=8, exclude=held)
    assert [p.prompt for p in c.take(20)] != [p.prompt for p in ProblemStream("countdown", 7, held).take(20)]
