"""GRPO: reinforcement learning with verifiable rewards, after a cold-start SFT.

    python grpo.py                         # built-in: tiny model, cold start (sft.py) if needed, then GRPO, CPU
    python grpo.py --init scratch          # GRPO from the untrained model: the cold-start problem
    python grpo.py --model PATH --init PATH --data prompts.jsonl --device cuda --lr 1e-6 --out runs/qwen
    torchrun --nproc_per_node=8 grpo.py ...   # (multi-process: see README)

One step, the phases of main (P = --num-prompts, G = --num-generations, B = P*G rows, T = prompt width,
C = completion width <= --max-new-tokens, F = reward functions, V = vocabulary):

  prompts_src.take(P)           P rows {"prompt", columns...}, each repeated G times (groups consecutive)
    | 1. rollout()              sample_and_score: rollout.generate on the current policy, then rewards.call
    v                           per function; --dynamic-sampling repeats it and merge_rounds joins the rounds
  Batch.roll                    input_ids, attention_mask (B, T+C); completion_mask, loss_mask,
                                logprobs (B, C) (sampler's); truncated (B,)
  Batch.per_fn (B, F) -> rewards (B,) = sum_f w_f * r_f        (NaN: nobody scored that sample)
    | 2. advantages()           group_advantages over the global batch: (R - baseline_g) / (std_g + eps)
    v
  Batch.advantages (B,)
    | 3. fixed_logprobs()       no grad: old_logp (B, C) if --num-iterations > 1, ref_logp (B, C) if --beta
    v
    | 4. update()               per micro-batch: token_logprobs (b, C) [hidden (b, C, H) @ lm_head, never
    |                           (B, C, V) at once] -> per_token_loss (b, C) -> aggregate (a scalar, the
    |                           micro-batch's share of the batch loss) -> backward; then optimizer_step
    v                           (sum over ranks, clip, AdamW; skipped if non-finite) x num_iterations
  5. step_metrics -> metrics.jsonl (TRL names); held-out eval every --eval-every; samples.jsonl
  6. checkpoint every --save-every (lifecycle.checkpoint)

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
7. --mode-prefixes "[Easy]|[Hard]" with --rollout-correction tis: AdaptThink's importance sampling, every
   group holds each mode G/k times, forced, reweighted to the policy (mode_prefixes).

Why the loss is ~0 on-policy. With --num-iterations 1 the policy that sampled the batch is the
policy being trained, so rho = pi_theta / pi_old = 1 exactly (old log-probs are the detached
current ones), clipping never fires, and the loss value is sum(-A * 1 * mask) / norm. The advantages
of each group are centred (they sum to ~0), so the loss is ~0 (exactly 0 with loss-type grpo and
equal lengths). Its gradient is not zero: d rho / d theta = grad log pi, so the update is
REINFORCE with the group mean as baseline. Watch reward, not loss; ratio and clip_ratio/* are logged
so you can see when the trust region is actually doing something (num_iterations > 1).
"""
import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import dist
import evaluate as E
import kernels
import lifecycle as run
import rewards
import sft
import tools
from data import TRUNCATION, DataError, ShuffledCycle, TooLong, check_data_text, check_text_or_messages, \
    encode_prompt, read_jsonl
from lifecycle import ConfigError
from model import completion_hidden, context_length, token_logprobs
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
    length_schedule: str = ""      # "STEP:TOKENS,...": completion limit from each step on, widened as RL goes
                                   # (Vision-R1's PTST), each <= --max-new-tokens; empty = --max-new-tokens
    max_prompt_length: int = 512
    truncation: str = "error"      # a --data prompt over --max-prompt-length: error | skip (counted); never cut
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mode_prefixes: str = ""        # "A|B": a group's completions open with these, forced, in equal shares, each
                                   # reweighted to the policy (AdaptThink's importance sampling; mode_prefixes())
    rollout_engine: str = "auto"   # rollout.py: auto (CUDA graph on a GPU, simple loop on CPU) | simple | static | graph
    tools: str = ""                # a tool the model may call while it reasons (tools.py): calculator | python |
                                   # module:function; empty = none (the built-in calc task wants calculator)
    tool_format: str = "<c>,</c>,<o>,</o>"  # call start, call end, output start, output end
    max_tool_calls: int = 4        # per completion
    tool_timeout: float = 5.0      # seconds per call
    max_tool_output_tokens: int = 24  # per call, delimiters included; longer outputs are cut
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
    loss_type: str = "dapo"        # grpo | dapo | dr_grpo | cispo | sapo (see the README's name map)
    epsilon_low: float = 0.2       # DAPO clip-higher: eps_low 0.2,
    epsilon_high: float = 0.28     # eps_high 0.28
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    sapo_temperature_pos: float = 1.0   # SAPO's gate temperature for tokens with a positive advantage
    sapo_temperature_neg: float = 1.05  # and for the others (TRL's defaults)
    rollout_correction: str = "none"    # sampler/trainer mismatch: none | tis (truncated IS) | mis (masked IS)
    rollout_correction_level: str = "token"  # token | sequence (one weight per completion)
    rollout_correction_cap: float = 2.0      # C: tis weights min(w, C); mis drops tokens/sequences with w > C
    off_policy_mask_threshold: float = 0.0   # > 0: drop sequences with A < 0 whose mean log(pi_sampler /
                                             # pi_theta) exceeds it (DeepSeek-V3.2's off-policy masking)
    top_entropy_quantile: float = 1.0   # < 1: policy gradient on the top q share of tokens by entropy only
    entropy_coef: float = 0.0           # > 0: subtract coef * the token-mean entropy from the loss
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
    eval_samples: int = 0          # k > 0: also pass@k and mean@k from k samples per prompt at --temperature
    sample_every: int = 10         # print and log a few completions every N steps
    save_every: int = 25
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int = 2
    kernels: str = "auto"          # auto = Triton kernels on CUDA (kernels/), PyTorch elsewhere | off
    lora_rank: int = 0             # r > 0: train LoRA adapters of rank r on the decoder's linear layers only (Hu et al. 2021)
    lora_alpha: float = 32.0       # LoRA scale alpha / r; LoRA wants a ~10x larger --lr than full fine-tuning
    fsdp: bool = False             # torchrun: shard weights, grads, AdamW state (FSDP2, Zhao et al. 2023; dist.py)


