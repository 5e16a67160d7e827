"""Verifiable tasks and reward functions. No torch here: pure Python, easy to test and to extend.

Tasks are seeded generators with an exact checker. Each problem carries both what RL needs (a prompt
and the columns the reward functions read, e.g. `answer`) and what the cold start needs (a worked
reasoning trace in the R1 format `<think>...</think><answer>...</answer>`).

    add       a + b with 3-digit numbers; the trace adds column by column, right to left, with carries:
              "347+285" -> <think>7+5=12,4+8+1=13,3+2+1=6</think><answer>632</answer>
    add2      the same with 2-digit numbers: the demo in a minute (tests/test_demo.py's learning test)
    countdown reach the target with each given number once, + - * /:
              "3,5,7->22" -> <think>3*5=15,15+7=22</think><answer>3*5+7</answer>
    calc      a*b+c with two-digit numbers, solved with a calculator call (tools.py; --tools calculator):
              "37*48+15" -> <c>37*48+15</c><o>1791</o><answer>1791</answer>
    adapt     3-digit a + b, easy (no carry) or hard (a carry), opened with a budget tag that sets the mode:
              "410+537" -> [Easy]<think></think><answer>947</answer>  (NoThinking)
              "586+257" -> [Hard]<think>6+7=13,8+5+1=14,5+2+1=8</think><answer>843</answer>
              a prompt that ends with " [Easy]" or " [Hard]" forces that mode

Reward functions follow TRL's signature: f(prompts, completions, **columns) -> list[float | None],
one value per completion, None = abstain (that function says nothing about that sample; TRL's
convention). `completions` are decoded strings; `completion_ids` (token id lists) and every extra
dataset column arrive as keyword arguments.

    accuracy_reward            1 if the <answer> equals the `answer` column (numerically when both are numbers)
    countdown_reward           1 if the <answer> expression uses exactly `numbers` and evaluates to `target`
    format_reward              1 if the completion is <think>...</think><answer>...</answer> (DeepSeek-R1)
    soft_overlong_punishment   DAPO's length penalty near the completion limit
    group_length_penalty       Kimi k1.5's length reward: correct answers paid for being short within their group
    cosine_length_reward       Yeo et al.'s cosine length-scaled reward, by correctness, with an over-limit penalty
    budget_tag_reward          AdaCtrl: an opening [Easy]/[Hard] tag that matches the group's accuracy
    thinking_stats             (not a reward) thinking rate, length by mode / tag / difficulty, per step
    code_reward                fraction of the `tests` column the completion's ```python block passes,
                               run in sandbox.py (separate process, limits, no network, no secrets);
                               calls and stdin/stdout tests are decided by the trainer, asserts are not

Expressions written by the model are evaluated with `safe_eval`, a bounded AST evaluator over exact
fractions, never with `eval` (which would run arbitrary code, and `9**9**9` would hang the trainer).
"""
import ast
import copy
import importlib
import inspect
import json
import math
import random
import re
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from fractions import Fraction

from tqdm import tqdm


@dataclass
class Problem:
    prompt: str   # the user message
    answer: str   # what accuracy_reward compares against
    trace: str    # a correct completion in R1 format, for the cold-start SFT
    columns: dict = None  # extra columns for reward functions (countdown: numbers, target)
    question: str = None  # the problem without a mode forced in its prompt (adapt): what held-out checks

    def row(self):
        """The problem as a GRPO dataset row: conversational prompt + reward columns."""
        return {"prompt": [{"role": "user", "content": self.prompt}], "answer": self.answer, **(self.columns or {})}


# -----------------------------------------------------------------------------
# Tasks

def addition_trace(a, b, slip=False):
    """The column-by-column scratchpad of a + b in R1 format. slip=True writes what a careless teacher
    writes: the carry out of the units column is forgotten (so the answer is wrong, but the trace is
    consistent with itself); a problem without that carry is unaffected."""
    steps, carry, total = [], 0, 0
    for k, (da, db) in enumerate(zip(reversed(str(a)), reversed(str(b)))):  # right to left, one column per step
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={s}" if carry else f"{da}+{db}={s}")
        total += (s % 10) * 10 ** k
        carry = 0 if slip and k == 0 else s // 10
    total += carry * 10 ** len(steps)
    return f"<think>{','.join(steps)}</think><answer>{total}</answer>"


def make_addition(rng, digits=3):
    a, b = (rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(2))
    return Problem(f"{a}+{b}", str(a + b), addition_trace(a, b))


def make_countdown(rng, count=3):
    """Build a random expression over `count` numbers left to right and use its value as the target
    (so every problem is solvable and the trace is a real solution)."""
    while True:
        nums = [rng.randint(1, 12) for _ in range(count)]
        order = rng.sample(nums, len(nums))
        value, expr, steps = Fraction(order[0]), str(order[0]), []
        for n in order[1:]:
            op = rng.choice("+-*/")
            new = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            if new.denominator != 1 or new < 0 or new > 999:
                break
            steps.append(f"{value}{op}{n}={new}")
            expr = f"({expr}){op}{n}" if op in "*/" and ("+" in expr or "-" in expr) else f"{expr}{op}{n}"
            value = new
        else:
            target = int(value)
            prompt = f"{','.join(map(str, nums))}->{target}"
            return Problem(prompt, expr, f"<think>{','.join(steps)}</think><answer>{expr}</answer>",
                           {"numbers": nums, "target": target})


