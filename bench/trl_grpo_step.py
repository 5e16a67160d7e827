"""TRL's GRPOTrainer on the same shape as our default: run with a Python that has `trl` installed
(pip install torch==2.13.0 trl), e.g. from bench/cpu_step_vs_trl.py. Prints one JSON line with the
seconds per step. The model is a Qwen2 with the tiny model's dimensions and random weights (most
completions run to the 32-token limit), a character tokenizer, 16 prompts x 8 generations, beta = 0.
Usage: python bench/trl_grpo_step.py STEPS"""
import json
import random
import sys
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, GRPOTrainer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
torch.manual_seed(0)
torch.set_num_threads(2)
# the same vocabulary size as the built-in tokenizer (10 special tokens + printable ASCII), so that a
# random model emits EOS as often as ours and the completions have the same lengths
specials = ["<pad>", "<eos>"] + [f"<s{i}>" for i in range(8)]
vocab = {t: i for i, t in enumerate(specials + [chr(i) for i in range(32, 127)])}
tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
tk.decoder = decoders.Fuse()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, tie_word_embeddings=True,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=None))
rng = random.Random(0)
rows = []
for _ in range(2000):
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})


def accuracy(completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=128, num_generations=8,
                  max_completion_length=32, max_steps=steps, learning_rate=1e-4, logging_steps=1,
                  report_to="none", use_cpu=True, bf16=False, beta=0.0, save_strategy="no",
                  temperature=1.0, top_p=1.0, seed=0, dataloader_num_workers=0)
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[accuracy], args=args,
                      train_dataset=Dataset.from_list(rows))
t = time.time()
trainer.train()
dt = time.time() - t
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
print(json.dumps({"trl_step_s": dt / steps, "steps": steps, "mean_length": sum(lengths) / max(len(lengths), 1)}))