# What a checkpoint was made with: --resume refuses to change these (lifecycle.check_resume); any other
# flag may change (e.g. --steps to extend a run, --lr, --beta) and is applied from the saved step on.
RESUME_FIXED = ("model", "init", "data", "task", "num_prompts", "num_generations", "max_prompt_length", "truncation",
                "eval_n", "eval_data", "seed", "fsdp", "lora_rank", "lora_alpha")


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
        (schedule_problem(cfg) is None, schedule_problem(cfg)),
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
        *tools.checks(cfg),
        one_of("advantage", cfg.advantage, ESTIMATORS),
        one_of("scale-rewards", cfg.scale_rewards, ("group", "batch", "none")),
        one_of("loss-type", cfg.loss_type, LOSS_TYPES),
        (cfg.sapo_temperature_pos > 0 and cfg.sapo_temperature_neg > 0, "--sapo-temperature-pos/-neg must be > 0"),
        one_of("rollout-correction", cfg.rollout_correction, ("none", "tis", "mis")),
        one_of("rollout-correction-level", cfg.rollout_correction_level, ("token", "sequence")),
        (cfg.rollout_correction_cap >= 1, f"--rollout-correction-cap must be >= 1, got {cfg.rollout_correction_cap}"),
        (cfg.off_policy_mask_threshold >= 0, f"--off-policy-mask-threshold must be >= 0 (0 = off), "
                                             f"got {cfg.off_policy_mask_threshold}"),
        (0 < cfg.top_entropy_quantile <= 1, f"--top-entropy-quantile must be in (0, 1], got {cfg.top_entropy_quantile}"),
        (cfg.entropy_coef >= 0, f"--entropy-coef must be >= 0, got {cfg.entropy_coef}"),
        (cfg.loss_type not in ("cispo", "sapo") or cfg.importance_sampling_level == "token",
         f"--loss-type {cfg.loss_type} is token-level: use it with --importance-sampling-level token"),
        (0 <= cfg.epsilon_low < 1, f"--epsilon-low must be in [0, 1), got {cfg.epsilon_low}"),
        (cfg.epsilon_high >= 0, f"--epsilon-high must be >= 0, got {cfg.epsilon_high}"),
        one_of("importance-sampling-level", cfg.importance_sampling_level, ("token", "sequence")),
        (cfg.num_iterations >= 1, f"--num-iterations must be >= 1, got {cfg.num_iterations}"),
        (cfg.beta >= 0, f"--beta must be >= 0, got {cfg.beta}"),
        one_of("kl-estimator", cfg.kl_estimator, ("k1", "k2", "k3")),
        *mode_prefix_checks(cfg),
        (cfg.max_resample >= 0, f"--max-resample must be >= 0, got {cfg.max_resample}"),
        (0 <= cfg.overlong_cache <= cfg.max_new_tokens,
         f"--overlong-cache must be in [0, --max-new-tokens {cfg.max_new_tokens}], got {cfg.overlong_cache}"),
        (cfg.micro_batch >= 0, f"--micro-batch must be >= 0 (0 = the whole batch), got {cfg.micro_batch}"),
        *[(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
          for k in ("eval_n", "eval_every", "eval_samples", "sample_every", "save_every")],
        (cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        one_of("kernels", cfg.kernels, kernels.MODES),
        (bool(cfg.data) or cfg.task in rewards.TASKS, f"--task must be one of {', '.join(rewards.TASKS)}, got {cfg.task!r}"),
    ]


# -----------------------------------------------------------------------------
# Rewards

def resolve_reward_funcs(cfg):
    """--reward-funcs (rewards.resolve: names, name(key=value), module:function) and --reward-weights.
    Empty: the task's checker + format; --overlong-cache adds DAPO's soft_overlong."""
    spec = cfg.reward_funcs or ("countdown" if cfg.task == "countdown" and not cfg.data else "accuracy") + (
        "" if cfg.task in ("calc", "adapt") and not cfg.data else ",format")   # their traces are not <think><answer>
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


# -----------------------------------------------------------------------------
# Prompts: the built-in task stream, or JSONL rows

# The columns the built-in rewards read from a JSONL row, and their JSON types (None: that row abstains).
REWARD_COLUMNS = {"accuracy": {"answer": (str, int, float)},
                  "countdown": {"numbers": (list,), "target": (int, float)}}


class Prompts:
    """The prompt rows of each step: the built-in task's stream, or a --data file's rows (checked here:
    text, reward columns, and length: prompt + --max-new-tokens within the model's context)."""

    def __init__(self, cfg, tok, names=(), context=None):
        self.builtin = not cfg.data
        if self.builtin:  # never a held-out problem (rewards.held_out)
            self.stream = rewards.ProblemStream(cfg.task, seed=cfg.seed + 1,
                                                exclude=rewards.held_out(cfg.task, cfg.eval_n) if cfg.eval_n else [])
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
# Phase 1, rollout: sample G completions per prompt and score them (+ dynamic sampling)

@dataclass
class Batch:
    """One step's rollouts on this rank and what the phases add to them. Rows: each of the step's
    prompts G times, grouped (row g*G + j is sample j of prompt g)."""
    roll: Rollout                   # ids, attention / completion / loss masks, sampling log-probs (rollout.py)
    prompts: list                   # B prompts, as the data gave them
    texts: list                     # B decoded completions
    per_fn: torch.Tensor            # (B, F) each reward function's value, NaN where it abstained
    rewards: torch.Tensor           # (B,) their weighted sum, NaN where every function abstained
    keep: torch.Tensor = None       # (B/G,) bool: groups dynamic sampling keeps (all without it)
    advantages: torch.Tensor = None  # (B,)                      phase 2
    old_logp: torch.Tensor = None   # (B, C) pi_old, fixed       phase 3 (num_iterations > 1)
    ref_logp: torch.Tensor = None   # (B, C) pi_ref, fixed       phase 3 (beta > 0)
    entropy_mask: torch.Tensor = None  # (B, C) 1 on high-entropy tokens  phase 3 (--top-entropy-quantile < 1)
    columns: dict = None            # the rows' columns, B values each (answer, difficulty, ...) for the metrics


def completion_limit(cfg, step):
    """The completion limit of a step (0-based): the last --length-schedule entry at or before it, else
    --max-new-tokens. A function of the step alone, so --resume continues the schedule where it was."""
    limit = cfg.max_new_tokens
    for at, tokens in parse_schedule(cfg.length_schedule):
        if at <= step:
            limit = tokens
    return limit


def parse_schedule(spec):
    """"0:16,20:32" -> [(0, 16), (20, 32)]; ValueError on anything else."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        at, sep, tokens = item.partition(":")
        if not sep or not at.strip().isdigit() or not tokens.strip().isdigit():
            raise ValueError(f"--length-schedule entry {item!r} is not STEP:TOKENS")
        out.append((int(at), int(tokens)))
    return out


def schedule_problem(cfg):
    try:
        sched = parse_schedule(cfg.length_schedule)
    except ValueError as e:
        return str(e)
    if [a for a, _ in sched] != sorted({a for a, _ in sched}):
        return "--length-schedule steps must increase"
    if any(not 1 <= t <= cfg.max_new_tokens for _, t in sched):
        return f"--length-schedule limits must be in [1, --max-new-tokens {cfg.max_new_tokens}]"
    return None


def mode_prefix_checks(cfg):
    k = len(cfg.mode_prefixes.split("|")) if cfg.mode_prefixes else 0
    return [] if not k else [
        (k >= 2 and all(cfg.mode_prefixes.split("|")), f"--mode-prefixes wants two or more non-empty prefixes "
                                                       f"separated by |, got {cfg.mode_prefixes!r}"),
        (cfg.num_generations % k == 0, f"--mode-prefixes: --num-generations {cfg.num_generations} must be a "
                                       f"multiple of the {k} prefixes (equal shares in every group)"),
        (cfg.rollout_correction != "none", "--mode-prefixes forces tokens the policy did not sample: use it with "
                                           "--rollout-correction tis, which reweights them to the policy"),
        (cfg.rollout_correction_cap >= k, f"--mode-prefixes: the weights of forced tokens reach {k}; "
                                          f"--rollout-correction-cap must be >= {k}")]


def mode_prefixes(cfg, tok):
    """--mode-prefixes -> [(ids, log-probs)] per prefix, or None. AdaptThink's importance sampling (Zhang et
    al. 2025, 2505.13417): an on-policy model that never skips thinking never samples the NoThinking mode,
    so it can never learn that the mode pays. Sample j of a group opens with prefix j mod k instead, so
    every group holds each mode G/k times, and the behaviour policy of those tokens is the uniform mixture
    pi_IS: at each token of prefix p, the share of the prefixes that agree with p so far among those that
    agreed one token earlier (1/k at the token where k distinct prefixes part, 1 before and after). Those
    log pi_IS are the sampler's log-probs, so --rollout-correction tis weighs the token where they part by
    pi_theta / pi_IS (<= k), the IS gradient of AdaptThink's loss (unclipped: the weight is detached); the
    forced tokens pi_IS was certain of stay out of the loss (rollout.generate says why).
    The prefixes must have the same number of tokens (rollout.opened's layout). mismatch/* count the forced
    tokens too (their sampler log-prob is pi_IS's, not the policy's)."""
    if not cfg.mode_prefixes:
        return None
    ids = [tok(p, add_special_tokens=False).input_ids for p in cfg.mode_prefixes.split("|")]
    shortest_limit = min([cfg.max_new_tokens, *(t for _, t in parse_schedule(cfg.length_schedule))])
    if len({len(i) for i in ids}) != 1 or shortest_limit <= len(ids[0]):
        raise ConfigError(f"--mode-prefixes {cfg.mode_prefixes!r}: the prefixes must have the same number of "
                          f"tokens, fewer than every completion limit; they have {[len(i) for i in ids]}")
    agree = lambda p, t: sum(q[:t] == p[:t] for q in ids)         # prefixes equal to p on its first t tokens
    return [(p, [math.log(agree(p, t + 1) / agree(p, t)) for t in range(len(p))]) for p in ids]


def sample_and_score(cfg, model, tok, rows, funcs, weights, fn_metrics, limit, tool=None):
    """G completions (at most `limit` tokens) for each row's prompt from the current policy, scored by
    every reward function."""
    G = cfg.num_generations
    prompts = [r["prompt"] for r in rows for _ in range(G)]           # each prompt G times, grouped
    ids = [encode_prompt(tok, p) for p in prompts]
    modes = mode_prefixes(cfg, tok)
    model.eval()
    with dist.gathered(model):  # --fsdp: whole weights while decoding (ranks stop at different steps)
        roll = generate(model, tok, ids, limit, cfg.temperature, cfg.top_k, cfg.top_p,
                        engine=dist.rollout_engine(model, cfg.rollout_engine), tools=tool,
                        prefixes=modes and [modes[i % G % len(modes)] for i in range(len(ids))])
    model.train()
    comp_ids = [row[m.bool()].tolist() for row, m in zip(roll.completion_ids, roll.completion_mask)]
    texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
    # every column of the rows goes to the reward functions by name (TRL), and what grpo.py adds:
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in {k for r in rows for k in r} - {"prompt"}}
    columns["prompt_text"] = tok.batch_decode(ids)  # rendered: shows a <think> the template pre-fills
    columns.setdefault("group", [i // G for i in range(len(prompts))])  # which samples share a prompt
    per_fn, R = score(funcs, weights, prompts, texts, comp_ids, columns, roll.input_ids.device, fn_metrics,
                      cfg.reward_timeout)
    keep = torch.ones(len(rows), dtype=torch.bool, device=R.device)
    if cfg.dynamic_sampling:  # DAPO: a group whose rewards are all equal has zero advantage
        keep = _nanstd(R.view(len(rows), G)) > 0
    return Batch(roll, prompts, texts, per_fn, R, keep, columns=columns)


def rollout(cfg, model, tok, prompts_src, funcs, weights, step, tool=None):
    """This rank's batch of the step, and the round counts. Without --dynamic-sampling one round; with
    it, rounds until num_prompts groups (over all ranks) have a reward spread, or max_resample extra
    rounds are spent (all ranks decide together, so they stay on the same rows of the data stream)."""
    rounds, fn_metrics = [], [{} for _ in funcs]   # fn_metrics: counts a reward reports (code: timeouts, ...)
    kept = lambda: dist.all_sum(sum(int(r.keep.sum()) for r in rounds))
    while True:
        rows = dist.shard(prompts_src.take(cfg.num_prompts))          # every rank draws the global batch
        rounds.append(sample_and_score(cfg, model, tok, rows, funcs, weights, fn_metrics, completion_limit(cfg, step),
                                       tool))
        if not cfg.dynamic_sampling or kept() >= cfg.num_prompts or len(rounds) > cfg.max_resample:
            break
    info = {"fn_metrics": fn_metrics}
    if cfg.length_schedule:
        info["completions/max_new_tokens"] = completion_limit(cfg, step)
    if cfg.dynamic_sampling:
        info = {**info, "dynamic_sampling/rounds": len(rounds),
                "dynamic_sampling/kept_frac": kept() / dist.all_sum(len(rows) * len(rounds))}
    batch = merge_rounds(rounds, len(rows), cfg.num_generations, tok.pad_token_id)
    if cfg.mask_truncated_completions:  # DAPO overlong filtering: no loss on completions that never ended
        batch.roll.loss_mask[batch.roll.truncated] = 0.0
    return batch, info


def merge_rounds(rounds, P, G, pad_id):
    """Join the rollout rounds of one step, keeping the groups marked `keep`, at most P groups (the
    last round whole when no round kept any: zero advantages, nothing learned, nothing lost). Rows of
    different rounds may differ in width: completions are right-padded to the longest, prompts
    left-padded to the longest; the sampling log-probs and both masks travel with their rows."""
    groups = [(b, g) for b in rounds for g in torch.nonzero(b.keep).flatten().tolist()]
    if not groups:
        groups = [(rounds[-1], g) for g in range(P)]
    groups = groups[:P]
    Pm = max(b.roll.prompt_len for b, _ in groups)
    Cm = max(b.roll.completion_mask.shape[1] for b, _ in groups)
    pad = lambda t, left, right, v: torch.nn.functional.pad(t, (left, right), value=v)
    parts = {k: [] for k in ("ids", "attn", "cmask", "lmask", "logp", "trunc", "per_fn", "R")}
    prompts, texts, columns = [], [], {k: [] for k in groups[0][0].columns or {}}
    for b, g in groups:
        s, r = slice(g * G, (g + 1) * G), b.roll
        pl, cl = r.prompt_len, r.completion_mask.shape[1]
        parts["ids"].append(pad(r.input_ids[s], Pm - pl, Cm - cl, pad_id))
        parts["attn"].append(pad(r.attention_mask[s], Pm - pl, Cm - cl, 0))
        for key, t in (("cmask", r.completion_mask), ("lmask", r.loss_mask), ("logp", r.logprobs)):
            parts[key].append(pad(t[s], 0, Cm - cl, 0.0))
        parts["trunc"].append(r.truncated[s])
        parts["per_fn"].append(b.per_fn[s])
        parts["R"].append(b.rewards[s])
        prompts += b.prompts[s]
        texts += b.texts[s]
        for k in columns:
            columns[k] += b.columns[k][s]
    cat = {k: torch.cat(v) for k, v in parts.items()}
    stats = None
    if groups[0][0].roll.tool_stats is not None:
        stats = {k: torch.cat([b.roll.tool_stats[k][g * G:(g + 1) * G] for b, g in groups])
                 for k in groups[0][0].roll.tool_stats}
    roll = Rollout(cat["ids"], cat["attn"], cat["cmask"], cat["logp"], cat["trunc"], Pm, cat["lmask"], stats)
    return Batch(roll, prompts, texts, cat["per_fn"], cat["R"], torch.ones(len(groups), dtype=torch.bool),
                 columns=columns)


# -----------------------------------------------------------------------------
# Phase 2: group-relative advantages

def advantages(cfg, R):
    """Phase 2: advantages from the rewards of the global batch (--scale-rewards batch needs every rank's
    rewards); this rank keeps its own rows. R (B,) -> (B,)."""
    R_all, offset = dist.gather_cat(R)
    return group_advantages(R_all, cfg.num_generations, cfg.scale_rewards, cfg.advantage)[offset:offset + len(R)]


def group_advantages(rewards_, G, scale="group", estimator="grpo", eps=1e-4):
    """rewards (P*G,) grouped consecutively -> advantages (P*G,). NaN rewards (no scorable reward)
    get advantage 0 and are left out of their group's statistics. Std is the unbiased (n-1) one,
    as in TRL and verl; a group with fewer than 2 scored samples has nothing to compare: advantage 0.
    On CUDA (--kernels auto) one Triton launch computes the estimators it knows (grpo, rloo;
    kernels/advantage.py); any other runs here in PyTorch, on any device.

    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 4, "none")      # centred: R - mean
    tensor([ 0.5000, -0.5000, -0.5000,  0.5000])
    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 4, "none", "rloo")  # R - mean of the others
    tensor([ 0.6667, -0.6667, -0.6667,  0.6667])"""
    if kernels.active(rewards_) and estimator in ("grpo", "rloo"):
        from kernels.advantage import group_advantages_triton
        return group_advantages_triton(rewards_, G, scale, estimator == "rloo", eps)
    return group_advantages_torch(rewards_, G, scale, estimator, eps)


ESTIMATORS = ("grpo", "rloo")   # --advantage: the baseline each sample's reward is compared with


def group_advantages_torch(rewards_, G, scale="group", estimator="grpo", eps=1e-4):
    """group_advantages in PyTorch: the specification the kernel is tested against."""
    r = rewards_.view(-1, G)                                      # (P, G)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).float()                        # (P, 1)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    total = r0.sum(1, keepdim=True)
    mean = total / n.clamp(min=1)
    if estimator == "rloo":  # baseline = mean of the other samples of the group (Ahmadian et al. 2024)
        adv = r0 - (total - r0) / (n - 1).clamp(min=1)
    elif estimator == "grpo":  # baseline = the group mean (DeepSeekMath)
        adv = r0 - mean
    else:
        raise ValueError(f"advantage estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
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


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo", "sapo")


def per_token_loss(logp, old_logp, advantages, mask, eps_low, eps_high, level="token",
                   ref_logp=None, beta=0.0, kl_estimator="k3", loss_type="dapo", weights=None,
                   sapo_temperatures=(1.0, 1.05)):
    """The policy loss per token (+ beta * KL). logp, old_logp, ref_logp, mask (B, C); advantages (B,).
    Returns the loss per token (B, C) and the per-token tensors the metrics need. By loss_type:
      grpo, dapo, dr_grpo  the clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
                           (PPO; they differ in aggregate)
      cispo  -sg(min(rho, 1 + eps_high)) A log pi (MiniMax-M1, 2506.13585): the IS weight is clipped and
             detached, so a clipped token still gets the REINFORCE gradient A grad log pi, scaled
      sapo   -(4 / tau) sigmoid(tau (rho - 1)) A, tau = sapo_temperatures[0] where A > 0 else [1]
             (SAPO, 2511.20347): a soft gate that fades the gradient smoothly instead of cutting it;
             at rho = 1 its gradient equals the surrogate's
    weights (B, C) or (B, 1), detached: multiply the policy loss per token (rollout correction, off-policy
    and entropy masks); None = 1. The KL term is added after, unweighted (TRL)."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)                       # verl's clamp: no exp overflow
    if level == "sequence":  # GSPO: s_i = exp(mean_t log rho_it), one ratio for the whole sequence
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")
    ratio = torch.exp(log_ratio)                                           # (B, C)
    A = advantages[:, None]                                                # (B, 1)
    clip_low = ((ratio < 1 - eps_low) & (A < 0)).float()                   # where clipping bites below
    clip_high = ((ratio > 1 + eps_high) & (A > 0)).float()                 # and above
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=1 + eps_high).detach() * A * logp
        clip_low = torch.zeros_like(clip_low)                              # no lower bound (MiniMax-M1)
    elif loss_type == "sapo":
        tau = torch.where(A > 0, sapo_temperatures[0], sapo_temperatures[1])
        loss = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * A
    elif loss_type in ("grpo", "dapo", "dr_grpo"):
        objective = torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
        loss = -objective
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if weights is not None:
        loss = loss * weights
    kl = None
    if beta != 0.0:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        loss = loss + beta * kl
    return loss, {"ratio": ratio, "kl": kl, "clip_low": clip_low, "clip_high": clip_high}