def make_calc(rng, full_share=0.25):
    """a*b+c with two-digit numbers: a product the tiny model cannot form in its head, so a calculator
    (tools.py) is the difference. The teacher uses it imperfectly: in full_share of its traces it computes
    the whole expression with the tool; in the rest only the product, then adds c in its head (right in the
    trace, but a step the model imitates badly), so greedy decoding after SFT takes the weaker habit and RL
    has to learn to hand the tool everything. a*b >= 1000, so every product and total has 4 digits: copying
    a tool output is then always the same distance back (9 tokens from <o>'s digit to the answer's), a
    fixed-offset attention the tiny model learns within the default 1,000 SFT steps; with 3- and 4-digit
    outputs mixed, that copy appeared on some seeds only, late and suddenly."""
    while True:
        a, b, c = (rng.randint(10, 99) for _ in range(3))
        if a * b >= 1000:
            break
    product, total = a * b, a * b + c
    if rng.random() < full_share:
        trace = f"<c>{a}*{b}+{c}</c><o>{total}</o><answer>{total}</answer>"
    else:
        trace = f"<c>{a}*{b}</c><o>{product}</o><think>{product}+{c}={total}</think><answer>{total}</answer>"
    return Problem(f"{a}*{b}+{c}", str(total), trace)


# Adaptive thinking (AdaCtrl's budget tags, AdaptThink's NoThinking mode). A completion opens with a tag
# that sets its budget: [Easy] answers at once, with an empty think (NoThinking), [Hard] thinks first.
# A prompt that ends with a tag forces it: the teacher obeys, so a cold-started model learns to obey.
EASY_TAG, HARD_TAG = "[Easy]", "[Hard]"


def carries(a, b):
    """Columns of a + b that carry: 0 means every digit of the sum is the sum of two digits."""
    n, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        n, a, b = n + carry, a // 10, b // 10
    return n


def make_adapt(rng, easy_share=0.8, think_easy=0.6, forced_share=0.0):
    """3-digit a + b where difficulty is the carries: an easy problem has none (each digit of the sum is
    two digits added, which the tiny model can answer at once), a hard one has one or more (answering at
    once means carrying in its head: the scratchpad is the difference). Columns: difficulty (easy|hard,
    the bucket of the per-difficulty metrics) and carries. The trace opens with AdaCtrl's budget tag, the
    true bucket ([Easy] / [Hard]), then thinks or not: the teacher thinks on every hard problem and on
    think_easy of the easy ones, after their [Easy] too: a cold start that wastes its scratchpad on easy
    problems, as a long-CoT model does, while its tag already says which ones could go without. With
    forced_share, that share of prompts end with a tag the teacher obeys, [Easy] answering at once and
    [Hard] thinking (sft.py's traces: COLD_START); RL and the held-out set use free prompts only."""
    hard = rng.random() >= easy_share
    while True:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (carries(a, b) > 0) == hard:
            break
    question, forced = f"{a}+{b}", None
    if rng.random() < forced_share:
        forced = rng.choice((EASY_TAG, HARD_TAG))
    think = forced == HARD_TAG if forced else (hard or rng.random() < think_easy)
    tag = forced or (HARD_TAG if hard else EASY_TAG)
    scratchpad = addition_trace(a, b)
    trace = tag + (scratchpad if think else "<think></think>" + scratchpad.split("</think>")[1])
    return Problem(f"{question} {forced}" if forced else question, str(a + b), trace,
                   {"difficulty": "hard" if hard else "easy", "carries": carries(a, b)}, question)


TASKS = {"add": make_addition, "add2": lambda rng: make_addition(rng, digits=2), "countdown": make_countdown,
         "calc": make_calc, "adapt": make_adapt}
# a task whose cold-start traces differ from its RL prompts: sft.py draws these instead. adapt: 50% hard
# problems (RL and the held-out set: 20%), because at 20% the 1,000-step cold start learned the carrying
# scratchpad on ~10% of the hard problems only, and thinking that does not pay is what RL then drops; and
# half the easy ones answered at once, because the direct answer is learned suddenly, on some seeds only:
# with 30% easy problems, 60% of them thought through, two seeds of three answered a forced [Easy] right on
# 6% and 18% of the easy problems (then NoThinking never pays in RL). The tag is the true bucket, not the
# mode: when [Hard] meant "thinks", the wasted easy traces taught a tag that is a coin flip on easy problems,
# and the first token routed 14-23 of 500 held-out problems wrong at any threshold, on every seed and RL
# run (README, "Adaptive thinking"); the README's table shows what these shares give
COLD_START = {"adapt": lambda rng: make_adapt(rng, easy_share=0.5, think_easy=0.5, forced_share=0.3)}
HELD_OUT_SEED = 1_000_003  # one fixed evaluation set for every run and every seed


