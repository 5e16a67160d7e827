"""Two CPU processes (gloo, as torchrun would start them) train exactly what one process trains on the
same global batch: same losses and metrics, same weights, within float tolerance (only the order of
the sums differs). The rollout is replaced by a deterministic one, a function of the prompt and the
sample's index, so both runs see the same global batch; everything after it is the real code:
prompt sharding, global advantages, global loss normalisation, gradient all-reduce, metric reduction,
rank-0-only checkpoints."""
import json
import os
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dpo
import grpo
import rollout
import sft

TOY = "toy_rewards:digit_fraction"


def fake_generate():
    """A stand-in for rollout.generate: completion j of a call is random tokens seeded by (prompt,
    which copy of that prompt, call number), 1..max_new_tokens long, EOS-terminated unless it used the
    whole budget. Independent of which rank, or which batch, the prompt is in."""
    calls = [0]

    def generate(model, tok, prompts, max_new_tokens, *args, **kwargs):
        calls[0] += 1
        seen, rows = {}, []
        for p in prompts:
            k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
            g = torch.Generator().manual_seed(zlib.crc32(repr((p, k, calls[0])).encode()))
            n = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
            ids = torch.randint(10, len(tok), (n,), generator=g).tolist()
            if n < max_new_tokens:
                ids[-1] = tok.eos_token_id
            rows.append(ids + [tok.pad_token_id] * (max_new_tokens - n))
        pids, pmask = rollout.left_pad(prompts, tok.pad_token_id, "cpu")
        comp = torch.tensor(rows)
        return rollout.finish(pids, pmask, comp, torch.zeros(comp.shape), tok.eos_token_id)
    return generate


def grpo_cfg(out):
    # dapo's token mean (global token count), batch-std advantages (global rewards), 2 micro-batches per
    # rank, PPO-style reuse and a KL term: every normaliser that crosses ranks is exercised
    return grpo.GRPOConfig(init="scratch", out=out, steps=3, num_prompts=4, num_generations=4, max_new_tokens=8,
                           micro_batch=4, num_iterations=2, beta=0.04, lr=1e-3, loss_type="dapo",
                           scale_rewards="batch", reward_funcs=TOY, eval_n=0, eval_every=0, sample_every=0,
                           save_every=0, threads=1)


def sft_cfg(out):
    return sft.SFTConfig(out=out, steps=3, batch_size=8, num_examples=16, eval_n=0, save_every=0, threads=1,
                         warmup=1)


def dpo_cfg(root):
    data = os.path.join(root, "pairs.jsonl")
    with open(data, "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"{a}+{a + 1}=", "chosen": str(2 * a + 1), "rejected": str(2 * a)}) + "\n")
    return dpo.DPOConfig(data=data, out=os.path.join(root, "dpo"), steps=3, batch_size=4, micro_batch=1, lr=1e-3,
                         warmup=1, eval_n=0, save_every=0, threads=1)


def run_both(root):
    grpo.generate = fake_generate()
    grpo.main(grpo_cfg(os.path.join(root, "grpo")))
    sft.main(sft_cfg(os.path.join(root, "sft")))
    os.makedirs(root, exist_ok=True)
    dpo.main(dpo_cfg(root))


def _worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    run_both(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_processes_equal_one(tmp_path, monkeypatch):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    monkeypatch.setattr(grpo, "generate", grpo.generate)       # restored after the in-process run
    run_both(one)
    os.makedirs(two)
    mp.spawn(_worker, args=(2, free_port(), two), nprocs=2, join=True)

    for name, log, keys in (("grpo", "metrics.jsonl", ("loss", "reward", "reward_std", "entropy", "kl", "ratio",
                                                       "grad_norm", "completions/mean_length")),
                            ("sft", "sft_metrics.jsonl", ("loss", "grad_norm")),
                            ("dpo", "metrics.jsonl", ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen",
                                                      "grad_norm"))):
        a, b = metrics(os.path.join(one, name, log)), metrics(os.path.join(two, name, log))
        assert [m["step"] for m in b] == [1, 2, 3]             # rank 0 alone wrote the log
        for x, y in zip(a, b):
            assert x["num_tokens"] == y["num_tokens"]          # the same global batch
            for k in keys:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (name, x["step"], k)
        wa = load_file(os.path.join(one, name, "model.safetensors"))
        wb = load_file(os.path.join(two, name, "model.safetensors"))
        assert wa.keys() == wb.keys()
        # Adam divides by sqrt(v): where a gradient is ~0 its reordered-sum rounding shows in the update,
        # so the weights agree to a small fraction of how far training moved them (seen: max |diff|
        # 2.8e-5 of a 7.7e-3 move for SFT at lr 3e-3, 1.8e-6 of 6.0e-3 for GRPO); losses to 1e-5.
        start = grpo.load("tiny")[0].state_dict()
        moved = max(float((wa[k] - start[k]).abs().max()) for k in wa)
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert moved > 1e-3 and diff < 0.01 * moved, (name, diff, moved)
    # the 2-process checkpoint holds both ranks' RNG states
    assert len(grpo.load_state(os.path.join(two, "grpo"))["rng_by_rank"]) == 2