def rollout_correction_weights(trainer_logp, sampler_logp, mask, mode, level="token", cap=2.0):
    """Importance weights w = pi_trainer / pi_sampler of the sampled tokens, both at the rollout's weights
    (they differ by kernels, precision, caches: "Your efficient RL framework secretly brings you
    off-policy RL training", Yao et al. 2025), detached. trainer_logp, sampler_logp, mask (B, C) ->
    (B, C) at token level, (B, 1) at sequence level (w = exp(sum_t log w_t), the ratio of the
    sequence probabilities, as TRL and verl). tis: min(w, cap) (truncated IS); mis: w, and 0 where
    w > cap (masked IS: such tokens / sequences are dropped). With equal log-probs w = 1 exactly."""
    d = ((trainer_logp - sampler_logp) * mask).detach()                     # (B, C), 0 off the mask
    log_w = d.sum(1, keepdim=True) if level == "sequence" else d
    w = torch.exp(log_w.clamp(max=20.0))
    if mode == "tis":
        return torch.clamp(w, max=cap)
    if mode == "mis":
        return torch.where(w > cap, torch.zeros_like(w), w)
    raise ValueError(f"rollout correction must be tis or mis, got {mode!r}")


def off_policy_sequence_mask(logp, sampler_logp, advantages, mask, threshold):
    """DeepSeek-V3.2 (2512.02556, eq. 9), TRL's off_policy_mask_threshold: keep a sequence when A >= 0 or
    its mean log(pi_sampler / pi_theta) <= threshold; drop it (0) otherwise: negative samples the
    current policy has drifted far from teach little and destabilise. (B, C), (B,) -> (B, 1) float."""
    kl = ((sampler_logp - logp.detach()) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    return ((advantages[:, None] >= 0) | (kl <= threshold)).to(mask.dtype)


def high_entropy_mask(entropy, mask, quantile):
    """"Beyond the 80/20 rule" (Wang et al. 2025, 2506.01939), TRL's top_entropy_quantile: 1 on the tokens
    whose entropy is in the top `quantile` share of the batch's tokens (entropy >= the (1 - quantile)
    quantile over every rank's masked tokens), 0 elsewhere. entropy, mask (B, C) -> (B, C) float."""
    valid, _ = dist.gather_cat(entropy[mask.bool()].float())
    if valid.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(valid, 1 - quantile)
    return ((entropy >= threshold) & mask.bool()).to(mask.dtype)


MISMATCH_THRESHOLD = 0.1   # |log pi_trainer - log pi_sampler| above this counts a token as mismatched


def mismatch_stats(trainer_logp, sampler_logp, mask):
    """Per token: the k3 estimate of KL(pi_sampler || pi_trainer) from the sampler's samples,
    exp(x) - 1 - x with x = log pi_trainer - log pi_sampler (>= 0; Schulman 2020), and |x|. (B, C) each."""
    x = ((trainer_logp - sampler_logp) * mask).detach()
    return torch.expm1(x) - x, x.abs()


def aggregate(loss_tok, mask, loss_type, num_seqs, num_tokens, max_len):
    """Reduce per-token losses (B, C) of one micro-batch to its share of the batch loss. The
    normalisers (num_seqs, num_tokens: of the whole batch) make the micro-batch shares add up to
    exactly the full-batch loss. cispo aggregates as dapo, sapo as grpo (TRL)."""
    if loss_type in ("grpo", "sapo"):     # (1/B) sum_i (1/L_i) sum_t m*l
        return ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if loss_type in ("dapo", "cispo"):    # sum_it m*l / sum_i L_i
        return (loss_tok * mask).sum() / max(num_tokens, 1)
    if loss_type == "dr_grpo":            # sum_it m*l / (B * L_max)
        return (loss_tok * mask).sum() / (num_seqs * max_len)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def micro_batch_loss(cfg, model, batch, s, num_seqs, num_tokens):
    """Rows s of the batch: their share of the batch loss, the per-token statistics (per_token_loss's,
    plus the sampler/trainer mismatch) and the entropy (b, C). On CUDA with --kernels auto, the
    token-level ratio and none of the switches that need whole sequences or the entropy first, the fused
    loss head computes the gradient for the hidden states and the lm_head during the forward
    (kernels/loss_head.py); otherwise token log-probs -> weights -> per_token_loss -> aggregate.
    old_logp None = on-policy (rho == 1)."""
    roll = batch.roll
    input_ids, attention_mask, mask, adv = roll.input_ids[s], roll.attention_mask[s], roll.loss_mask[s], batch.advantages[s]
    old_logp, ref_logp, sampler = (None if t is None else t[s] for t in (batch.old_logp, batch.ref_logp, roll.logprobs))
    C = mask.shape[1]
    reduce = lambda lt: aggregate(lt, mask, cfg.loss_type, num_seqs, num_tokens, cfg.max_new_tokens)
    loss_args = dict(level=cfg.importance_sampling_level, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                     loss_type=cfg.loss_type, sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg))
    plain = (cfg.rollout_correction == "none" and not cfg.off_policy_mask_threshold and cfg.entropy_coef == 0
             and batch.entropy_mask is None)
    if kernels.active(input_ids) and cfg.importance_sampling_level == "token" and plain:
        from kernels.loss_head import fused_loss_head
        A = adv[:, None].expand_as(mask).reshape(-1)                          # (b*C,) flattened rows
        old_f, ref_f = (None if t is None else t.reshape(-1) for t in (old_logp, ref_logp))

        def per_token(lp, rows):  # the token-level loss of rows `rows`, elementwise in lp (n,)
            old = lp.detach() if old_f is None else old_f[rows]
            return per_token_loss(lp[:, None], old[:, None], A[rows], None, cfg.epsilon_low, cfg.epsilon_high,
                                  ref_logp=None if ref_f is None else ref_f[rows, None],
                                  **{**loss_args, "level": "token"})[0][:, 0]
        hidden, head, targets = completion_hidden(model, input_ids, attention_mask, C)
        loss, logp, ent = fused_loss_head(hidden, head.weight, targets, per_token, reduce, cfg.temperature,
                                          bias=head.bias, scale=head.scale, softcap=head.softcap)
        _, st = per_token_loss(logp, logp if old_logp is None else old_logp, adv, mask, cfg.epsilon_low,
                               cfg.epsilon_high, ref_logp=ref_logp, **loss_args)  # statistics
    else:
        logp, ent = token_logprobs(model, input_ids, attention_mask, C, cfg.temperature, entropy=True)
        old = old_logp if old_logp is not None else logp.detach()   # on-policy: rho == 1
        weights = token_weights(cfg, old, logp, sampler, adv, mask, None if batch.entropy_mask is None
                                else batch.entropy_mask[s])
        lt, st = per_token_loss(logp, old, adv, mask, cfg.epsilon_low, cfg.epsilon_high, ref_logp=ref_logp,
                                weights=weights, **loss_args)
        loss = reduce(lt)
        if cfg.entropy_coef:  # an entropy bonus: the token mean over the global batch, for every loss type
            loss = loss - cfg.entropy_coef * (ent * mask).sum() / max(num_tokens, 1)
        st["weight"] = weights
    # the sampler against the trainer, both at the rollout's weights (pi_old, or this pass when on-policy)
    st["mismatch_k3"], st["mismatch_abs"] = mismatch_stats(logp.detach() if old_logp is None else old_logp,
                                                           sampler, mask)
    return loss, st, ent


