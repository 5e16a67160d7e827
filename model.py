"""The model side of every script: build or load a causal LM + tokenizer, save it, and compute the
per-token log-probs (+ entropy) that every loss in this repo is made of.

    model, tok = load("tiny")             # the built-in ~0.8M-parameter Qwen2 + character tokenizer
    model, tok = load("path/to/Qwen2.5-0.5B-Instruct", device="cuda")   # any local HF directory
    save(model, tok, "runs/x")            # loads again with AutoModelForCausalLM.from_pretrained

Nothing is ever downloaded: "tiny" is built here from a transformers config, and a path must be a local
directory in the Hugging Face layout.

`token_logprobs` is the one place where logits become log-probs. It runs the decoder once, then pushes
the hidden states of the completion positions through the lm_head in row chunks, so the fp32 logits of
the whole batch (B*T*V floats: 64*512*151936*4 bytes = 20 GB for Qwen2.5-0.5B) never exist at once.
`logprobs_from_hidden` is the function a fused GPU kernel replaces. The lm_head is applied as the model's
own forward applies it (`output_head`: a bias, a logit scale, Gemma's soft cap), and `load` checks that
on every model, so the log-probs trained on are those the model samples from.
"""
import errno
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import kernels

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
# Saving. The output directory is a plain HF checkpoint (model.safetensors, config.json,
# generation_config.json, tokenizer files, chat template); the training state (optimizer, step, RNG,
# data position) lives in trainer_state/ beside it so from_pretrained never sees it. Logs
# (metrics.jsonl, ...) share the directory, so the checkpoint cannot be swapped in by renaming the
# directory itself; instead a small journal makes the swap all-or-nothing:
#   1. write the whole new checkpoint to OUT/.ckpt-tmp and fsync every file (the old one is untouched);
#   2. rename .ckpt-tmp -> .ckpt-ready: ONE atomic rename is the commit point;
#   3. move the files of .ckpt-ready into OUT one by one, then remove .ckpt-ready.
# A crash before 2 leaves the old checkpoint intact (the partial .ckpt-tmp is ignored and deleted);
# a crash during 3 leaves a mix in OUT that recover() completes (roll forward) before anything loads
# it: load(), load_state() and save() all call it. So whatever loads is one whole checkpoint.

TMP, READY = ".ckpt-tmp", ".ckpt-ready"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(out_dir):
    """Finish a checkpoint swap that a crash interrupted (step 3 above), and drop an incomplete one."""
    shutil.rmtree(os.path.join(out_dir, TMP), ignore_errors=True)
    ready = os.path.join(out_dir, READY)
    if not os.path.isdir(ready):
        return
    # trainer_state last: until it moves, the old state never claims weights newer than itself
    for name in sorted(os.listdir(ready), key=lambda n: n == "trainer_state"):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)   # the old copy; the new one is still in .ckpt-ready if we crash here
        os.replace(os.path.join(ready, name), dst)
    _fsync(out_dir)
    os.rmdir(ready)


def save(model, tok, out_dir, state=None, weights=None):
    """Write a checkpoint to out_dir atomically (see above). Logs and other files in out_dir are kept.
    weights: the full state dict when the model itself holds only shards (--fsdp, dist.model_state)."""
    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    tmp = os.path.join(out_dir, TMP)
    try:
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tok.save_pretrained(tmp)
        if state is not None:
            os.makedirs(os.path.join(tmp, "trainer_state"))
            torch.save(state, os.path.join(tmp, "trainer_state", "state.pt"))
        write_checksums(tmp)
        for root, _, files in os.walk(tmp):   # on disk before the commit, not just in the page cache
            for f in files:
                _fsync(os.path.join(root, f))
            _fsync(root)
    except (OSError, RuntimeError) as e:      # torch.save reports a full disk as "unexpected pos ..."
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(out_dir).free < 64 << 20
        shutil.rmtree(tmp, ignore_errors=True)   # frees what it took; the last checkpoint was never touched
        raise OSError(f"{out_dir}: could not write the checkpoint" + (": the disk is full" if full else "") +
                      f" ({type(e).__name__}: {e}). The previous checkpoint there is intact.") from e
    os.replace(tmp, os.path.join(out_dir, READY))   # the commit point
    _fsync(out_dir)
    recover(out_dir)


