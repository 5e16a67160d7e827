"""kernels/ on one GPU against the matmul floor, naive PyTorch, Liger-Kernel and cut-cross-entropy, and
the GRPO training step with kernels on vs off. One process, JSON lines on stdout.

    python bench/kernels_gpu.py                 # logprob + loss_head tables at the three shapes, then step
    python bench/kernels_gpu.py logprob step    # a subset
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --tiny    # CPU smoke test of every code path (no timings
                                                             # worth reading)

Shapes (H, V, N): (896, 151936, 4096), (896, 151936, 16384), (3584, 152064, 8192): Qwen2.5-0.5B and -7B
lm_heads at 4k-16k tokens, bf16. Liger-Kernel (FLCE with reduction='none', and its chunked GRPO loss)
and cut-cross-entropy (default gradient filter, and exact) are measured when importable
(`pip install liger-kernel cut-cross-entropy`), skipped otherwise.

Method (as ../shared/bench/anchors_gpu.py): time = mean of 10 calls (5 for forward+backward) after
warm-up, synchronised; memory = peak allocated above what the inputs hold; error = max |. - fp32
reference| of log p, dX and dW (gradient of sum(g * log p), g random). "floor" rows are cuBLAS: x @ W.T
alone (the forward's floor) and the three matmuls logits, dX, dW (the floor of a gradient-in-forward
loss; a log-prob backward that recomputes the logits does four).

step: one GRPO training step, rollout excluded (advantages, reference log-probs without grad, loss
forward + backward over micro-batches, AdamW), on a Qwen2.5-0.5B-shaped Qwen2 with random weights, bf16,
64 completions x 512 tokens after 128-token prompts, beta 0.04: seconds and peak memory, kernels on then
off, same process.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [("qwen0.5b", 896, 151936, 4096), ("qwen0.5b", 896, 151936, 16384), ("qwen7b", 3584, 152064, 8192)]
TINY_SHAPES = [("tiny", 64, 1003, 37), ("tiny", 80, 1000, 130)]


def out(**kw):
    print(json.dumps(kw), flush=True)


class Bench:
    def __init__(self, dev, iters):
        self.dev, self.iters = dev, iters

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, iters=None, warm=2):
        iters = iters or self.iters
        for _ in range(warm):
            fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return round((time.perf_counter() - t) / iters * 1e3, 3)

    def peak_mib(self, fn):
        if self.dev != "cuda":
            fn()
            return None
        self.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20)


# -----------------------------------------------------------------------------
# Providers: (x, W, y) -> log p (N,) fp32, differentiable

def providers(tiny):
    from kernels.logprob import fused_logprob

    def naive(x, W, y):
        return torch.log_softmax((x @ W.T).float(), -1).gather(1, y[:, None])[:, 0]

    p = {"naive_torch": naive, "ours": fused_logprob}
    if tiny:
        return p
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        p["liger_flce"] = lambda x, W, y: -flce(W, x, y)
    except Exception as e:
        out(kind="skip", provider="liger_flce", why=repr(e)[:200])
    try:
        from cut_cross_entropy import linear_cross_entropy
        p["cce"] = lambda x, W, y: -linear_cross_entropy(x, W, y, reduction="none")
        p["cce_exact"] = lambda x, W, y: -linear_cross_entropy(x, W, y, reduction="none", filter_eps=None)
    except Exception as e:
        out(kind="skip", provider="cce", why=repr(e)[:200])
    return p


def make_inputs(H, V, N, dev, dtype, seed=0):
    torch.manual_seed(seed)
    W = (torch.randn(V, H, device=dev) * 0.02).to(dtype).requires_grad_()
    x = torch.randn(N, H, device=dev).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    return x, W, y, g


def fp32_reference(x, W, y, g):
    """log p, dX, dW in fp32 (chunked, so the reference itself fits)."""
    from kernels.logprob import logprob_reference
    xf = x.detach().float().requires_grad_()
    Wf = W.detach().float().requires_grad_()
    lp = logprob_reference(xf, Wf, y, chunk_rows=2048)
    (lp * g).sum().backward()
    return lp.detach(), xf.grad, Wf.grad


def logprob_table(b, shapes, dtype, tiny):
    provs = providers(tiny)
    for name, H, V, N in shapes:
        x, W, y, g = make_inputs(H, V, N, b.dev, dtype)
        ref = fp32_reference(x, W, y, g)
        with torch.no_grad():
            t_mm = b.time(lambda: x @ W.T)
            L = x @ W.T
            t_dx = b.time(lambda: L @ W)
            t_dw = b.time(lambda: L.T @ x)
            del L
        out(kind="floor", shape=name, H=H, V=V, N=N, x_WT_ms=t_mm, three_matmuls_ms=round(t_mm + t_dx + t_dw, 3),
            four_matmuls_ms=round(2 * t_mm + t_dx + t_dw, 3), tflops_fwd=round(2 * N * H * V / t_mm / 1e9, 1))
        for pname, fn in provs.items():
            try:
                def fwd():
                    with torch.no_grad():
                        return fn(x, W, y)

                def fwd_bwd():
                    x.grad = W.grad = None
                    (fn(x, W, y) * g).sum().backward()
                lp = fwd()
                fwd_bwd()
                err = {"err_logp": (lp.float() - ref[0]).abs().max().item(),
                       "err_dX": (x.grad.float() - ref[1]).abs().max().item(),
                       "err_dW": (W.grad.float() - ref[2]).abs().max().item()}
                out(kind="logprob", shape=name, N=N, provider=pname, fwd_ms=b.time(fwd),
                    fwd_bwd_ms=b.time(fwd_bwd, max(1, b.iters // 2)), fwd_peak_mib=b.peak_mib(fwd),
                    fwd_bwd_peak_mib=b.peak_mib(fwd_bwd), **err)
            except Exception as e:
                out(kind="logprob", shape=name, N=N, provider=pname, err=repr(e)[:300])
            if b.dev == "cuda":
                torch.cuda.empty_cache()
        del x, W, y, g, ref


# -----------------------------------------------------------------------------
# Loss heads: the GRPO clipped surrogate + k3 KL (loss_type dapo, off-policy), forward + backward

def grpo_inputs(N, dev, y, seq=512):
    B = N // seq
    torch.manual_seed(1)
    mask = (torch.rand(B, seq, device=dev) > 0.1).float()
    adv = torch.randn(B, device=dev)
    return B, seq, mask, adv


def loss_head_table(b, shapes, dtype, tiny):
    import grpo
    from kernels.logprob import logprob_reference
    from kernels.loss_head import fused_loss_head
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    for name, H, V, N in shapes:
        seq = 512 if N % 512 == 0 else N
        x, W, y, _ = make_inputs(H, V, N, b.dev, dtype)
        B, C, mask, adv = grpo_inputs(N, b.dev, y, seq)
        with torch.no_grad():
            base = logprob_reference(x.detach(), W.detach(), y, chunk_rows=2048).view(B, C)
        old, ref = base + 0.05 * torch.randn_like(base), base + 0.05 * torch.randn_like(base)
        n_tok = int(mask.sum())
        reduce = lambda lt: grpo.aggregate(lt, mask, "dapo", B, n_tok, C)
        A = adv[:, None].expand(B, C).reshape(-1)
        old_f, ref_f = old.reshape(-1), ref.reshape(-1)

        def per_token(lp, rows):
            return grpo.per_token_loss(lp[:, None], old_f[rows, None], A[rows], None, eps_low, eps_high, "token",
                                       ref_f[rows, None], beta, "k3")[0][:, 0]

        def naive_logp(x, W, y):
            return torch.log_softmax((x @ W.T).float(), -1).gather(1, y[:, None])[:, 0]

        def torch_loss(logp_fn):
            def f():
                lp = logp_fn(x, W, y).view(B, C)
                return reduce(grpo.per_token_loss(lp, old, adv, mask, eps_low, eps_high, "token", ref, beta, "k3")[0])
            return f

        heads = {"naive_torch": torch_loss(naive_logp),
                 "ours_logprob+torch_loss": torch_loss(lambda x, W, y: providers(True)["ours"](x, W, y)),
                 "ours_fused_head": lambda: fused_loss_head(x.view(B, C, H), W, y.view(B, C), per_token, reduce)[0]}
        if not tiny:
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
                lg = LigerFusedLinearGRPOLoss(beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                                              loss_type="dapo", use_ref_model=True)
                heads["liger_chunked_grpo"] = lambda: lg(x.view(B, C, H), W, y.view(B, C), mask, adv,
                                                         ref_per_token_logps=ref, old_per_token_logps=old)[0]
            except Exception as e:
                out(kind="skip", provider="liger_chunked_grpo", why=repr(e)[:200])
            try:
                from cut_cross_entropy import linear_cross_entropy
                heads["cce+torch_loss"] = torch_loss(lambda x, W, y: -linear_cross_entropy(x, W, y, reduction="none"))
            except Exception as e:
                out(kind="skip", provider="cce", why=repr(e)[:200])
        grads = {}
        for hname, f in heads.items():
            try:
                def fwd_bwd():
                    x.grad = W.grad = None
                    loss = f()
                    loss.backward()
                    return loss
                loss = fwd_bwd().item()
                grads[hname] = (x.grad.float(), W.grad.float())
                out(kind="loss_head", shape=name, N=N, provider=hname, loss=loss,
                    fwd_bwd_ms=b.time(fwd_bwd, max(1, b.iters // 2)), fwd_bwd_peak_mib=b.peak_mib(fwd_bwd))
            except Exception as e:
                out(kind="loss_head", shape=name, N=N, provider=hname, err=repr(e)[:300])
        if "naive_torch" in grads:  # agreement of the gradients with the naive path (same dtype)
            gx, gw = grads["naive_torch"]
            for hname, (hx, hw) in grads.items():
                out(kind="loss_head_grad_diff", shape=name, provider=hname, max_dX=(hx - gx).abs().max().item(),
                    max_dW=(hw - gw).abs().max().item())
        del x, W, y, grads
        if b.dev == "cuda":
            torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# End to end: one GRPO training step, rollout excluded

def grpo_step(b, tiny, micro_batch):
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    import grpo
    import kernels
    from model import token_logprobs
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1003)
        B, P, C, G = 8, 8, 16, 4
        dtype = torch.float32
    else:
        shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936)
        B, P, C, G = 64, 128, 512, 8
        dtype = torch.bfloat16
    cfg_m = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg_m).to(b.dev, dtype).train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    V = shape["vocab_size"]
    ids = torch.randint(0, V, (B, P + C), device=b.dev)
    attn = torch.ones_like(ids)
    mask = (torch.rand(B, C, device=b.dev) > 0.1).float()
    R = torch.rand(B, device=b.dev)
    cfg = grpo.GRPOConfig(loss_type="dapo", beta=0.04, max_new_tokens=C, micro_batch=micro_batch)
    mbs = [slice(i, i + micro_batch) for i in range(0, B, micro_batch)]
    n_tok = int(mask.sum())

    def step():
        adv = grpo.group_advantages(R, G)
        with torch.no_grad():
            ref_logp = torch.cat([token_logprobs(ref_model, ids[s], attn[s], C) for s in mbs])
        opt.zero_grad(set_to_none=True)
        for s in mbs:
            loss, _, _ = grpo.micro_batch_loss(cfg, model, ids[s], attn[s], C, adv[s], mask[s], None, ref_logp[s],
                                               B, n_tok)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for mode in ("auto", "off"):
        kernels.set_mode(mode)
        try:
            ms = b.time(step, iters=3, warm=1)
            out(kind="grpo_step", kernels="on" if mode == "auto" else "off", B=B, prompt=P, completion=C,
                micro_batch=micro_batch, dtype=str(dtype), step_ms=ms, peak_mib=b.peak_mib(step))
        except Exception as e:
            out(kind="grpo_step", kernels=mode, err=repr(e)[:300])
    kernels.set_mode("auto")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="*", default=["logprob", "loss_head", "step"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (smoke test)")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward in the step")
    a = ap.parse_args()
    if a.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--tiny runs the kernels on CPU: set TRITON_INTERPRET=1 before starting python")
        import kernels
        # the trainers switch the kernels in for CUDA tensors only; here every tensor is on the CPU
        kernels.active = lambda t: kernels._mode == "auto"
        b, shapes, dtype = Bench("cpu", 1), TINY_SHAPES, torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/kernels_gpu.py needs a CUDA GPU (for a CPU smoke test of the code paths: "
                     "TRITON_INTERPRET=1 python bench/kernels_gpu.py --tiny)")
        b, shapes, dtype = Bench("cuda", 10), SHAPES, torch.bfloat16
        # (TF32 stays off: it would only touch the fp32 reference the errors are measured against)
        import triton
        out(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda)
    for part in a.parts:
        t0 = time.time()
        if part == "logprob":
            logprob_table(b, shapes, dtype, a.tiny)
        elif part == "loss_head":
            loss_head_table(b, shapes, dtype, a.tiny)
        elif part == "step":
            grpo_step(b, a.tiny, a.micro_batch if not a.tiny else 4)
        else:
            sys.exit(f"unknown part {part!r} (logprob, loss_head, step)")
        out(kind="part_done", part=part, s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