def token_weights(cfg, trainer_logp, logp, sampler_logp, adv, mask, entropy_mask=None):
    """The detached per-token multipliers of the policy loss (B, C) or (B, 1), or None when all are 1:
    the rollout correction (from the trainer's log-probs at the rollout's weights against the sampler's),
    the off-policy sequence mask (against the current policy) and the high-entropy token mask."""
    w = None
    if cfg.rollout_correction != "none":
        w = rollout_correction_weights(trainer_logp, sampler_logp, mask, cfg.rollout_correction,
                                       cfg.rollout_correction_level, cfg.rollout_correction_cap)
    if cfg.off_policy_mask_threshold:
        keep = off_policy_sequence_mask(logp, sampler_logp, adv, mask, cfg.off_policy_mask_threshold)
        w = keep if w is None else w * keep
    if entropy_mask is not None:
        w = entropy_mask if w is None else w * entropy_mask
    return w


# -----------------------------------------------------------------------------
# Phase 3: the log-probs that stay fixed during the update, once, without grad

@torch.no_grad()
def fixed_logprobs(cfg, model, ref, batch):
    """pi_old (only with num_iterations > 1: on-policy it is the update's own log-prob, detached), pi_ref
    (only with beta > 0), (B, C) each or None, and the high-entropy token mask (B, C) or None
    (--top-entropy-quantile < 1), computed micro-batch by micro-batch."""
    roll, C = batch.roll, batch.roll.loss_mask.shape[1]
    logp = lambda m: torch.cat([token_logprobs(m, roll.input_ids[s], roll.attention_mask[s], C, cfg.temperature)
                                for s in micro_batches(cfg, len(batch.prompts))])
    old = logp(model) if cfg.num_iterations > 1 else None
    ref_logp = logp(ref) if ref is not None else None
    entropy_mask = None
    if cfg.top_entropy_quantile < 1:  # the tokens to learn from, chosen once for the step at the rollout's weights
        ent = torch.cat([token_logprobs(model, roll.input_ids[s], roll.attention_mask[s], C, cfg.temperature,
                                        entropy=True)[1] for s in micro_batches(cfg, len(batch.prompts))])
        entropy_mask = high_entropy_mask(ent, roll.loss_mask, cfg.top_entropy_quantile)
    if roll.input_ids.is_cuda:
        torch.cuda.synchronize()  # CUDA runs asynchronously: wait, or the time lands in time/train
    return old, ref_logp, entropy_mask