# Each checkpoint lists the sha256 of its files in checksums.json, so that bit damage on disk (a bad
# sector, a partial copy) is refused at load instead of training on quietly. load() checks the model
# files, load_state() the training state. A directory without the list (any HF model) is not checked.
CHECKSUMS = "checksums.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(ckpt_dir):
    sums = {os.path.relpath(os.path.join(root, f), ckpt_dir): _sha256(os.path.join(root, f))
            for root, _, files in os.walk(ckpt_dir) for f in files}
    with open(os.path.join(ckpt_dir, CHECKSUMS), "w") as f:
        json.dump(sums, f, indent=1, sort_keys=True)


def verify_checksums(ckpt_dir, state):
    """Check the files of the checkpoint in ckpt_dir against its checksums.json: those under
    trainer_state/ (state=True) or the others (the model and tokenizer files)."""
    path = os.path.join(ckpt_dir, CHECKSUMS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        sums = json.load(f)
    for name, want in sums.items():
        if name.startswith("trainer_state" + os.sep) != state:
            continue
        file = os.path.join(ckpt_dir, name)
        if not os.path.isfile(file):
            raise OSError(f"{file}: missing from the checkpoint (listed in {path})")
        if _sha256(file) != want:
            raise OSError(f"{file}: damaged (its sha256 differs from the one saved with it in {path}); "
                          f"refusing to load it")


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(out_dir):
    recover(out_dir)
    path = os.path.join(out_dir, "trainer_state", "state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {out_dir} has no checkpoint yet (no {path}); run without --resume "
                                f"to start a run there")
    verify_checksums(out_dir, state=True)
    return torch.load(path, weights_only=False)


def check_resume(cfg, saved, fixed):
    """--resume: this run's flags against those the checkpoint was saved with (its trainer state). A flag
    in `fixed` (what the weights, the data position or the random streams were made with) must not
    change: ConfigError, before anything is written. Any other change is applied from the saved step on,
    and printed; run_config.json then records it, and it is true (the scripts keep the flags' optimizer
    hyperparameters over the saved ones: dist.resume_optimizer)."""
    if saved is None:
        return
    flag = lambda k: "--" + k.replace("_", "-")
    # (a flag the saved run did not have yet, from an older version of the script, is not a change)
    changed = {k: (saved[k], v) for k, v in vars(cfg).items() if k != "resume" and k in saved and saved[k] != v}
    refused = [f"{flag(k)} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in fixed]
    if refused:
        raise ConfigError(f"--resume cannot change {', '.join(refused)}: the checkpoint in {cfg.out} was made with "
                          f"the saved value (trainer_state); resume with it, or start a new --out")
    if changed:
        print("--resume with changed flags, applied from the saved step on: " +
              ", ".join(f"{flag(k)} {a!r} -> {b!r}" for k, (a, b) in changed.items()))


_locks = {}


def lock_out(out_dir):
    """Hold an exclusive lock on out_dir for the life of this process: a second run into the same
    directory (which would interleave its logs and checkpoints with this one's) fails at once. flock is
    released by the kernel when the process ends, however it ends; a later run in this same process
    (tests, grpo.py's cold start) reuses the lock it holds."""
    import fcntl
    key = os.path.realpath(out_dir)
    if key in _locks:
        return
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"{out_dir} is in use by another run (it holds {out_dir}/.lock); wait for it to end, "
                           f"or use another --out") from None
    _locks[key] = f


def trim_log(path, step):
    """On --resume: drop the lines a killed run logged for steps after its last checkpoint. Those steps
    run again, so the log then reads as if the run had never stopped. Rewritten atomically.
    A last line that is not whole JSON is a write cut short (a kill or a full disk mid-line): it is
    dropped. Any other line that does not parse is damage this function cannot explain: an error."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = [ln for ln in f if ln.strip()]
    lines = []
    for n, ln in enumerate(raw, 1):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            if n == len(raw):
                print(f"{path}: dropped a torn last line (a write cut short)")
                break
            raise DataError(f"{path}:{n}: not a JSON line; the log is damaged (fix or remove it to resume)") from None
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            lines.append(ln if ln.endswith("\n") else ln + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def metrics_line(metrics):
    """One line of a metrics log. A value that is not a finite number (the grad norm of a skipped step,
    the mean of a reward every sample abstained from) is written as null: the log stays strict JSON,
    which Python's NaN / Infinity are not."""
    return json.dumps({k: v if not isinstance(v, float) or np.isfinite(v) else None for k, v in metrics.items()}) + "\n"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_config(cfg, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "run_config.json"), "w") as f:
        json.dump(vars(cfg), f, indent=2)


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


