"""LoRA (--lora-rank): the adapted model starts exactly at the base model, only the adapters train, the
checkpoint is a plain merged Hugging Face model, and --resume continues bitwise as an uninterrupted run."""
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import grpo
import model as M
import sft
from conftest import TEST_THREADS


def test_lora_starts_at_the_base_model_and_counts_its_parameters():
    """B = 0: y = base(x) + 0 exactly. Trainable: r (in + out) per linear layer of the decoder: the tiny model's
    4 layers have q (128->128), k, v (128->64), o (128->128), gate, up (128->512), down (512->128)."""
    base, tok = M.load("tiny")
    ids = torch.tensor([tok("12+34").input_ids])
    with torch.no_grad():
        want = base(ids).logits
    n = M.add_lora(base, rank=4, alpha=8.0)
    per_layer = sum(4 * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 512), (128, 512),
                                             (512, 128)])
    assert n == 4 * per_layer
    with torch.no_grad():
        assert torch.equal(base(ids).logits, want)
    assert all(p.requires_grad == (".lora_" in name) for name, p in base.named_parameters())


def test_only_the_adapters_train_and_the_checkpoint_is_merged(tmp_path):
    out = str(tmp_path / "s")
    policy, tok, _ = sft.main(sft.SFTConfig(task="add2", out=out, steps=30, lr=1e-2, lora_rank=4, lora_alpha=8.0,
                                            eval_n=0, save_every=0, threads=TEST_THREADS))
    fresh, _ = M.load("tiny")
    trained = {n.replace(".base.", "."): p for n, p in policy.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(trained[n], p) for n, p in fresh.named_parameters())   # the base never moved
    assert any(float(m.lora_B.detach().abs().max()) > 0 for m in M.lora_layers(policy).values())
    merged = AutoModelForCausalLM.from_pretrained(out)                          # no LoRA code: plain weights
    ids = torch.tensor([tok("12+34").input_ids])
    with torch.no_grad():
        a, b = policy(ids).logits, merged(ids).logits
    # W + s B A in one matmul against W x + s B (A x): fp32 rounding of the order only
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(a, fresh(ids).logits, atol=1e-3)                 # and it did learn something


def test_lora_resume_equals_the_uninterrupted_run(tmp_path):
    """GRPO from scratch with LoRA, 4 steps, against 2 steps then --resume to 4: the same code on the same
    shapes from the same state (frozen base from --init, adapters, AdamW moments, RNG), so bitwise equal."""
    kw = dict(init="scratch", num_prompts=2, num_generations=4, max_new_tokens=8, eval_n=0, sample_every=0,
              threads=TEST_THREADS, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    grpo.main(grpo.GRPOConfig(out=a, steps=4, save_every=0, **kw))
    grpo.main(grpo.GRPOConfig(out=b, steps=2, save_every=0, **kw))
    grpo.main(grpo.GRPOConfig(out=b, steps=4, save_every=0, resume=True, **kw))
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ".lora_A" not in " ".join(wa)                                        # merged: base names only
