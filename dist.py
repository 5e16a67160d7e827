"""Several processes: everything sft.py, grpo.py and dpo.py need from torch.distributed, in one place.

    torchrun --nproc_per_node=8 grpo.py --device cuda ...       # one node, 8 GPUs
    torchrun --nproc_per_node=2 grpo.py --threads 1 ...          # two CPU processes (gloo)

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
"""
import atexit
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
    """Sum every parameter's gradient over the ranks, in flat buckets (one dtype per bucket)."""
    if world() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
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
