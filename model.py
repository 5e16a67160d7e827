"""The model side of every script: build or load a causal LM + tokenizer, and compute the per-token
log-probs (+ entropy) that every loss in this repo is made of.

    model, tok = load("tiny")             # the built-in ~0.8M-parameter Qwen2 + character tokenizer
    model, tok = load("path/to/Qwen2.5-0.5B-Instruct", device="cuda")   # any local HF directory
    model, tok = load("runs/grpo")        # a checkpoint this repo saved (checkpoint.save), checksums checked

Nothing is ever downloaded: "tiny" is built here from a transformers config, and a path must be a local
directory in the Hugging Face layout.

`token_logprobs` is the one place where logits become log-probs. It runs the decoder once, then pushes
the hidden states of the completion positions through the lm_head in row chunks, so the fp32 logits of
the whole batch (B*T*V floats: 64*512*151936*4 bytes = 20 GB for Qwen2.5-0.5B) never exist at once.
`logprobs_from_hidden` is the function a fused GPU kernel replaces. The lm_head is applied as the model's
own forward applies it (`output_head`: a bias, a logit scale, Gemma's soft cap), and `load` checks that
on every model, so the log-probs trained on are those the model samples from.
"""
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import kernels
from checkpoint import recover, verify_checksums

# -----------------------------------------------------------------------------
# The built-in tokenizer: one token per printable ASCII character, plus the chat/role tokens and the
# R1 reasoning tags as single tokens (they are structure, not text, and single tokens keep the tiny
# model's completions short). pad != eos on purpose: if they were equal, masking pads would also mask
# the EOS and the model would never learn to stop.

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Renders [{"role", "content"}, ...]; the generation prompt is the assistant role token. Each assistant
# turn ends with <eos>, so a completion rendered by this template already carries its EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    # A Qwen2Tokenizer (byte-level BPE) with no merges is a character tokenizer. Using Qwen's own class,
    # rather than a generic one, matters on reload: AutoTokenizer.from_pretrained picks the tokenizer
    # class from config.json's model_type (qwen2) and rebuilds it from vocab + merges, so any other
    # class would come back as a byte-level Qwen2Tokenizer with a different vocabulary. Byte-level BPE
    # spells bytes as printable characters (space is "\u0120"), hence the mapping of the vocabulary.
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    byte_char = bytes_to_unicode()
    chars = [byte_char[i] for i in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS + chars)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                         padding_side="left")  # generation pads on the left; training builds its own layout
    tok.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS[3:]] +
                   [AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


# The default model: a standard Qwen2 (so the exact same code path serves real Qwen checkpoints), sized
# so that SFT + GRPO run in minutes on two CPU cores. 4 layers x 128 wide = 0.8M parameters.
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def build_tiny_model(tok, seed=0, **overrides):
    cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, rope_theta=10000.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=None, do_sample=False)
    return model


