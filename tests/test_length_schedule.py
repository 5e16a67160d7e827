"""--length-schedule (a PTST-style completion limit that widens as RL goes): each step samples within the
limit of the last entry at or before it, logs it, and --resume picks the schedule up where it was."""
import json
import os

import pytest

import grpo
from conftest import TEST_THREADS


def test_completion_limit_by_step():
    cfg = grpo.GRPOConfig(max_new_tokens=48, length_schedule="0:16, 10:32,20:48")
    assert [grpo.completion_limit(cfg, s) for s in (0, 9, 10, 19, 20, 99)] == [16, 16, 32, 32, 48, 48]
    assert grpo.completion_limit(grpo.GRPOConfig(max_new_tokens=48), 5) == 48
    assert grpo.completion_limit(grpo.GRPOConfig(max_new_tokens=48, length_schedule="5:8"), 2) == 48
    for bad, msg in [("0-16", "is not STEP:TOKENS"), ("10:8,0:4", "must increase"), ("0:64", r"\[1, --max-new-tokens 48\]")]:
        with pytest.raises(grpo.ConfigError, match=msg):
            grpo.main(grpo.GRPOConfig(max_new_tokens=48, length_schedule=bad))


def test_schedule_in_a_run_and_across_resume(tmp_path):
    """The limit is 3 tokens at steps 1-2 and 6 at step 3, and no completion is longer; a run stopped after
    step 2 and resumed samples step 3 at 6 too, and that step equals the uninterrupted one."""
    kw = dict(init="scratch", num_prompts=2, num_generations=2, max_new_tokens=6, length_schedule="0:3,2:6",
              eval_n=0, sample_every=0, threads=TEST_THREADS, save_every=0)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    grpo.main(grpo.GRPOConfig(out=a, steps=3, **kw))
    ms = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [m["completions/max_new_tokens"] for m in ms] == [3, 3, 6]
    assert [m["completions/max_length"] <= m["completions/max_new_tokens"] for m in ms] == [True] * 3
    grpo.main(grpo.GRPOConfig(out=b, steps=2, **kw))
    grpo.main(grpo.GRPOConfig(out=b, steps=3, resume=True, **kw))
    mb = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [m["completions/max_new_tokens"] for m in mb] == [3, 3, 6]
    assert mb[2]["reward"] == ms[2]["reward"] and mb[2]["loss"] == ms[2]["loss"]   # the same run, resumed