def chat_ids(tok, messages, add_generation_prompt):
    """Render role/content messages with the tokenizer's chat template and tokenize without adding
    special tokens again (the template already has its own BOS, if any: no double BOS)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("conversational data needs a tokenizer with a chat template; this one has none")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False).input_ids


# -----------------------------------------------------------------------------
# Data: JSONL in TRL's vocabulary, checked line by line before any training starts, and turned into
# token ids. A prompt is a string ("standard") or a list of {"role", "content"} ("conversational").

ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    pass


class TooLong(ValueError):
    """A row over a length limit: an error, or skipped and counted with --truncation skip. Never cut:
    a truncated prompt is a different question, a truncated completion one that never ends."""


TRUNCATION = ("error", "skip")


def read_jsonl(path, check, truncation="error"):
    """Parse every line of a JSONL file; check(row) raises ValueError naming the bad field (TooLong for
    a row over a length limit). Any problem is reported as 'file:line: ...' before a single step is
    taken. With truncation="skip" rows over the limit are left out and their number is printed."""
    if truncation not in TRUNCATION:
        raise ValueError(f"--truncation must be error or skip, got {truncation!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows, too_long, n = [], 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to read") from None
            except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
                raise DataError(f"{path}:{n}: unreadable JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            try:
                check(row)
            except TooLong as e:
                if truncation == "error":
                    raise DataError(f"{path}:{n}: {e} (--truncation skip leaves such rows out)") from None
                too_long += 1
                continue
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}:{n}: {e}") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to check") from None
            rows.append(row)
    if too_long:
        print(f"{path}: skipped {too_long} of {len(rows) + too_long} rows over the length limit (--truncation skip)")
    if not rows:
        raise DataError(f"{path}: no rows" + (f" left: all {too_long} are over the length limit" if too_long else ""))
    return rows


def check_text_or_messages(row, field, last_role=None):
    """A field must be a non-empty string, or a non-empty list of role/content messages."""
    if field not in row:
        raise ValueError(f"missing field {field!r} (has: {', '.join(row)})")
    v = row[field]
    if isinstance(v, str):
        if not v.strip():
            raise ValueError(f"field {field!r} is empty")
        return
    if not isinstance(v, list) or not v:
        raise ValueError(f"field {field!r} must be a string or a non-empty list of messages, got {type(v).__name__}")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise ValueError(f"field {field!r}[{i}] must be {{'role': str, 'content': str}}, got {json.dumps(m)[:80]}")
        if m["role"] not in ROLES:
            raise ValueError(f"field {field!r}[{i}] has unknown role {m['role']!r} (known: {', '.join(sorted(ROLES))})")
    if not any(m["content"].strip() for m in v):
        raise ValueError(f"field {field!r} is empty (every message's content is blank)")
    if last_role and v[-1]["role"] != last_role:
        raise ValueError(f"field {field!r} must end with a {last_role!r} message, ends with {v[-1]['role']!r}")
    if last_role and not v[-1]["content"].strip():
        raise ValueError(f"field {field!r}[{len(v) - 1}]: the final {last_role!r} message is empty")


def _texts(x):
    """The data text of a field: the string, or each message's content."""
    return [x] if isinstance(x, str) else [m["content"] for m in x]


_token_chars = {}