def load(path="tiny", device="cpu", dtype=None, seed=0):
    """(model, tokenizer) from "tiny" (built fresh, random weights) or a local HF directory.
    dtype defaults to bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if path == "tiny":
        tok = build_char_tokenizer()
        model = build_tiny_model(tok, seed=seed).to(device=device, dtype=dtype)
        check_output_head(model, path)
        return model, tok
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a local directory (nothing is downloaded; "
                                f"use 'tiny' for the built-in model)")
    recover(path)  # a checkpoint swap cut short by a crash is completed first (see save)
    verify_checksums(path, state=False)
    tok = AutoTokenizer.from_pretrained(path)
    check_tokenizer(tok, path)
    attention = attention_implementation(AutoConfig.from_pretrained(path), path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device)
    check_output_head(model, path)
    return model, tok


def attention_implementation(config, where):
    """sdpa where the architecture has it, else eager (Gemma 2: sdpa has no attention soft-capping). Never
    what config.json may ask for (flash / flex attention): rollout.py's static engine builds the 4-D
    attention masks that only these two take, and both run on any device."""
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ValueError(f"{where}: {type(config).__name__} ({config.model_type}) has no causal-LM class in "
                         f"transformers (AutoModelForCausalLM cannot load it)")
    return "sdpa" if cls._supports_sdpa else "eager"


def check_tokenizer(tok, where):
    # A pad token equal to EOS silently breaks the completion mask (the model never learns to stop).
    if tok.pad_token_id is None:
        raise ValueError(f"{where}: tokenizer has no pad token; set one that differs from EOS")
    if tok.eos_token_id is None:
        raise ValueError(f"{where}: tokenizer has no EOS token")
    if tok.pad_token_id == tok.eos_token_id:
        raise ValueError(f"{where}: pad token == EOS token ({tok.pad_token!r}); the completion mask would drop "
                         f"the EOS and the model would never learn to stop. Set a distinct pad token.")


# -----------------------------------------------------------------------------
# Token log-probs. Layout shared by sft.py, grpo.py and rollout.py: each row is
# [left-padded prompt | right-padded completion], input_ids (B, T), attention_mask (B, T), and the
# last C columns are the completion. The logit that predicts column t sits at position t-1.

def position_ids(attention_mask):
    # Left padding shifts where each sequence starts; positions count real tokens only. (B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# The lm_head. Every causal LM in transformers computes its logits from the decoder's last hidden states
# as x @ W.T (+ a bias: Phi, GPT-J, CodeGen), and a few families then transform them in forward() with
# a number from their config. One rule reads those numbers; the attribute and what each forward does
# with it (transformers 5.24):
LOGIT_SCALES = {"logit_scale": 1,          # Cohere, Cohere2, Cohere2Moe: logits * logit_scale
                "logits_scaling": -1,      # Granite, GraniteMoe (Shared, Hybrid, SWA): logits / logits_scaling;
                                           # MiniCPM3 divides the hidden states by it (the same, without a bias)
                "lm_head_multiplier": 1}   # FalconH1: logits * lm_head_multiplier
SOFTCAPS = ("final_logit_softcapping",     # Gemma2, Gemma3, Gemma3n, Gemma4, VaultGemma: cap * tanh(logits / cap)
            "logits_soft_cap")             # RecurrentGemma
# Whatever else a forward does (HyperCLOVAX multiplies by its logits_scaling where Granite divides; BERT-
# style prediction heads; a vocabulary cut) is caught by check_output_head when the model is loaded.


@dataclass
class Head:
    """The model's logits from hidden states x (n, H): kernels.head_logits(x, weight, bias, scale, softcap),
    i.e. (x @ weight.T + bias) * scale, then softcap * tanh(. / softcap) when softcap > 0."""
    weight: torch.Tensor                  # (V, H)
    bias: torch.Tensor | None = None      # (V,)
    scale: float = 1.0
    softcap: float = 0.0

    def logits(self, x):                  # (n, H) -> (n, V), fp32 (at least)
        return kernels.head_logits(x, self.weight, self.bias, self.scale, self.softcap)


def output_head(model):
    """The model's lm_head as a Head: its output embedding (weight, bias) and the scale and soft cap that
    its config names (LOGIT_SCALES, SOFTCAPS)."""
    m = getattr(model, "module", model)   # DDP wraps the model
    cfg = m.config.get_text_config()      # (a multimodal config keeps the language model's in a sub-config)
    lm = m.get_output_embeddings()
    scale = 1.0
    for name, power in LOGIT_SCALES.items():
        if getattr(cfg, name, None) is not None:
            scale *= float(getattr(cfg, name)) ** power
    softcap = next((float(getattr(cfg, n)) for n in SOFTCAPS if getattr(cfg, n, None)), 0.0)
    return Head(lm.weight, getattr(lm, "bias", None), scale, softcap)


def check_output_head(model, where):
    """Refuse a model whose own forward computes other logits than completion_hidden + output_head, with
    an error that says what differs. One forward of 8 tokens, compared with ours. The decoder runs the
    same code on the same input both times, so the two differ only in the head: its matmul may add the
    H products in another order (each within gamma_H = H 2^-24 of sum_h |x_h W_vh|: fp32 accumulation,
    Higham eq. 3.5, so 2 gamma_H apart) and the model rounds its logits in its own dtype after each of
    matmul, bias, scale, tanh, cap where we keep fp32 (<= 8 ulps of the largest logit allowed). A missing
    scale (Cohere's 0.0625, Granite's 1/8 ... 1/16), cap, bias or prediction head moves logits by far more,
    except in bf16 where a change below ~6% of the largest logit goes unseen (the tests check in fp32)."""
    m = getattr(model, "module", model)
    name = type(m).__name__
    if m.get_output_embeddings() is None:
        raise ValueError(f"{where}: {name} has no output embedding (lm_head) to compute log-probs with")
    ids = torch.arange(1, 9, device=next(m.parameters()).device)[None] % m.config.get_text_config().vocab_size
    attn = torch.ones_like(ids)                                              # (1, 8): any 8 tokens
    training = m.training
    m.eval()                                                                 # no dropout: the same forward twice
    try:
        with torch.no_grad():
            want = m(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                     use_cache=False).logits[0, :-1].float()                 # (7, V)
            hidden, head, _ = completion_hidden(m, ids, attn, 7)            # (1, 7, H): what training computes
            got = head.logits(hidden[0])                                     # (7, V)
            bias = None if head.bias is None else head.bias.abs()
            abs_sum = Head(head.weight.abs(), bias).logits(hidden[0].abs())  # (7, V): sum_h |x_h W_vh| (+ |b_v|)
    except TypeError as e:   # a decoder that takes no attention mask or position ids (Mamba-style models)
        raise ValueError(f"{where}: {name}'s decoder cannot run as training runs it "
                         f"(input_ids, attention_mask, position_ids): {e}") from None
    finally:
        m.train(training)
    ours = (f"x @ W.T{' + bias' if head.bias is not None else ''}, scale {head.scale:g}, softcap {head.softcap:g} "
            f"(model.output_head reads the lm_head's bias, {', '.join(LOGIT_SCALES)}, {', '.join(SOFTCAPS)})")
    if got.shape != want.shape:
        raise ValueError(f"{where}: {name} gives logits of shape {tuple(want.shape)}, {ours} gives "
                         f"{tuple(got.shape)}: unsupported architecture")
    tol = 2 * hidden.shape[-1] * 2 ** -24 * abs(head.scale) * abs_sum + 8 * torch.finfo(m.dtype).eps * want.abs().max()
    bad = ~((got - want).abs() <= tol)                                       # (7, V); NaN is bad too
    if bad.any():
        t, v = bad.nonzero()[0].tolist()
        raise ValueError(f"{where}: {name}'s forward computes other logits than {ours}: at probe position {t}, "
                         f"token {v}, {float(want[t, v]):.6g} vs {float(got[t, v]):.6g} (allowed difference "
                         f"{float(tol[t, v]):.2g}). Training would use log-probs the model does not sample from; "
                         f"add its rule to model.output_head.")


def logprobs_from_hidden(hidden, head, targets, temperature=1.0, entropy=False, chunk_rows=4096):
    """log softmax(head.logits(hidden) / T)[target] for each row, and optionally the entropy of that
    distribution. hidden (N, H), head: a Head with weight (V, H), targets (N,) -> (N,) fp32 [, (N,) fp32].

    Plain PyTorch, chunked over rows: only a (chunk_rows, V) fp32 block of logits is alive at a time.
    On CUDA (with --kernels auto) the fused Triton kernel runs instead: no logits in memory at all."""
    if kernels.active(hidden):
        from kernels.logprob import fused_logprob  # imports triton: only when a CUDA tensor asks
        return fused_logprob(hidden, head.weight, targets, temperature, entropy, bias=head.bias, scale=head.scale,
                             softcap=head.softcap)
    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = head.logits(hidden[i:i + chunk_rows]) / temperature            # (n, V) fp32
        logz = torch.logsumexp(logits, dim=-1)                                  # (n,)
        logps.append(logits.gather(-1, targets[i:i + chunk_rows, None]).squeeze(-1) - logz)
        if entropy:
            p = torch.softmax(logits, dim=-1)
            ents.append(logz - (p * logits).sum(-1))                           # H = logZ - E_p[z]
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    if not entropy:
        return logp
    return logp, (torch.cat(ents) if ents else torch.zeros_like(logp))


def completion_hidden(model, input_ids, attention_mask, num_completion):
    """Run the decoder once: hidden states of the positions that predict the last num_completion tokens
    (B, C, H), the model's Head (output_head), and those tokens (B, C). What every loss head starts from."""
    B, T = input_ids.shape
    C = num_completion
    base = getattr(model, "module", model).base_model  # the decoder without its lm_head
    hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # (B, T, H)
    hidden = hidden[:, T - C - 1:T - 1]                  # (B, C, H): positions predicting the completion
    return hidden, output_head(model), input_ids[:, T - C:]