def held_out(task, n=500):
    """n distinct problems from a seed that training never uses."""
    rng, seen, out = random.Random(HELD_OUT_SEED), set(), []
    while len(out) < n:
        p = TASKS[task](rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


class ProblemStream:
    """An endless, seeded stream of training problems that skips every held-out prompt.
    `position` (problems drawn so far) is all the state needed to resume exactly."""

    def __init__(self, task, seed, exclude=(), cold_start=False):
        self.task, self.seed, self.exclude, self.position = task, seed, {p.question or p.prompt for p in exclude}, 0
        self.make = COLD_START.get(task, TASKS[task]) if cold_start else TASKS[task]
        self.rng = random.Random(seed)

    def next(self):
        while True:
            p = self.make(self.rng)
            self.position += 1
            if (p.question or p.prompt) not in self.exclude:
                return p

    def take(self, n):
        return [self.next() for _ in range(n)]

    def seek(self, position):
        self.rng, self.position = random.Random(self.seed), 0
        while self.position < position:
            self.make(self.rng)
            self.position += 1


# -----------------------------------------------------------------------------
# Safe arithmetic evaluation

MAX_EXPR_CHARS, MAX_DEPTH, MAX_EXPONENT, MAX_ABS = 200, 32, 64, 10 ** 18


def safe_eval(expr):
    """Evaluate + - * / ** and parentheses over integers and decimals exactly (Fractions), with bounds
    on length, depth, exponents and magnitudes. Returns a Fraction, or None for anything else
    (names, calls, attributes, division by zero, values out of bounds, syntax errors)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        return _eval(ast.parse(expr.strip(), mode="eval").body, 0)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError):
        return None


def _eval(node, depth):
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # repr() keeps decimals exact: Fraction("0.1") is 1/10, Fraction(0.1) is the binary float
        v = Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        v = -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            # checked before computing: 9**9**9 is refused at 9**387420489, it is never evaluated
            if b.denominator != 1 or abs(b) > MAX_EXPONENT:
                raise ValueError("exponent out of bounds")
            if a == 0 and b < 0:
                raise ZeroDivisionError
        v = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
             ast.Div: lambda: a / b, ast.Pow: lambda: a ** int(b)}[type(node.op)]()
    else:
        raise ValueError(f"not allowed: {type(node).__name__}")
    if abs(v.numerator) > MAX_ABS * v.denominator or v.denominator > MAX_ABS:
        raise ValueError("value out of bounds")
    return v


# -----------------------------------------------------------------------------
# Reward functions

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def extract_answer(completion):
    """Text inside the last <answer>...</answer>, or None."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def _prompt_text(prompt):
    """The text of a prompt: the string itself, or the last message of a conversation."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def accuracy_reward(prompts, completions, answer=None, **kw):
    """1.0 if the extracted answer equals the reference (as numbers when both are arithmetic, else as
    stripped strings), 0.0 otherwise; None when the row has no reference answer."""
    if answer is None:
        return [None] * len(completions)
    out = []
    for c, ref in zip(completions, answer):
        if ref is None:
            out.append(None)
            continue
        got = extract_answer(c)
        if got is None:
            out.append(0.0)
            continue
        a, b = safe_eval(got), safe_eval(str(ref))
        out.append(float(a == b) if a is not None and b is not None else float(got == str(ref).strip()))
    return out


def countdown_reward(prompts, completions, numbers=None, target=None, **kw):
    """1.0 if the answer expression uses each given number exactly once and equals the target."""
    if numbers is None or target is None:
        return [None] * len(completions)
    out = []
    for c, nums, tgt in zip(completions, numbers, target):
        expr = extract_answer(c)
        if expr is None:
            out.append(0.0)
            continue
        used = sorted(int(x) for x in re.findall(r"\d+", expr))
        value = safe_eval(expr)
        out.append(float(used == sorted(nums) and value is not None and value == tgt))
    return out


def format_reward(prompts, completions, prompt_text=None, **kw):
    """1.0 for <think>...</think><answer>...</answer> and nothing else. When the chat template
    pre-fills the opening <think> (Qwen3 / R1-distill templates do), that tag is in the prompt, not in
    the completion: it is put back before checking, so well-formed completions still score 1.
    `prompt_text` (the rendered prompt, which grpo.py passes) is where a pre-filled tag shows; without
    it the raw prompt (a string, or the last message of a conversation) is checked."""
    texts = prompt_text if prompt_text is not None else [_prompt_text(p) for p in prompts]
    out = []
    for text, c in zip(texts, completions):
        if isinstance(text, str) and text.rstrip().endswith("<think>") and "<think>" not in c:
            c = "<think>" + c
        out.append(float(bool(FORMAT_RE.match(c))))
    return out


def soft_overlong_punishment(max_new_tokens, overlong_cache):
    """DAPO (Yu et al. 2025, eq. 13), L_max = max_new_tokens, L_cache = overlong_cache: 0 up to
    L_max - L_cache tokens, then a linear ramp down to -1 at L_max, and -1 beyond (a truncated
    completion has length L_max here, so it gets -1). A maker (REWARD_MAKERS): both numbers come from
    grpo.py's flags of the same names unless --reward-funcs gives them."""
    max_completion_length, cache_length = max_new_tokens, overlong_cache
    start = max_completion_length - cache_length

    def soft_overlong(prompts, completions, completion_ids, **kw):
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else (start - n) / cache_length if n <= max_completion_length else -1.0)
        return out
    return soft_overlong


# -----------------------------------------------------------------------------
# Length-aware rewards (adaptive thinking): pay for short reasoning where it is right, and for a budget
# tag that matches how hard the problem is for the policy now. Length = number of completion tokens
# (len of each `completion_ids` list, EOS included); correctness = accuracy_reward on the `answer` column,
# so a row without an answer abstains (None) in all three.

def _groups(prompts, group, n):
    """The samples of each prompt, as lists of indices. `group` (one id per completion, equal for the
    samples of one prompt; grpo.py passes it) decides when given; without it, runs of consecutive equal
    prompts are the groups, so two neighbouring rows with the same prompt would count as one group."""
    if group is not None:
        if len(group) != n:
            raise ValueError(f"group has {len(group)} ids for {n} completions")
        by_id = {}
        for i, g in enumerate(group):
            by_id.setdefault(g, []).append(i)
        return list(by_id.values())
    out = []
    for i, p in enumerate(prompts):
        if out and prompts[out[-1][-1]] == p:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _lengths(completion_ids, name):
    if completion_ids is None:
        raise ValueError(f"{name} needs completion_ids (the token ids of each completion) to measure lengths")
    return [len(ids) for ids in completion_ids]


