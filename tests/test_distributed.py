"""Two CPU processes (gloo, as torchrun would start them) train exactly what one process trains on the
same global batch: same losses and metrics, same weights, within float tolerance (only the order of
the sums differs). The rollout is replaced by a deterministic one, a function of the prompt and the
sample's index, so both runs see the same global batch; everything after it is the real code:
prompt sharding, global advantages, global loss normalisation, gradient all-reduce, metric reduction,
rank-0-only checkpoints. The same again with --fsdp (FSDP2-sharded weights, gradients and AdamW state),
plus its checkpoint, its --resume and real rollouts of a sharded model."""
import json
import os
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import checkpoint as CK
import dpo
import grpo
import model as M
import rollout
import sft
from conftest import FP32_RTOL

TOY = "toy_rewards:digit_fraction"


def fake_generate(calls_before=0):
    """A stand-in for rollout.generate: completion j of a call is random tokens seeded by (prompt,
    which copy of that prompt, call number), 1..max_new_tokens long, EOS-terminated unless it used the
    whole budget. Independent of which rank, or which batch, the prompt is in. (calls_before: the
    calls a resumed run's first life made.)"""
    calls = [calls_before]

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


def grpo_cfg(out, fsdp=False, **kw):
    # dapo's token mean (global token count), batch-std advantages (global rewards), 2 micro-batches per
    # rank, PPO-style reuse and a KL term: every normaliser that crosses ranks is exercised
    return grpo.GRPOConfig(**{**dict(init="scratch", out=out, steps=3, num_prompts=4, num_generations=4,
                                     max_new_tokens=8, micro_batch=4, num_iterations=2, beta=0.04, lr=1e-3,
                                     loss_type="dapo", scale_rewards="batch", reward_funcs=TOY, eval_n=0,
                                     eval_every=0, sample_every=0, save_every=0, threads=1, fsdp=fsdp), **kw})


def sft_cfg(out, fsdp=False):
    return sft.SFTConfig(out=out, steps=3, batch_size=8, num_examples=16, eval_n=0, save_every=0, threads=1,
                         warmup=1, fsdp=fsdp)