def micro_batches(cfg, B):
    """Row slices of at most --micro-batch rows (0: the whole batch); gradients accumulate over them."""
    n = cfg.micro_batch or B
    return [slice(i, i + n) for i in range(0, B, n)]


# -----------------------------------------------------------------------------
# Phase 4: num_iterations optimizer steps on the batch

def update(cfg, model, opt, sched, batch):
    """num_iterations optimizer steps on the same batch. The loss normalisers are those of the global
    batch (num_seqs, num_tokens: summed over ranks, dist.py). Returns the token means of the logged
    per-token statistics (over the loss mask, averaged over the iterations; the sampler/trainer
    mismatch from the first iteration, at the rollout's weights), the last grad norm and the number of
    skipped (non-finite) updates."""
    mask = batch.roll.loss_mask
    num_seqs, num_tokens = int(dist.all_sum(mask.shape[0])), int(dist.all_sum(int(mask.sum())))
    sums = dict.fromkeys(("ratio", "kl", "clip_low", "clip_high", "entropy", "loss", "weight", "weight_zero",
                          "mismatch_k3", "mismatch_abs", "mismatch_over"), 0.0)
    mismatch_max, skipped = 0.0, 0
    for it in range(cfg.num_iterations):
        opt.zero_grad(set_to_none=True)
        for s in micro_batches(cfg, mask.shape[0]):
            loss, stats, ent = micro_batch_loss(cfg, model, batch, s, num_seqs, num_tokens)
            loss.backward()
            m = mask[s]
            w = 1.0 / max(num_tokens, 1) / cfg.num_iterations               # token-mean over the batch
            sums["loss"] += loss.item() / cfg.num_iterations
            sums["entropy"] += float((ent.detach() * m).sum()) * w
            for k in ("ratio", "clip_low", "clip_high", "kl"):
                if stats[k] is not None:
                    sums[k] += float((stats[k].detach() * m).sum()) * w
            if stats.get("weight") is not None:   # the policy loss's per-token weights (--rollout-correction, masks)
                wt = stats["weight"].expand_as(m)
                sums["weight"] += float((wt * m).sum()) * w
                sums["weight_zero"] += float(((wt == 0) * m).sum()) * w
            if it == 0:
                sums["mismatch_k3"] += float((stats["mismatch_k3"] * m).sum()) / max(num_tokens, 1)
                sums["mismatch_abs"] += float((stats["mismatch_abs"] * m).sum()) / max(num_tokens, 1)
                sums["mismatch_over"] += float(((stats["mismatch_abs"] > MISMATCH_THRESHOLD) * m).sum()) / max(num_tokens, 1)
                if m.numel():
                    mismatch_max = max(mismatch_max, float((stats["mismatch_abs"] * m).max()))
        grad_norm, skip = run.optimizer_step(model, opt, sched, cfg.grad_clip)
        skipped += skip
    sums = {k: dist.all_sum(v) for k, v in sums.items()}
    sums["mismatch_max"] = dist.all_max(mismatch_max)
    return sums, grad_norm, skipped, num_tokens


