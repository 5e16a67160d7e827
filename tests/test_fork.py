"""The README's "Fork it" changes are local: a reward maker from the user's own module takes a number
from the command line and one from the flags without a line of grpo.py changing; the Triton advantage
kernel serves only the estimators it knows, so a new estimator in grpo.py runs on any device; the
sampling log-probs and the loss mask reach the update."""
import json
import os
import sys
import tempfile
import types

import pytest
import torch

import grpo
import kernels
import rewards
from conftest import TEST_THREADS


def test_a_maker_of_your_own_gets_its_parameters_from_the_spec_and_the_flags():
    names, funcs = rewards.resolve("toy_rewards:short_correct(alpha=0.25),format", {"max_new_tokens": 10})
    assert names == ["toy_rewards:short_correct", "format"]
    # right answers: 1 - 0.25 * len / 10; a wrong one 0; no answer column: abstains (None)
    got = funcs[0](None, ["<answer>2</answer>", "<answer>3</answer>"], [[0] * 4, [0] * 8], answer=["2", "2"])
    assert got == [1 - 0.25 * 4 / 10, 0.0]
    assert funcs[0](None, ["x"], [[0]], answer=[None]) == [None]


def test_the_maker_runs_inside_grpo(tmp_path):
    """The README's command line, one GRPO step on a JSONL task: the reward is logged under its name."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(4)))
    out = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(init="scratch", data=str(data), out=out, steps=1, num_prompts=2, num_generations=2,
                              max_new_tokens=6, eval_n=0, sample_every=0, save_every=0, threads=TEST_THREADS,
                              reward_funcs="toy_rewards:short_correct(alpha=0.3),format"))
    m = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert m["rewards/toy_rewards:short_correct/abstained"] == 0 and "rewards/format/mean" in m


def test_the_advantage_kernel_serves_only_the_estimators_it_knows(monkeypatch):
    """(A stand-in for the kernel module: importing the real one here, before tests/test_kernels.py sets
    TRITON_INTERPRET, would build its kernel for a GPU.)"""
    calls = []
    monkeypatch.setattr(kernels, "active", lambda t: True)
    fake = types.ModuleType("kernels.advantage")
    fake.group_advantages_triton = lambda r, G, scale, rloo, eps: calls.append(rloo) or torch.zeros_like(r)
    monkeypatch.setitem(sys.modules, "kernels.advantage", fake)
    R = torch.tensor([1.0, 0.0, 0.0, 1.0])
    grpo.group_advantages(R, 4, "none", "grpo")
    grpo.group_advantages(R, 4, "none", "rloo")
    assert calls == [False, True]
    with pytest.raises(ValueError, match="advantage estimator must be one of"):
        grpo.group_advantages(R, 4, "none", "rpp")     # not the kernel's: the PyTorch path, where it is added
    assert calls == [False, True]


def test_sampling_logprobs_and_loss_mask_reach_the_update(monkeypatch):
    """What the phases hand on: the batch the update sees carries the sampler's log-probs (equal to the
    trainer's on-policy, up to rounding: same model, same weights) and a loss mask that
    --mask-truncated-completions cuts without touching the completion mask."""
    seen = {}
    real = grpo.update

    def spy(cfg, model, opt, sched, batch):
        seen["batch"] = batch
        return real(cfg, model, opt, sched, batch)
    monkeypatch.setattr(grpo, "update", spy)
    cfg = grpo.GRPOConfig(init="scratch", out=None, steps=1, num_prompts=2, num_generations=2, max_new_tokens=5,
                          eval_n=0, sample_every=0, save_every=0, threads=TEST_THREADS, mask_truncated_completions=True)
    with tempfile.TemporaryDirectory() as d:
        cfg.out = d
        model, _, _ = grpo.main(cfg)
    roll = seen["batch"].roll
    assert roll.truncated.any(), "an untrained model runs to the limit"      # (5 tokens: it never stops)
    assert torch.equal(roll.loss_mask[roll.truncated], torch.zeros_like(roll.loss_mask[roll.truncated]))
    assert roll.completion_mask[roll.truncated].sum() > 0                   # the completion mask is intact
    assert roll.logprobs.shape == roll.completion_mask.shape and (roll.logprobs * roll.completion_mask).sum() < 0
