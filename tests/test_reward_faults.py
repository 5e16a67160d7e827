"""grpo.score with reward functions that raise or return None / NaN / inf / junk: those samples abstain for
that function (NaN), the others are scored, a group with no scorable sample gets advantage 0, and a run
with a broken reward function trains on and logs rewards/<fn>/abstained. Also the code reward end to end
on examples/code_problems.jsonl."""
import json
import math
import os

import pytest
import torch

import grpo
import rewards
from conftest import TEST_THREADS
from grpo import group_advantages, score

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "code_problems.jsonl")


def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def raises_on_boom(prompts, completions, **kw):
    """Fails for the whole batch as soon as one completion contains 'boom'."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [1.0] * len(completions)


def always_raises(prompts, completions, **kw):
    raise KeyError("no such column")


def junk(prompts, completions, **kw):
    return [None, math.nan, math.inf, "abc", -math.inf, 2][:len(completions)]


def wrong_length(prompts, completions, **kw):
    return [1.0]


def exits(prompts, completions, **kw):
    import sys
    sys.exit(0)


def rewrites_its_inputs(prompts, completions, completion_ids, answer, **kw):
    completions[:] = ["<answer>3</answer>"] * len(completions)
    answer[:] = ["3"] * len(answer)
    completion_ids[0].append(99)
    return [1.0] * len(completions)


def seen(prompts, completions, completion_ids, answer, **kw):
    seen.calls.append((list(completions), list(answer), [list(i) for i in completion_ids]))
    return [0.0] * len(completions)


def column(prompts, completions, **kw):
    return torch.ones(len(completions), 1)   # (N, 1): one element per sample, but not one number


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    monkeypatch.setattr(rewards, "_reported_faults", {})


def run_score(funcs, completions, weights=None, timeout=None, **columns):
    n = len(completions)
    w = torch.tensor(weights or [1.0] * len(funcs))
    return score(funcs, w, ["p"] * n, completions, [[1]] * n, columns, timeout=timeout)


def nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_only_the_sample_that_makes_a_function_raise_abstains(capsys):
    """raises_on_boom fails on the batch; called again per sample it fails only on 'boom': that sample
    abstains for it (NaN) and still gets length's reward. Totals: weights 1 and 0.5."""
    per_fn, total = run_score([length, raises_on_boom], ["ab", "boom", "c"], weights=[1.0, 0.5])
    assert nan_equal(per_fn, torch.tensor([[2., 1.], [4., math.nan], [1., 1.]]))
    assert torch.equal(total, torch.tensor([2.5, 4.0, 1.5]))     # dyadic values: sums exact in any order
    err = capsys.readouterr().err
    assert "reward function raises_on_boom raised" in err and "RuntimeError: boom" in err


def test_non_numbers_and_non_finite_values_abstain():
    """None (by choice), NaN, +-inf and a string all become NaN; 2 stays 2."""
    per_fn, total = run_score([junk, length], ["a"] * 6, weights=[1.0, 1.0])
    assert nan_equal(per_fn[:, 0], torch.tensor([math.nan] * 5 + [2.0]))
    assert torch.equal(total, torch.tensor([1., 1., 1., 1., 1., 3.]))   # small integers: exact


def test_wrong_length_and_always_raising_abstain_everywhere(capsys):
    """Every sample abstains for such a function; where every function abstains the total is NaN."""
    per_fn, total = run_score([always_raises, wrong_length], ["a", "b"])
    assert torch.isnan(per_fn).all() and torch.isnan(total).all()
    err = capsys.readouterr().err
    assert "always_raises raised" in err and "KeyError" in err
    assert "wrong_length returned the wrong number of values" in err


def test_each_fault_is_reported_once(capsys):
    for _ in range(3):
        run_score([always_raises, length], ["a", "b"])
    assert capsys.readouterr().err.count("always_raises raised") == 1


def test_a_group_with_no_scorable_sample_gets_zero_advantage():
    """Group 1 (samples 0-3) scores 1, 0, 0, 1; group 2 (samples 4-7) all make the only function fail.
    Group 1: mean 1/2, unbiased std sqrt(1/3), A = +-(1/2)/(std + 1e-4); group 2: A = 0, not NaN."""
    def reward(prompts, completions, **kw):
        if any(c == "x" for c in completions):
            raise ValueError("x")
        return [float(c == "right") for c in completions]

    _, total = run_score([reward], ["right", "wrong", "wrong", "right", "x", "x", "x", "x"])
    assert torch.isnan(total[4:]).all()
    adv = group_advantages(total, 4, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0., 0., 0., 0.]))
    for scale in ("group", "batch", "none"):  # a NaN group is zeroed by a where: exact
        assert torch.equal(group_advantages(total, 4, scale)[4:], torch.zeros(4))