def check_data_text(tok, *fields, max_tokens=None, limit="the length limit"):
    """Data text stays text. A special token's text inside it (an EOS inside a completion, pad text, a
    role token inside user content) would be read as that token by the tokenizer, and by the chat
    template, which renders content to text before it is tokenised: the model would be trained not to
    stop, or on a turn the data never had. Such a row is refused, naming the token; it is not split into
    characters, because after templating content can no longer be told apart from structure.
    With max_tokens: text that surely has more tokens than that is refused (TooLong) before it is
    tokenised, so a 50 MB line costs a length check, not minutes and GBs: no token covers more
    characters than its vocabulary entry has (byte-level BPE: one per byte, each byte >= 1 character)."""
    key = id(tok)
    if key not in _token_chars:  # (tok kept alive beside its id, so the id cannot be reused)
        special = {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)
        _token_chars[key] = (tok, sorted(special), max(map(len, tok.get_vocab())))
    _, special, per_token = _token_chars[key]
    texts = [t for f in fields for t in _texts(f)]
    chars = sum(map(len, texts))
    if max_tokens is not None and chars > max_tokens * per_token:
        raise TooLong(f"{chars} characters: more than {max_tokens} tokens however tokenised > {limit} {max_tokens}")
    for t in texts:
        for s in special:
            if s in t:
                raise ValueError(f"the text contains {s!r}, a special token of this tokenizer: data text must not "
                                 f"become structure (remove it, or spell it differently)")


def encode_prompt(tok, prompt):
    """Prompt ids: conversational prompts through the chat template with the generation prompt,
    standard strings as they are (with the tokenizer's own BOS, if it has one). The text must have
    passed check_data_text (read_jsonl's checks call it) for its special tokens to be structure only."""
    if isinstance(prompt, list):
        return chat_ids(tok, prompt, add_generation_prompt=True)
    return tok(prompt).input_ids


def encode_example(tok, prompt, completion):
    """(prompt_ids, completion_ids) for SFT; the completion always ends with EOS so the model learns to
    stop. Conversational: the completion is what the template adds after the generation prompt."""
    p = encode_prompt(tok, prompt)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("prompt and completion must both be strings or both be message lists")
    if isinstance(completion, list):
        full = chat_ids(tok, prompt + completion, add_generation_prompt=False)
        if full[:len(p)] != p:
            raise ValueError("the chat template renders the prompt differently with and without the completion")
        c = full[len(p):]
    else:
        c = tok(completion, add_special_tokens=False).input_ids
    if tok.eos_token_id not in c:  # (after check_data_text, an EOS in c is the template's own)
        c = c + [tok.eos_token_id]
    return p, c


def context_length(model):
    """The most positions the model was built for (max_position_embeddings), or None if it does not say."""
    m = getattr(model, "module", model)
    return getattr(m.config.get_text_config(), "max_position_embeddings", None)


class ShuffledCycle:
    """Epochs over n rows, each in a fresh seeded order. (epoch, pos) is the whole state: a resumed run
    sees exactly the rows an uninterrupted run would have seen, across epoch boundaries too."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.order = self._order()

    def _order(self):
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k):
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load(self, s):
        # the saved position indexes an order of n rows: rows of another count are other data
        n = s.get("n", max(self.n, s["pos"]))
        if n != self.n:
            raise ConfigError(f"--resume: the data has {self.n} rows, the checkpoint was trained on {n} (at row "
                              f"{s['pos']} of epoch {s['epoch']}); resume with the same data, or start a new --out")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self.order = self._order()


# -----------------------------------------------------------------------------
# CLI: one dataclass per script; its fields are the flags (dashes on the command line), its values
# the defaults, each defined once.

class ConfigError(ValueError):
    """Flags out of range, of the wrong type, or in a combination that cannot work. Raised before
    anything is loaded or written, so a failed start leaves a previous run in --out as it was."""


def check_flags(cfg, problems):
    """Raise one ConfigError listing every problem: each script's check_config passes the sentences
    for the rules it broke (a list of (ok, sentence)). The field types are checked here for all of
    them (a config built in Python bypasses argparse's conversions)."""
    import dataclasses
    types = {"int": int, "float": (int, float), "str": str, "bool": bool}
    bad = [f"--{f.name.replace('_', '-')} must be {f.type if isinstance(f.type, str) else f.type.__name__}, "
           f"got {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
           if not isinstance(getattr(cfg, f.name), types.get(f.type, f.type))
           or (f.type in (int, float, "int", "float") and isinstance(getattr(cfg, f.name), bool))]
    if bad:  # the ranges below compare numbers: report the types alone first
        raise ConfigError("; ".join(bad))
    bad = [msg for ok, msg in problems(cfg) if not ok]
    if bad:
        raise ConfigError("; ".join(bad))


def parse_config(cls, argv=None):
    import argparse
    import dataclasses
    ap = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(flag, type=typ, default=f.default)
    return cls(**vars(ap.parse_args(argv)))