def token_logprobs(model, input_ids, attention_mask, num_completion, temperature=1.0, entropy=False):
    """Log-probs of the last `num_completion` tokens of each row under the model.
    input_ids, attention_mask (B, T) -> logp (B, C) fp32 [, entropy (B, C)]. Gradients flow when
    called with grad enabled; the no-grad call and the grad call compute exactly the same numbers."""
    B, C = input_ids.shape[0], num_completion
    hidden, head, targets = completion_hidden(model, input_ids, attention_mask, C)
    out = logprobs_from_hidden(hidden.reshape(B * C, -1), head, targets.reshape(-1), temperature, entropy)
    if entropy:
        return out[0].view(B, C), out[1].view(B, C)
    return out.view(B, C)



def context_length(model):
    """The most positions the model was built for (max_position_embeddings), or None if it does not say."""
    m = getattr(model, "module", model)
    return getattr(m.config.get_text_config(), "max_position_embeddings", None)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): train a low-rank update of every linear layer of the decoder, the base frozen.
# Most single-GPU runs of a 7B policy fit only this way: the trainable parameters and their AdamW state
# shrink from 7B to tens of millions.

class LoRALinear(torch.nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)), with base frozen, A (r, in) random and B (out, r) zero, so
    training starts exactly at the base model. merged() is the plain weight W + (alpha / r) B A."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                                     dtype=base.weight.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                                     dtype=base.weight.dtype))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)   # as nn.Linear (and PEFT) initialise A

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self):
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)