def group_length_penalty():
    """Kimi k1.5's length reward (Kimi Team 2025, arXiv 2501.12599, sec. 2.3.3 "Length Penalty"), relative
    to the lengths of the k samples of one prompt:

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)      (lambda_i = 0 if max_len = min_len)
        reward_i = lambda_i            if sample i is correct
                   min(0, lambda_i)    if it is wrong

    So a correct sample gets +0.5 if it is the group's shortest and -0.5 if the longest; a wrong sample is
    never paid for being short, only penalised for being long. Kimi adds it to the accuracy reward with a
    weight (here: --reward-weights) after a first phase of RL without it (their warm-up; nothing here
    schedules it). min_len / max_len are over all the group's samples, answered or not; a sample without
    an answer abstains. A group of one (grpo's sample-by-sample fault fallback) has max_len = min_len: it
    gets 0.0. Groups: `group` if given, else runs of equal prompts (_groups).
    A maker without numbers (the 0.5 is the formula's), registered as "length_penalty"."""

    def length_penalty(prompts, completions, completion_ids=None, answer=None, group=None, **kw):
        correct = accuracy_reward(prompts, completions, answer=answer)
        lengths = _lengths(completion_ids, "length_penalty")
        out = [None] * len(completions)
        for idx in _groups(prompts, group, len(completions)):
            lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
            for i in idx:
                if correct[i] is None:
                    continue
                lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if correct[i] == 1.0 else min(0.0, lam)
        return out
    return length_penalty


