"""Evaluation of any saved model on any task: greedy accuracy, and pass@k / mean@k from k samples per
prompt, scored by the same reward functions that training uses.

    python evaluate.py --model runs/grpo                                   # the built-in task's held-out set
    python evaluate.py --model DIR --data eval.jsonl                       # your task: TRL-format prompts
    python evaluate.py --model DIR --data eval.jsonl --samples 8 --temperature 1.0   # + pass@1..8, mean@8
    python evaluate.py --model DIR --data eval.jsonl --reward my_rewards:exact       # your success criterion

Data: JSONL rows {"prompt": str | [messages], <the columns the reward reads>}, e.g. {"prompt": ...,
"answer": "42"} for `accuracy`: the GRPO prompt format, so a held-out split of the GRPO file works as it is.

The score of a completion is the reward function's value (`--reward`: a rewards.REWARD_FUNCS name or
module:function; default: the built-in task's checker, `accuracy` for --data). A completion *passes*
when it scores full marks (>= 1: a right answer; for code_reward every test). A reward that abstains
(None) counts as 0: an unscored sample is not a success.

- accuracy: the mean score of the greedy completion (one per prompt);
- mean@k:  the mean score over k samples per prompt at --temperature;
- pass@k:  the chance that at least one of k samples passes, with the unbiased estimator of Chen et al.
           2021 (HumanEval) from n = k samples of which c pass: 1 - C(n-c, k) / C(n, k), averaged over
           prompts, for every k' = 1, 2, 4, ..., k. pass@1 equals the mean pass rate of the samples.

Writes nothing unless --out is given: then OUT/eval_result.json (the numbers) and OUT/eval_samples.jsonl
(every prompt's greedy completion and score).

Inside training (sft.py, grpo.py, dpo.py) the same code runs as `HeldOut`: the rows of --eval-data, or
the built-in task's held-out problems, scored before the first step, every --eval-every steps and at the
end, into metrics.jsonl (held_out_accuracy, held_out/pass@k, held_out/mean@k), result.json (before,
after, history) and samples.jsonl (a few completions, "eval": true). Same model, same rows: the same
numbers here as there (one batch size, one decoding path; tested).
"""
import json
import os
from dataclasses import dataclass

import torch

import dist
import rewards
import tools
from data import TooLong, check_data_text, check_text_or_messages, encode_prompt, read_jsonl
from model import load
from rollout import generate


