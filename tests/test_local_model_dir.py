"""The real-model path (--model PATH) on a tiny model built here: a Llama architecture (not the
built-in Qwen2) with a chat template that starts with its own BOS, saved as a local HF directory.
sft.py and grpo.py must train it from JSONL, and rollout must still match model.generate."""
import json
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import grpo
import model as M
import data as D
import checkpoint as CK
import sft
from conftest import TEST_THREADS, greedy_agreement
from rollout import generate, left_pad

TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_llama_dir(path):
    tok = M.build_char_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.chat_template = TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    CK.save(LlamaForCausalLM(cfg), tok, path)
    return tok


def test_llama_dir_loads_and_chat_template_has_one_bos(tmp_path):
    """load(PATH) gives a Llama model; a template that writes its own BOS gets exactly one BOS
    (encode_prompt / encode_example never add a second), and the completion ends with one EOS."""
    d = str(tmp_path / "llama")
    make_llama_dir(d)
    m, tok = M.load(d)
    assert type(m).__name__ == "LlamaForCausalLM"
    p, c = D.encode_example(tok, [{"role": "user", "content": "1+2"}], [{"role": "assistant", "content": "3"}])
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    assert p == [tok.bos_token_id] + tok.convert_tokens_to_ids(["<|user|>", "1", "+", "2", "<|assistant|>"])
    assert c == tok.convert_tokens_to_ids(["3", "<eos>"])


def test_llama_greedy_rollout_equals_generate(tmp_path):
    """Token-for-token equality with model.generate holds for the Llama family too (mixed prompt lengths)."""
    d = str(tmp_path / "llama")
    make_llama_dir(d)
    m, tok = M.load(d)
    prompts = [D.encode_prompt(tok, [{"role": "user", "content": s}]) for s in ("1+2", "345+678", "9")]
    r = generate(m, tok, prompts, 10, greedy=True)
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    # two implementations of the same logits: token for token, but at a near-tie (tests/conftest.py)
    greedy_agreement(m, ids, mask, r.completion_ids, ref[:, ids.shape[1]:], tok.pad_token_id)


def test_sft_then_grpo_on_a_local_llama_dir_with_jsonl(tmp_path):
    """python sft.py --model PATH --data sft.jsonl, then python grpo.py --model PATH --init SFT_OUT
    --data prompts.jsonl: both run, SFT lowers its loss, GRPO logs the rewards, and both outputs
    load with from_pretrained as Llama models."""
    d = str(tmp_path / "llama")
    make_llama_dir(d)
    sft_data, rl_data = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}"}, {"role": "assistant", "content": str(2 * a)}]}
            for a in range(20)]
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rl_data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{a}"}], "answer": str(2 * a)})
                               + "\n" for a in range(20)))
    s_out, g_out = str(tmp_path / "sft"), str(tmp_path / "grpo")
    sft.main(sft.SFTConfig(model=d, data=str(sft_data), out=s_out, steps=80, batch_size=8, lr=3e-3, warmup=2,
                           eval_n=0, threads=TEST_THREADS, save_every=0))
    losses = [json.loads(line)["loss"] for line in open(os.path.join(s_out, "sft_metrics.jsonl"))]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    grpo.main(grpo.GRPOConfig(model=d, init=s_out, data=str(rl_data), out=g_out, steps=2, num_prompts=2,
                              num_generations=4, max_new_tokens=8, eval_n=0, sample_every=0, save_every=0,
                              threads=TEST_THREADS, reward_funcs="accuracy", reward_weights="1"))
    ms = [json.loads(line) for line in open(os.path.join(g_out, "metrics.jsonl"))]
    assert [m["step"] for m in ms] == [1, 2] and "rewards/accuracy/mean" in ms[0]
    for out in (s_out, g_out):
        assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
