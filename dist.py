"""Several processes: everything sft.py, grpo.py and dpo.py need from torch.distributed, in one place.

    torchrun --nproc_per_node=8 grpo.py --device cuda ...       # one node, 8 GPUs
    torchrun --nproc_per_node=2 grpo.py --threads 1 ...          # two CPU processes (gloo)
    torchrun --nproc_per_node=8 grpo.py --device cuda --fsdp ... # one node, 8 GPUs, the model sharded

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE unset or 1
nothing here does anything and the scripts run exactly as a single process.

Data parallel, with the whole batch's normalisation. Every rank draws the same global batch from the
same seeded data stream and keeps its own contiguous slice (shard), so all G samples of a GRPO prompt
live on one rank. Each rank's loss is its samples' share of the GLOBAL loss: sums over its tokens
divided by the global token / sequence count (all-reduced). After the backward the gradients are
SUMMED across ranks (sync_grads), which then equals the single-process gradient of the global batch:
sum_r d(sum_{t in r} l_t / N)/d theta = d(sum_t l_t / N)/d theta. Metrics are reduced the same way.

Why not torch's DistributedDataParallel wrapper: DDP only synchronises gradients of a backward whose
forward went through DDP.forward, and the scripts never call the wrapped module as a whole:
model.token_logprobs runs the decoder and then the lm_head in row chunks (and a fused kernel may form
the lm_head's gradient inside its forward). An explicit bucketed all-reduce after the backward is
correct for any forward path; it gives up DDP's overlap of communication with the backward.

Sharded (--fsdp): FSDP2, torch's `fully_shard` (Zhao et al. 2023, "PyTorch FSDP"), for a model whose
weights, gradients and AdamW state do not fit one device; without --fsdp nothing of this runs.
- What is sharded: each decoder layer, then the decoder as a whole (model.base_model, the root):
  every rank keeps 1/N of each parameter (dim 0), of its gradient and of its AdamW moments. A layer's
  full weights exist only while its forward or backward runs (all-gathered, then freed) and its
  gradient is reduce-scattered right after its backward. FSDP's hooks fire because
  model.completion_hidden calls base_model itself.
- What is replicated: the lm_head weight, kept OUT of FSDP (`ignored_params`) as a plain tensor on
  every rank, because it is read outside any module's forward: completion_hidden hands it to
  logprobs_from_hidden or to the fused loss head (which forms its gradient inside its own forward),
  where no FSDP hook would gather it. With tied embeddings (Qwen2.5-0.5B, the built-in model) it IS
  embed_tokens.weight, which is then replicated too.
- Gradients: the sharded ones are SUMMED by FSDP's reduce-scatter (divide factor 1, sum-only
  collectives), the head's by sync_grads: the convention above, so the step is again the
  single-process one on the global batch. clip_grad_norm_ forms the global norm from the shards
  (torch's own refuses a mix of sharded and plain gradients); AdamW gets the shards and the head in
  separate groups (its foreach path refuses the mix too).
- Memory: the head with its gradient and two AdamW moments is on every rank (V x H: 152k x 3584 for
  Qwen2.5-7B, 4 x 1.1 GB in bf16); everything else is divided by N. Rollouts and evaluation run with
  the whole decoder gathered (`gathered`): ranks decode different prompts for different numbers of
  steps, and per-step all-gathers would leave a rank that stopped early waiting forever. So the
  full weights must fit one device next to the shards while sampling; the gradients and optimizer
  state, the bulk of training memory, never have to. Each rank reads the whole checkpoint into host
  memory once before sharding (`staging`).
- Checkpoints: the full weights and optimizer state are gathered (a collective: every rank calls it),
  rank 0 writes the usual from_pretrained directory, and --resume reads it back into the shards: a
  sharded run saves and resumes exactly as an unsharded one.
- In a single process --fsdp has nothing to shard over: a note, and the model stays whole. Not with
  grpo's --dynamic-sampling: ranks may keep different numbers of groups, hence run different numbers
  of sharded forwards, and those must run in lockstep.
"""
import atexit
import contextlib
import os

