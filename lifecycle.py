"""The life of a training run, shared by sft.py, grpo.py and dpo.py: plain functions each script
calls around its own loop (no Trainer, no callbacks: every loop stays in its script).

    device = start(cfg, check_config)              # flags checked, threads, kernels, processes, seeds
    model, tok = load_model(path, device, cfg)     # (staged on the CPU for --fsdp)
    state = open_out(cfg, RESUME_FIXED)            # lock OUT; on --resume the checked training state
    prepare_weights(model, cfg, device, state)     # --lora-rank adapters; on --resume the saved weights
    write_config(cfg); model = shard(model, cfg, device)
    opt, sched = optimizer(cfg, model, schedule, state, betas)   # + the saved moments, schedule and RNG
    logs = Logs(cfg, step)                         # metrics.jsonl / samples.jsonl, trimmed on --resume
    grad_norm, skipped = optimizer_step(model, opt, sched, cfg.grad_clip)   # skips a non-finite step
    checkpoint(cfg, model, tok, opt, sched, step, data=..., history=...)
    finish(cfg, logs, result)                      # result.json, curves.svg

Several processes (torchrun): every function here does the right thing on every rank (dist.py); only
rank 0 writes to OUT.
"""
import argparse
import dataclasses
import fcntl
import inspect
import json
import math
import os
import re

import numpy as np
import torch

import dist
import kernels
import plot
from checkpoint import load_state, rng_state, save, seed_everything, set_rng_state
from data import DataError
from model import add_lora, load, lora_layers, lora_state, merged_state_dict


# -----------------------------------------------------------------------------
# Starting: flags, threads, processes, seeds

def start(cfg, check_config):
    """Check every flag (before anything is loaded or written), set threads and kernels, join the
    process group (torchrun; else a no-op) and seed: rank r uses seed + r, so ranks sample differently
    and rank 0 is the single-process run. Returns the device."""
    check_flags(cfg, check_config)
    torch.set_num_threads(cfg.threads)
    kernels.set_mode(cfg.kernels)
    device = dist.init(cfg.device)
    seed_everything(cfg.seed + dist.rank())
    print(json.dumps(vars(cfg)))
    return device


def load_model(path, device, cfg):
    """(model, tok) from path; with --fsdp whole on the CPU first (shard() moves the shards)."""
    where, dtype = dist.staging(device, cfg.fsdp)
    return load(path, where, dtype, seed=cfg.seed)


def open_out(cfg, fixed):
    """Lock OUT (one run at a time); on --resume, the training state of its checkpoint, after checking
    this run's flags against those it was made with (check_resume). Nothing is written yet. None when
    not resuming."""
    if dist.is_main():
        lock_out(cfg.out)
    if not cfg.resume:
        return None
    state = load_state(cfg.out)
    check_resume(cfg, state.get("config"), fixed)
    return state


def prepare_weights(model, cfg, device, state):
    """The weights training starts from. --lora-rank r: LoRA adapters on the decoder's linear layers,
    everything else frozen (model.add_lora). --resume: the last checkpoint's weights, loaded whole
    (shard() shards them); with LoRA its adapters (trainer_state), over the same frozen base (--init)."""
    if cfg.lora_rank:
        n = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        print(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}: {n:,} trainable parameters of "
              f"{sum(p.numel() for p in model.parameters()):,}")
    if state is None:
        return
    if cfg.lora_rank:
        model.load_state_dict(state["lora"], strict=False)
        return
    where, dtype = dist.staging(device, cfg.fsdp)
    model.load_state_dict(load(cfg.out, where, dtype)[0].state_dict())


def shard(model, cfg, device):
    """--fsdp: the model sharded over the ranks (dist.shard_model); else the model itself."""
    return dist.shard_model(model, device) if cfg.fsdp and model is not None else model


def write_config(cfg):
    """OUT/run_config.json: the flags of this run (rank 0). After every check: a failed start never
    rewrites the record of the previous run."""
    if dist.is_main():
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "run_config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=2)


# -----------------------------------------------------------------------------
# The optimizer, its step, the checkpoint

