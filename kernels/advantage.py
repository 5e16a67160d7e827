"""Group-relative advantages from the rewards of P prompts x G completions (grouped consecutively).

    adv = group_advantages_triton(rewards, G, scale="group", rloo=False)     # (P*G,) -> (P*G,)

Its specification is the trainer's own PyTorch path, grpo.group_advantages_torch, with estimator
"grpo" (rloo=False) or "rloo": the conventions live there, with the rest of the algorithm, and the test
(tests/test_kernels.py) compares the two. grpo.group_advantages calls this kernel on CUDA for the two
estimators it knows; an estimator added to grpo.py runs in PyTorch until a kernel learns it.

Conventions (TRL / verl): A_i = (R_i - mean_g) / (std_g + eps) with the unbiased (n - 1) std over the
scored samples of the group; scale "batch" divides by the std of every scored reward of the batch, "none"
does not divide (Dr. GRPO); rloo subtracts the mean of the other samples of the group instead of the
group mean. A NaN reward (no reward function could score that completion) gets advantage 0 and is left
out of every statistic; a group with fewer than 2 scored samples (G = 1 included) has nothing to compare
and gets 0.

The kernel is one program (P*G is a few thousand floats at most: the op is launch-bound, so what matters
is one launch and no host sync, not parallelism). It walks the groups in blocks of BLOCK_P rows of a
(BLOCK_P, next_pow2(G)) tile; with scale "batch" it first makes two passes for the batch mean and std.
"""
import torch
import triton
import triton.language as tl


# -----------------------------------------------------------------------------
# Kernel

SCALES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _advantage_kernel(r_ptr, out_ptr, P, G, eps, SCALE: tl.constexpr, RLOO: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
    gs = tl.arange(0, BLOCK_G)
    g_ok = gs < G
    if SCALE == 2:  # batch std: mean first, then squared deviations (two passes, unbiased)
        tot = tl.zeros((BLOCK_G,), tl.float32)
        cnt = tl.zeros((BLOCK_G,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            r = tl.load(r_ptr + ps[:, None] * G + gs[None, :], mask=(ps < P)[:, None] & g_ok[None, :],
                        other=float("nan")).to(tl.float32)
            v = r == r                                              # False on NaN and on padding
            tot += tl.sum(tl.where(v, r, 0.0), axis=0)
            cnt += tl.sum(v.to(tl.float32), axis=0)
        n_all = tl.sum(cnt, axis=0)
        b_mean = tl.sum(tot, axis=0) / tl.maximum(n_all, 1.0)
        ss = tl.zeros((BLOCK_G,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            r = tl.load(r_ptr + ps[:, None] * G + gs[None, :], mask=(ps < P)[:, None] & g_ok[None, :],
                        other=float("nan")).to(tl.float32)
            v = r == r
            ss += tl.sum(tl.where(v, (r - b_mean) * (r - b_mean), 0.0), axis=0)
        b_std = tl.where(n_all > 1, tl.sqrt(tl.sum(ss, axis=0) / tl.maximum(n_all - 1, 1.0)), 0.0)
    for p0 in range(0, P, BLOCK_P):
        ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        ok = (ps < P)[:, None] & g_ok[None, :]
        offs = ps[:, None] * G + gs[None, :]
        r = tl.load(r_ptr + offs, mask=ok, other=float("nan")).to(tl.float32)   # (BLOCK_P, BLOCK_G)
        valid = r == r
        r0 = tl.where(valid, r, 0.0)
        n = tl.sum(valid.to(tl.float32), axis=1)[:, None]                        # (BLOCK_P, 1)
        total = tl.sum(r0, axis=1)[:, None]
        mean = total / tl.maximum(n, 1.0)
        if RLOO:
            adv = r0 - (total - r0) / tl.maximum(n - 1, 1.0)
        else:
            adv = r0 - mean
        if SCALE == 1:
            dev = tl.where(valid, r0 - mean, 0.0)
            std = tl.sqrt(tl.sum(dev * dev, axis=1)[:, None] / tl.maximum(n - 1, 1.0))
            adv = adv / (std + eps)
        if SCALE == 2:
            adv = adv / (b_std + eps)
        adv = tl.where(valid & (n > 1), adv, 0.0)
        tl.store(out_ptr + offs, adv, mask=ok)


def group_advantages_triton(rewards, G, scale="group", rloo=False, eps=1e-4):
    """Same contract as the reference; fp32 out of the kernel, cast back to the rewards' dtype."""
    if rewards.numel() % G:
        raise ValueError(f"kernels/advantage.py: {rewards.numel()} rewards is not a multiple of G = {G}")
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    r = rewards.contiguous()
    P = r.numel() // G
    out = torch.empty(r.shape, device=r.device, dtype=torch.float32)
    if P == 0:
        return out.to(rewards.dtype)
    block_g = triton.next_power_of_2(G)
    block_p = min(triton.next_power_of_2(P), max(1, 4096 // block_g))
    _advantage_kernel[(1,)](r, out, P, G, float(eps), SCALE=SCALES[scale], RLOO=bool(rloo),
                            BLOCK_P=block_p, BLOCK_G=block_g)
    return out.to(rewards.dtype)


# -----------------------------------------------------------------------------
# Benchmark: python -m kernels.advantage   (CUDA)

if __name__ == "__main__":
    import sys
    import time
    if not torch.cuda.is_available():
        sys.exit("kernels/advantage.py benchmark needs a CUDA GPU")
    for P, G in [(32, 8), (512, 16), (4096, 8)]:
        r = torch.randn(P * G, device="cuda")
        r[::7] = float("nan")
        from grpo import group_advantages_torch   # the benchmark's reference (this module never imports grpo)
        for name, fn in [("reference", group_advantages_torch), ("triton", group_advantages_triton)]:
            fn(r, G); torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(100):
                fn(r, G)
            torch.cuda.synchronize()
            print(f"P={P} G={G} {name}: {(time.perf_counter() - t) * 1e4:.1f} us")
