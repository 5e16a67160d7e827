"""Cold-start supervised fine-tuning: teach the model the reasoning format on a few worked traces, so
that RL afterwards has a policy that is sometimes right (DeepSeek-R1 §2.3.1).

    python sft.py                                   # built-in tiny model, a careless teacher's addition traces, CPU, ~2.5 min
    python sft.py --model PATH --data train.jsonl --device cuda --lr 1e-5 --out runs/sft-qwen
    torchrun --nproc_per_node=8 sft.py ...          # (multi-process: see README)

Data: JSONL rows {"prompt", "completion"} (strings, or lists of role/content messages) or
{"messages": [...]} (the last message, from the assistant, is the completion).

The built-in cold start (README, Results): 4,000 addition traces from a careless teacher who, where the
units column carries, forgets that carry in --teacher-slip = 70% of its traces. SFT converges to the
teacher, mistake included (58.8% held-out: the problems without a units carry); the carry it still
samples 30% of the time is what GRPO's verifiable reward then amplifies.

Algorithmic choices:
1. Completion-only loss: prompt tokens are masked out; the model is not trained to write questions.
2. EOS is part of the completion and of the loss: without it the policy never learns to stop, and
   every RL rollout runs to the length limit.
3. Token-mean normalisation over the batch: sum(-log p * mask) / sum(mask).
4. AdamW, linear warmup then cosine decay to 10%; gradient-norm clipping at 1.0.
"""
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import dist
import evaluate as E
import kernels
import plot
import rewards
from model import (TRUNCATION, ShuffledCycle, TooLong, check_data_text, check_flags, check_resume,
                   check_text_or_messages, completion_hidden, context_length, encode_example, encode_prompt, load,
                   load_state, lock_out, metrics_line, parse_config, read_jsonl, rng_state, save, seed_everything,
                   set_rng_state, token_logprobs, trim_log, write_config)
from rollout import generate


@dataclass
class SFTConfig:
    """Cold-start SFT (completion-only loss)."""
    model: str = "tiny"          # "tiny" (built in) or a local HF model directory
    data: str = ""               # JSONL file; empty = traces of the built-in --task
    task: str = "add"            # built-in task (rewards.TASKS) for traces and held-out evaluation
    num_examples: int = 4000     # built-in traces in the cold-start set (8 epochs: SFT converges on every seed)
    teacher_slip: float = 0.7    # built-in add: share of traces whose teacher forgets the carry out of the
                                 # units column (a wrong trace); SFT imitates it, RL has to fix it (README)
    out: str = "runs/sft"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3             # right for the 0.8M tiny model; use ~1e-5 for a real 0.5B-7B model
    warmup: int = 20
    weight_decay: float = 0.0
    max_length: int = 512        # prompt + completion tokens
    truncation: str = "error"    # a --data row over --max-length: error | skip (counted); never cut
    eval_n: int = 500            # held-out problems for greedy accuracy at the end (0 = skip)
    eval_data: str = ""          # held-out JSONL (GRPO's prompt format: prompt + answer), scored greedy by
                                 # `accuracy` before and after SFT (evaluate.py)
    max_new_tokens: int = 48     # for that evaluation
    device: str = "cpu"
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    threads: int = 2             # torch CPU threads
    kernels: str = "auto"        # auto = Triton kernels on CUDA (kernels/), PyTorch elsewhere | off
    fsdp: bool = False           # torchrun: shard weights, grads, AdamW state (FSDP2, Zhao et al. 2023; dist.py)


# What a checkpoint was made with: --resume refuses to change these (model.check_resume); any other
# flag may change (e.g. --steps to extend a run, --lr) and is applied from the saved step on.
RESUME_FIXED = ("model", "data", "task", "num_examples", "teacher_slip", "batch_size", "max_length", "truncation",
                "eval_n", "eval_data", "seed", "fsdp")


