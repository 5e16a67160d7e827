"""Rollout speed on a GPU: model.generate (plain, and with a static cache) against rollout.generate
(engine "graph": static cache + a captured CUDA-graph decode step), in the same run, next to the floor
set by memory bandwidth; then one end-to-end GRPO step of grpo.py, split into its phases.

    python bench/rollout_gpu.py                  # CUDA: the decode table + the GRPO step (a few minutes)
    python bench/rollout_gpu.py --only decode    # or --only grpo
    python bench/rollout_gpu.py --tiny           # CPU smoke test of the same code (small model, few tokens)

Model: Qwen2.5-0.5B-shaped, random weights (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocabulary 151936, tied embeddings), bf16. Decode: prompts of 128 random tokens, 256 new tokens,
sampling at temperature 1 with no top-k / top-p, every row runs all 256 steps (generate: min_new_tokens;
ours: an EOS id outside the vocabulary), batch 64 and 256. "ms/step" is the whole call / 256, so it
includes the prefill's share, for every mode alike. The first call of each mode is timed separately
(transformers compiles the forward for its static cache; we capture the graph), the second is the
steady state reported.

Floor: every decode step reads all weights once, so no engine can step faster than
weight bytes / memory bandwidth, with the bandwidth measured here by a large device-to-device copy.
Our static cache also reads its whole K/V buffer (prompt + max_new_tokens columns) every step: that
bound is printed too.

GRPO step: grpo.py on the same shape (random weights saved to a temporary directory with the built-in
character tokenizer; the model's extra vocabulary decodes to nothing), prompts written to JSONL from
the built-in addition task, 32 prompts x 8 completions, 256 new tokens, beta 0.04 (so the reference
log-probs are computed; old log-probs are skipped on-policy at num_iterations 1), bf16. Reported per
rollout engine: the median step of steps 2.. (by step_time) and its time/rollout, time/logprobs, time/train from
metrics.jsonl, step 1 (which includes the capture) apart, and the peak GPU memory.
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo          # noqa: E402
import model as M    # noqa: E402
import checkpoint as CK    # noqa: E402
import rewards       # noqa: E402
import rollout       # noqa: E402

QWEN05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512)


def out(**kw):
    print(json.dumps(kw), flush=True)


def build(shape, device, dtype, seed=0):
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bandwidth(device, nbytes):
    """Bytes per second of a device-to-device copy (each copy reads and writes nbytes)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    n = 10
    dt = timed(lambda: [y.copy_(x) for _ in range(n)], device)
    return 2 * nbytes * n / dt


# -----------------------------------------------------------------------------
# Decode

def decode_table(model, device, batches, P, T, modes):
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # tied: counted once
    bw = bandwidth(device, 2 << 30 if device.type == "cuda" else 64 << 20)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    out(kind="floor", weight_bytes=weight_bytes, bandwidth_GBps=round(bw / 1e9, 1),
        weights_ms_per_step=round(weight_bytes / bw * 1e3, 4))
    vocab = c.vocab_size
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=vocab)   # an EOS id the model cannot emit: no row stops
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(1, vocab, (B, P), generator=g)
        ids = prompts.to(device)
        kv_bytes = 2 * c.num_hidden_layers * B * c.num_key_value_heads * (P + T) * head_dim * model.dtype.itemsize
        floor_ms = weight_bytes / bw * 1e3
        res = {}
        for mode in modes:
            if mode == "ours":
                engine = "graph" if device.type == "cuda" else "static"
                call = lambda: rollout.generate(model, tok, prompts.tolist(), T, temperature=1.0, engine=engine)
            else:
                kw = {}
                if mode == "generate_static":
                    kw = dict(cache_implementation="static")
                    if device.type != "cuda":
                        kw["disable_compile"] = True      # CPU smoke: no inductor build
                call = lambda kw=kw: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T,
                                                    min_new_tokens=T, do_sample=True, temperature=1.0, top_p=1.0,
                                                    top_k=0, pad_token_id=0, **kw)
            with torch.no_grad():
                first = timed(call, device)
                dt = timed(call, device)
            row = dict(kind="decode", mode=mode, B=B, P=P, T=T, first_call_s=round(first, 2), s=round(dt, 3),
                       tok_per_s=round(B * T / dt), ms_per_step=round(dt / T * 1e3, 3),
                       floor_ms_per_step=round(floor_ms, 4), x_floor=round(dt / T * 1e3 / floor_ms, 1),
                       kv_read_ms_per_step=round(kv_bytes / bw * 1e3, 4))
            if mode == "ours":
                dec = next(iter(rollout._decoders[model].values()))
                row["capture_s"] = None if dec.capture_seconds is None else round(dec.capture_seconds, 2)
                rollout.clear_decoders(model)   # free this batch's cache and graph before the next
            res[mode] = row
            out(**row)
            rows.append(row)
        if "ours" in res and "generate" in res:
            ours, plain = res["ours"], res["generate"]
            overhead = max(ours["first_call_s"] - ours["s"], 0.0)   # capture + warm-up, paid once per shape
            saved = plain["s"] - ours["s"]                    # per rollout, against plain generate
            out(kind="payoff", B=B, one_time_s=round(overhead, 2), saved_per_rollout_s=round(saved, 3),
                pays_off_after_rollouts=math.ceil(overhead / saved) if saved > 0 else None,
                speedup_vs_generate=round(plain["s"] / ours["s"], 2),
                speedup_vs_generate_static=round(res["generate_static"]["s"] / ours["s"], 2)
                if "generate_static" in res else None)
    return rows


