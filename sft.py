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
import os
import random
import time
from dataclasses import dataclass

from tqdm import tqdm

import dist
import evaluate as E
import kernels
import lifecycle as run
import rewards
import tools
from checkpoint import seed_everything
from data import (TRUNCATION, ShuffledCycle, TooLong, check_data_text, check_text_or_messages, collate,
                  encode_example, read_jsonl)
from model import completion_hidden, context_length, token_logprobs


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
    eval_n: int = 500            # built-in task: held-out problems, greedy accuracy before / after (0 = skip)
    eval_data: str = ""          # held-out JSONL (GRPO's prompt format: prompt + answer), scored greedy by
                                 # `accuracy` before / every --eval-every / after SFT (evaluate.py)
    eval_every: int = 0          # also every N steps, for the learning curve (0 = only before/after)
    eval_samples: int = 0        # k > 0: also pass@k and mean@k from k samples per prompt at temperature 1
    max_new_tokens: int = 48     # for that evaluation
    tools: str = ""              # the tool of tool-using traces (tools.py): their spliced outputs are masked
                                 # out of the loss, and the evaluation calls it; empty = none
    tool_format: str = "<c>,</c>,<o>,</o>"  # call start, call end, output start, output end
    max_tool_calls: int = 4
    tool_timeout: float = 5.0
    max_tool_output_tokens: int = 24
    device: str = "cpu"
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    threads: int = 2             # torch CPU threads
    kernels: str = "auto"        # auto = Triton kernels on CUDA (kernels/), PyTorch elsewhere | off
    lora_rank: int = 0             # r > 0: train LoRA adapters of rank r on the decoder's linear layers only (Hu et al. 2021)
    lora_alpha: float = 32.0       # LoRA scale alpha / r; LoRA wants a ~10x larger --lr than full fine-tuning
    fsdp: bool = False           # torchrun: shard weights, grads, AdamW state (FSDP2, Zhao et al. 2023; dist.py)


