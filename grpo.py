"""GRPO: reinforcement learning with verifiable rewards, after a cold-start SFT.

    python grpo.py                         # built-in: tiny model, cold start (sft.py) if needed, then GRPO, CPU
    python grpo.py --init scratch          # GRPO from the untrained model: the cold-start problem
    python grpo.py --model PATH --init PATH --data prompts.jsonl --device cuda --lr 1e-6 --out runs/qwen
    torchrun --nproc_per_node=8 grpo.py ...   # (multi-process: see README)

One step: sample num_prompts prompts -> G completions each (rollout.py) -> rewards (rewards.py),
a weighted sum -> group advantages -> pi_old (and pi_ref) log-probs without grad -> num_iterations
optimizer steps on the clipped surrogate (+ KL) -> metrics line (TRL names) -> checkpoint.

Algorithmic choices (each a flag; the defaults and where they come from):
1. Group-relative advantages, A_i = (R_i - mean_g R) / (std_g R + 1e-4), unbiased std over the G
   samples of a prompt (DeepSeekMath / TRL). --scale-rewards batch uses the std of the whole batch;
   none drops the division (Dr. GRPO, Liu et al. 2025: the std favours too-easy / too-hard prompts).
   --advantage rloo: A_i = R_i - mean of the other G-1 rewards (Ahmadian et al. 2024).
2. Token-level clipped surrogate, l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) with
   eps_low = 0.2, eps_high = 0.28 (DAPO clip-higher, Yu et al. 2025); log rho clamped to +-20 (verl).
   --importance-sampling-level sequence: GSPO (Zheng et al. 2025), one ratio per sequence,
   exp(mean_t log rho), clipped per sequence (use eps ~3e-4 / 4e-4 with it).
3. Loss aggregation --loss-type: dapo = sum of token losses / number of tokens in the batch (TRL's
   default; DAPO's token-level loss), grpo = mean over sequences of the per-sequence token mean
   (DeepSeekMath), dr_grpo = sum / (num sequences * max_new_tokens) (Dr. GRPO).
4. KL to a frozen reference (--beta, default 0 as in TRL and DAPO/Dr. GRPO; DeepSeekMath used 0.04),
   estimator k1 / k2 / k3 (k3 = exp(-x) + x - 1, x = log pi - log pi_ref; Schulman 2020). With beta = 0
   no reference model is kept in memory at all.
5. --num-iterations > 1 (PPO-style reuse of a rollout, "mu" in DeepSeekMath): pi_old log-probs are
   computed once, without grad, right after the rollout, and held fixed across the iterations.
6. DAPO options: --mask-truncated-completions (overlong filtering), --dynamic-sampling (drop groups
   whose rewards are all equal, sample more until the batch is full or --max-resample rounds are
   spent), --overlong-cache L (soft overlong punishment over the last L tokens).

Why the loss is ~0 on-policy. With --num-iterations 1 the policy that sampled the batch is the
policy being trained, so rho = pi_theta / pi_old = 1 exactly (old log-probs are the detached
current ones), clipping never fires, and the loss value is sum(-A * 1 * mask) / norm. The advantages
of each group are centred (they sum to ~0), so the loss is ~0 (exactly 0 with loss-type grpo and
equal lengths). Its gradient is not zero: d rho / d theta = grad log pi, so the update is
REINFORCE with the group mean as baseline. Watch reward, not loss; ratio and clip_ratio/* are logged
so you can see when the trust region is actually doing something (num_iterations > 1).
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import kernels
import plot
import dist
import evaluate as E
import rewards
import sft
from model import (TRUNCATION, ConfigError, DataError, ShuffledCycle, TooLong, check_data_text, check_flags,
                   check_resume, check_text_or_messages, completion_hidden, context_length, encode_prompt, load,
                   load_state, lock_out, metrics_line, parse_config, read_jsonl, rng_state, save, seed_everything,
                   set_rng_state, token_logprobs, trim_log, write_config)
from rollout import Rollout, generate


@dataclass
class GRPOConfig:
    """GRPO with the Dr. GRPO / DAPO / GSPO switches."""
    model: str = "tiny"            # base model: "tiny" (built in) or a local HF directory
    init: str = "runs/sft"         # cold-start checkpoint to start from ("scratch" = the base model as is);
                                   # the default is built by sft.py on first use
    data: str = ""                 # JSONL with "prompt" + columns for the reward functions; empty = --task
    task: str = "add"              # built-in task (rewards.TASKS)
    out: str = "runs/grpo"
    steps: int = 50
    num_prompts: int = 32          # prompts per step
    num_generations: int = 8       # G, completions per prompt
    max_new_tokens: int = 48
    max_prompt_length: int = 512
    truncation: str = "error"      # a --data prompt over --max-prompt-length: error | skip (counted); never cut
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollout_engine: str = "auto"   # rollout.py: auto (CUDA graph on a GPU, simple loop on CPU) | simple | static | graph
    lr: float = 1e-4               # right for the tiny model; ~1e-6 for a real 0.5B-7B model
    warmup: int = 0
    grad_clip: float = 1.0
    reward_funcs: str = ""         # comma list of rewards.REWARD_FUNCS names or module:function;
                                   # empty = the task's checker + format
    reward_weights: str = ""       # comma list, same length; empty = 1.0 for the checker, 0.1 for format (TinyZero)
    reward_timeout: float = 300.0  # seconds one reward function may take on one step's batch; its samples
                                   # abstain past it (rewards.call); 0 = unbounded
    advantage: str = "grpo"        # grpo | rloo
    scale_rewards: str = "group"   # group | batch | none (none = Dr. GRPO)
    loss_type: str = "dapo"        # grpo | dapo | dr_grpo (see the README's name map)
    epsilon_low: float = 0.2       # DAPO clip-higher: eps_low 0.2,
    epsilon_high: float = 0.28     # eps_high 0.28
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1        # optimizer steps per rollout batch (mu)
    beta: float = 0.0              # KL coefficient; 0 = no reference model
    kl_estimator: str = "k3"       # k1 | k2 | k3
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    max_resample: int = 3          # extra rollout rounds per step for dynamic sampling
    overlong_cache: int = 0        # > 0: add DAPO's soft overlong punishment over the last N tokens
    micro_batch: int = 128         # sequences per forward/backward (gradients accumulate)
    eval_n: int = 500              # held-out problems, greedy, before/after (built-in task only)
    eval_data: str = ""            # held-out JSONL (the --data format), scored greedy by the first reward
                                   # function, before / every --eval-every / after (evaluate.py)
    eval_every: int = 10           # also every N steps, for the learning curve (0 = only before/after)
    sample_every: int = 10         # print and log a few completions every N steps
    save_every: int = 25
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int = 2
    kernels: str = "auto"          # auto = Triton kernels on CUDA (kernels/), PyTorch elsewhere | off
    fsdp: bool = False             # torchrun: shard weights, grads, AdamW state (FSDP2, Zhao et al. 2023; dist.py)


# What a checkpoint was made with: --resume refuses to change these (model.check_resume); any other
# flag may change (e.g. --steps to extend a run, --lr, --beta) and is applied from the saved step on.
RESUME_FIXED = ("model", "init", "data", "task", "num_prompts", "num_generations", "max_prompt_length", "truncation",
                "eval_n", "eval_data", "seed", "fsdp")


def check_config(cfg):
    """Every flag's range, and the combinations that cannot work, before anything is loaded or written."""
    one_of = lambda flag, v, opts: (v in opts, f"--{flag} must be {' or '.join(opts)}, got {v!r}")
    return [
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.num_prompts >= 1, f"--num-prompts must be >= 1, got {cfg.num_prompts}"),
        # a group of one has nothing to be compared with: every advantage would be 0 and nothing would train
        (cfg.num_generations >= 2, f"--num-generations must be >= 2 (group advantages compare the G samples of a "
                                   f"prompt; with {cfg.num_generations} every advantage is 0), got {cfg.num_generations}"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {cfg.max_prompt_length}"),
        one_of("truncation", cfg.truncation, TRUNCATION),
        (cfg.temperature > 0, f"--temperature must be > 0 (sampling; the log-probs divide by it), got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}"),
        (cfg.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {cfg.top_k}"),
        one_of("rollout-engine", cfg.rollout_engine, ("auto", "simple", "static", "graph")),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (cfg.grad_clip > 0, f"--grad-clip must be > 0, got {cfg.grad_clip}"),
        (cfg.reward_timeout >= 0, f"--reward-timeout must be >= 0 (0 = unbounded), got {cfg.reward_timeout}"),
        one_of("advantage", cfg.advantage, ("grpo", "rloo")),
        one_of("scale-rewards", cfg.scale_rewards, ("group", "batch", "none")),
        one_of("loss-type", cfg.loss_type, ("grpo", "dapo", "dr_grpo")),
        (0 <= cfg.epsilon_low < 1, f"--epsilon-low must be in [0, 1), got {cfg.epsilon_low}"),
        (cfg.epsilon_high >= 0, f"--epsilon-high must be >= 0, got {cfg.epsilon_high}"),
        one_of("importance-sampling-level", cfg.importance_sampling_level, ("token", "sequence")),
        (cfg.num_iterations >= 1, f"--num-iterations must be >= 1, got {cfg.num_iterations}"),
        (cfg.beta >= 0, f"--beta must be >= 0, got {cfg.beta}"),
        one_of("kl-estimator", cfg.kl_estimator, ("k1", "k2", "k3")),
        (cfg.max_resample >= 0, f"--max-resample must be >= 0, got {cfg.max_resample}"),
        (0 <= cfg.overlong_cache <= cfg.max_new_tokens,
         f"--overlong-cache must be in [0, --max-new-tokens {cfg.max_new_tokens}], got {cfg.overlong_cache}"),
        (cfg.micro_batch >= 0, f"--micro-batch must be >= 0 (0 = the whole batch), got {cfg.micro_batch}"),
        *[(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
          for k in ("eval_n", "eval_every", "sample_every", "save_every")],
        (cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        one_of("kernels", cfg.kernels, kernels.MODES),
        (bool(cfg.data) or cfg.task in rewards.TASKS, f"--task must be one of {', '.join(rewards.TASKS)}, got {cfg.task!r}"),
    ]


# -----------------------------------------------------------------------------
# Rewards -> advantages

def resolve_reward_funcs(cfg):
    """--reward-funcs (rewards.resolve: names, name(key=value), module:function) and --reward-weights.
    Empty: the task's checker + format; --overlong-cache adds DAPO's soft_overlong."""
    spec = cfg.reward_funcs or ("countdown" if cfg.task == "countdown" and not cfg.data else "accuracy") + ",format"
    if cfg.overlong_cache > 0:
        spec += ",soft_overlong"
    try:
        names, funcs = rewards.resolve(spec, vars(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else (
            [0.1 if n == "format" else 1.0 for n in names])
    except ValueError:
        raise ConfigError(f"--reward-weights must be a comma list of numbers, got {cfg.reward_weights!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--reward-weights must be finite numbers, got {cfg.reward_weights!r}")
    if len(weights) != len(names):
        raise ConfigError(f"--reward-weights has {len(weights)} values for {len(names)} reward functions")
    return names, funcs, weights


def score(funcs, weights, prompts, completions, completion_ids, columns, device="cpu", extra=None, timeout=None):
    """Run every reward function (rewards.call: its own copies, faults and overruns of `timeout` seconds
    cost only the samples they hit). Returns per-function rewards (N, F) with NaN where a function
    abstained, and their weighted sum (N,), NaN where every function abstained, both on `device` (the
    model's: the advantages made from them meet the log-probs there, and on CUDA the advantage kernel
    takes them). weights: F floats. A function may return its values with a `.metrics` dict of counts
    (code_reward: runs, timeouts, ...): they are added into extra[i] (one dict per function), logged as
    rewards/<fn>/<key>; rewards/<fn>/abstained counts the samples each function did not score."""
    N = len(completions)
    extra = extra if extra is not None else [{} for _ in funcs]
    per_fn = torch.tensor([rewards.call(f, prompts, completions, completion_ids, columns, extra[i], timeout)
                           for i, f in enumerate(funcs)],
                          dtype=torch.float32, device=device).T.reshape(N, len(funcs))  # (N, F)
    weighted = per_fn * torch.as_tensor(weights, dtype=torch.float32, device=device)     # (N, F)
    total = torch.nansum(weighted, dim=1)
    total[torch.isnan(per_fn).all(1)] = math.nan
    return per_fn, total


def group_advantages(rewards_, G, scale="group", rloo=False, eps=1e-4):
    """rewards (P*G,) grouped consecutively -> advantages (P*G,). NaN rewards (no scorable reward)
    get advantage 0 and are left out of their group's statistics. Std is the unbiased (n-1) one,
    as in TRL and verl; a group with fewer than 2 scored samples has nothing to compare: advantage 0.
    On CUDA (--kernels auto) one Triton launch computes the same (kernels/advantage.py)."""
    if kernels.active(rewards_):
        from kernels.advantage import group_advantages_triton
        return group_advantages_triton(rewards_, G, scale, rloo, eps)
    return group_advantages_torch(rewards_, G, scale, rloo, eps)


def group_advantages_torch(rewards_, G, scale="group", rloo=False, eps=1e-4):
    """group_advantages in PyTorch: the specification the kernel is tested against."""
    r = rewards_.view(-1, G)                                      # (P, G)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).float()                        # (P, 1)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    total = r0.sum(1, keepdim=True)
    mean = total / n.clamp(min=1)
    if rloo:  # baseline = mean of the other samples of the group
        adv = r0 - (total - r0) / (n - 1).clamp(min=1)
    else:
        adv = r0 - mean
    if scale == "group":
        std = (((r0 - mean) ** 2 * valid).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps)
    elif scale == "batch":
        flat = r[valid]
        std = flat.std() if flat.numel() > 1 else torch.tensor(0.0, device=r.device)
        adv = adv / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    adv = torch.where(valid & (n > 1), adv, torch.zeros_like(adv))
    return adv.view(-1)


# -----------------------------------------------------------------------------
# The loss: small pure functions, explicit masks and normalisers

def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta; x = log pi - log pi_ref."""
    x = logp - ref_logp
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x ** 2
    if estimator == "k3":  # verl's clamps: x to +-20 so exp(-x) stays finite, k3 to [-10, 10]
        x = x.clamp(-20.0, 20.0)
        return (torch.exp(-x) + x - 1).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def per_token_loss(logp, old_logp, advantages, mask, eps_low, eps_high, level="token",
                   ref_logp=None, beta=0.0, kl_estimator="k3"):
    """Clipped surrogate (+ beta * KL) per token. logp, old_logp, ref_logp, mask (B, C); advantages (B,).
    Returns the loss per token (B, C) and the per-token tensors the metrics need."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)                       # verl's clamp: no exp overflow
    if level == "sequence":  # GSPO: s_i = exp(mean_t log rho_it), one ratio for the whole sequence
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")
    ratio = torch.exp(log_ratio)                                           # (B, C)
    A = advantages[:, None]                                                # (B, 1)
    objective = torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss = -objective
    kl = None
    if beta != 0.0:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        loss = loss + beta * kl
    return loss, {"ratio": ratio, "kl": kl,
                  "clip_low": ((ratio < 1 - eps_low) & (A < 0)).float(),   # clipping bites below
                  "clip_high": ((ratio > 1 + eps_high) & (A > 0)).float()}  # and above


def aggregate(loss_tok, mask, loss_type, num_seqs, num_tokens, max_len):
    """Reduce per-token losses (B, C) of one micro-batch to its share of the batch loss. The
    normalisers (num_seqs, num_tokens: of the whole batch) make the micro-batch shares add up to
    exactly the full-batch loss."""
    if loss_type == "grpo":     # (1/B) sum_i (1/L_i) sum_t m*l
        return ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if loss_type == "dapo":     # sum_it m*l / sum_i L_i
        return (loss_tok * mask).sum() / max(num_tokens, 1)
    if loss_type == "dr_grpo":  # sum_it m*l / (B * L_max)
        return (loss_tok * mask).sum() / (num_seqs * max_len)
    raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def micro_batch_loss(cfg, model, input_ids, attention_mask, C, adv, mask, old_logp, ref_logp, num_seqs, num_tokens):
    """One micro-batch's share of the batch loss, the per-token statistics (per_token_loss's) and the
    entropy (B, C). On CUDA with --kernels auto and the token-level ratio, the fused loss head computes
    the gradient for the hidden states and the lm_head during the forward (kernels/loss_head.py);
    otherwise token log-probs -> per_token_loss -> aggregate. old_logp None = on-policy (rho == 1)."""
    reduce = lambda lt: aggregate(lt, mask, cfg.loss_type, num_seqs, num_tokens, cfg.max_new_tokens)
    if kernels.active(input_ids) and cfg.importance_sampling_level == "token":
        from kernels.loss_head import fused_loss_head
        A = adv[:, None].expand_as(mask).reshape(-1)                          # (B*C,) flattened rows
        old_f, ref_f = (None if t is None else t.reshape(-1) for t in (old_logp, ref_logp))

        def per_token(lp, rows):  # the token-level loss of rows `rows`, elementwise in lp (n,)
            old = lp.detach() if old_f is None else old_f[rows]
            return per_token_loss(lp[:, None], old[:, None], A[rows], None, cfg.epsilon_low, cfg.epsilon_high,
                                  "token", None if ref_f is None else ref_f[rows, None], cfg.beta,
                                  cfg.kl_estimator)[0][:, 0]
        hidden, head, targets = completion_hidden(model, input_ids, attention_mask, C)
        loss, logp, ent = fused_loss_head(hidden, head.weight, targets, per_token, reduce, cfg.temperature,
                                          bias=head.bias, scale=head.scale, softcap=head.softcap)
        _, st = per_token_loss(logp, logp if old_logp is None else old_logp, adv, mask, cfg.epsilon_low,
                               cfg.epsilon_high, "token", ref_logp, cfg.beta, cfg.kl_estimator)  # statistics
        return loss, st, ent
    logp, ent = token_logprobs(model, input_ids, attention_mask, C, cfg.temperature, entropy=True)
    old = old_logp if old_logp is not None else logp.detach()   # on-policy: rho == 1
    lt, st = per_token_loss(logp, old, adv, mask, cfg.epsilon_low, cfg.epsilon_high, cfg.importance_sampling_level,
                            ref_logp, cfg.beta, cfg.kl_estimator)
    return reduce(lt), st, ent


# -----------------------------------------------------------------------------
# Prompts: the built-in task stream, or JSONL rows

# The columns the built-in rewards read from a JSONL row, and their JSON types (None: that row abstains).
REWARD_COLUMNS = {"accuracy": {"answer": (str, int, float)},
                  "countdown": {"numbers": (list,), "target": (int, float)}}


class Prompts:
    """The prompt rows of each step: the built-in task's stream, or a --data file's rows (checked here:
    text, reward columns, and length: prompt + --max-new-tokens within the model's context)."""

    def __init__(self, cfg, tok, held, names=(), context=None):
        self.builtin = not cfg.data
        if self.builtin:
            self.stream = rewards.ProblemStream(cfg.task, seed=cfg.seed + 1, exclude=held)
            # built-in prompts are conversational: a tokenizer without a chat template fails here, not at step 1
            encode_prompt(tok, rewards.Problem("1+1", "2", "").row()["prompt"])
        else:
            def check(row):  # read_jsonl reports any failure here as file:line
                check_text_or_messages(row, "prompt")
                for col, types in columns.items():  # (JSON true/false are bools, which Python counts as ints)
                    v = row.get(col)
                    if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
                        raise ValueError(f"field {col!r} must be {' or '.join(t.__name__ for t in types)}, "
                                         f"got {type(v).__name__}")
                check_data_text(tok, row["prompt"], max_tokens=cfg.max_prompt_length, limit="--max-prompt-length")
                n = len(encode_prompt(tok, row["prompt"]))
                if n > cfg.max_prompt_length:
                    raise TooLong(f"prompt has {n} tokens > --max-prompt-length {cfg.max_prompt_length}")
                if context is not None and n + cfg.max_new_tokens > context:
                    raise TooLong(f"prompt has {n} tokens + --max-new-tokens {cfg.max_new_tokens} > the model's "
                                  f"context of {context} positions (max_position_embeddings)")
            columns = {c: t for n in names for c, t in REWARD_COLUMNS.get(n, {}).items()}
            self.rows = read_jsonl(cfg.data, check, cfg.truncation)
            for col in columns:  # a row may lack the column (that reward abstains on it), the file may not
                if all(r.get(col) is None for r in self.rows):
                    raise DataError(f"{cfg.data}: no row has the column {col!r} that the reward "
                                    f"{'/'.join(n for n in names if col in REWARD_COLUMNS.get(n, {}))} reads")
            self.cycle = ShuffledCycle(len(self.rows), cfg.seed)

    def take(self, n):
        return [p.row() for p in self.stream.take(n)] if self.builtin else [self.rows[i] for i in self.cycle.take(n)]

    def state(self):
        return {"position": self.stream.position} if self.builtin else self.cycle.state()

    def load(self, s):
        if self.builtin:
            self.stream.seek(s["position"])
        else:
            self.cycle.load(s)


# -----------------------------------------------------------------------------

def main(cfg):
    check_flags(cfg, check_config)               # before anything is loaded or written
    torch.set_num_threads(cfg.threads)
    kernels.set_mode(cfg.kernels)
    device = dist.init(cfg.device)               # torchrun: join the group (dist.py); else a no-op
    rank, world = dist.rank(), dist.world()
    seed_everything(cfg.seed + rank)             # ranks sample differently; rank 0 is the single-process run
    print(json.dumps(vars(cfg)))
    names, funcs, weights = resolve_reward_funcs(cfg)
    G, P = cfg.num_generations, cfg.num_prompts
    if P % world:
        raise ValueError(f"--num-prompts {P} must be a multiple of the number of processes ({world})")
    if cfg.fsdp and cfg.dynamic_sampling and world > 1:  # sharded forwards must run in lockstep on every rank
        raise ValueError("--dynamic-sampling with --fsdp: ranks may keep different numbers of groups, hence run "
                         "different numbers of sharded forwards; not supported (use it without --fsdp)")
    Pl = P // world                              # this rank's prompts per step; all G samples of each
    held = rewards.held_out(cfg.task, cfg.eval_n) if cfg.eval_n and not cfg.data else []

    # The cold start: the default init directory is built by sft.py the first time it is needed.
    if cfg.init != "scratch" and not os.path.isdir(cfg.init):
        if cfg.init != GRPOConfig.init:
            raise FileNotFoundError(f"--init {cfg.init!r} does not exist (use 'scratch' to start from --model)")
        print(f"no cold-start checkpoint at {cfg.init}: running sft.py first")
        if world > 1:
            raise FileNotFoundError(f"--init {cfg.init!r} does not exist: run sft.py (or torchrun sft.py) first")
        sft.main(sft.SFTConfig(model=cfg.model, task=cfg.task, out=cfg.init, device=cfg.device,
                               seed=cfg.seed, threads=cfg.threads, eval_n=cfg.eval_n,
                               kernels=cfg.kernels))
        seed_everything(cfg.seed)
    start = cfg.model if cfg.init == "scratch" else cfg.init
    where, dtype = dist.staging(device, cfg.fsdp)   # --fsdp: whole on the CPU, then sharded onto the device
    model, tok = load(start, where, dtype, seed=cfg.seed)
    prompts_src = Prompts(cfg, tok, held, names, context_length(model))  # JSONL is checked here, before training
    eval_rows = E.read_rows(cfg.eval_data, tok, cfg.max_prompt_length) if cfg.eval_data else []
    ref = None
    if cfg.beta != 0.0:  # a frozen copy of the starting policy; with beta = 0 none is kept
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if dist.is_main():
        lock_out(cfg.out)                        # one run at a time in OUT
    if cfg.resume:  # every check before the first write; the weights of the last checkpoint (whole: sharded below)
        st = load_state(cfg.out)
        check_resume(cfg, st.get("config"), RESUME_FIXED)
        prompts_src.load(st["data"])
        model.load_state_dict(load(cfg.out, where, dtype)[0].state_dict())
    if cfg.fsdp:  # the reference is sharded the same way (it is as large as the policy)
        model, ref = dist.shard_model(model, device), ref and dist.shard_model(ref, device)
    if dist.is_main():
        write_config(cfg, cfg.out)
    opt = torch.optim.AdamW(dist.param_groups(model), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    step, history = 0, []
    if cfg.resume:
        dist.resume_optimizer(model, opt, sched, st["optimizer"], st["scheduler"])
        step, history = st["step"], st["history"]
        set_rng_state(st["rng_by_rank"][rank] if len(st.get("rng_by_rank", ())) == world else st["rng"])
    model.train()

    def evaluate():
        if eval_rows:  # --eval-data: its rows, scored by the first reward function (the task's checker)
            with dist.gathered(model):
                acc = E.evaluate(model, tok, eval_rows, funcs[0], cfg.max_new_tokens)[0]["accuracy"]
        else:
            acc = sft.evaluate(model, tok, held, cfg.max_new_tokens)[0]
        history.append({"step": step, "held_out_accuracy": acc})
        return acc

    def checkpoint():  # rank 0 writes (the replicas are identical); every rank's RNG goes with it
        rngs = dist.gather_objects(rng_state())
        weights, optim = dist.model_state(model), dist.optimizer_state(model, opt)  # --fsdp: gathered, collective
        if dist.is_main():
            save(model, tok, cfg.out, {"optimizer": optim, "scheduler": sched.state_dict(), "step": step,
                                       "history": history, "data": prompts_src.state(), "rng": rngs[0],
                                       "rng_by_rank": rngs, "config": vars(cfg)}, weights)
        dist.barrier()

    evaluating = bool(held or eval_rows)
    if evaluating and step == 0:
        print(f"held-out greedy accuracy before GRPO: {evaluate():.3f}")
    if cfg.resume and dist.is_main():
        for name in ("metrics.jsonl", "samples.jsonl"):
            trim_log(os.path.join(cfg.out, name), step)
    logs = cfg.out if dist.is_main() else None   # only rank 0 writes
    mode = "a" if cfg.resume else "w"            # a fresh run starts its logs empty: OUT holds one run
    log = open(os.path.join(logs, "metrics.jsonl") if logs else os.devnull, mode)
    samples_log = open(os.path.join(logs, "samples.jsonl") if logs else os.devnull, mode)
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo", dynamic_ncols=True, disable=not dist.is_main())
    zero_std, warned = [], False   # frac_reward_zero_std of each step of this process: is there a signal?
    while step < cfg.steps:
        t0 = time.time()
        # ---- rollout + rewards (+ dynamic sampling) ---------------------------------------------
        kept, rounds, seen_groups = [], 0, 0
        fn_metrics = [{} for _ in funcs]  # counts a reward function reports (code_reward: timeouts, ...)
        while True:
            rows = dist.shard(prompts_src.take(P))                            # every rank draws the global
            prompts = [r["prompt"] for r in rows for _ in range(G)]           # each prompt G times, grouped
            ids = [encode_prompt(tok, p) for p in prompts]
            model.eval()
            with dist.gathered(model):  # --fsdp: whole weights while decoding (ranks stop at different steps)
                roll = generate(model, tok, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                engine=dist.rollout_engine(model, cfg.rollout_engine))
            model.train()
            comp_ids = [row[m.bool()].tolist() for row, m in zip(roll.completion_ids, roll.completion_mask)]
            texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
            columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in {k for r in rows for k in r} - {"prompt"}}
            columns["prompt_text"] = tok.batch_decode(ids)  # rendered: shows a <think> the template pre-fills
            per_fn, R = score(funcs, weights, prompts, texts, comp_ids, columns, device, fn_metrics, cfg.reward_timeout)
            rounds += 1
            seen_groups += Pl
            keep = torch.ones(Pl, dtype=torch.bool, device=device)
            if cfg.dynamic_sampling:  # DAPO: a group whose rewards are all equal has zero advantage
                keep = _nanstd(R.view(Pl, G)) > 0
            kept.append((roll, prompts, texts, per_fn, R, keep))
            # (all ranks decide together, so they stay on the same rows of the data stream)
            if not cfg.dynamic_sampling or dist.all_sum(sum(int(k[-1].sum()) for k in kept)) >= P \
                    or rounds > cfg.max_resample:
                break
        roll, prompts, texts, per_fn, R = merge_rounds(kept, Pl, G, tok.pad_token_id)
        mask_c, trunc = roll.completion_mask, roll.truncated                             # (B, C), (B,)
        t_rollout = time.time() - t0

        # Advantages from the global batch (--scale-rewards batch needs every rank's rewards); this
        # rank keeps its own rows. Normalisers are global too: see dist.py.
        R_all, offset = dist.gather_cat(R)
        adv = group_advantages(R_all, G, cfg.scale_rewards, rloo=cfg.advantage == "rloo")[offset:offset + len(R)]
        mask = mask_c.clone()                                                            # (B, C)
        if cfg.mask_truncated_completions:
            mask[trunc] = 0.0
        B, C = mask.shape
        B_all, num_tokens = int(dist.all_sum(B)), int(dist.all_sum(int(mask.sum())))

        # ---- pi_old and pi_ref log-probs, once, without grad --------------------------------------
        t1 = time.time()
        mbs = [slice(i, i + (cfg.micro_batch or B)) for i in range(0, B, cfg.micro_batch or B)]
        old_logp = ref_logp = None
        with torch.no_grad():
            if cfg.num_iterations > 1:
                old_logp = torch.cat([token_logprobs(model, roll.input_ids[s], roll.attention_mask[s], C,
                                                     cfg.temperature) for s in mbs])
            if ref is not None:
                ref_logp = torch.cat([token_logprobs(ref, roll.input_ids[s], roll.attention_mask[s], C,
                                                     cfg.temperature) for s in mbs])
        if roll.input_ids.is_cuda:
            torch.cuda.synchronize()  # CUDA runs asynchronously: wait, or the time lands in time/train
        t_logprobs = time.time() - t1

        # ---- num_iterations optimizer steps on the same batch -------------------------------------
        t2 = time.time()
        acc = {k: 0.0 for k in ("ratio", "kl", "clip_low", "clip_high", "entropy", "loss")}
        skipped = 0
        for _ in range(cfg.num_iterations):
            opt.zero_grad(set_to_none=True)
            for s in mbs:
                loss, st_, ent = micro_batch_loss(cfg, model, roll.input_ids[s], roll.attention_mask[s], C, adv[s],
                                                  mask[s], None if old_logp is None else old_logp[s],
                                                  None if ref_logp is None else ref_logp[s], B_all, num_tokens)
                loss.backward()
                m = mask[s]
                w = 1.0 / max(num_tokens, 1) / cfg.num_iterations               # token-mean over the batch
                acc["loss"] += loss.item() / cfg.num_iterations
                acc["entropy"] += float((ent.detach() * m).sum()) * w
                acc["ratio"] += float((st_["ratio"].detach() * m).sum()) * w
                acc["clip_low"] += float((st_["clip_low"] * m).sum()) * w
                acc["clip_high"] += float((st_["clip_high"] * m).sum()) * w
                if st_["kl"] is not None:
                    acc["kl"] += float((st_["kl"].detach() * m).sum()) * w
            dist.sync_grads(model)              # sum over ranks = the gradient of the global batch
            grad_norm = dist.clip_grad_norm_(model, cfg.grad_clip)
            if torch.isfinite(grad_norm):
                opt.step()
            else:  # a NaN/inf gradient would poison the weights: skip the update, keep going
                skipped += 1
            sched.step()
        t_train = time.time() - t2
        step += 1

        # ---- metrics (TRL names) -------------------------------------------------------------------
        acc = {k: dist.all_sum(v) for k, v in acc.items()}       # each rank holds its share of the sums
        R_rank, adv_rank = R, adv                                 # (rank 0's rows, for the samples log)
        R, per_fn, trunc, lengths = (dist.gather_cat(t)[0] for t in (R, per_fn, trunc, mask_c.sum(1)))
        grp = R.view(-1, G)
        metrics = {"step": step, "reward": float(R.nanmean()), "reward_std": float(_nanstd(grp).mean()),
                   **{f"rewards/{n}/mean": float(per_fn[:, i].nanmean()) for i, n in enumerate(names)},
                   **{f"rewards/{n}/std": float(_nanstd(per_fn[:, i][None])[0]) for i, n in enumerate(names)},
                   **{f"rewards/{n}/abstained": int(per_fn[:, i].isnan().sum()) for i, n in enumerate(names)},
                   "frac_reward_zero_std": float((_nanstd(grp) < 1e-8).float().mean()),
                   "completions/mean_length": float(lengths.mean()),
                   "completions/min_length": float(lengths.min()), "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": float(trunc.float().mean()),
                   "completions/mean_terminated_length": float(lengths[~trunc].mean()) if (~trunc).any() else 0.0,
                   "loss": acc["loss"], "entropy": acc["entropy"], "ratio": acc["ratio"],
                   "clip_ratio/low_mean": acc["clip_low"], "clip_ratio/high_mean": acc["clip_high"],
                   "clip_ratio/region_mean": acc["clip_low"] + acc["clip_high"],
                   "grad_norm": float(grad_norm), "skipped_steps": skipped, "learning_rate": sched.get_last_lr()[0],
                   "num_tokens": num_tokens, "step_time": time.time() - t0,
                   "time/rollout": t_rollout, "time/logprobs": t_logprobs, "time/train": t_train}
        metrics.update({f"rewards/{names[i]}/{k}": dist.all_sum(v)    # every rank has the same keys
                        for i, d in enumerate(fn_metrics) for k, v in sorted(d.items())})
        if cfg.beta != 0.0:
            metrics["kl"] = acc["kl"]
        if cfg.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = rounds
            metrics["dynamic_sampling/kept_frac"] = dist.all_sum(sum(int(k[-1].sum()) for k in kept)) / \
                dist.all_sum(seen_groups)
        if evaluating and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics["held_out_accuracy"] = evaluate()
        zero_std.append(metrics["frac_reward_zero_std"])
        warning = no_signal_warning(zero_std) if not warned else None
        if warning and dist.is_main():
            tqdm.write(warning, file=sys.stderr)
        warned = warned or warning is not None
        log.write(metrics_line(metrics))
        log.flush()
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", zero_std=f"{metrics['frac_reward_zero_std']:.2f}",
                        len=f"{metrics['completions/mean_length']:.1f}", ent=f"{metrics['entropy']:.2f}")
        bar.update(1)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and dist.is_main():
            for i in range(0, min(B, 2 * G), G):  # the first completion of the first two groups
                sample = {"step": step, "prompt": rewards._prompt_text(prompts[i]), "completion": texts[i],
                          "reward": float(R_rank[i]), "advantage": float(adv_rank[i])}
                samples_log.write(json.dumps(sample) + "\n")
                tqdm.write(f"[step {step}] {sample['prompt']!r} -> {sample['completion']!r} "
                           f"reward={sample['reward']:.2f}")
            samples_log.flush()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint()
    bar.close()
    summary = {}
    if evaluating:
        summary = sft.before_after(history, evaluate(), len(held) or len(eval_rows),
                                   cfg.task if held else cfg.eval_data, "GRPO")
    checkpoint()
    if dist.is_main():
        with open(os.path.join(cfg.out, "result.json"), "w") as f:
            json.dump(summary, f, indent=1)
    log.close()
    samples_log.close()
    if dist.is_main():
        print("curves:", plot.draw(cfg.out))   # OUT/curves.svg: every metric over the steps
    return model, tok, summary


def no_signal_warning(zero_std, window=5, level=0.95):
    """A sentence when, over the last `window` steps, at least `level` of the groups had identical rewards
    every step (frac_reward_zero_std): their advantages are 0, so GRPO learns (almost) nothing and would
    otherwise finish silently. None while there is signal."""
    if len(zero_std) < window or min(zero_std[-window:]) < level:
        return None
    return (f"warning: no learning signal: in each of the last {window} steps at least {level:.0%} of the groups "
            f"had identical rewards (frac_reward_zero_std {sum(zero_std[-window:]) / window:.2f}), so their "
            f"advantages are 0. The policy almost never solves these prompts (or always does). Try a cold start "
            f"(sft.py), a larger --num-generations, easier prompts, or a denser reward.")


def _nanstd(x):
    """Unbiased std of each row of x (R, G), ignoring NaN; 0 for rows with < 2 values."""
    valid = ~torch.isnan(x)
    n = valid.sum(1).float()
    x0 = torch.where(valid, x, torch.zeros_like(x))
    mean = x0.sum(1) / n.clamp(min=1)
    var = (((x0 - mean[:, None]) ** 2) * valid).sum(1) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def merge_rounds(kept, P, G, pad_id):
    """Join the rollout rounds of one step, keeping the groups marked `keep` (all of them without
    dynamic sampling), at most P groups. Completions of different rounds may differ in length:
    they are right-padded to the longest, prompts left-padded to the longest."""
    groups = []
    for roll, prompts, texts, per_fn, R, keep in kept:
        for g in torch.nonzero(keep).flatten().tolist():
            groups.append((roll, prompts, texts, per_fn, R, g))
    if not groups:  # nothing had signal in any round: train on the last round (zero advantages)
        roll, prompts, texts, per_fn, R, _ = kept[-1]
        groups = [(roll, prompts, texts, per_fn, R, g) for g in range(P)]
    groups = groups[:P]
    Pm = max(r.prompt_len for r, *_ in groups)
    Cm = max(r.completion_mask.shape[1] for r, *_ in groups)
    ids, attn, cmask, trunc, prompts_out, texts_out, fns, Rs = [], [], [], [], [], [], [], []
    for roll, prompts, texts, per_fn, R, g in groups:
        s = slice(g * G, (g + 1) * G)
        pl, cl = roll.prompt_len, roll.completion_mask.shape[1]
        pad = lambda t, left, right, v: torch.nn.functional.pad(t, (left, right), value=v)
        ids.append(pad(roll.input_ids[s], Pm - pl, Cm - cl, pad_id))
        attn.append(pad(roll.attention_mask[s], Pm - pl, Cm - cl, 0))
        cmask.append(pad(roll.completion_mask[s], 0, Cm - cl, 0.0))
        trunc.append(roll.truncated[s])
        prompts_out += prompts[s]
        texts_out += texts[s]
        fns.append(per_fn[s])
        Rs.append(R[s])
    merged = Rollout(torch.cat(ids), torch.cat(attn), torch.cat(cmask), None, torch.cat(trunc), Pm)
    return merged, prompts_out, texts_out, torch.cat(fns), torch.cat(Rs)


if __name__ == "__main__":
    main(parse_config(GRPOConfig))