@dataclass
class EvalConfig:
    model: str = "runs/grpo"     # a saved run directory (any local HF causal LM) or "tiny"
    data: str = ""               # JSONL prompts + reward columns; empty = the built-in --task's held-out set
    task: str = "add"            # built-in task (rewards.TASKS), when --data is empty
    n: int = 500                 # built-in: held-out problems (the set sft/grpo/dpo report on)
    reward: str = ""             # success criterion; empty = the task's checker (accuracy for --data)
    samples: int = 0             # k > 0: also k samples per prompt -> pass@k, mean@k
    temperature: float = 1.0     # for the samples
    max_new_tokens: int = 48
    max_prompt_length: int = 512
    batch_size: int = 250        # prompts per generate call (training's: the same batches, the same numbers)
    out: str = ""                # write eval_result.json + eval_samples.jsonl here
    tools: str = ""              # a tool the model calls while it answers (tools.py), as in training
    tool_format: str = "<c>,</c>,<o>,</o>"
    max_tool_calls: int = 4
    tool_timeout: float = 5.0
    max_tool_output_tokens: int = 24
    device: str = "cpu"
    seed: int = 0
    threads: int = 2


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c passes (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as the
    product prod_{i=n-c+1}^{n} (1 - k / i), which never forms the large binomials."""
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p


def checker(task):
    """The built-in task's success criterion: its exact checker."""
    return "countdown" if task == "countdown" else "accuracy"


def resolve_reward(name, task, builtin):
    """The success criterion (a rewards.resolve spec of one function; empty: the built-in task's
    checker, accuracy for --data) -> (name, reward function)."""
    names, funcs = rewards.resolve(name or (checker(task) if builtin else "accuracy"))
    if len(funcs) != 1:
        raise ValueError(f"--reward names one function, got {name!r}")
    return names[0], funcs[0]


def load_rows(cfg, tok):
    """Eval rows {"prompt", columns...}: the built-in held-out problems, or the rows of --data."""
    if not cfg.data:
        return builtin_rows(cfg.task, cfg.n)
    return read_rows(cfg.data, tok, cfg.max_prompt_length)


def builtin_rows(task, n):
    """The built-in task's n held-out problems as eval rows (never seen in training: rewards.held_out)."""
    return [p.row() for p in rewards.held_out(task, n)]


def read_rows(path, tok, max_prompt_length):
    """The checked rows of an eval JSONL (GRPO's prompt format); any bad row stops with file:line."""
    def check(row):
        check_text_or_messages(row, "prompt")
        check_data_text(tok, row["prompt"], max_tokens=max_prompt_length, limit="--max-prompt-length")
        n = len(encode_prompt(tok, row["prompt"]))
        if n > max_prompt_length:
            raise TooLong(f"prompt has {n} tokens > --max-prompt-length {max_prompt_length}")
    return read_jsonl(path, check)


def score(reward_fn, rows, completions, k=1):
    """Scores (len(rows) * k floats) of completions laid out row by row, k per row. The reward runs as in
    training (rewards.call: its own copies, faults contained); a sample it does not score counts 0."""
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    cols = {c: [r.get(c) for r in rows for _ in range(k)] for c in {c for r in rows for c in r} - {"prompt"}}
    values = rewards.call(reward_fn, prompts, completions, [None] * len(completions), cols)
    return [x if x == x else 0.0 for x in values]   # NaN: abstained


def thinking(rows, completions, scores, tok):
    """Adaptive thinking on these completions (rewards.thinking_stats) as {metric: mean}: thinking rate,
    length by mode, tag and difficulty, accuracy (score >= 1) by difficulty, and mean_length; {} when no row
    has a difficulty column. Lengths: the completion re-encoded, + 1 for its EOS."""
    if not any(r.get("difficulty") for r in rows):
        return {}
    lengths = [len(tok(c, add_special_tokens=False).input_ids) + 1 for c in completions]
    stats = rewards.thinking_stats(completions, lengths, [float(s >= 1.0) for s in scores],
                                   [r.get("difficulty") for r in rows])
    return {"mean_length": sum(lengths) / len(lengths), **{k: v / n for k, (v, n) in stats.items()}}


@torch.no_grad()
def complete(model, tok, rows, k, max_new_tokens, temperature, batch_size, greedy, engine="auto", tools=None):
    """Decoded completions, row by row, k per row (greedy: k = 1); with tools (tools.Tools) the model calls
    them as in training."""
    training = model.training
    model.eval()
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows for _ in range(k)]
    out = []
    for i in range(0, len(prompts), batch_size):
        r = generate(model, tok, prompts[i:i + batch_size], max_new_tokens, temperature, greedy=greedy, engine=engine,
                     tools=tools)
        out += tok.batch_decode(r.completion_ids, skip_special_tokens=True)
    model.train(training)
    return out


def evaluate(model, tok, rows, reward_fn, max_new_tokens=48, samples=0, temperature=1.0, batch_size=250,
             engine="auto", tools=None):
    """The numbers (module docstring) and the greedy completions with their scores. Greedy decoding
    draws no random numbers; the k samples draw from the global torch generator (HeldOut forks it)."""
    greedy = complete(model, tok, rows, 1, max_new_tokens, 1.0, batch_size, greedy=True, engine=engine, tools=tools)
    scores = score(reward_fn, rows, greedy)
    result = {"accuracy": sum(scores) / len(scores), "n": len(rows)}
    if samples:
        comps = complete(model, tok, rows, samples, max_new_tokens, temperature, batch_size, greedy=False,
                         engine=engine, tools=tools)
        s = score(reward_fn, rows, comps, samples)                                     # (n_rows * k,)
        per_row = [s[i * samples:(i + 1) * samples] for i in range(len(rows))]
        passes = [sum(x >= 1.0 for x in r) for r in per_row]
        result[f"mean@{samples}"] = sum(s) / len(s)
        ks = sorted({2 ** j for j in range(samples.bit_length()) if 2 ** j <= samples} | {samples})
        for k in ks:
            result[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in passes) / len(rows)
        result["temperature"] = temperature
    return result, list(zip(rows, greedy, scores))


# -----------------------------------------------------------------------------
# Inside training

def criterion(cfg, first=None):
    """A run's success criterion on its held-out set: the built-in task's checker, and for --eval-data
    `first` (grpo.py passes its first reward function) or `accuracy`."""
    if cfg.eval_data:
        return first or rewards.accuracy_reward
    return rewards.REWARD_FUNCS[checker(cfg.task)]