# -----------------------------------------------------------------------------
# GRPO step

def grpo_steps(shape, device, dtype, engines, steps, num_prompts, G, T, workdir):
    tok = M.build_char_tokenizer()
    mdir = os.path.join(workdir, "model")
    CK.save(build(shape, "cpu", dtype), tok, mdir)
    data = os.path.join(workdir, "prompts.jsonl")
    with open(data, "w") as f:
        for p in rewards.ProblemStream("add", seed=1).take(num_prompts * (steps + 1)):
            f.write(json.dumps(p.row()) + "\n")
    results = []
    for engine in engines:
        cfg = grpo.GRPOConfig(model=mdir, init="scratch", data=data, out=os.path.join(workdir, f"run_{engine}"),
                              steps=steps, num_prompts=num_prompts, num_generations=G, max_new_tokens=T,
                              beta=0.04, eval_n=0, eval_every=0, sample_every=0, save_every=10 ** 9,
                              device=str(device), rollout_engine=engine, threads=torch.get_num_threads())
        gc.collect()              # the previous run's model, optimizer and rollout buffers
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        grpo.main(cfg)
        with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
            ms = [json.loads(line) for line in f]
        later = ms[1:] or ms
        # the median step and its own phases (medians taken phase by phase need not add up to a step)
        med = sorted(later, key=lambda m: m["step_time"])[len(later) // 2]
        row = dict(kind="grpo_step", engine=engine, B=num_prompts * G, T=T, steps=len(ms),
                   first_step_s=round(ms[0]["step_time"], 2), step_s=round(med["step_time"], 3),
                   rollout_s=round(med["time/rollout"], 3), logprobs_s=round(med["time/logprobs"], 3),
                   train_s=round(med["time/train"], 3),
                   rollout_frac=round(med["time/rollout"] / med["step_time"], 3),
                   mean_completion_len=round(statistics.mean(m["completions/mean_length"] for m in ms), 1),
                   peak_mem_GiB=(round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                                 if device.type == "cuda" else None))
        out(**row)
        results.append(row)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small model, few tokens: a CPU smoke test")
    ap.add_argument("--only", choices=["decode", "grpo"], default=None)
    ap.add_argument("--grpo-steps", type=int, default=5)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("# no CUDA (or --tiny): running the CPU smoke test with a small model. GPU numbers need CUDA; "
              "nothing printed here is a GPU measurement.", flush=True)
        shape, dtype, batches, P, T = TINY, torch.float32, (4, 8), 16, 8
        grpo_kw = dict(steps=2, num_prompts=2, G=2, T=8)
    else:
        shape, dtype, batches, P, T = QWEN05B, torch.bfloat16, (64, 256), 128, 256
        grpo_kw = dict(steps=a.grpo_steps, num_prompts=32, G=8, T=256)
        out(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__,
            transformers=__import__("transformers").__version__, cuda=torch.version.cuda)
    rows = []
    if a.only in (None, "decode"):
        model = build(shape, device, dtype)
        rows += decode_table(model, device, batches, P, T, ("generate", "generate_static", "ours"))
        del model
    if a.only in (None, "grpo"):
        with tempfile.TemporaryDirectory() as d:
            engines = ("simple", "graph") if cuda else ("simple", "static")
            rows += grpo_steps(shape, device, dtype, engines, workdir=d, **grpo_kw)
    return rows


if __name__ == "__main__":
    main()