def cosine_length_reward(max_new_tokens, r0_correct=2.0, rL_correct=1.0, r0_wrong=-10.0, rL_wrong=0.0,
                         r_exceed=-10.0):
    """The cosine length-scaled reward of Yeo et al. 2025 ("Demystifying Long Chain-of-Thought Reasoning in
    LLMs", arXiv 2502.03373, sec. 4), L_max = max_new_tokens, L = completion tokens:

        CosFn(L) = r_L + (r_0 - r_L) * (1 + cos(pi * L / L_max)) / 2     (r_0 at L = 0, r_L at L = L_max)
        reward   = CosFn with (r0_correct, rL_correct)   if correct
                   CosFn with (r0_wrong, rL_wrong)       if wrong
                   r_exceed                              if L >= L_max (the completion hit the limit)

    Defaults are the paper's section-4.2 run, as the authors' script passes them (github.com/eddycmu/
    demystify-long-cot, scripts/.../section_4.2__active_scaling_of_cot_length__cosine.sh: correct 2 -> 1,
    wrong -10 -> 0, exceed -10): a short correct answer pays most, and a wrong one is penalised less the
    longer it thought, so the policy is not pushed to give up early on hard problems. Differences from
    the authors' code (openrlhf/reward/cosine.py): no repetition penalty (the paper's sec. 4.3 add-on),
    and no 16-token margin before the limit (their MAX_LEN_MARGIN: 16 of 64 tokens would be a quarter of
    the budget here). A completion whose EOS is token number L_max has length L_max too and counts as
    exceeding: from the ids alone it cannot be told from a truncated one. A maker (REWARD_MAKERS
    "cosine_length"); max_new_tokens comes from grpo.py's flag unless the spec gives it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    L_max = max_new_tokens

    def cosine_length(prompts, completions, completion_ids=None, answer=None, **kw):
        correct = accuracy_reward(prompts, completions, answer=answer)
        out = []
        for c, n in zip(correct, _lengths(completion_ids, "cosine_length")):
            if c is None:
                out.append(None)
            elif n >= L_max:
                out.append(r_exceed)
            else:
                r0, rL = (r0_correct, rL_correct) if c == 1.0 else (r0_wrong, rL_wrong)
                out.append(rL + (r0 - rL) * (1.0 + math.cos(math.pi * n / L_max)) / 2.0)
        return out
    return cosine_length


BUDGET_TAG_RE = re.compile(r"\s*\[(easy|hard)\]", re.IGNORECASE)


def budget_tag_reward(easy_threshold=0.625, r_consistent=1.0, r_inconsistent=0.0, r_missing=-1.0):
    """AdaCtrl's difficulty-calibration reward (Huang et al. 2025, "AdaCtrl: Towards Adaptive and
    Controllable Reasoning via Difficulty-Aware Budgeting", arXiv 2505.18822): the completion opens with a
    budget tag, [Easy] or [Hard], and the tag should match how hard the problem is for the policy now,
    measured on the G samples of its prompt:

        acc_g   = share of the group's samples that are correct (accuracy_reward)
        label_g = Easy if acc_g > easy_threshold else Hard
        reward  = r_consistent (1)     if the tag equals label_g
                  r_inconsistent (0)   if it is the other tag
                  r_missing (-1)       if the completion does not start with a tag (format violation)

    Rule and values as in the authors' code (github.com/JoeYing1019/AdaCtrl: verl/trainer/ppo/
    ray_trainer.py labels with `acc > diff_threshold`, qwen-7b.sh sets diff_threshold=0.625 with 16
    samples, reward_manager/naive.py compute_diff_format gives 1 / 0 / -1 and the run weights it 0.5).
    Strictly above the threshold: with G=8, 5 correct (0.625) is Hard, 6 is Easy. Differences: the tag
    may follow leading whitespace (AdaCtrl reads the first 6 characters); case is ignored, as there.
    AdaCtrl's other length term (compute_diff_len: a correct [Easy] sample gets (1 + cos(pi L / L_group_max))
    / 2) is not part of this function. The group accuracy counts the samples that have an answer; one
    without an answer abstains. A group of one (grpo's fault fallback) is measured by its own correctness:
    correct -> Easy is consistent, wrong -> Hard is. Groups: `group` if given, else runs of equal prompts.
    A tag before <think> makes format_reward score 0: use this instead of "format" for tagged completions.
    A maker (REWARD_MAKERS "budget_tag")."""
    if not 0.0 <= easy_threshold <= 1.0:
        raise ValueError(f"easy_threshold is a share of correct samples, in [0, 1], got {easy_threshold}")

    def budget_tag(prompts, completions, completion_ids=None, answer=None, group=None, **kw):
        correct = accuracy_reward(prompts, completions, answer=answer)
        out = [None] * len(completions)
        for idx in _groups(prompts, group, len(completions)):
            scored = [correct[i] for i in idx if correct[i] is not None]
            if not scored:
                continue
            label = "easy" if sum(scored) / len(scored) > easy_threshold else "hard"
            for i in idx:
                if correct[i] is None:
                    continue
                m = BUDGET_TAG_RE.match(completions[i])
                out[i] = r_missing if m is None else r_consistent if m.group(1).lower() == label else r_inconsistent
        return out
    return budget_tag


THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def no_thinking_bonus(delta=0.05):
    """AdaptThink's constrained objective (Zhang et al. 2025, "AdaptThink: Reasoning Models Can Learn When
    to Think", arXiv 2505.13417, sec. 4.1): prefer NoThinking (an empty <think></think>) as long as accuracy
    does not fall below the reference model's. The constraint E[R] >= E[R_ref] becomes a penalty, and
    divided by its weight lambda the objective is, per sample,

        delta * 1[thinking is empty] + R(x, y) - Rbar_ref(x),        delta = 1 / lambda (paper: 0.05)

    so NoThinking wins on a problem exactly when it loses less than delta of accuracy there. This function
    is the delta term: delta for a completion whose first <think>...</think> holds only whitespace, else 0
    (no think block at all: 0, it did not choose NoThinking). Add it to `accuracy` (--reward-funcs
    "accuracy,no_thinking(delta=0.05)"): R is the accuracy reward, and GRPO's group baseline takes the place
    of Rbar_ref(x) (the paper's mean reward of 16 reference samples, computed before training); a per-prompt
    constant would cancel in the group advantage anyway. Not reproduced: the paper's importance sampling
    that forces half of each group into each mode (here the cold start already writes both). A maker
    (REWARD_MAKERS "no_thinking")."""
    if not (delta >= 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")

    def no_thinking(prompts, completions, **kw):
        out = []
        for c in completions:
            m = THINK_RE.search(c)
            out.append(delta if m is not None and not m.group(1).strip() else 0.0)
        return out
    return no_thinking


def thinking_stats(completions, lengths, correct, difficulty=None):
    """What adaptive thinking changes, as {metric: (sum, count)} so that ranks can add them before the
    division (grpo.py logs sum / count). lengths: tokens per completion; correct: accuracy_reward's
    values (None abstains from the accuracies); difficulty: the rows' bucket column, if they have one.

        thinking/rate                    completions whose <think> has text
        thinking/skip_rate               completions whose <think> is empty (AdaptThink's NoThinking)
        thinking/length/think|no_think   mean length by that mode
        thinking/tag_rate/easy           completions that open with [Easy] (AdaCtrl's budget tag)
        thinking/length/easy_tag|hard_tag|no_tag   mean length by the opening tag
        thinking/accuracy/<bucket>, thinking/length/<bucket>   by difficulty bucket
    """
    out = {}

    def add(name, value):
        s, n = out.get(name, (0.0, 0))
        out[name] = (s + float(value), n + 1)

    for i, (c, n) in enumerate(zip(completions, lengths)):
        m = THINK_RE.search(c)
        thinks = bool(m and m.group(1).strip())
        add("thinking/rate", thinks)
        add("thinking/skip_rate", bool(m) and not thinks)
        add(f"thinking/length/{'think' if thinks else 'no_think'}", n)
        tag = BUDGET_TAG_RE.match(c)
        add("thinking/tag_rate/easy", bool(tag) and tag.group(1).lower() == "easy")
        add(f"thinking/length/{tag.group(1).lower() + '_tag' if tag else 'no_tag'}", n)
        if difficulty is not None and difficulty[i] is not None:
            add(f"thinking/length/{difficulty[i]}", n)
            if correct[i] is not None:
                add(f"thinking/accuracy/{difficulty[i]}", correct[i])
    return out


# -----------------------------------------------------------------------------
# Code execution (ReTool, CodeV-R1): run the completion's program against the row's tests, sandboxed

CODE_RE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion):
    """The last ```python (or ```py, or unlabelled ```) fenced block of the completion, or None."""
    found = CODE_RE.findall(completion)
    return found[-1] if found else None


class Rewards(list):
    """A reward function's values (a list, as every reward function returns) plus `metrics`, counts to log
    beside them (grpo.py: rewards/<fn>/<name>)."""

    def __init__(self, values, metrics):
        super().__init__(values)
        self.metrics = metrics


def code_reward(prompts, completions, tests=None, sandbox=None, **kw):
    """Fraction of the row's tests that the completion's program passes, run in sandbox.py (timeout,
    memory/process/disk limits per run, no network, a file system of its own, no inherited environment).

    The `tests` column is a list; each test is one of
        {"call": "add", "args": [2, 3], "expected": 5}
              a call, decided by the trainer: the sandboxed process imports the program (as module
              `solution`: an `if __name__ == "__main__":` block does not run), calls add(2, 3) (optional
              "kwargs": {...}) and prints the result as JSON; the trainer parses it and compares it with
              `expected`, which never enters the sandbox, as JSON values with their types (True is not 1,
              1 is not 1.0; tuples arrive as lists). All the calls of a row run in one process, under one
              timeout; each result is printed as soon as it is computed, so the calls before one that hangs
              still count. A call whose result line is missing, unparsable, not JSON-serialisable, printed
              twice, or an exception, fails.
        {"input": "2 3\n", "output": "5"}
              stdin/stdout, decided by the trainer: the program runs with `input` as stdin and passes if it
              exits 0 and its stdout equals `output` (trailing whitespace of each line and trailing blank
              lines ignored). Its own process per test.
        "assert add(2, 3) == 5"
              Python run after the program in the same process, decided INSIDE the untrusted process: it
              passes if a random marker printed after the test is the last line of stdout (its own process
              per test). Resists a wrong program, a crash, and sys.exit(0) / os._exit(0) before the asserts.
              Does NOT resist a program written to cheat: the marker can be read (sys._getframe().f_code.
              co_consts, the source file), printed by an excepthook or atexit handler before os._exit(0),
              and `assert f(x) == y` passes for a returned object whose __eq__ is always True. Kept for
              hand-written tests; for RL, which optimises against the checker, use calls or stdin/stdout.
    0.0 when the completion has no code block. None (abstain) when the row has no tests, or when the
    sandbox itself could not run a test (no fork, no disk: nothing the program did), since the fraction
    is then unknown. For all-or-nothing (CodeV-R1), wrap it: 1.0 if code_reward(...) == 1.0.

    Returns a Rewards list; its `metrics`: runs, timeouts (runs killed at the timeout), output_cut (runs
    killed for printing more than the cap), not_started, seconds (wall time of the whole batch). A policy
    that learns to hang shows up there before it shows up in the step time.
    """
    from sandbox import default_sandbox   # here, not at the top: sandbox.py is POSIX-only
    box = sandbox or default_sandbox()
    code = [extract_code(c) for c in completions]
    jobs, owner, checks = [], [], []          # one sandboxed run each; check(result) -> tests passed
    tests = tests or [None] * len(completions)
    for i, (prog, row_tests) in enumerate(zip(code, tests)):
        if prog is None or not row_tests:
            continue
        calls, expected = [], []
        for j, t in enumerate(row_tests):
            if isinstance(t, str):
                marker = f"all tests ran {secrets.token_hex(8)}"
                jobs.append((f"{prog}\n\n{t}\nprint({marker!r})\n", ""))
                checks.append(lambda r, m=marker: r.ok and r.stdout.rstrip().rsplit("\n", 1)[-1] == m)
            elif isinstance(t, dict) and "call" in t:
                call, want = _call_test(t, f"tests[{j}] of sample {i}")
                calls.append(call)
                expected.append(want)
                continue
            elif isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str):
                jobs.append((prog, t["input"]))
                want = _normalise_output(t["output"])
                checks.append(lambda r, w=want: r.ok and _normalise_output(r.stdout) == w)
            else:
                raise ValueError(f"tests[{j}] of sample {i}: expected an assert string, "
                                 f"{{\"input\": str, \"output\": str}} or {{\"call\": name, \"args\": [...], "
                                 f"\"expected\": value}}, got {t!r:.80}")
            owner.append(i)
        if calls:   # one process for all the calls of the row
            # The marker tells the harness's lines from the program's own prints. A program can forge a
            # line, but a line only claims a value, and the value is compared here.
            marker = f"result {secrets.token_hex(8)}"
            jobs.append((f"{_CALL_HARNESS}\n_run({prog!r}, {json.dumps(calls)!r}, {marker!r})\n", ""))
            checks.append(lambda r, m=marker, w=expected: _calls_passed(r.stdout, m, w))
            owner.append(i)
    t0 = time.monotonic()
    results = box.map(jobs)
    passed, unknown = [0] * len(completions), [False] * len(completions)
    for i, r, check in zip(owner, results, checks):
        unknown[i] |= not r.started
        passed[i] += check(r)
    out = []
    for i, row_tests in enumerate(tests):
        if not row_tests or unknown[i]:
            out.append(None)
        else:
            out.append(0.0 if code[i] is None else passed[i] / len(row_tests))
    return Rewards(out, {"runs": len(results), "timeouts": sum(r.timed_out for r in results),
                         "output_cut": sum(r.truncated for r in results),
                         "not_started": sum(not r.started for r in results),
                         "seconds": time.monotonic() - t0})


# The call harness: main.py of a call test's process. It imports the program as module `solution`, calls
# each function and prints, per call, one line "\n<marker> [k, "value", result]" (or [k, "raised", name])
# as soon as it has it. Nothing here needs to be trusted: whatever the program does to it, the trainer
# reads only JSON values from stdout and compares them with expected values the process never sees.
_CALL_HARNESS = """\
import json, os
def _run(source, calls, marker):
    ns = {"__name__": "solution"}
    exec(compile(source, "solution.py", "exec"), ns)
    for k, (name, args, kwargs) in enumerate(json.loads(calls)):
        try:
            line = json.dumps([k, "value", ns[name](*args, **kwargs)])
        except BaseException as e:
            line = json.dumps([k, "raised", type(e).__name__])
        os.write(1, f"\\n{marker} {line}\\n".encode())
"""


def _call_test(t, where):
    """A {"call", "args", "kwargs", "expected"} test -> ([name, args, kwargs], expected), both as plain
    JSON values (tuples become lists, as they will in the result), or a ValueError saying what is wrong."""
    name, args, kwargs = t["call"], t.get("args", []), t.get("kwargs", {})
    if not (isinstance(name, str) and name.isidentifier() and "expected" in t and isinstance(args, list)
            and isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)
            and set(t) <= {"call", "args", "kwargs", "expected"}):
        raise ValueError(f"{where}: a call test is {{\"call\": function name, \"args\": [...] (optional), "
                         f"\"kwargs\": {{str: ...}} (optional), \"expected\": value}}, got {t!r:.80}")
    try:
        return json.loads(json.dumps([name, args, kwargs])), json.loads(json.dumps(t["expected"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: args, kwargs and expected must be JSON values ({e})") from None


def _calls_passed(stdout, marker, expected):
    """How many calls returned their expected value: call k passes if stdout has exactly one line
    "<marker> [k, "value", v]" and v equals expected[k] (_same)."""
    seen = {}
    for line in stdout.split("\n"):
        if line.startswith(marker + " "):
            try:
                k, kind, value = json.loads(line[len(marker) + 1:])
            except (ValueError, TypeError, RecursionError):   # anything the program printed: not a claim
                continue
            if type(k) is int:
                seen.setdefault(k, []).append((kind, value))
    return sum(len(seen.get(k, ())) == 1 and seen[k][0][0] == "value" and _same(seen[k][0][1], want)
               for k, want in enumerate(expected))


def _same(a, b):
    """Equal as JSON values, types included (True is not 1, 1 is not 1.0), lists in order."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _normalise_output(text):
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


REWARD_FUNCS = {"accuracy": accuracy_reward, "countdown": countdown_reward, "format": format_reward,
                "code": code_reward}

# Reward functions that need numbers (a length budget, a cap) are made by a maker: maker(**params) ->
# reward function. Each parameter named like a flag of the script (grpo.py's max_new_tokens) takes that
# flag's value unless the spec gives it; the others take the spec's value or the maker's default.
REWARD_MAKERS = {"soft_overlong": soft_overlong_punishment, "length_penalty": group_length_penalty,
                 "cosine_length": cosine_length_reward, "budget_tag": budget_tag_reward,
                 "no_thinking": no_thinking_bonus}


# -----------------------------------------------------------------------------
# Choosing reward functions: --reward-funcs "accuracy,format,soft_overlong(overlong_cache=8),mine:fn"

def parse_spec(spec):
    """'a,b(k=1,s=x),mod:fn' -> [('a', {}), ('b', {'k': 1, 's': 'x'}), ('mod:fn', {})]. Values are
    Python literals (numbers, strings, True/False) or else plain strings. Commas inside (...) do not split."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in (i.strip() for i in items):
        m = re.fullmatch(r"([\w.:]+)(?:\((.*)\))?", item)
        if not m or depth != 0:
            raise ValueError(f"--reward-funcs: cannot read {item!r} (expected name, name(key=value, ...) or "
                             f"module:function)")
        params = {}
        for kv in filter(None, (x.strip() for x in (m.group(2) or "").split(","))):
            k, eq, v = kv.partition("=")
            if not eq or not k.strip().isidentifier():
                raise ValueError(f"--reward-funcs {item!r}: parameter {kv!r} is not key=value")
            try:
                params[k.strip()] = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError):
                params[k.strip()] = v.strip()
        out.append((m.group(1), params))
    return out


def resolve(spec, config=None):
    """The reward functions a spec names -> (names, functions). config: the script's flags (a dict),
    which fill a maker's parameters of the same names. Every problem is a ValueError naming the item."""
    config = config or {}
    names, funcs = [], []
    for name, params in parse_spec(spec):
        if ":" in name:  # a function of your own: mod:fn, or a maker of your own: mod:fn(k=v)
            mod, _, attr = name.partition(":")
            try:
                f = getattr(importlib.import_module(mod), attr)
            except ImportError as e:
                raise ValueError(f"--reward-funcs {name!r}: cannot import module {mod!r} ({e})") from None
            except AttributeError:
                raise ValueError(f"--reward-funcs {name!r}: module {mod!r} has no {attr!r}") from None
            if not callable(f):
                raise ValueError(f"--reward-funcs {name!r}: {attr!r} is not a function")
            maker = f if params else None
        elif name in REWARD_MAKERS:
            f, maker = None, REWARD_MAKERS[name]
        elif name in REWARD_FUNCS:
            if params:
                raise ValueError(f"--reward-funcs {name!r} takes no parameters (makers that do: "
                                 f"{', '.join(REWARD_MAKERS)})")
            f, maker = REWARD_FUNCS[name], None
        else:
            raise ValueError(f"--reward-funcs: unknown reward function {name!r} (built in: "
                             f"{', '.join([*REWARD_FUNCS, *REWARD_MAKERS])}; or module:function)")
        if maker is not None:
            sig = inspect.signature(maker)
            unknown = set(params) - set(sig.parameters)
            if unknown:
                raise ValueError(f"--reward-funcs {name!r}: unknown parameter(s) {', '.join(sorted(unknown))} "
                                 f"(it takes {', '.join(sig.parameters)})")
            given = {k: config[k] for k in sig.parameters if k in config and k not in params}
            missing = [k for k, p in sig.parameters.items()
                       if p.default is p.empty and k not in params and k not in given]
            if missing:
                raise ValueError(f"--reward-funcs {name!r}: give {', '.join(missing)}, e.g. {name}({missing[0]}=...)")
            try:
                f = maker(**given, **params)
            except (TypeError, ValueError) as e:
                raise ValueError(f"--reward-funcs {name!r}: {e}") from None
        names.append(name)
        funcs.append(f)
    return names, funcs


# -----------------------------------------------------------------------------
# Calling a reward function: user code, run in the trainer's process on model output for hours. One
# sample that trips it must cost that sample's reward, not the run.

class RewardTimeout(BaseException):
    """Raised in the main thread when a reward call overruns its bound. A BaseException, so that a
    reward function's own `except Exception` does not swallow it."""


_watch = {"armed": False}


def _overrun(signum, frame):
    if _watch["armed"]:
        _watch["armed"] = False
        raise RewardTimeout()


def _bounded(fn, seconds, what):
    """fn() within `seconds`: at the deadline a watchdog thread signals the main thread (SIGUSR1), whose
    handler raises RewardTimeout where fn is. This stops Python code (loops, sleeps, waits); code that
    never returns to the interpreter (one C call: a huge regex, 10**10**8) cannot be interrupted and is
    named on stderr instead. Unbounded off the main thread or without signals (Windows)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "pthread_kill"):
        return fn()
    if signal.getsignal(signal.SIGUSR1) is not _overrun:
        signal.signal(signal.SIGUSR1, _overrun)
    main = threading.main_thread().ident
    stuck = threading.Timer(seconds + 10.0, lambda: tqdm.write(
        f"{what} ran past its {seconds:g} s limit and cannot be interrupted (it is inside one call into C code); "
        f"training waits for it", file=sys.stderr))
    timer = threading.Timer(seconds, lambda: (signal.pthread_kill(main, signal.SIGUSR1), stuck.start()))
    timer.daemon = stuck.daemon = True
    _watch["armed"] = True
    timer.start()
    try:
        return fn()
    finally:
        _watch["armed"] = False   # a signal that arrives from here on is ignored
        timer.cancel()
        stuck.cancel()
        if timer.is_alive():
            timer.join()
        stuck.cancel()


def call(f, prompts, completions, completion_ids, columns, metrics=None, timeout=None):
    """One reward function on N samples -> N floats, NaN where it abstained or failed; the counts in the
    `.metrics` of what it returned (if any) are added into the dict `metrics`.

    A function abstains on a sample when it returns None for it (TRL's convention), returns something
    that is not a finite number (NaN, inf, a string), returns an array that is not 1-D, raises (sys.exit
    included), or runs past `timeout` seconds. It gets its own copies of its inputs, so editing them in
    place changes neither what the next function scores nor what is logged. A call that raises or runs
    out of time is made again sample by sample (each with timeout / N), so only the samples that trip
    it abstain, and the report names them. Each kind of fault is reported once per function on stderr."""
    N = len(completions)
    metrics = metrics if metrics is not None else {}
    name = getattr(f, "__name__", repr(f))
    try:
        p, c, ids, cols = copy.deepcopy((prompts, completions, completion_ids, columns))
        ret = _bounded(lambda: f(p, c, completion_ids=ids, **cols), timeout, f"reward function {name}")
        if getattr(ret, "ndim", 1) != 1:  # an (N, 1) array would make N values of one element each
            _report_fault(f, "returned an array that is not 1-D",
                          f"shape {tuple(ret.shape)} for {N} completions: return one number per completion")
            return [math.nan] * N
        values = list(ret)
    except (Exception, SystemExit, RewardTimeout) as e:  # sys.exit() in a reward function must not end training
        if isinstance(e, RewardTimeout):
            kind = "ran past its time limit"
            detail = (f"{timeout:g} s on {N} sample(s)" + (f"; scoring them one by one, {timeout / N:.3g} s each, "
                                                            f"to find which" if N > 1 else
                                                            f": this completion abstains: {completions[0][:200]!r}"))
        else:
            kind, detail = "called sys.exit" if isinstance(e, SystemExit) else "raised", traceback.format_exc()
        _report_fault(f, kind, detail, repeat=3 if N == 1 and isinstance(e, RewardTimeout) else 1)
        if N == 1:
            return [math.nan]
        each = timeout / N if timeout and isinstance(e, RewardTimeout) else timeout
        return [call(f, prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                     {k: v[i:i + 1] for k, v in columns.items()}, metrics, each)[0] for i in range(N)]
    if len(values) != N:
        _report_fault(f, "returned the wrong number of values", f"{len(values)} values for {N} completions")
        return [math.nan] * N
    for k, v in (getattr(ret, "metrics", None) or {}).items():
        metrics[k] = metrics.get(k, 0) + v
    out = []
    for v in values:
        if v is None:   # abstains by choice: not a fault
            out.append(math.nan)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.inf
        if not math.isfinite(x):
            _report_fault(f, "returned a value that is not a finite number", repr(v))
            x = math.nan
        out.append(x)
    return out


_reported_faults = {}


def _report_fault(f, kind, detail, repeat=1):
    """On stderr, the first `repeat` times this function shows this kind of fault (samples that time
    out: the first 3, each named); rewards/<fn>/abstained counts every one."""
    name = getattr(f, "__name__", repr(f))
    seen = _reported_faults.get((name, kind), 0)
    if seen < repeat:
        _reported_faults[(name, kind)] = seen + 1
        tqdm.write(f"reward function {name} {kind} (its samples abstain; counted in rewards/<fn>/abstained):"
                   f"\n{detail}", file=sys.stderr)