class HeldOut:
    """A training run's held-out set and its success criterion. Called with the model at a step, it
    evaluates (greedy; + pass@k / mean@k with samples = k > 0), records the numbers in `history` (saved
    with the checkpoint) and keeps two scored completions in `shown` for samples.jsonl. Falsy when the
    run has no held-out set (--eval-data empty and, with --data or --eval-n 0, no built-in one)."""

    def __init__(self, cfg, tok, reward_fn, max_prompt_length, max_new_tokens, temperature=1.0, tools=None):
        """cfg: the script's flags (eval_data, eval_n, data, task, eval_samples)."""
        if cfg.eval_data:
            self.rows, self.name = read_rows(cfg.eval_data, tok, max_prompt_length), cfg.eval_data
        elif cfg.eval_n and not cfg.data:
            self.rows, self.name = builtin_rows(cfg.task, cfg.eval_n), cfg.task
        else:
            self.rows, self.name = [], ""
        self.reward_fn, self.max_new_tokens = reward_fn, max_new_tokens
        self.samples, self.temperature, self.tools = cfg.eval_samples, temperature, tools
        self.history, self.shown = [], []

    def __bool__(self):
        return bool(self.rows)

    def __call__(self, model, tok, step, logs=None):
        """-> the metrics of this evaluation: held_out_accuracy (+ held_out/pass@k, held_out/mean@k; rows with a
        difficulty column: held_out/mean_length and held_out/thinking/*, of the greedy completions); two
        scored completions go to logs.samples (samples.jsonl) when logs are given."""
        # the k samples draw from a generator of their own: evaluating never moves training's streams
        devices = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else []
        with dist.gathered(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(1234 + step)
            result, greedy = evaluate(model, tok, self.rows, self.reward_fn, self.max_new_tokens, self.samples,
                                      self.temperature, engine=dist.rollout_engine(model), tools=self.tools)
        m = {"held_out_accuracy": result["accuracy"],
             **{f"held_out/{k}": v for k, v in result.items() if k.startswith(("pass@", "mean@"))},
             **{f"held_out/{k}": v for k, v in thinking(self.rows, [c for _, c, _ in greedy],
                                                        [s for _, _, s in greedy], tok).items()}}
        self.history.append({"step": step, **m})
        self.shown = [{"step": step, "eval": True, "prompt": rewards._prompt_text(r["prompt"]), "completion": c,
                       "score": s} for r, c, s in greedy[:2]]
        if logs is not None:
            logs.samples(self.shown)
        return m

    def summary(self, algo):
        """The closing line and result.json's numbers: accuracy at the first evaluation and at the last."""
        before, after = self.history[0]["held_out_accuracy"], self.history[-1]["held_out_accuracy"]
        n = len(self.rows)
        print(f"\nheld-out greedy accuracy on {n} {self.name} problems: before {algo} {before:.3f} -> after {algo} "
              f"{after:.3f} ({'+' if after >= before else ''}{100 * (after - before):.1f} points)")
        return {"held_out_accuracy_before": before, "held_out_accuracy_after": after, "n": n,
                "history": self.history}


def main(cfg):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.samples < 0 or cfg.n < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or not cfg.temperature > 0:
        raise ValueError("--samples must be >= 0, --n, --max-new-tokens and --batch-size >= 1, --temperature > 0")
    name, reward_fn = resolve_reward(cfg.reward, cfg.task, not cfg.data)
    model, tok = load(cfg.model, cfg.device, torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32)
    rows = load_rows(cfg, tok)
    result, greedy = evaluate(model, tok, rows, reward_fn, cfg.max_new_tokens, cfg.samples, cfg.temperature,
                              cfg.batch_size, tools=tools.build(cfg, tok))
    result.update({"model": cfg.model, "data": cfg.data or f"built-in {cfg.task} held-out", "reward": name})
    print(json.dumps(result))
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "eval_result.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(cfg.out, "eval_samples.jsonl"), "w") as f:
            for row, completion, s in greedy:
                f.write(json.dumps({"prompt": rewards._prompt_text(row["prompt"]), "completion": completion,
                                    "score": s}) + "\n")
    return result


if __name__ == "__main__":
    from lifecycle import parse_config
    main(parse_config(EvalConfig))