def check_config(cfg):
    """Every flag's range, before anything is loaded or written."""
    return [
        (cfg.num_examples >= 1, f"--num-examples must be >= 1, got {cfg.num_examples}"),
        (0 <= cfg.teacher_slip <= 1, f"--teacher-slip must be in [0, 1], got {cfg.teacher_slip}"),
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.max_length >= 2, f"--max-length must be >= 2 (a prompt token and the EOS), got {cfg.max_length}"),
        (cfg.truncation in TRUNCATION, f"--truncation must be error or skip, got {cfg.truncation!r}"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}"),
        *[(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
          for k in ("eval_n", "save_every")],
        (cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        (cfg.kernels in kernels.MODES, f"--kernels must be one of {', '.join(kernels.MODES)}, got {cfg.kernels!r}"),
        (bool(cfg.data) or cfg.task in rewards.TASKS, f"--task must be one of {', '.join(rewards.TASKS)}, got {cfg.task!r}"),
    ]


# -----------------------------------------------------------------------------
# Data

def check_sft_row(row):
    if "messages" in row:
        check_text_or_messages(row, "messages", last_role="assistant")
        if not isinstance(row["messages"], list) or len(row["messages"]) < 2:
            raise ValueError("field 'messages' needs at least a prompt message and an assistant message")
    else:
        check_text_or_messages(row, "prompt")
        check_text_or_messages(row, "completion")


def encode_checked(tok, prompt, completion, max_length, context=None):
    """(prompt_ids, completion_ids) of a row within --max-length and the model's context (its
    max_position_embeddings), its text checked first (model.check_data_text: no special-token text, no
    tokenising of text that is surely too long)."""
    check_data_text(tok, prompt, completion, max_tokens=max_length, limit="--max-length")
    ids = encode_example(tok, prompt, completion)
    n = len(ids[0]) + len(ids[1])
    if n > max_length:
        raise TooLong(f"{n} tokens > --max-length {max_length}")
    if context is not None and n > context:
        raise TooLong(f"{n} tokens > the model's context of {context} positions (max_position_embeddings)")
    return ids


def load_examples(cfg, tok, context=None):
    """List of (prompt_ids, completion_ids). A file's rows are checked and tokenized line by line, so
    any error names its file:line. context: the model's (model.context_length)."""
    examples = []
    if cfg.data:
        def check(r):
            check_sft_row(r)
            p, c = (r["messages"][:-1], r["messages"][-1:]) if "messages" in r else (r["prompt"], r["completion"])
            examples.append(encode_checked(tok, p, c, cfg.max_length, context))
        read_jsonl(cfg.data, check, cfg.truncation)
        return examples
    stream = rewards.ProblemStream(cfg.task, seed=cfg.seed, exclude=rewards.held_out(cfg.task, max(cfg.eval_n, 1)))
    slips = random.Random(cfg.seed + 10_000)   # the teacher's slips: their own stream, one draw per trace
    for i, p in enumerate(stream.take(cfg.num_examples)):
        trace = p.trace
        if cfg.task in ("add", "add2") and slips.random() < cfg.teacher_slip:
            trace = rewards.addition_trace(*map(int, p.prompt.split("+")), slip=True)
        try:
            examples.append(encode_checked(tok, [{"role": "user", "content": p.prompt}],
                                           [{"role": "assistant", "content": trace}], cfg.max_length, context))
        except ValueError as e:
            raise ValueError(f"{cfg.task} example {i}: {e}") from None
    return examples


def collate(examples, pad_id, device):
    """[(prompt_ids, completion_ids)] -> input_ids, attention_mask (B, P+C) laid out as
    [left-padded prompt | right-padded completion], and completion_mask (B, C)."""
    P = max(len(p) for p, _ in examples)
    C = max(len(c) for _, c in examples)
    ids = torch.full((len(examples), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(examples):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p):P + len(c)] = 1
    return ids.to(device), attn.to(device), attn[:, P:].float().to(device)


def sft_loss(logp, mask):
    """Token-mean negative log-likelihood over the completion tokens. logp, mask (B, C)."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def batch_loss(model, ids, attn, mask):
    """sft_loss of a batch. On CUDA with --kernels auto the fused loss head computes it from the hidden
    states, with the lm_head's gradient formed in the forward (kernels/loss_head.py)."""
    if kernels.active(ids):
        from kernels.loss_head import fused_loss_head
        hidden, head, targets = completion_hidden(model, ids, attn, mask.shape[1])
        return fused_loss_head(hidden, head.weight, targets, lambda lp, rows: lp, lambda lp: sft_loss(lp, mask),
                               bias=head.bias, scale=head.scale, softcap=head.softcap)[0]
    return sft_loss(token_logprobs(model, ids, attn, mask.shape[1]), mask)          # (B, C) log-probs


# -----------------------------------------------------------------------------
# Held-out evaluation (shared with grpo.py and dpo.py)

@torch.no_grad()
def evaluate(model, tok, problems, max_new_tokens, batch_size=250):
    """Greedy accuracy on built-in problems; also returns the decoded completions."""
    model.eval()
    completions = []
    with dist.gathered(model):   # --fsdp: whole weights for the decode, no per-token all-gathers
        for i in range(0, len(problems), batch_size):
            chunk = problems[i:i + batch_size]
            prompts = [encode_prompt(tok, p.row()["prompt"]) for p in chunk]
            r = generate(model, tok, prompts, max_new_tokens, greedy=True, engine=dist.rollout_engine(model))
            completions += tok.batch_decode(r.completion_ids, skip_special_tokens=True)
    score = rewards.countdown_reward if problems and problems[0].columns else rewards.accuracy_reward
    rows = [p.row() for p in problems]
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    acc = score([r["prompt"] for r in rows], completions, **cols)
    model.train()
    return sum(acc) / max(len(acc), 1), completions


def before_after(history, after, n, task, algo):
    """grpo.py's and dpo.py's closing line and result.json: held-out accuracy at their step 0
    (history[0]) and at the end."""
    before = history[0]["held_out_accuracy"]
    print(f"\nheld-out greedy accuracy on {n} {task} problems: before {algo} {before:.3f} -> after {algo} "
          f"{after:.3f} ({'+' if after >= before else ''}{100 * (after - before):.1f} points)")
    return {"held_out_accuracy_before": before, "held_out_accuracy_after": after, "n": n, "history": history}


def cosine_lr(step, warmup, total):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------

def main(cfg):
    check_flags(cfg, check_config)               # before anything is loaded or written
    torch.set_num_threads(cfg.threads)
    kernels.set_mode(cfg.kernels)
    device = dist.init(cfg.device)               # torchrun: join the group (dist.py); else a no-op
    seed_everything(cfg.seed)
    print(json.dumps(vars(cfg)))
    where, dtype = dist.staging(device, cfg.fsdp)   # --fsdp: whole on the CPU, then sharded onto the device
    model, tok = load(cfg.model, where, dtype, seed=cfg.seed)
    examples = load_examples(cfg, tok, context_length(model))  # every row is checked before the first step
    eval_rows = E.read_rows(cfg.eval_data, tok, cfg.max_length) if cfg.eval_data else []
    step, data, st = 0, ShuffledCycle(len(examples), cfg.seed), None
    if dist.is_main():
        lock_out(cfg.out)                        # one run at a time in OUT
    if cfg.resume:                               # every check before the first write
        st = load_state(cfg.out)
        check_resume(cfg, st.get("config"), RESUME_FIXED)
        data.load(st["data"])
        model, tok = load(cfg.out, where, dtype)  # the weights of the last checkpoint (whole: sharded below)
    if dist.is_main():
        write_config(cfg, cfg.out)
    if cfg.fsdp:
        model = dist.shard_model(model, device)
    opt = torch.optim.AdamW(dist.param_groups(model), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.warmup, cfg.steps))
    if st is not None:
        dist.resume_optimizer(model, opt, sched, st["optimizer"], st["scheduler"])
        step = st["step"]
        set_rng_state(st["rng"])
    model.train()

    def eval_accuracy():  # --eval-data: greedy, scored by the accuracy checker (no random numbers drawn)
        with dist.gathered(model):
            return E.evaluate(model, tok, eval_rows, rewards.accuracy_reward, cfg.max_new_tokens)[0]["accuracy"]
    before = (st or {}).get("eval_before")
    if eval_rows and st is None:
        before = eval_accuracy()
        print(f"held-out greedy accuracy before SFT: {before:.3f} on {len(eval_rows)} rows of {cfg.eval_data}")

    def checkpoint():  # rank 0 writes: the replicas are identical (SFT draws no random numbers)
        weights, optim = dist.model_state(model), dist.optimizer_state(model, opt)  # --fsdp: gathered, collective
        if dist.is_main():
            save(model, tok, cfg.out, {"optimizer": optim, "scheduler": sched.state_dict(), "step": step,
                                       "data": data.state(), "rng": rng_state(), "eval_before": before,
                                       "config": vars(cfg)}, weights)
        dist.barrier()

    if cfg.resume and dist.is_main():
        trim_log(os.path.join(cfg.out, "sft_metrics.jsonl"), step)
    # a fresh run starts its log empty (OUT holds one run); --resume appends after the trimmed log
    log = open(os.path.join(cfg.out, "sft_metrics.jsonl") if dist.is_main() else os.devnull,
               "a" if cfg.resume else "w")
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", dynamic_ncols=True, disable=not dist.is_main())
    while step < cfg.steps:
        t0 = time.time()
        batch = [examples[i] for i in dist.shard(data.take(cfg.batch_size))]  # this rank's slice
        ids, attn, mask = collate(batch, tok.pad_token_id, device)
        loss = batch_loss(model, ids, attn, mask)
        num_tokens = mask.sum()
        if dist.world() > 1:  # this rank's share of the token mean over the GLOBAL batch (dist.py)
            num_tokens = dist.all_sum(num_tokens)
            loss = loss * (mask.sum() / num_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_grads(model)
        grad_norm = dist.clip_grad_norm_(model, 1.0)
        skipped = not torch.isfinite(grad_norm)
        if not skipped:
            opt.step()
        # else: a NaN/inf gradient would poison the weights and Adam's moments; skip the update (the
        # step still counts, so the schedule and the data stay where an uninterrupted run has them)
        sched.step()
        step += 1
        m = {"step": step, "loss": dist.all_sum(loss.item()), "grad_norm": grad_norm.item(),
             "skipped_steps": int(skipped), "lr": sched.get_last_lr()[0], "num_tokens": int(num_tokens),
             "epoch": data.epoch, "step_time": time.time() - t0}
        log.write(metrics_line(m))
        log.flush()
        bar.set_postfix(loss=f"{m['loss']:.3f}", epoch=data.epoch)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint()
    bar.close()
    checkpoint()
    result = {}
    if cfg.eval_n and not cfg.data:
        acc, comps = evaluate(model, tok, rewards.held_out(cfg.task, cfg.eval_n), cfg.max_new_tokens)
        result = {"held_out_accuracy": acc, "n": cfg.eval_n}
        print(f"held-out greedy accuracy after SFT: {acc:.3f} on {cfg.eval_n} {cfg.task} problems")
        print("sample:", repr(comps[0]))
    if eval_rows:
        after = eval_accuracy()
        result = {"held_out_accuracy_before": before, "held_out_accuracy": after, "n": len(eval_rows),
                  "eval_data": cfg.eval_data}
        print(f"held-out greedy accuracy on {len(eval_rows)} rows of {cfg.eval_data}: before SFT {before:.3f} "
              f"-> after SFT {after:.3f}")
    if dist.is_main():
        with open(os.path.join(cfg.out, "sft_result.json"), "w") as f:
            json.dump(result, f)
    log.close()
    if dist.is_main():
        print("curves:", plot.draw(cfg.out))   # OUT/curves.svg: every metric over the steps
    return model, tok, result


if __name__ == "__main__":
    main(parse_config(SFTConfig))