# -----------------------------------------------------------------------------
# End to end

SOLUTIONS = {  # a right answer to each problem of examples/code_problems.jsonl, in order
    0: "def add(a, b):\n    return a + b",
    1: "def is_palindrome(s):\n    return s == s[::-1]",
    2: "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    3: "a, b = map(int, input().split())\nprint(a + b)",
    4: "print(' '.join(reversed(input().split())))",
}


def example_rows():
    with open(EXAMPLE) as f:
        return [json.loads(line) for line in f]


def test_code_reward_through_score_on_the_example_problems():
    """Each example problem with its right solution scores 1; a naive recursive fib passes the three small
    cases and times out on fib(90): 3/4; the prose answer has no code block: 0. Weighted with format (0.1,
    which is 0 here: no <think>/<answer> tags), exactly as grpo.main scores a batch."""
    from sandbox import Sandbox
    rows = example_rows()
    naive_fib = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"
    completions = [f"```python\n{code}\n```" for code in [*SOLUTIONS.values(), naive_fib]] + ["I don't know"]
    idx = list(range(5)) + [2, 0]
    box = Sandbox(timeout=1.0, max_parallel=2)
    code_reward = lambda *a, **kw: rewards.code_reward(*a, sandbox=box, **kw)  # noqa: E731
    per_fn, total = run_score([code_reward, rewards.format_reward], completions, weights=[1.0, 0.1],
                              tests=[rows[i]["tests"] for i in idx])
    assert per_fn[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.0]
    assert total.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.0]      # x + 0.1 * 0 = x: exact