def dpo_cfg(root, fsdp=False):
    data = os.path.join(root, "pairs.jsonl")
    with open(data, "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"{a}+{a + 1}=", "chosen": str(2 * a + 1), "rejected": str(2 * a)}) + "\n")
    return dpo.DPOConfig(data=data, out=os.path.join(root, "dpo"), steps=3, batch_size=4, micro_batch=1, lr=1e-3,
                         warmup=1, eval_n=0, save_every=0, threads=1, fsdp=fsdp)


def run_both(root, fsdp=False):
    grpo.generate = fake_generate()
    grpo.main(grpo_cfg(os.path.join(root, "grpo"), fsdp))
    sft.main(sft_cfg(os.path.join(root, "sft"), fsdp))
    os.makedirs(root, exist_ok=True)
    dpo.main(dpo_cfg(root, fsdp))
    if fsdp:  # GRPO again, killed after step 2 (its checkpoint), then --resume for step 3
        out = os.path.join(root, "grpo-resumed")
        grpo.generate = fake_generate()
        grpo.main(grpo_cfg(out, fsdp, steps=2))
        grpo.generate = fake_generate(calls_before=2)
        grpo.main(grpo_cfg(out, fsdp, resume=True))


def check_sharded_generate(rank):
    """Real rollouts of a sharded model: each rank decodes its own prompts for a different number of
    steps (which per-step all-gathers would turn into a hang), greedy, token for token what the whole
    model decodes."""
    import dist
    whole, tok = M.load("tiny")
    sharded = dist.shard_model(M.load("tiny")[0])
    prompts = [[12 + rank, 40, 50 + 3 * rank], [60, 61 - rank]][:1 + rank]
    for n in (3 + 5 * rank, 2):
        with dist.gathered(sharded):
            got = rollout.generate(sharded, tok, prompts, n, greedy=True, engine=dist.rollout_engine(sharded))
        want = rollout.generate(whole, tok, prompts, n, greedy=True)
        # bitwise by construction: gathered, the shards are the whole model's tensors exactly (copies),
        # and both decode with the same code on the same shapes in this process
        assert torch.equal(got.completion_ids, want.completion_ids)


def _worker(rank, world, port, root, fsdp=False):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    run_both(root, fsdp)
    if fsdp:
        check_sharded_generate(rank)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Threads: every process here runs one thread (threads=1 in the configs, set in _worker too), whatever
# TEST_THREADS says: the two workers already use both cores of a 2-core machine, and the one-process
# reference runs with one thread as well.
RUNS = (("grpo", "metrics.jsonl", ("loss", "reward", "reward_std", "entropy", "kl", "ratio", "grad_norm",
                                    "completions/mean_length")),
        ("sft", "sft_metrics.jsonl", ("loss", "grad_norm")),
        ("dpo", "metrics.jsonl", ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm")))


def compared(keys, step):
    """The metrics compared at a step. rewards/accuracies is a per-pair sign decision: at step 1 (policy ==
    reference) it is the sign of h = 0 up to rounding, so it is compared from step 2 on only, where every
    pair's margin is far from 0 (tests/test_dpo.py tests the decision itself on exact inputs)."""
    return [k for k in keys if not (k == "rewards/accuracies" and step == 1)]


# 1 vs 2 processes: the same sums in other orders (per-rank partial sums, the all-reduce, other
# micro-batches): relative FP32_RTOL (tests/conftest.py); abs for values at or near 0. Seen: <= 3% of
# rel 1e-5.
def same_metric(x, y):
    return y == pytest.approx(x, rel=FP32_RTOL, abs=1e-6)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """grpo, sft and dpo in this process: the reference both multi-process tests compare with."""
    one = str(tmp_path_factory.mktemp("one"))
    saved = grpo.generate
    try:
        run_both(one)
    finally:
        grpo.generate = saved
    return one


def test_two_processes_equal_one(tmp_path, one_process):
    one, two = one_process, str(tmp_path / "two")
    os.makedirs(two)
    mp.spawn(_worker, args=(2, free_port(), two), nprocs=2, join=True)

    for name, log, keys in RUNS:
        a, b = metrics(os.path.join(one, name, log)), metrics(os.path.join(two, name, log))
        assert [m["step"] for m in b] == [1, 2, 3]             # rank 0 alone wrote the log
        for x, y in zip(a, b):
            assert x["num_tokens"] == y["num_tokens"]          # the same global batch
            for k in compared(keys, x["step"]):
                assert same_metric(x[k], y[k]), (name, x["step"], k)
        wa = load_file(os.path.join(one, name, "model.safetensors"))
        wb = load_file(os.path.join(two, name, "model.safetensors"))
        assert wa.keys() == wb.keys()
        # Adam divides by sqrt(v): where a gradient is ~0 its reordered-sum rounding shows in the update,
        # so the weights agree to a small fraction of how far training moved them (seen: max |diff|
        # 2.8e-5 of a 7.7e-3 move for SFT at lr 3e-3, 1.8e-6 of 6.0e-3 for GRPO); losses to 1e-5.
        start = M.load("tiny")[0].state_dict()
        moved = max(float((wa[k] - start[k]).abs().max()) for k in wa)
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert moved > 1e-3 and diff < 0.01 * moved, (name, diff, moved)
    # the 2-process checkpoint holds both ranks' RNG states
    assert len(CK.load_state(os.path.join(two, "grpo"))["rng_by_rank"]) == 2


def test_fsdp_two_processes_equal_one(tmp_path, one_process):
    """--fsdp: the same losses and weights as one process, sharded weights and optimizer state
    notwithstanding; the rank-0 checkpoint is a whole from_pretrained model; --resume continues it."""
    from transformers import AutoModelForCausalLM
    one, two = one_process, str(tmp_path / "fsdp")
    os.makedirs(two)
    mp.spawn(_worker, args=(2, free_port(), two, True), nprocs=2, join=True)

    start = M.load("tiny")[0].state_dict()
    for name, log, keys in RUNS:
        a, b = metrics(os.path.join(one, name, log)), metrics(os.path.join(two, name, log))
        assert [m["step"] for m in b] == [1, 2, 3]
        for x, y in zip(a, b):
            assert x["num_tokens"] == y["num_tokens"]
            for k in compared(keys, x["step"]):
                assert same_metric(x[k], y[k]), (name, x["step"], k)
        # the checkpoint holds the whole model, loadable as it is; tolerance as in the test above (seen:
        # max |diff| 1.7e-6 of a 6.0e-3 move for GRPO, 2.8e-5 of 7.7e-3 for SFT, 4.2e-6 of 2.6e-3 for DPO)
        wa = load_file(os.path.join(one, name, "model.safetensors"))
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(two, name)).state_dict()
        assert loaded.keys() == start.keys()
        moved = max(float((wa[k] - start[k]).abs().max()) for k in wa)
        diff = max(float((wa[k] - loaded[k]).abs().max()) for k in wa)
        assert moved > 1e-3 and diff < 0.01 * moved, (name, diff, moved)
        assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()  # still tied
    # the sharded path ran: AdamW's state came back gathered from the shards, keyed by parameter name
    st = CK.load_state(os.path.join(two, "grpo"))["optimizer"]["state"]
    assert st["model.layers.0.mlp.up_proj.weight"]["exp_avg"].shape == start["model.layers.0.mlp.up_proj.weight"].shape
    # killed after step 2 and resumed under --fsdp (weights, sharded AdamW moments, schedule, data, RNG):
    # step 3 and the final weights are those of the uninterrupted sharded run, bit for bit (the whole
    # state restored exactly, then the same code on the same shapes with the same two processes and
    # threads on this machine: the same operations on the same numbers in the same order)
    a = metrics(os.path.join(two, "grpo", "metrics.jsonl"))
    b = metrics(os.path.join(two, "grpo-resumed", "metrics.jsonl"))
    assert [m["step"] for m in b] == [1, 2, 3]
    assert [m["loss"] for m in b] == [m["loss"] for m in a] and b[2]["grad_norm"] == a[2]["grad_norm"]
    wa = load_file(os.path.join(two, "grpo", "model.safetensors"))
    wb = load_file(os.path.join(two, "grpo-resumed", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_single_process_is_a_no_op(tiny, capsys):
    # without torchrun there is nothing to shard over: the model comes back whole, with a note
    import dist
    model, _ = tiny
    assert dist.shard_model(model) is model and not dist.is_sharded(model)
    assert "nothing to shard over" in capsys.readouterr().out


def test_fsdp_finds_the_decoder_layers():
    # the blocks shard_model wraps one by one, for the built-in Qwen2 and a Llama (untied head)
    import dist
    from transformers import AutoModelForCausalLM, LlamaConfig
    qwen, _ = M.load("tiny")
    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=3, num_attention_heads=2))
    for m, n in ((qwen, 4), (llama, 3)):
        assert dist.decoder_layers(m) == list(m.model.layers) and len(m.model.layers) == n