def add_lora(model, rank, alpha):
    """Wrap every nn.Linear inside the decoder (attention and MLP projections; not the lm_head, not the
    embeddings) in a LoRALinear and freeze everything else. Returns the number of trainable parameters.
    Draws A from torch's global generator (seeded by the caller)."""
    model.requires_grad_(False)
    decoder = getattr(model, "module", model).base_model
    targets = [(parent, name, child) for parent in decoder.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(model):
    return {n: m for n, m in getattr(model, "module", model).named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model):
    """The model's state dict as the base architecture names it, each LoRA layer merged into its weight:
    what a Hugging Face checkpoint of the trained model holds (from_pretrained loads it, no LoRA code)."""
    sd = {}
    layers = lora_layers(model)
    for k, v in getattr(model, "module", model).state_dict().items():
        owner = next((n for n in layers if k.startswith(n + ".")), None)
        if owner is None:
            sd[k] = v
        elif k == owner + ".base.weight":
            sd[owner + ".weight"] = layers[owner].merged().detach()
        elif k == owner + ".base.bias":
            sd[owner + ".bias"] = v
    return sd


def lora_state(model):
    """The adapters alone (lora_A, lora_B of every layer): what --resume needs beside the frozen base."""
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()
            if ".lora_A" in k or ".lora_B" in k}