# -----------------------------------------------------------------------------
# Phase 5: the step's metrics (TRL's names)

def thinking_metrics(batch):
    """Adaptive thinking (rewards.thinking_stats) over the global batch: logged when the rows have a
    `difficulty` column or a completion opens with a budget tag or leaves its <think> empty."""
    lengths = batch.roll.completion_mask.sum(1).tolist()
    correct = rewards.accuracy_reward(batch.prompts, batch.texts, answer=batch.columns.get("answer"))
    stats = {}
    for part in dist.gather_objects(rewards.thinking_stats(batch.texts, lengths, correct,   # every rank's counts
                                                           batch.columns.get("difficulty"))):
        for k, (s, n) in part.items():
            stats[k] = (stats.get(k, (0.0, 0))[0] + s, stats.get(k, (0.0, 0))[1] + n)
    adaptive = ("difficulty" in batch.columns or stats["thinking/skip_rate"][0] > 0
                or "thinking/length/easy_tag" in stats or "thinking/length/hard_tag" in stats)
    return {k: s / n for k, (s, n) in sorted(stats.items())} if adaptive else {}


def step_metrics(cfg, step, batch, info, sums, grad_norm, skipped, num_tokens, names, lr):
    """The metrics line of a step, over the global batch (every rank's rows)."""
    R, per_fn, trunc, lengths = (dist.gather_cat(t)[0] for t in (batch.rewards, batch.per_fn, batch.roll.truncated,
                                                                   batch.roll.completion_mask.sum(1)))
    grp = R.view(-1, cfg.num_generations)
    m = {"step": step, "reward": float(R.nanmean()), "reward_std": float(_nanstd(grp).mean()),
         **{f"rewards/{n}/mean": float(per_fn[:, i].nanmean()) for i, n in enumerate(names)},
         **{f"rewards/{n}/std": float(_nanstd(per_fn[:, i][None])[0]) for i, n in enumerate(names)},
         **{f"rewards/{n}/abstained": int(per_fn[:, i].isnan().sum()) for i, n in enumerate(names)},
         "frac_reward_zero_std": float((_nanstd(grp) < 1e-8).float().mean()),
         "completions/mean_length": float(lengths.mean()),
         "completions/min_length": float(lengths.min()), "completions/max_length": float(lengths.max()),
         "completions/clipped_ratio": float(trunc.float().mean()),
         "completions/mean_terminated_length": float(lengths[~trunc].mean()) if (~trunc).any() else 0.0,
         "loss": sums["loss"], "entropy": sums["entropy"], "ratio": sums["ratio"],
         "clip_ratio/low_mean": sums["clip_low"], "clip_ratio/high_mean": sums["clip_high"],
         "clip_ratio/region_mean": sums["clip_low"] + sums["clip_high"],
         "grad_norm": float(grad_norm), "skipped_steps": skipped, "learning_rate": lr, "num_tokens": num_tokens}
    m.update({f"rewards/{names[i]}/{k}": dist.all_sum(v)    # every rank has the same keys
              for i, d in enumerate(info["fn_metrics"]) for k, v in sorted(d.items())})
    if cfg.beta != 0.0:
        m["kl"] = sums["kl"]
    if batch.roll.tool_stats is not None:   # ReTool's view of tool use
        t = {k: dist.gather_cat(v.float())[0] for k, v in batch.roll.tool_stats.items()}
        calls = float(t["calls"].sum())
        m.update({"tools/calls_per_completion": float(t["calls"].mean()),
                  "tools/frac_completions_with_call": float((t["calls"] > 0).float().mean()),
                  "tools/error_rate": float(t["errors"].sum()) / calls if calls else 0.0,
                  "tools/timeout_rate": float(t["timeouts"].sum()) / calls if calls else 0.0,
                  "tools/over_limit": float(t["over_limit"].sum()),
                  "tools/output_token_share": float(t["forced_tokens"].sum() / lengths.sum().clamp(min=1))})
    m.update(thinking_metrics(batch))
    # the sampler (rollout.py) against the trainer on the same tokens and weights: kernels, precision, caches
    m.update({"mismatch/k3_kl": sums["mismatch_k3"], "mismatch/logp_diff_abs_mean": sums["mismatch_abs"],
              "mismatch/logp_diff_abs_max": sums["mismatch_max"],
              f"mismatch/frac_tokens_diff_gt_{MISMATCH_THRESHOLD:g}": sums["mismatch_over"]})
    if cfg.rollout_correction != "none" or cfg.off_policy_mask_threshold or cfg.top_entropy_quantile < 1:
        m.update({"policy_weight/mean": sums["weight"], "policy_weight/frac_zero": sums["weight_zero"]})
    m.update({k: v for k, v in info.items() if k.startswith(("dynamic_sampling/", "completions/"))})
    return m