def test_grpo_trains_on_with_a_broken_reward_function(tmp_path):
    """Two steps on the example JSONL with --reward-funcs code,always_raises: always_raises abstains on every
    sample (4 per step, logged as rewards/<name>/abstained), code scores every sample (0 abstained;
    the untrained model writes no code block, so 0), and both steps complete."""
    out = str(tmp_path / "out")
    cfg = grpo.GRPOConfig(init="scratch", data=EXAMPLE, out=out, steps=2, num_prompts=2, num_generations=2,
                          max_new_tokens=6, eval_n=0, eval_every=0, sample_every=0, save_every=0, threads=TEST_THREADS,
                          reward_funcs="code,test_reward_faults:always_raises", reward_weights="1,1")
    grpo.main(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        ms = [json.loads(line) for line in f]
    assert [m["step"] for m in ms] == [1, 2]
    broken = "rewards/test_reward_faults:always_raises/abstained"   # metric names are the --reward-funcs names
    assert all(m[broken] == 4 and m["rewards/code/abstained"] == 0 for m in ms)
    assert all(m["rewards/code/mean"] == 0.0 for m in ms)


def test_sys_exit_in_a_reward_function_is_contained(capsys):
    per_fn, total = run_score([exits, length], ["ab", "c"])
    assert nan_equal(per_fn, torch.tensor([[math.nan, 2.0], [math.nan, 1.0]])) and total.tolist() == [2.0, 1.0]
    assert "reward function exits called sys.exit" in capsys.readouterr().err


def test_each_reward_function_gets_its_own_copies():
    seen.calls = []
    completions, answer, ids = ["7", "8"], ["1", "2"], [[1], [2]]
    score([rewrites_its_inputs, seen], torch.tensor([1.0, 1.0]), ["p", "p"], completions, ids, {"answer": answer})
    assert seen.calls == [(["7", "8"], ["1", "2"], [[1], [2]])]
    assert completions == ["7", "8"] and answer == ["1", "2"] and ids == [[1], [2]]   # the caller's too


def test_an_array_that_is_not_1d_abstains_with_a_message(capsys):
    per_fn, _ = run_score([column, length], ["ab", "c"])
    assert torch.isnan(per_fn[:, 0]).all() and per_fn[:, 1].tolist() == [2.0, 1.0]
    err = capsys.readouterr().err
    assert "reward function column returned an array that is not 1-D" in err and "shape (2, 1)" in err


def test_no_nan_reaches_metrics_jsonl(tmp_path):
    """A function that abstains on every sample has no mean: null in the log, which stays strict JSON."""
    out = str(tmp_path / "out")
    cfg = grpo.GRPOConfig(init="scratch", data=EXAMPLE, out=out, steps=1, num_prompts=2, num_generations=2,
                          max_new_tokens=4, eval_n=0, eval_every=0, sample_every=0, save_every=0, threads=TEST_THREADS,
                          reward_funcs="test_reward_faults:column,test_reward_faults:exits", reward_weights="1,1")
    grpo.main(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert m["rewards/test_reward_faults:column/mean"] is None and m["rewards/test_reward_faults:column/abstained"] == 4


def test_a_reward_function_that_hangs_is_stopped_and_only_its_hanging_samples_abstain(capsys):
    """Bounded time: a function that hangs on one sample (a busy loop; another sleeps) is stopped at the
    --reward-timeout bound, called again sample by sample to find which, and only that sample abstains; the
    report names the function and the sample. Bounded: the whole call takes about 2 x the bound, not forever."""
    import time

    def spins_on_x(prompts, completions, **kw):
        for c in completions:
            while "x" in c:          # pure Python: the interpreter sees the signal between bytecodes
                pass
        return [1.0] * len(completions)

    def sleeps_on_x(prompts, completions, **kw):
        if any("x" in c for c in completions):
            time.sleep(3600)         # a blocking call: the signal interrupts it
        return [2.0] * len(completions)

    t0 = time.monotonic()
    per_fn, R = run_score([spins_on_x, sleeps_on_x], ["a", "bx", "c"], timeout=0.6)
    took = time.monotonic() - t0
    assert nan_equal(per_fn, torch.tensor([[1.0, 2.0], [math.nan, math.nan], [1.0, 2.0]]))
    assert took < 2 * 2 * 0.6 + 1.0          # two functions, each: the batch bound + the per-sample bounds
    err = capsys.readouterr().err
    assert "reward function spins_on_x ran past its time limit" in err and "0.6 s on 3 sample(s)" in err
    assert "this completion abstains: 'bx'" in err                                       # which sample


def test_a_reward_function_cannot_swallow_its_timeout():
    """RewardTimeout is a BaseException: a function's own `except Exception` does not keep it running."""
    def stubborn(prompts, completions, **kw):
        while True:
            try:
                while True:
                    pass
            except Exception:
                continue
    per_fn, _ = run_score([stubborn], ["a"], timeout=0.3)
    assert math.isnan(per_fn.item())


def test_without_a_bound_a_slow_function_finishes():
    import time

    def dawdles(prompts, completions, **kw):
        time.sleep(0.3)
        return [1.0] * len(completions)
    assert run_score([dawdles], ["ab"], timeout=0)[0].tolist() == [[1.0]]
    assert run_score([dawdles], ["ab"], timeout=5)[0].tolist() == [[1.0]]   # within its bound: untouched


def test_reward_specs_with_parameters():
    """--reward-funcs 'name(key=value)': a maker's parameters from the spec, else from the flags of the same
    name, else its defaults; every mistake is a sentence naming the item."""
    assert rewards.parse_spec("accuracy, soft_overlong(overlong_cache=8, max_new_tokens=20),m:f") == [
        ("accuracy", {}), ("soft_overlong", {"overlong_cache": 8, "max_new_tokens": 20}), ("m:f", {})]
    names, funcs = rewards.resolve("soft_overlong(overlong_cache=5)", {"max_new_tokens": 20, "overlong_cache": 0})
    ids = [[0] * n for n in (15, 16, 20, 21)]
    assert names == ["soft_overlong"] and funcs[0](None, [""] * 4, ids) == [0.0, -0.2, -1.0, -1.0]
    for spec, msg in [("accuracy(x=1)", "takes no parameters"), ("soft_overlong(bogus=1)", "unknown parameter"),
                      ("soft_overlong", "give max_new_tokens, overlong_cache"), ("acc(", "cannot read"),
                      ("nope", "unknown reward function 'nope'"), ("no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(ValueError, match=msg):
            rewards.resolve(spec, {})
    with pytest.raises(grpo.ConfigError, match="unknown parameter"):
        grpo.resolve_reward_funcs(grpo.GRPOConfig(reward_funcs="accuracy,soft_overlong(bogus=1)"))
