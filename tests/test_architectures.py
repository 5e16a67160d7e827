"""Every common causal-LM family through the --model PATH path: a tiny random model of each, saved with
save_pretrained beside the built-in character tokenizer, loaded by model.load (attention fallback, the
lm_head check), then (1) our log-probs, PyTorch and kernel, equal the model's own: the log-probs that
rollout.py samples with, from log_softmax(model(...).logits / T); (2) one SFT step and one GRPO step
train it. The heads differ: Phi has an lm_head bias, Cohere multiplies the logits by logit_scale, Granite
divides them by logits_scaling, Gemma 2 and 3 soft-cap them (and Gemma 2 and Bloom have no sdpa
attention); the MoE, sliding-window and ALiBi families run too."""
import json
import os
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

if not torch.cuda.is_available():   # as in tests/test_kernels.py: set before kernels.logprob is imported
    os.environ["TRITON_INTERPRET"] = "1"

import grpo  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import data as D  # noqa: E402
import checkpoint as CK  # noqa: E402
import rollout  # noqa: E402
import sft  # noqa: E402
from conftest import TEST_THREADS, model_logprob_tol  # noqa: E402

if "kernels.logprob" in sys.modules and not sys.modules["kernels.logprob"].INTERPRET and not torch.cuda.is_available():
    pytest.skip("kernels.logprob was imported before TRITON_INTERPRET was set", allow_module_level=True)

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, initializer_range=0.2)   # logits of a few units: the heads' terms matter
GEMMA = dict(head_dim=8)
FAMILIES = {   # config class, what differs from SIZE
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {}),
    "llama": (T.LlamaConfig, {}),
    "mistral": (T.MistralConfig, {}),
    "gemma": (T.GemmaConfig, GEMMA),
    "gemma2": (T.Gemma2Config, {**GEMMA, "final_logit_softcapping": 3.0}),   # eager attention: no sdpa
    "gemma3": (T.Gemma3TextConfig, {**GEMMA, "final_logit_softcapping": 3.0, "sliding_window": 4}),
    "phi": (T.PhiConfig, {}),                                                   # lm_head bias (randomised below)
    "phi3": (T.Phi3Config, {}),
    "cohere": (T.CohereConfig, {"logit_scale": 0.5}),
    "gpt2": (T.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "olmo": (T.OlmoConfig, {}),
    "olmo2": (T.Olmo2Config, {}),
    "granite": (T.GraniteConfig, {"logits_scaling": 4.0}),
    "granitemoe": (T.GraniteMoeConfig, {"logits_scaling": 4.0, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "cohere2": (T.Cohere2Config, {"logit_scale": 0.5, "sliding_window": 4}),
    "qwen2_moe": (T.Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32}),
    "gpt_neox": (T.GPTNeoXConfig, {}),
    "stablelm": (T.StableLmConfig, {}),
    "falcon": (T.FalconConfig, {}),
    "bloom": (T.BloomConfig, {"n_layer": 2, "n_head": 4}),                      # ALiBi; eager attention
}
EAGER = {"gemma2", "bloom"}   # no sdpa in transformers: load falls back to eager


def make_dir(path, family):
    tok = M.build_char_tokenizer()
    cls, extra = FAMILIES[family]
    cfg = cls(**{**SIZE, **extra}, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              bos_token_id=None)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    if head.bias is not None:            # transformers initialises it to 0, which would hide a missing bias
        with torch.no_grad():
            head.bias.normal_(0, 1.0)
    CK.save(model, tok, path)
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: (str(root / f), make_dir(str(root / f), f)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_the_models_own(dirs, family, monkeypatch):
    """The log-probs rollout.py samples with (model(...).logits, KV cache, left padding, T = 0.7) equal
    token_logprobs', PyTorch and kernel (interpreter on CPU), to the rounding of two fp32 evaluations of
    the same logits (tests/conftest.py); the tokenizer comes back as it was saved."""
    path, saved_tok = dirs[family]
    m, tok = M.load(path)
    assert type(m).__name__.lower().startswith(family.replace("_", ""))   # Gemma3ForCausalLM, GPT2LMHeadModel, ...
    assert m.config._attn_implementation == ("eager" if family in EAGER else "sdpa")
    text = "<think>12+34</think> ok"
    assert tok(text).input_ids == saved_tok(text).input_ids
    torch.manual_seed(0)
    prompts = [D.encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("12+34", "1+2", "345+678")]
    r = rollout.generate(m, tok, prompts, max_new_tokens=8, temperature=0.7)
    C = r.completion_ids.shape[1]
    tol, _ = model_logprob_tol(m, r.input_ids, r.attention_mask, 0.7)
    for on in (False, True):
        monkeypatch.setattr(kernels, "active", lambda t: on)
        with torch.no_grad():
            lp = M.token_logprobs(m, r.input_ids, r.attention_mask, C, temperature=0.7) * r.completion_mask
        err = float((lp - r.logprobs).abs().max())
        assert err <= tol, (family, "kernel" if on else "pytorch", err, tol)


def test_load_refuses_a_head_it_does_not_know(tmp_path):
    """A forward that transforms its logits in a way output_head does not read is refused at load, with
    an error naming the model and the difference: HyperCLOVAX multiplies by its logits_scaling where
    Granite divides (output_head reads Granite's rule)."""
    FAMILIES["hyperclovax"] = (T.HyperCLOVAXConfig, {"logits_scaling": 4.0})
    try:
        make_dir(str(tmp_path / "m"), "hyperclovax")
    finally:
        del FAMILIES["hyperclovax"]
    with pytest.raises(ValueError, match="HyperCLOVAXForCausalLM's forward computes other logits than x @ W.T, "
                                         "scale 0.25"):
        M.load(str(tmp_path / "m"))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_sft_and_one_grpo_step(dirs, family, tmp_path):
    """python sft.py --model PATH --data ... then python grpo.py --model PATH --init SFT --data ...: one step
    each changes the weights, logs finite numbers, and writes a checkpoint that loads (and passes the
    head check) again."""
    path, _ = dirs[family]
    sft_data, rl_data = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{a}"}],
                                            "completion": [{"role": "assistant", "content": str(2 * a)}]}) + "\n"
                                for a in range(4)))
    rl_data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{a}"}], "answer": str(2 * a)})
                               + "\n" for a in range(4)))
    s_out, g_out = str(tmp_path / "sft"), str(tmp_path / "grpo")
    sft.main(sft.SFTConfig(model=path, data=str(sft_data), out=s_out, steps=1, batch_size=4, lr=1e-3, warmup=1,
                           eval_n=0, save_every=0, threads=TEST_THREADS))
    grpo.main(grpo.GRPOConfig(model=path, init=s_out, data=str(rl_data), out=g_out, steps=1, num_prompts=2,
                              num_generations=4, max_new_tokens=4, eval_n=0, sample_every=0, save_every=0,
                              threads=TEST_THREADS, reward_funcs="toy_rewards:first_char", reward_weights="1"))
    # (4 samples per prompt: the weights-moved check below needs one group whose first characters are not all
    # the same, i.e. a non-zero advantage, whatever the samples this processor draws)
    with open(os.path.join(s_out, "sft_metrics.jsonl")) as f:
        assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in f)
    with open(os.path.join(g_out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    w0, w1, w2 = (load_file(os.path.join(d, "model.safetensors")) for d in (path, s_out, g_out))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    M.load(g_out)
