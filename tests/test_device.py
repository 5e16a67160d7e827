"""Device placement, without a GPU: whole SFT, GRPO and DPO runs with the model on an accelerator that
tests/device_emulation.py emulates on the CPU. Any op there that mixes a host tensor into device math
raises DeviceMix, where a CUDA run would stop with "Expected all tensors to be on the same device"
(rewards built on the host, a mask or an index left behind, ...). With --kernels auto the kernels are
switched in for the emulated device, each replaced by its PyTorch reference (the interpreter cannot
read device memory; tests/test_kernels.py tests the kernels themselves): so the trainer reaches each
kernel, with all of its inputs on the device, as it would on CUDA."""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():   # as in tests/test_kernels.py: set before kernels.logprob is imported
    os.environ["TRITON_INTERPRET"] = "1"

import dpo  # noqa: E402
import grpo  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import checkpoint as CK  # noqa: E402
import sft  # noqa: E402
from conftest import TEST_THREADS  # noqa: E402
from device_emulation import DEVICE, DeviceMix, OnDevice, emulated_device  # noqa: E402

if "kernels.logprob" in sys.modules and not sys.modules["kernels.logprob"].INTERPRET and not torch.cuda.is_available():
    pytest.skip("kernels.logprob was imported before TRITON_INTERPRET was set", allow_module_level=True)

import kernels.advantage  # noqa: E402
import kernels.logprob  # noqa: E402
import kernels.loss_head  # noqa: E402


@pytest.fixture
def device(monkeypatch):
    """The emulated device, with the mode on for the test: .name ("meta") for the configs' --device,
    .reached the kernels called. Kernels are active for tensors on it, each entry point replaced by its
    reference."""
    reached = []
    monkeypatch.setattr(kernels, "active", lambda t: kernels._mode == "auto" and t.device.type == DEVICE.type)
    for mod, name, ref in [(kernels.logprob, "fused_logprob", kernels.logprob.logprob_reference),
                           (kernels.loss_head, "fused_loss_head", kernels.loss_head.loss_head_reference),
                           (kernels.advantage, "group_advantages_triton",
                            lambda r, G, scale, rloo, eps: grpo.group_advantages_torch(r, G, scale, "rloo" if rloo else "grpo", eps))]:
        def kernel(*a, _name=name, _ref=ref, **kw):
            assert all(isinstance(t, OnDevice) for t in a if isinstance(t, torch.Tensor)), _name
            reached.append(_name)
            return _ref(*a, **{k: v for k, v in kw.items() if k not in ("chunk_rows", "tiles")})
        monkeypatch.setattr(mod, name, kernel)
    with emulated_device():
        yield SimpleNamespace(name=DEVICE.type, reached=reached)
    kernels.set_mode("auto")


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def on_device(model):
    return all(isinstance(p, OnDevice) for p in model.parameters())


def test_the_emulation_raises_on_a_host_device_mix():
    """What CUDA refuses, the emulated device refuses: a host tensor in device math. What CUDA allows
    works: 0-dim host tensors (scalars), moves, copies, host index tensors; and the numbers are real.
    A model moves there whole (load(device=) runs the lm_head check there too)."""
    with emulated_device() as dev:
        x = torch.arange(6.0).to(dev)                       # (6,)
        assert isinstance(x, OnDevice) and x.device == DEVICE
        with pytest.raises(DeviceMix, match="mul"):
            x * torch.ones(6)
        assert float((x * torch.tensor(2.0)).sum()) == 30.0
        assert x[torch.tensor([1, 3])].cpu().tolist() == [1.0, 3.0]
        assert torch.tensor([1.0, 2.0], device=dev).tolist() == [1.0, 2.0]
        y = torch.zeros(6, device=dev)
        y.copy_(torch.ones(6))
        assert y.cpu().sum().item() == 6.0 and not isinstance(y.cpu(), OnDevice)
        m, _ = M.load("tiny", device=dev)                  # the model moves whole, tied weights stay tied
        assert on_device(m) and m.get_output_embeddings().weight is m.get_input_embeddings().weight