def shown_samples(batch, step, G):
    """The first completion of the first two groups of this rank, for samples.jsonl and the console."""
    return [{"step": step, "prompt": rewards._prompt_text(batch.prompts[i]), "completion": batch.texts[i],
             "reward": float(batch.rewards[i]), "advantage": float(batch.advantages[i])}
            for i in range(0, min(len(batch.prompts), 2 * G), G)]


class NoSignal:
    """Says so, once, when the run has no learning signal: see no_signal_warning."""

    def __init__(self):
        self.zero_std, self.warned = [], False

    def check(self, frac_reward_zero_std):
        self.zero_std.append(frac_reward_zero_std)
        warning = None if self.warned else no_signal_warning(self.zero_std)
        if warning and dist.is_main():
            tqdm.write(warning, file=sys.stderr)
        self.warned = self.warned or warning is not None


# -----------------------------------------------------------------------------

def main(cfg):
    # ---- setup: flags, rewards, the cold start, the data, the reference, OUT ----------------------
    device = run.start(cfg, check_config)
    names, funcs, weights = resolve_reward_funcs(cfg)
    check_processes(cfg)
    model, tok = run.load_model(sft.cold_start(cfg, GRPOConfig.init), device, cfg)
    prompts_src = Prompts(cfg, tok, names, context_length(model))  # JSONL is checked here, before training
    tool = tools.build(cfg, tok)                                    # --tools: called inside the rollouts
    mode_prefixes(cfg, tok)                                         # --mode-prefixes: checked before training
    held = E.HeldOut(cfg, tok, E.criterion(cfg, funcs[0]), cfg.max_prompt_length, cfg.max_new_tokens,
                     cfg.temperature, tool)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta != 0.0 else None  # frozen start
    state = run.open_out(cfg, RESUME_FIXED)
    if state:
        prompts_src.load(state["data"])
    run.prepare_weights(model, cfg, device, state)   # --lora-rank adapters; --resume: the saved weights
    model, ref = run.shard(model, cfg, device), run.shard(ref, cfg, device)  # (ref: as large as the policy)
    run.write_config(cfg)
    opt, sched = run.optimizer(cfg, model, run.warmup_lr(cfg.warmup), state, betas=(0.9, 0.99))
    step, held.history = (state["step"], state["history"]) if state else (0, [])
    model.train()
    logs, no_signal = run.Logs(cfg, step), NoSignal()
    if held and step == 0:
        print(f"held-out greedy accuracy before GRPO: {held(model, tok, step, logs)['held_out_accuracy']:.3f}")
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo", dynamic_ncols=True, disable=not dist.is_main())
    while step < cfg.steps:
        t0 = time.time()
        batch, info = rollout(cfg, model, tok, prompts_src, funcs, weights, step, tool)  # 1. sample + score
        t1 = time.time()
        batch.advantages = advantages(cfg, batch.rewards)                             # 2. advantages
        batch.old_logp, batch.ref_logp, batch.entropy_mask = fixed_logprobs(cfg, model, ref, batch)  # 3.
        t2 = time.time()
        sums, grad_norm, skipped, num_tokens = update(cfg, model, opt, sched, batch)  # 4. optimizer steps
        step += 1
        m = step_metrics(cfg, step, batch, info, sums, grad_norm, skipped, num_tokens, names,  # 5. log
                         sched.get_last_lr()[0])
        t3 = time.time()   # one clock reading: the three phases add up to the step
        m.update({"step_time": t3 - t0, "time/rollout": t1 - t0, "time/logprobs": t2 - t1, "time/train": t3 - t2})
        if held and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m.update(held(model, tok, step, logs))
        no_signal.check(m["frac_reward_zero_std"])
        logs.metrics(m)
        bar.set_postfix(reward=f"{m['reward']:.3f}", zero_std=f"{m['frac_reward_zero_std']:.2f}",
                        len=f"{m['completions/mean_length']:.1f}", ent=f"{m['entropy']:.2f}")
        bar.update(1)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and dist.is_main():
            shown = shown_samples(batch, step, cfg.num_generations)
            logs.samples(shown)
            for x in shown:
                tqdm.write(f"[step {step}] {x['prompt']!r} -> {x['completion']!r} reward={x['reward']:.2f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:               # 6. checkpoint
            run.checkpoint(cfg, model, tok, opt, sched, step, data=prompts_src.state(), history=held.history)
    bar.close()
    # ---- the end: held-out accuracy after, the last checkpoint, result.json, curves.svg ------------
    summary = {}
    if held:
        held(model, tok, step, logs)
        summary = held.summary("GRPO")
    run.checkpoint(cfg, model, tok, opt, sched, step, data=prompts_src.state(), history=held.history)
    run.finish(cfg, logs, summary)
    return model, tok, summary


def check_processes(cfg):
    """What several processes (torchrun) need of the flags: every rank holds whole groups."""
    world = dist.world()
    if cfg.num_prompts % world:
        raise ValueError(f"--num-prompts {cfg.num_prompts} must be a multiple of the number of processes ({world})")
    if cfg.fsdp and cfg.dynamic_sampling and world > 1:  # sharded forwards must run in lockstep on every rank
        raise ValueError("--dynamic-sampling with --fsdp: ranks may keep different numbers of groups, hence run "
                         "different numbers of sharded forwards; not supported (use it without --fsdp)")


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


if __name__ == "__main__":
    main(run.parse_config(GRPOConfig))
