"""DPO: Direct Preference Optimization, from preference pairs in a file or from on-policy pairs that
the built-in task's checker ranks.

    python dpo.py                          # built-in: tiny model, cold start (sft.py) if needed, on-policy pairs, CPU
    python dpo.py --loss ipo --beta 0.5    # another loss
    python dpo.py --model PATH --data pairs.jsonl --device cuda --lr 5e-7 --out runs/dpo-qwen

Data: JSONL rows in TRL's preference format, {"prompt", "chosen", "rejected"} or the implicit-prompt
form {"chosen", "rejected"}; strings ("standard") or role/content message lists ("conversational",
rendered with the tokenizer's chat template). With --data and --init left at its default, the run
starts from --model itself.

Without --data the pairs are built on-policy, in rounds (iterative DPO): sample --num-generations
completions for each of --num-prompts problems from the current policy (rollout.py), score them
with the task's checker (rewards.py), pair correct completions (chosen) with incorrect ones
(rejected), then train on those pairs for --steps / --rounds steps. A prompt whose samples are all
correct, or all wrong, has nothing to prefer and gives no pair (it is counted: pairs/all_correct,
pairs/none_correct). This is the recipe of Iterative Reasoning Preference Optimization (Pang et al.
2024) without its NLL term, and of Self-Rewarding LMs (Yuan et al. 2024) with a checker as the judge.
Why rounds: DPO revisits its pairs, GRPO never does. One round of ~90 pairs trained for ~10 epochs
pushed the rejected log-probs from -6 to -13 and took held-out accuracy from 61% to 41% (seed 1,
200 problems); five rounds of ~1 epoch each over ~400-600 fresh pairs take it from 58% to 73%.
The default (5 rounds x 1024 problems x 8 samples, up to 4 pairs per problem, 20 steps of 32 pairs
per round) runs in about 3 minutes on one CPU thread; sampling is most of it.

One step: --batch-size pairs -> one forward over [chosen; rejected] (2B rows, [left-padded prompt |
right-padded completion]) -> summed completion log-probs -> h against the cached reference
log-probs -> loss -> optimizer step -> metrics line (TRL names) -> checkpoint.

Algorithmic choices (each a flag; the defaults and where they come from):
1. h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], log-probs summed over the
   completion tokens, EOS included (Rafailov et al. 2023). --loss:
     sigmoid  -log sigmoid(beta h) (DPO, beta 0.1 as in TRL); with --label-smoothing eps > 0 it is
              cDPO (Mitchell 2023): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), the
              expected DPO loss when each label is flipped with probability eps (OpenRLHF's sigmoid).
     robust   rDPO (Chowdhury et al. 2024), TRL's "robust": the unbiased version,
              [-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).
     ipo      IPO (Azar et al. 2023): (h - 1/(2 beta))^2, with log-probs AVERAGED over each
              completion's tokens instead of summed (TRL's convention, confirmed with the IPO authors;
              OpenRLHF sums). The logged rewards/* and logps/* are then per-token averages too.
     hinge    SLiC (Zhao et al. 2023): relu(1 - beta h).
   --label-smoothing applies to sigmoid and robust only.
2. The reference is the starting policy, and its log-probs are computed once, without grad, before
   training (TRL's precompute_ref_log_probs), then cached in OUT/ref_logps.pt and reused on --resume:
   no second model is in memory while training. With --rounds > 1 each round's reference is the
   policy at the start of that round (Pang et al. 2024; Yuan et al. 2024), so it is again just the
   current model, scored once before the round's first step.
3. Dropout is off while training (the model stays in eval mode; TRL's disable_dropout): at step 0
   the policy must score each pair exactly as the reference did, so h = 0 and the loss is log 2.
4. Logged implicit rewards beta * (log pi - log pi_ref) for chosen and rejected, their margin, and
   the fraction of pairs with chosen reward > rejected reward (rewards/accuracies).
5. AdamW (weight decay 0), linear warmup then cosine decay to 10%, gradient-norm clipping at 1.0.
6. On-policy pairs (build_pairs): per problem, up to --pairs-per-prompt disjoint (correct, incorrect)
   pairs by the checker's score; equal scores never make a pair. The completions are the sampled
   token ids themselves, up to and including EOS, never decoded and re-tokenized text.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dist
import evaluate as E
import kernels
import lifecycle as run
import rewards
import sft
import tools
from data import (TRUNCATION, ShuffledCycle, TooLong, check_data_text, check_text_or_messages, collate,
                  encode_example, encode_prompt, read_jsonl)
from model import context_length, token_logprobs
from rollout import generate


@dataclass
class DPOConfig:
    """DPO (sigmoid / cDPO / robust / IPO / hinge) on JSONL pairs or on-policy pairs."""
    model: str = "tiny"            # base model: "tiny" (built in) or a local HF directory
    init: str = "runs/sft"         # checkpoint to start from (policy and reference); "scratch" = --model as is.
                                   # Built by sft.py on first use (built-in task); with --data, the default means --model
    data: str = ""                 # JSONL preference pairs; empty = on-policy pairs from --task
    task: str = "add"              # built-in task (rewards.TASKS)
    out: str = "runs/dpo"
    loss: str = "sigmoid"          # sigmoid | robust | ipo | hinge
    beta: float = 0.1
    label_smoothing: float = 0.0   # eps: cDPO with sigmoid, rDPO with robust
    steps: int = 100               # optimizer steps in all (--rounds rounds of steps / rounds each)
    batch_size: int = 32           # pairs per step
    lr: float = 1e-4               # right for the tiny model; ~5e-7 for a real 0.5B-7B model
    warmup: int = 10
    grad_clip: float = 1.0
    max_length: int = 1024         # prompt + longer completion, tokens, of a JSONL pair
    truncation: str = "error"      # a pair over --max-length: error | skip (counted); never cut
    rounds: int = 5                # on-policy rounds: fresh pairs and a fresh reference each (1 with --data)
    num_prompts: int = 1024        # problems sampled per round
    num_generations: int = 8       # k, completions per problem
    pairs_per_prompt: int = 4      # at most this many disjoint (correct, incorrect) pairs per problem
    temperature: float = 1.0       # sampling temperature for the on-policy completions
    max_new_tokens: int = 48
    generation_batch: int = 512    # sequences per rollout.generate call (memory)
    tools: str = ""                # a tool the model calls while it answers (tools.py; on-policy pairs and the
                                   # held-out evaluation call it; JSONL pairs' tool outputs are masked)
    tool_format: str = "<c>,</c>,<o>,</o>"
    max_tool_calls: int = 4
    tool_timeout: float = 5.0
    max_tool_output_tokens: int = 24
    micro_batch: int = 64          # pairs per forward/backward (gradients accumulate; memory)
    eval_n: int = 500              # held-out problems, greedy, before/after (built-in task only)
    eval_data: str = ""            # held-out JSONL (GRPO's prompt format: prompt + answer), scored greedy by
                                   # `accuracy` before / every --eval-every / after (evaluate.py)
    eval_every: int = 0            # also every N steps, for the learning curve (0 = only before/after)
    eval_samples: int = 0          # k > 0: also pass@k and mean@k from k samples per prompt at --temperature
    save_every: int = 20
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int = 2
    kernels: str = "auto"          # auto = the Triton log-prob kernel on CUDA (kernels/), PyTorch elsewhere | off
    lora_rank: int = 0             # r > 0: train LoRA adapters of rank r on the decoder's linear layers only (Hu et al. 2021)
    lora_alpha: float = 32.0       # LoRA scale alpha / r; LoRA wants a ~10x larger --lr than full fine-tuning
    fsdp: bool = False             # torchrun: shard weights, grads, AdamW state (FSDP2, Zhao et al. 2023; dist.py)


# What a checkpoint was made with: --resume refuses to change these (lifecycle.check_resume), and --steps
# with on-policy rounds (it sets where each round, with its pairs and reference, begins); any other
# flag may change and is applied from the saved step on.
RESUME_FIXED = ("model", "init", "data", "task", "loss", "batch_size", "max_length", "truncation", "rounds",
                "num_prompts", "num_generations", "pairs_per_prompt", "eval_n", "eval_data", "seed", "fsdp", "lora_rank", "lora_alpha")


def check_config(cfg):
    """Every flag's range, and the combinations that cannot work, before anything is loaded or written."""
    return [
        (cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}"),
        (cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}"),
        (not cfg.label_smoothing or cfg.loss in ("sigmoid", "robust"),
         "--label-smoothing applies to --loss sigmoid (cDPO) and robust only"),
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (cfg.grad_clip > 0, f"--grad-clip must be > 0, got {cfg.grad_clip}"),
        (cfg.max_length >= 2, f"--max-length must be >= 2, got {cfg.max_length}"),
        (cfg.truncation in TRUNCATION, f"--truncation must be error or skip, got {cfg.truncation!r}"),
        (cfg.rounds >= 1, f"--rounds must be >= 1, got {cfg.rounds}"),
        (cfg.num_prompts >= 1, f"--num-prompts must be >= 1, got {cfg.num_prompts}"),
        # a pair needs a correct and an incorrect completion of the same problem
        (cfg.num_generations >= 2, f"--num-generations must be >= 2 (a pair is two completions), got {cfg.num_generations}"),
        (cfg.pairs_per_prompt >= 1, f"--pairs-per-prompt must be >= 1, got {cfg.pairs_per_prompt}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.generation_batch >= 1, f"--generation-batch must be >= 1, got {cfg.generation_batch}"),
        (cfg.micro_batch >= 1, f"--micro-batch must be >= 1, got {cfg.micro_batch}"),
        *[(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
          for k in ("eval_n", "eval_every", "eval_samples", "save_every")],
        (cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        (cfg.kernels in kernels.MODES, f"--kernels must be one of {', '.join(kernels.MODES)}, got {cfg.kernels!r}"),
        (bool(cfg.data) or cfg.task in rewards.TASKS, f"--task must be one of {', '.join(rewards.TASKS)}, got {cfg.task!r}"),
        *tools.checks(cfg),
    ]


# -----------------------------------------------------------------------------
# The losses: small pure functions of h (B,), the chosen-minus-rejected log-ratio margin

def sigmoid_loss(h, beta, label_smoothing=0.0):
    """DPO: -log sigmoid(beta h) (Rafailov et al. 2023). With label smoothing eps, cDPO (Mitchell
    2023): the expected DPO loss when the label is flipped with probability eps,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    objective = (1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    return -objective


def robust_loss(h, beta, label_smoothing=0.0):
    """rDPO (Chowdhury et al. 2024), as TRL's "robust": an unbiased estimate of the clean DPO loss
    under label noise eps < 1/2: [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(h, beta, label_smoothing=0.0):
    """IPO (Azar et al. 2023): regress h onto 1/(2 beta), (h - 1/(2 beta))^2. Here h is built from
    per-token AVERAGED log-probs (TRL's convention); see sequence_logps."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h, beta, label_smoothing=0.0):
    """SLiC (Zhao et al. 2023): relu(1 - beta h); zero once the margin beta h reaches 1."""
    return torch.relu(1 - beta * h)


LOSSES = {"sigmoid": sigmoid_loss, "robust": robust_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def sequence_logps(token_logp_sums, num_tokens, loss):
    """Summed completion log-probs (B,) -> what h is made of: the sums, or per-token averages for IPO."""
    return token_logp_sums / num_tokens.clamp(min=1) if loss == "ipo" else token_logp_sums


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and
    rejected (B,) each, detached. All inputs (B,) sequence log-probs (see sequence_logps)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)                               # (B,)
    losses = LOSSES[loss](h, beta, label_smoothing)
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


# -----------------------------------------------------------------------------
# Pairs: a small record of token ids; one forward scores chosen and rejected together

@dataclass
class Pair:
    prompt: list      # prompt ids (chat template and generation prompt included)
    chosen: list      # completion ids, ending with EOS (unless an on-policy sample was truncated)
    rejected: list
    chosen_mask: list = None    # with --tools: 0 on spliced tool output (not the model's), else None = all 1
    rejected_mask: list = None

    def fields(self):
        return (self.prompt, self.chosen, self.rejected, self.chosen_mask, self.rejected_mask)


def collate_pairs(pairs, pad_id, device):
    """B pairs -> one batch of 2B rows, chosen rows first, then rejected: input_ids, attention_mask
    (2B, P+C) as [left-padded prompt | right-padded completion], completion mask (2B, C)."""
    examples = ([(p.prompt, p.chosen) + ((p.chosen_mask,) if p.chosen_mask else ()) for p in pairs] +
                [(p.prompt, p.rejected) + ((p.rejected_mask,) if p.rejected_mask else ()) for p in pairs])
    return collate(examples, pad_id, device)   # the mask: model-written tokens only (tool output excluded)


def pair_logps(model, pairs, pad_id, device):
    """Summed completion log-probs and completion lengths of chosen and rejected, in ONE forward over
    the concatenated batch [chosen; rejected]: (2B,) each, chosen rows first. Grad flows if enabled."""
    ids, attn, mask = collate_pairs(pairs, pad_id, device)
    logp = token_logprobs(model, ids, attn, mask.shape[1])            # (2B, C)
    return (logp * mask).sum(1), mask.sum(1)


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, micro_batch):
    """(N, 2) summed log-probs [chosen, rejected] of every pair under `model`, computed once."""
    out = []
    with dist.gathered(model):  # --fsdp: ranks may hold different numbers of pairs; no lockstep needed
        for i in range(0, len(pairs), micro_batch):
            s, _ = pair_logps(model, pairs[i:i + micro_batch], pad_id, device)
            out.append(s.view(2, -1).T)                               # (b, 2)
    return torch.cat(out).cpu() if out else torch.zeros(0, 2)


def fingerprint(pairs):
    """A hash of every token id: a cached reference must belong to exactly these pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p.fields() if p.chosen_mask or p.rejected_mask else p.fields()[:3]).encode())
    return h.hexdigest()


def split_prompt(row):
    """A TRL preference row -> (prompt, chosen, rejected). Explicit: the row's prompt. Implicit
    (no "prompt"): conversational rows share every message but the final assistant one, which is
    the completion; standard rows split at the end of the shared string prefix (TRL's rule: a space
    just before the split goes with the completion)."""
    if "prompt" in row:
        check_text_or_messages(row, "prompt")
        last = "assistant" if isinstance(row["prompt"], list) else None
        check_text_or_messages(row, "chosen", last_role=last)
        check_text_or_messages(row, "rejected", last_role=last)
        return row["prompt"], row["chosen"], row["rejected"]
    check_text_or_messages(row, "chosen")
    check_text_or_messages(row, "rejected")
    c, r = row["chosen"], row["rejected"]
    if isinstance(c, list) != isinstance(r, list):
        raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists")
    if isinstance(c, list):
        check_text_or_messages(row, "chosen", last_role="assistant")
        check_text_or_messages(row, "rejected", last_role="assistant")
        if len(c) < 2 or c[:-1] != r[:-1]:
            raise ValueError("implicit prompt: 'chosen' and 'rejected' must share every message but the final "
                             "assistant one (that shared prefix is the prompt); or give a 'prompt' field")
        return c[:-1], c[-1:], r[-1:]
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n > 0 and c[n - 1] == " ":
        n -= 1
    if n == 0:
        raise ValueError("implicit prompt: 'chosen' and 'rejected' share no prefix to use as the prompt")
    return c[:n], c[n:], r[n:]


def encode_pair(tok, row, max_length, context=None, spec=None):
    """A JSONL row -> Pair of token ids; data.encode_example does the templating (no double BOS/EOS).
    Within --max-length and the model's context (max_position_embeddings); the text is checked first
    (data.check_data_text); a pair whose two completions are the same teaches nothing: refused. spec (a
    tools.ToolSpec, with --tools): the completions are tool traces, their spliced outputs masked."""
    prompt, chosen, rejected = split_prompt(row)
    for c in (chosen, rejected):
        check_data_text(tok, prompt, c, max_tokens=max_length, limit="--max-length")
    p, c = encode_example(tok, prompt, chosen)
    p2, r = encode_example(tok, prompt, rejected)
    assert p == p2
    if c == r:
        raise ValueError("'chosen' and 'rejected' are the same completion (h = 0: the pair trains nothing)")
    n = len(p) + max(len(c), len(r))
    if n > max_length:
        raise TooLong(f"pair has {n} tokens > --max-length {max_length}")
    if context is not None and n > context:
        raise TooLong(f"pair has {n} tokens > the model's context of {context} positions (max_position_embeddings)")
    if spec is not None:
        return Pair(p, c, r, tools.output_mask(tok, c, spec), tools.output_mask(tok, r, spec))
    return Pair(p, c, r)


def build_pairs(scores, k, pairs_per_prompt=1):
    """Pair the k scored samples of each prompt (grouped consecutively in `scores`, P*k floats or None
    for unscored). A best-scoring sample is chosen, a worst-scoring one rejected; prompts whose scored
    samples all tie (all correct, or none correct) give no pair. Up to pairs_per_prompt disjoint pairs
    per prompt: the i-th best with the i-th worst, in sample order (samples are i.i.d., so the first
    of several tied samples is as good as a random one). Returns [(chosen index, rejected index)]
    into `scores`, and the counts of prompts without a pair."""
    pairs, counts = [], {"all_correct": 0, "none_correct": 0, "unscored": 0}
    for g in range(len(scores) // k):
        idx = [i for i in range(g * k, (g + 1) * k) if scores[i] is not None]
        if not idx:
            counts["unscored"] += 1
            continue
        hi, lo = max(scores[i] for i in idx), min(scores[i] for i in idx)
        if hi == lo:
            counts["all_correct" if hi > 0 else "none_correct"] += 1
            continue
        best = [i for i in idx if scores[i] == hi]
        worst = [i for i in idx if scores[i] == lo]
        pairs += list(zip(best, worst))[:pairs_per_prompt]
    return pairs, counts


def sample_pairs(model, tok, problems, cfg, tool=None):
    """One on-policy round: k completions per problem from the current policy (calling `tool`, a
    tools.Tools, when given), scored by the task's checker, paired by build_pairs. Returns the pairs,
    their texts (for logging) and round stats."""
    k = cfg.num_generations
    prompts = [encode_prompt(tok, p.row()["prompt"]) for p in problems]
    flat = [ids for ids in prompts for _ in range(k)]                 # each prompt k times, grouped
    model.eval()
    comps, texts, masks = [], [], []
    with dist.gathered(model):  # --fsdp: whole weights while decoding (ranks stop at different steps)
        for i in range(0, len(flat), cfg.generation_batch):
            r = generate(model, tok, flat[i:i + cfg.generation_batch], cfg.max_new_tokens, cfg.temperature, tools=tool,
                         engine=dist.rollout_engine(model))
            # exactly the sampled tokens, up to and including EOS: the policy's own sequences, not re-tokenized text
            comps += [row[m.bool()].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
            masks += [lm[m.bool()].long().tolist() if tool else None for lm, m in zip(r.loss_mask, r.completion_mask)]
            texts += tok.batch_decode(r.completion_ids, skip_special_tokens=True)
    rows = [p.row() for p in problems for _ in range(k)]
    check = rewards.REWARD_FUNCS[E.checker(cfg.task)]
    scores = check([r["prompt"] for r in rows], texts, **{c: [r[c] for r in rows] for c in rows[0] if c != "prompt"})
    index, counts = build_pairs(scores, k, cfg.pairs_per_prompt)
    pairs = [Pair(flat[w], comps[w], comps[l], masks[w], masks[l]) for w, l in index]
    shown = [{"prompt": problems[w // k].prompt, "chosen": texts[w], "rejected": texts[l]} for w, l in index[:2]]
    valid = [s for s in scores if s is not None]
    stats = {"pairs/num": len(pairs), **{f"pairs/{c}": n for c, n in counts.items()},
             "pairs/sampled_accuracy": sum(valid) / max(len(valid), 1)}
    return pairs, shown, stats


# -----------------------------------------------------------------------------
# A round: its pairs, their reference log-probs, the order they are drawn in

@dataclass
class Round:
    index: int
    pairs: list                # Pair
    ref: torch.Tensor          # (N, 2) reference log-probs [chosen, rejected] of every pair, on the CPU
    cycle: ShuffledCycle       # epochs over the pairs
    stats: dict                # pairs/* counts, time/pairs: logged with every step of the round


def start_round(cfg, model, tok, r, stream, file_pairs, logs, resume_data=None):
    """Round r: from OUT/ref_logps.pt when resuming inside it (the reference cannot be recomputed from
    trained weights), else built now: the file's pairs, or pairs sampled on-policy (each rank samples
    and scores its slice of the problems; all ranks then hold all pairs), scored by the current model
    as the round's reference, cached."""
    cache_path = os.path.join(cfg.out, "ref_logps.pt")
    device = next(model.parameters()).device
    if resume_data is not None:
        cache = torch.load(cache_path, weights_only=False) if os.path.exists(cache_path) else None
        if cache is None or cache["round"] != r:
            raise FileNotFoundError(f"--resume: no reference log-probs for round {r} in {cache_path}; they "
                                    f"cannot be recomputed from the trained weights")
        pairs = file_pairs if cfg.data else [Pair(*p) for p in cache["pairs"]]
        if cache["fingerprint"] != fingerprint(pairs):
            raise ValueError(f"--resume: {cache_path} belongs to other pairs (did --data change?)")
        rnd = Round(r, pairs, cache["ref"], ShuffledCycle(len(pairs), cfg.seed + 1000 * r), cache["stats"])
        rnd.cycle.load(resume_data["pairs"])
        return rnd
    t0 = time.time()
    if cfg.data:  # (every rank scores every pair: the same work, in the time of one process)
        pairs, shown, stats = file_pairs, [], {"pairs/num": len(file_pairs)}
        ref = reference_logps(model, pairs, tok.pad_token_id, device, cfg.micro_batch)  # (N, 2)
    else:
        pairs, shown, stats = sample_pairs(model, tok, dist.shard(stream.take(cfg.num_prompts)), cfg,
                                           tools.build(cfg, tok))
        # (N, 2); called with no pairs too: under --fsdp every rank must join the gathering
        ref = reference_logps(model, pairs, tok.pad_token_id, device, cfg.micro_batch)
        parts = dist.gather_objects((pairs, ref, stats))
        pairs, ref = [p for ps, _, _ in parts for p in ps], torch.cat([x for _, x, _ in parts])
        stats = {k: sum(s[k] for _, _, s in parts) for k in stats}       # counts add up
        stats["pairs/sampled_accuracy"] /= len(parts)                  # equal shards: the mean
        if not pairs:
            raise RuntimeError(f"round {r}: no prompt had both a correct and an incorrect sample "
                               f"({stats}); sample more (--num-prompts, --num-generations, --temperature)")
    stats["time/pairs"] = time.time() - t0                   # sampling, scoring, reference
    if dist.is_main():
        torch.save({"round": r, "fingerprint": fingerprint(pairs), "ref": ref, "stats": stats,
                    "pairs": None if cfg.data else [p.fields() for p in pairs]}, cache_path)
        tqdm.write(f"[round {r}] {json.dumps(stats)}")
        for x in shown:
            tqdm.write(f"  {x['prompt']!r}: chosen {x['chosen']!r} / rejected {x['rejected']!r}")
    logs.samples([{"round": r, **x} for x in (shown if dist.is_main() else [])])
    return Round(r, pairs, ref, ShuffledCycle(len(pairs), cfg.seed + 1000 * r), stats)


# -----------------------------------------------------------------------------
# One step

def train_step(cfg, model, opt, sched, rnd, pad_id):
    """One optimizer step on the next --batch-size pairs of the round (this rank's share of them,
    micro-batch by micro-batch). Returns the step's metrics (TRL's names), means over the global batch."""
    device = next(model.parameters()).device
    model.eval()  # no dropout: the policy scores a pair as the reference did (h = 0 at step 0)
    idx = rnd.cycle.take(cfg.batch_size)
    B = len(idx)                                                  # the global batch: every mean is over B
    idx = dist.shard(idx)                                         # this rank's pairs
    opt.zero_grad(set_to_none=True)
    sums = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                          "logps/rejected"), 0.0)
    num_tokens = 0
    for i in range(0, len(idx), cfg.micro_batch):
        mb = idx[i:i + cfg.micro_batch]
        seq_sums, lens = pair_logps(model, [rnd.pairs[j] for j in mb], pad_id, device)  # (2b,)
        b = len(mb)
        ref_sums = rnd.ref[mb].to(device)                         # (b, 2)
        pi = sequence_logps(seq_sums, lens, cfg.loss)             # (2b,): chosen rows, then rejected
        ref_seq = sequence_logps(ref_sums.T.reshape(-1), lens, cfg.loss)
        losses, rw_c, rw_r = dpo_loss(pi[:b], pi[b:], ref_seq[:b], ref_seq[b:], cfg.beta, cfg.loss, cfg.label_smoothing)
        (losses.sum() / B).backward()                             # micro-batch share of the batch mean
        sums["loss"] += float(losses.detach().sum()) / B
        sums["rewards/chosen"] += float(rw_c.sum()) / B
        sums["rewards/rejected"] += float(rw_r.sum()) / B
        # TRL's convention: strictly chosen reward > rejected reward; a tie counts as not accurate. At
        # policy == reference (a round's first step) both rewards are rounding noise around 0 (this pass
        # can batch and pad the pairs otherwise than the reference pass did): that value is noise too.
        sums["rewards/accuracies"] += float((rw_c > rw_r).float().sum()) / B
        sums["logps/chosen"] += float(pi[:b].detach().sum()) / B
        sums["logps/rejected"] += float(pi[b:].detach().sum()) / B
        num_tokens += int(lens.sum())
    grad_norm, skipped = run.optimizer_step(model, opt, sched, cfg.grad_clip)
    sums = {k: dist.all_sum(v) for k, v in sums.items()}
    return {"round": rnd.index, **sums, "rewards/margins": sums["rewards/chosen"] - sums["rewards/rejected"],
            "grad_norm": float(grad_norm), "skipped_steps": int(skipped), "learning_rate": sched.get_last_lr()[0],
            "num_tokens": int(dist.all_sum(num_tokens)), "epoch": rnd.cycle.epoch + rnd.cycle.pos / len(rnd.pairs),
            **rnd.stats}


def read_pairs(cfg, tok, model, start):
    """--data: every row checked and tokenized, before anything is written (None: on-policy pairs)."""
    if cfg.data:
        pairs, context = [], context_length(model)
        spec = tools.spec_from(cfg) if cfg.tools else None
        read_jsonl(cfg.data, lambda row: pairs.append(encode_pair(tok, row, cfg.max_length, context, spec)),
                   cfg.truncation)
        return pairs
    if not getattr(tok, "chat_template", None):  # on-policy prompts are conversational
        raise ValueError(f"{start}: the built-in task's prompts are conversational and this tokenizer has no chat "
                         f"template; give --data pairs as plain strings, or a model with a template")
    return None


# -----------------------------------------------------------------------------

def main(cfg):
    # ---- setup: flags, the cold start (with --data and the default --init: --model itself), pairs, OUT
    device = run.start(cfg, check_config)
    own_data = cfg.data and cfg.init == DPOConfig.init   # your pairs, your --model
    start = cfg.model if own_data else sft.cold_start(cfg, DPOConfig.init)
    model, tok = run.load_model(start, device, cfg)
    file_pairs = read_pairs(cfg, tok, model, start)
    stream = rewards.ProblemStream(cfg.task, seed=cfg.seed + 1,                # GRPO's prompt stream
                                   exclude=rewards.held_out(cfg.task, cfg.eval_n) if cfg.eval_n and not cfg.data else [])
    held = E.HeldOut(cfg, tok, E.criterion(cfg), cfg.max_length, cfg.max_new_tokens, cfg.temperature,
                     tools.build(cfg, tok))
    state = run.open_out(cfg, RESUME_FIXED + (() if cfg.data else ("steps",)))
    if state:
        if cfg.data:  # a file of another size cannot continue the saved position
            ShuffledCycle(len(file_pairs), cfg.seed).load(state["data"]["pairs"])
    run.prepare_weights(model, cfg, device, state)   # --lora-rank adapters; --resume: the saved weights
    run.write_config(cfg)
    model = run.shard(model, cfg, device)
    opt, sched = run.optimizer(cfg, model, run.cosine_lr(cfg.warmup, cfg.steps), state, betas=(0.9, 0.99))
    per_round = -(-cfg.steps // (1 if cfg.data else cfg.rounds))     # steps per round (ceil); a file: one round
    step, held.history, rounds_log = (state["step"], state["history"], state["rounds"]) if state else (0, [], [])
    if state:
        stream.seek(state["data"]["stream"])
    logs, rnd = run.Logs(cfg, step), None
    if held and step == 0:
        print(f"held-out greedy accuracy before DPO: {held(model, tok, step, logs)['held_out_accuracy']:.3f}")
    save = lambda: run.checkpoint(cfg, model, tok, opt, sched, step, history=held.history, rounds=rounds_log,
                                  data={"stream": stream.position, "pairs": rnd.cycle.state()})
    bar = tqdm(total=cfg.steps, initial=step, desc="dpo", dynamic_ncols=True, disable=not dist.is_main())
    while step < cfg.steps:
        if rnd is None or step % per_round == 0:                      # a round: pairs and their reference
            resuming = state is not None and rnd is None and (step % per_round or cfg.data)
            rnd = start_round(cfg, model, tok, step // per_round, stream, file_pairs, logs,
                              state["data"] if resuming else None)
            if not resuming:
                rounds_log.append({"round": rnd.index, "step": step, **rnd.stats})
        t0 = time.time()
        m = {"step": step + 1, **train_step(cfg, model, opt, sched, rnd, tok.pad_token_id)}   # one step
        step += 1
        if held and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m.update(held(model, tok, step, logs))
        logs.metrics({**m, "step_time": time.time() - t0})
        bar.set_postfix(loss=f"{m['loss']:.3f}", margin=f"{m['rewards/margins']:.2f}",
                        acc=f"{m['rewards/accuracies']:.2f}", round=rnd.index)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save()
    bar.close()
    summary = {}
    if held:                                                          # ---- the end
        held(model, tok, step, logs)
        summary = {**held.summary("DPO"), "rounds": rounds_log}
    if rnd is not None:
        save()
    run.finish(cfg, logs, summary)
    return model, tok, summary


if __name__ == "__main__":
    main(run.parse_config(DPOConfig))
