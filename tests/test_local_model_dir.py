"""The real-model path (--model PATH) on a tiny model built here: a Llama architecture (not the
built-in Qwen2) with a chat template that starts with its own BOS, saved as a local HF directory.
sft.py and grpo.py must train it from JSONL, and rollout must still match model.generate."""
import json
import os
import random

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


def make_bpe_dir(path, corpus):
    """A model directory written by transformers itself (save_pretrained, no code of this repo): a tiny
    Qwen2 and a byte-level BPE tokenizer trained here on `corpus` (real merges: "reverse" is a few tokens,
    not seven characters), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = TEMPLATE.replace("{{ bos_token }}", "")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_a_new_jsonl_task_on_a_transformers_dir_reports_what_it_learned(tmp_path):
    """A task the built-in code has never seen (reverse a word), TRL-format JSONL (SFT traces, GRPO prompts
    with `answer`, DPO pairs, a held-out file), a transformers-saved model with a byte-level BPE tokenizer:
    sft.py, grpo.py and dpo.py each report held-out accuracy before and after (result files, history) and
    pass@k with --eval-samples; SFT learns the task; a checkpoint scores the same inside training (GRPO's
    "before" is SFT's "after": same weights, rows, criterion and decoding) and in evaluate.py."""
    import dpo
    import evaluate as E
    # 200 spelled-out three-letter words; the 20 held out use only letters (tokens) seen in training
    words = [f"{a} {b} {c}" for a in "abcdefgh" for b in "aeiou" for c in "mnrst"]
    random.Random(0).shuffle(words)
    train, held_words = words[:180], words[180:]
    prompt = lambda w: [{"role": "user", "content": f"reverse {w}"}]
    answer = lambda w: f"<answer>{w[::-1]}</answer>"
    d = str(tmp_path / "bpe")
    tok = make_bpe_dir(d, [f"reverse {w} {answer(w)}" for w in words])
    assert len(tok("reverse").input_ids) < len("reverse")                        # merges, not characters
    files = {"sft": [{"prompt": prompt(w), "completion": [{"role": "assistant", "content": answer(w)}]} for w in train],
             "grpo": [{"prompt": prompt(w), "answer": w[::-1]} for w in train],
             "dpo": [{"prompt": prompt(w), "chosen": [{"role": "assistant", "content": answer(w)}],
                      "rejected": [{"role": "assistant", "content": answer(w[::-1])}]} for w in train],
             "held": [{"prompt": prompt(w), "answer": w[::-1]} for w in held_words]}
    for name, rows in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = lambda name: str(tmp_path / f"{name}.jsonl")
    common = dict(eval_data=path("held"), eval_samples=2, threads=TEST_THREADS, save_every=0, max_new_tokens=16)
    s_out, g_out, d_out = (str(tmp_path / n) for n in ("s", "g", "d"))
    sft.main(sft.SFTConfig(model=d, data=path("sft"), out=s_out, steps=400, batch_size=16, lr=3e-3, warmup=5,
                           **common))
    g_res = grpo.main(grpo.GRPOConfig(model=d, init=s_out, data=path("grpo"), out=g_out, steps=2, num_prompts=4,
                                      num_generations=4, reward_funcs="accuracy,format", **common))[2]
    d_res = dpo.main(dpo.DPOConfig(model=d, init=s_out, data=path("dpo"), out=d_out, steps=2, batch_size=8,
                                   **common))[2]
    s_res = json.load(open(os.path.join(s_out, "sft_result.json")))
    for res in (s_res, g_res, d_res):
        assert res["n"] == 20 and {"held_out_accuracy_before", "held_out_accuracy_after"} <= set(res)
        assert all({"held_out/pass@1", "held_out/pass@2", "held_out/mean@2"} <= set(h) for h in res["history"])
    assert s_res["held_out_accuracy_before"] == 0.0 and s_res["held_out_accuracy_after"] >= 0.3, s_res
    assert g_res["held_out_accuracy_before"] == s_res["held_out_accuracy_after"]
    assert d_res["held_out_accuracy_before"] == s_res["held_out_accuracy_after"]
    alone = E.main(E.EvalConfig(model=g_out, data=path("held"), max_new_tokens=16, threads=TEST_THREADS))
    assert alone["accuracy"] == g_res["held_out_accuracy_after"]