@pytest.mark.parametrize("kernels_mode", ["off", "auto"])
def test_grpo_runs_on_a_device(tmp_path, device, kernels_mode):
    """Two GRPO steps with everything that creates tensors on the way (rewards, dynamic sampling's
    kept groups, truncation mask, PPO reuse with old log-probs, a reference model's log-probs, KL), then
    a checkpoint. With kernels, as on a GPU: the static rollout engine (the CUDA-graph engine's buffers
    and decode step, without the capture), and the advantage kernel, the log-prob kernel (old /
    reference log-probs) and the fused loss head all reached with device inputs."""
    model, _, _ = grpo.main(grpo.GRPOConfig(
        device=device.name, kernels=kernels_mode, init="scratch", out=str(tmp_path / "grpo"), steps=2, num_prompts=2,
        num_generations=4, max_new_tokens=6, eval_n=0, eval_every=0, sample_every=1, save_every=1,
        threads=TEST_THREADS, reward_funcs="toy_rewards:digit_fraction", beta=0.04, num_iterations=2,
        dynamic_sampling=True, mask_truncated_completions=True,
        rollout_engine="static" if kernels_mode == "auto" else "simple"))
    assert on_device(model)
    ms = metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2] and all(math.isfinite(m["grad_norm"]) for m in ms)
    if kernels_mode == "auto":
        assert {"group_advantages_triton", "fused_logprob", "fused_loss_head"} <= set(device.reached)
    else:
        assert device.reached == []


def test_grpo_mode_prefixes_on_a_device(tmp_path, device):
    """--mode-prefixes: the forced prefix's log-probs and masks are made on the rollout's device and join its
    tensors there (rollout.opened), then the rollout correction weighs them (static engine, as on a GPU)."""
    model, _, _ = grpo.main(grpo.GRPOConfig(
        device=device.name, init="scratch", out=str(tmp_path / "grpo"), steps=2, num_prompts=2, num_generations=4,
        max_new_tokens=6, eval_n=0, eval_every=0, sample_every=1, save_every=0, threads=TEST_THREADS,
        reward_funcs="toy_rewards:opens_easy", mode_prefixes="[E|[H", rollout_correction="tis", rollout_engine="static"))
    assert on_device(model)
    ms = metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert [m["rewards/toy_rewards:opens_easy/mean"] for m in ms] == [0.5, 0.5]
    assert all(math.isfinite(m["grad_norm"]) for m in ms)


@pytest.mark.parametrize("kernels_mode", ["off", "auto"])
def test_sft_runs_on_a_device(tmp_path, device, kernels_mode):
    """Two SFT steps, a checkpoint and the held-out evaluation (greedy rollouts, rewards)."""
    model, _, result = sft.main(sft.SFTConfig(device=device.name, kernels=kernels_mode, out=str(tmp_path / "sft"),
                                              steps=2, batch_size=4, num_examples=16, eval_n=4, save_every=1,
                                              max_new_tokens=8, threads=TEST_THREADS))
    assert on_device(model) and result["n"] == 4
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "sft" / "sft_metrics.jsonl"))
    assert ("fused_loss_head" in device.reached) == (kernels_mode == "auto")


@pytest.mark.parametrize("kernels_mode", ["off", "auto"])
def test_dpo_runs_on_a_device(tmp_path, device, kernels_mode):
    """Two DPO steps from JSONL pairs: reference log-probs (cached on the host), then the policy's."""
    base = str(tmp_path / "base")
    CK.save(*M.load("tiny", seed=3), base)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)})
                            + "\n" for a in range(4)))
    model, _, _ = dpo.main(dpo.DPOConfig(device=device.name, kernels=kernels_mode, model=base, data=str(data),
                                         out=str(tmp_path / "dpo"), steps=2, batch_size=4, micro_batch=2,
                                         save_every=1, threads=TEST_THREADS))
    assert on_device(model)
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "dpo" / "metrics.jsonl"))
    assert ("fused_logprob" in device.reached) == (kernels_mode == "auto")