def optimizer(cfg, model, schedule, state=None, betas=(0.9, 0.99), weight_decay=0.0):
    """AdamW (lr = cfg.lr) with a LambdaLR schedule(step) -> lr factor. On --resume: the saved moments
    and schedule position (with this run's lr: dist.resume_optimizer) and this rank's random streams."""
    opt = torch.optim.AdamW(dist.param_groups(model), lr=cfg.lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    if state is not None:
        dist.resume_optimizer(model, opt, sched, state["optimizer"], state["scheduler"])
        rngs = state.get("rng_by_rank", ())
        set_rng_state(rngs[dist.rank()] if len(rngs) == dist.world() else state["rng"])
    return opt, sched


def warmup_lr(warmup):
    """Linear warmup over `warmup` steps, then constant (grpo.py)."""
    return lambda step: min(1.0, (step + 1) / max(warmup, 1))


def cosine_lr(warmup, total):
    """Linear warmup, then cosine decay to 10% at `total` steps (sft.py, dpo.py)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def optimizer_step(model, opt, sched, grad_clip):
    """After the backward(s): sum the gradients over ranks (the global batch's gradient, dist.py), clip
    the global norm, step, advance the schedule. A NaN/inf gradient would poison the weights and Adam's
    moments: that update is skipped, but the step still counts (the schedule and the data stay where an
    uninterrupted run has them). Returns (grad norm, skipped)."""
    dist.sync_grads(model)
    grad_norm = dist.clip_grad_norm_(model, grad_clip)
    skipped = not bool(torch.isfinite(grad_norm))
    if not skipped:
        opt.step()
    sched.step()
    return grad_norm, skipped


def checkpoint(cfg, model, tok, opt, sched, step, **state):
    """Save weights + training state to OUT atomically (checkpoint.save): rank 0 writes (the replicas are
    identical), every rank's random streams go with it. state: what else the run needs to continue
    (its data position, history, ...). Collective: every rank calls it."""
    rngs = dist.gather_objects(rng_state())
    weights, optim = dist.model_state(model), dist.optimizer_state(model, opt)  # --fsdp: gathered, collective
    if lora_layers(model):  # a plain checkpoint of the merged weights; the adapters to resume from beside it
        weights, state = merged_state_dict(model), {**state, "lora": lora_state(model)}
    if dist.is_main():
        save(model, tok, cfg.out, {"optimizer": optim, "scheduler": sched.state_dict(), "step": step, "rng": rngs[0],
                                   "rng_by_rank": rngs, "config": vars(cfg), **state}, weights)
    dist.barrier()


# -----------------------------------------------------------------------------
# Logs and the end of a run

class Logs:
    """The run's JSONL logs in OUT (rank 0 writes; the other ranks write nowhere). A fresh run starts
    them empty (OUT holds one run); --resume first drops the lines logged after the checkpoint's step
    (trim_log), then appends, so the logs read as if the run had never stopped."""

    def __init__(self, cfg, step, metrics="metrics.jsonl", samples="samples.jsonl"):
        self.files = {}
        for key, name in (("metrics", metrics), ("samples", samples)):
            if name is None:
                continue
            path = os.path.join(cfg.out, name)
            if cfg.resume and dist.is_main():
                trim_log(path, step)
            self.files[key] = open(path if dist.is_main() else os.devnull, "a" if cfg.resume else "w")

    def metrics(self, m):
        self.files["metrics"].write(metrics_line(m))
        self.files["metrics"].flush()

    def samples(self, rows):
        for r in rows:
            self.files["samples"].write(json.dumps(r) + "\n")
        self.files["samples"].flush()

    def close(self):
        for f in self.files.values():
            f.close()


def finish(cfg, logs, result, name="result.json"):
    """OUT/result.json (the run's summary), the logs closed, OUT/curves.svg drawn (plot.py)."""
    if dist.is_main():
        with open(os.path.join(cfg.out, name), "w") as f:
            json.dump(result, f, indent=1)
    logs.close()
    if dist.is_main():
        print("curves:", plot.draw(cfg.out))   # every metric over the steps


def metrics_line(metrics):
    """One line of a metrics log. A value that is not a finite number (the grad norm of a skipped step,
    the mean of a reward every sample abstained from) is written as null: the log stays strict JSON,
    which Python's NaN / Infinity are not."""
    return json.dumps({k: v if not isinstance(v, float) or np.isfinite(v) else None for k, v in metrics.items()}) + "\n"


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
    types = {"int": int, "float": (int, float), "str": str, "bool": bool}
    bad = [f"--{f.name.replace('_', '-')} must be {f.type if isinstance(f.type, str) else f.type.__name__}, "
           f"got {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
           if not isinstance(getattr(cfg, f.name), types.get(f.type, f.type))
           or (f.type in (int, float, "int", "float") and isinstance(getattr(cfg, f.name), bool))]
    if bad:  # the ranges below compare numbers: report the types alone first
        raise ConfigError("; ".join(bad))
    bad = [msg for ok, msg in problems(cfg) + lora_checks(cfg) if not ok]
    if bad:
        raise ConfigError("; ".join(bad))


def lora_checks(cfg):
    """The LoRA flags every script has."""
    return [(cfg.lora_rank >= 0, f"--lora-rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}"),
            (cfg.lora_alpha > 0, f"--lora-alpha must be > 0, got {cfg.lora_alpha}"),
            (not (cfg.lora_rank and cfg.fsdp), "--lora-rank with --fsdp is not supported (the adapters are small: "
                                               "run data parallel without --fsdp)")]


def parse_config(cls, argv=None):
    """The flags of a config dataclass; -h shows each field's comment in the class body as its help."""
    ap = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    notes = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=notes.get(f.name, "-"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(flag, type=typ, default=f.default, help=notes.get(f.name, "-"))
    return cls(**vars(ap.parse_args(argv)))


def _field_comments(cls):
    """{field: its comment}, read from the class source: `name: type = default  # comment`, continued on
    the comment-only lines below it."""
    notes, last = {}, None
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return notes
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:\s*[\w\[\], ]+=.*?#\s?(.*)$", line)
        if m:
            last = m.group(1)
            notes[last] = m.group(2).strip()
        elif last and re.match(r"\s+#", line):
            notes[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return {k: v.replace("%", "%%") for k, v in notes.items()}


# -----------------------------------------------------------------------------
# Resuming and OUT

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