# What a checkpoint was made with: --resume refuses to change these (lifecycle.check_resume); any other
# flag may change (e.g. --steps to extend a run, --lr) and is applied from the saved step on.
RESUME_FIXED = ("model", "data", "task", "num_examples", "teacher_slip", "batch_size", "max_length", "truncation",
                "eval_n", "eval_data", "seed", "fsdp", "lora_rank", "lora_alpha")


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
          for k in ("eval_n", "eval_every", "eval_samples", "save_every")],
        (cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        (cfg.kernels in kernels.MODES, f"--kernels must be one of {', '.join(kernels.MODES)}, got {cfg.kernels!r}"),
        (bool(cfg.data) or cfg.task in rewards.TASKS, f"--task must be one of {', '.join(rewards.TASKS)}, got {cfg.task!r}"),
        *tools.checks(cfg),
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
    max_position_embeddings), its text checked first (data.check_data_text: no special-token text, no
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
    """List of (prompt_ids, completion_ids) (+ the completion's loss mask with --tools: 0 on the spliced
    tool outputs). A file's rows are checked and tokenized line by line, so any error names its file:line.
    context: the model's (model.context_length)."""
    examples = []
    if cfg.data:
        def check(r):
            check_sft_row(r)
            p, c = (r["messages"][:-1], r["messages"][-1:]) if "messages" in r else (r["prompt"], r["completion"])
            examples.append(encode_checked(tok, p, c, cfg.max_length, context))
        read_jsonl(cfg.data, check, cfg.truncation)
        return with_tool_masks(cfg, tok, examples)
    stream = rewards.ProblemStream(cfg.task, seed=cfg.seed, exclude=rewards.held_out(cfg.task, max(cfg.eval_n, 1)),
                                   cold_start=True)   # (adapt: a share of prompts force a mode)
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
    return with_tool_masks(cfg, tok, examples)


def with_tool_masks(cfg, tok, examples):
    """--tools: each example gets its completion's loss mask, 0 on the spliced tool outputs (the model
    reads what the tool wrote, it never learns to write it)."""
    if not cfg.tools:
        return examples
    spec = tools.spec_from(cfg)
    return [(p, c, tools.output_mask(tok, c, spec)) for p, c in examples]


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
# The phases of one step

def train_step(model, opt, sched, batch, device, pad_id):
    """One optimizer step on a batch of (prompt_ids, completion_ids): the loss is this rank's share of
    the token mean over the GLOBAL batch (dist.py). Returns the step's metrics."""
    ids, attn, mask = collate(batch, pad_id, device)
    loss = batch_loss(model, ids, attn, mask)
    num_tokens = mask.sum()
    if dist.world() > 1:
        num_tokens = dist.all_sum(num_tokens)
        loss = loss * (mask.sum() / num_tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm, skipped = run.optimizer_step(model, opt, sched, grad_clip=1.0)
    return {"loss": dist.all_sum(loss.item()), "grad_norm": grad_norm.item(), "skipped_steps": int(skipped),
            "learning_rate": sched.get_last_lr()[0], "num_tokens": int(num_tokens)}


def cold_start(cfg, default_init):
    """grpo.py's and dpo.py's cold start: the checkpoint to start from. --init scratch: --model as it is.
    The default --init directory, when missing, is built here by this script with its defaults on the
    same task, model and seed (then the seeds are reset, so the RL run is the same either way)."""
    if cfg.init == "scratch":
        return cfg.model
    if os.path.isdir(cfg.init):
        return cfg.init
    if cfg.init != default_init:
        raise FileNotFoundError(f"--init {cfg.init!r} does not exist (use 'scratch' to start from --model)")
    if dist.world() > 1:
        raise FileNotFoundError(f"--init {cfg.init!r} does not exist: run sft.py (or torchrun sft.py) first")
    print(f"no cold-start checkpoint at {cfg.init}: running sft.py first")
    main(SFTConfig(model=cfg.model, task=cfg.task, out=cfg.init, device=cfg.device, seed=cfg.seed,
                   threads=cfg.threads, eval_n=cfg.eval_n, kernels=cfg.kernels, tools=getattr(cfg, "tools", ""),
                   tool_format=getattr(cfg, "tool_format", SFTConfig.tool_format),
                   max_new_tokens=max(cfg.max_new_tokens, SFTConfig.max_new_tokens)))
    seed_everything(cfg.seed)
    return cfg.init


# -----------------------------------------------------------------------------

def main(cfg):
    device = run.start(cfg, check_config)
    model, tok = run.load_model(cfg.model, device, cfg)
    examples = load_examples(cfg, tok, context_length(model))  # every row is checked before the first step
    held = E.HeldOut(cfg, tok, E.criterion(cfg), cfg.max_length, cfg.max_new_tokens, tools=tools.build(cfg, tok))
    data = ShuffledCycle(len(examples), cfg.seed)
    state = run.open_out(cfg, RESUME_FIXED)
    if state:
        data.load(state["data"])
    run.prepare_weights(model, cfg, device, state)   # --lora-rank adapters; --resume: the saved weights
    run.write_config(cfg)
    model = run.shard(model, cfg, device)
    opt, sched = run.optimizer(cfg, model, run.cosine_lr(cfg.warmup, cfg.steps), state, betas=(0.9, 0.95),
                               weight_decay=cfg.weight_decay)
    step, held.history = (state["step"], state.get("history", [])) if state else (0, [])
    model.train()
    logs = run.Logs(cfg, step, metrics="sft_metrics.jsonl", samples="samples.jsonl")
    if held and step == 0:
        print(f"held-out greedy accuracy before SFT: {held(model, tok, step, logs)['held_out_accuracy']:.3f}")
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", dynamic_ncols=True, disable=not dist.is_main())
    while step < cfg.steps:
        t0 = time.time()
        batch = [examples[i] for i in dist.shard(data.take(cfg.batch_size))]  # this rank's slice
        m = {"step": step + 1, **train_step(model, opt, sched, batch, device, tok.pad_token_id), "epoch": data.epoch}
        step += 1
        if held and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m.update(held(model, tok, step, logs))
        logs.metrics({**m, "step_time": time.time() - t0})
        bar.set_postfix(loss=f"{m['loss']:.3f}", epoch=data.epoch)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            run.checkpoint(cfg, model, tok, opt, sched, step, data=data.state(), history=held.history)
    bar.close()
    run.checkpoint(cfg, model, tok, opt, sched, step, data=data.state(), history=held.history)
    result = {}
    if held:
        held(model, tok, step, logs)
        result = held.summary("SFT")
        result["held_out_accuracy"] = result["held_out_accuracy_after"]
        print("sample:", repr(held.shown[0]["completion"]))
    run.finish(cfg, logs, result, "sft_result.json")
    return model, tok, result


if __name__ == "__main__":
    main(run.parse_config(SFTConfig))