import torch
import torch.distributed as dist

BUCKET = 1 << 25   # elements per all-reduce (128 MB of fp32): bounded extra memory, few launches


def init(device):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.
    Returns the device this rank uses (cuda:LOCAL_RANK on a GPU node)."""
    if world() == 1 or dist.is_initialized():
        return _local_device(device)
    device = _local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return device


def _local_device(device):
    if str(device) == "cuda" and world() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return str(device)


def world():
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def shard(items):
    """This rank's contiguous slice of a global list whose length the world size divides."""
    n, w = len(items), world()
    if n % w:
        raise ValueError(f"a global batch of {n} does not split over {w} processes; make it a multiple of {w}")
    return items[rank() * n // w:(rank() + 1) * n // w]


def all_sum(x):
    """Sum of a number (or a float tensor) over all ranks; x itself in a single process."""
    if world() == 1:
        return x
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"  # nccl: GPU only
    t = torch.as_tensor(x, dtype=torch.float64).to(on, copy=True)
    dist.all_reduce(t)
    return t.item() if not isinstance(x, torch.Tensor) else t.to(x.device, x.dtype)


def all_max(x):
    """Maximum of a number over all ranks; x itself in a single process."""
    if world() == 1:
        return x
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(x, dtype=torch.float64).to(on, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_cat(t):
    """Concatenate a per-rank CPU tensor (any length along dim 0) in rank order on every rank.
    Returns (global tensor, offset of this rank's rows)."""
    if world() == 1:
        return t, 0
    parts = [None] * world()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts).to(t.device), sum(p.shape[0] for p in parts[:rank()])


def gather_objects(x):
    """[x of rank 0, x of rank 1, ...] on every rank."""
    if world() == 1:
        return [x]
    out = [None] * world()
    dist.all_gather_object(out, x)
    return out


def sync_grads(model):
    """Sum every parameter's gradient over the ranks, in flat buckets (one dtype per bucket). Under
    --fsdp only the unsharded ones (the lm_head): FSDP has already summed the sharded ones (DTensors)."""
    if world() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None and not _is_dtensor(p.grad)]
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        bucket, size = [], 0
        for g in gs + [None]:
            if g is not None and (size + g.numel() <= BUCKET or not bucket):
                bucket.append(g)
                size += g.numel()
                continue
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            for b, f in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(f.view_as(b))
            bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def barrier():
    if world() > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# Sharded data parallel (--fsdp): see the module docstring.

def _is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def staging(device, fsdp):
    """(device, dtype) for model.load before shard_model. Under --fsdp with several ranks: the CPU, so
    that the whole model never has to fit the accelerator (fully_shard then moves each layer there and
    keeps this rank's shard of it), in the dtype the accelerator would get (model.load's rule: bf16 on
    CUDA, fp32 elsewhere). Otherwise (device, None): load as usual. (Every rank reads the whole
    checkpoint into host memory once.)"""
    if not fsdp or world() == 1:
        return device, None
    return "cpu", torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def shard_model(model, device="cpu"):
    """Shard a model in place with FSDP2 over all ranks, its shards on `device`: each decoder layer,
    then the decoder (the root), all but the lm_head weight, which is moved to `device` whole. In a
    single process there is nothing to shard over: the model is returned as is."""
    if world() == 1:
        print("--fsdp in a single process: nothing to shard over, the model stays whole (launch with torchrun)")
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (world(),))
    head = {model.get_output_embeddings().weight}   # tied: this is also embed_tokens.weight
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, ignored_params=head)
    fully_shard(model.base_model, mesh=mesh, ignored_params=head)
    for p in model.parameters():                    # what FSDP left alone: the head (and any other
        if not _is_dtensor(p):                      # parameter outside base_model)
            p.data = p.data.to(device)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # sum, not FSDP's default mean, over ranks: each rank's loss is already its share of the
            # global loss (see above). Sum-only comms also keep gloo (no PREMUL_SUM) working.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def decoder_layers(model):
    """The repeated blocks to shard one by one: the outermost modules whose class the model names in
    _no_split_modules (Qwen2DecoderLayer, LlamaDecoderLayer, ...), else base_model.layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks, prefixes = [], []
    for name, m in model.base_model.named_modules():
        if type(m).__name__ in names and not any(name.startswith(p) for p in prefixes):
            blocks.append(m)
            prefixes.append(name + ".")
    if not blocks:
        blocks = list(getattr(model.base_model, "layers", ()))
    if not blocks:
        raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (no _no_split_modules "
                         f"class among its modules, no base_model.layers)")
    return blocks


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def rollout_engine(model, engine="auto"):
    """A sharded model decodes with the simple engine: the static / CUDA-graph engines keep buffers and
    captured addresses of the weights across calls, and a sharded model's gathered weights are freed
    and re-allocated (elsewhere) between rollouts."""
    return "simple" if is_sharded(model) else engine


def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the whole model, also when some gradients are shards
    (DTensors) and some are replicated: the global norm is sqrt(sum over ranks of the squared norms of
    the local shards + the squared norm of the replicated gradients, counted once). Scales in place;
    returns the norm before clipping (a 0-d tensor, NaN/inf when some gradient is)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not any(_is_dtensor(p.grad) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.to_local() if _is_dtensor(p.grad) else p.grad for p in params]
    sq = [torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]
    sharded = sum(s for s, p in zip(sq, params) if _is_dtensor(p.grad))
    dist.all_reduce(sharded)                                  # (replicated: already equal on every rank)
    total = (sharded + sum(s for s, p in zip(sq, params) if not _is_dtensor(p.grad))).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)        # torch's formula
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


@contextlib.contextmanager
def gathered(model):
    """Hold the whole sharded model gathered on every rank for a while (rollouts, evaluation): one
    all-gather per layer on entry, then forwards without any communication, resharded on exit. Ranks
    decode different prompts for different numbers of steps; with the usual per-forward all-gathers a
    rank that stops early would leave the others waiting forever. Costs the full weights on every
    rank for that time. For no-grad forwards only. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        if m is not model.base_model:          # (the root is never resharded after its forward)
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            if m is not model.base_model:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def model_state(model):
    """The full state dict of a sharded model, on CPU, on rank 0 ({} elsewhere): a collective, every
    rank calls it. None for an unsharded model (save() reads the model itself)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, opt):
    """opt.state_dict(); for a sharded model the full one (gathered, keyed by parameter name, on
    rank 0): a collective, every rank calls it."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state):
    """Inverse of optimizer_state: every rank passes the full state and keeps its own shards."""
    if not is_sharded(model):
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def resume_optimizer(model, opt, sched, opt_state, sched_state):
    """Load the saved AdamW moments and the schedule's position, but keep this run's hyperparameters (lr,
    betas, weight decay: what the flags say and run_config.json records). The saved states carry the old
    ones, so a --resume with a new --lr would otherwise train at the old lr. The current lr is then this
    run's lr times the schedule at the saved step, as LambdaLR computes it (an unchanged --resume is
    bitwise the uninterrupted run)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    load_optimizer_state(model, opt, opt_state)
    sched.load_state_dict(sched_state)
    sched.base_lrs = [h["initial_lr"] for h in hyper]
    for g, h, lam in zip(opt.param_groups, hyper, sched.lr_lambdas):
        g.update(h)
        g["lr"] = h["initial_lr"] * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def param_groups(model):
    """What AdamW takes: the parameters; for a sharded model two groups, the shards and the replicated
    rest, because AdamW's multi-tensor (foreach) path refuses a mix of DTensors and plain tensors."""
    params = [p for p in model.parameters() if p.requires_grad]   # (--lora-rank: the adapters only)
    if not is_sharded(model):
        return params
    groups = [[p for p in params if _is_dtensor(p)], [p for p in params if not _is_dtensor(p)]]
    return [{"params": g} for g in groups if g]
