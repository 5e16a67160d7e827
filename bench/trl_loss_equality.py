"""Our GRPO loss against TRL's, on identical tensors: the loss, every parameter's gradient and the token
log-probs, for every loss_type both have, with and without KL, on- and off-policy, token and sequence level.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl
    python bench/trl_loss_equality.py --trl-python /tmp/trl/bin/python [--json OUT.json]

What it does. It builds a tiny Qwen2 (random weights, seed 0: hidden 64, 2 layers, 4 heads, 2 KV heads,
vocabulary 96, tied embeddings, eager attention, fp32) and a word-level tokenizer, saves both to a
temporary directory, and builds one fixed batch of B = 8 rows: left-padded prompts of 2..6 tokens,
right-padded completions of 1..10 tokens (three run to the 10-token limit, the others end with EOS),
advantages of both signs, pi_old = our log-probs + noise (a per-row offset of up to +-0.35 plus
N(0, 0.3) per token, so that ratios cross both clip edges at token and at sequence level) and pi_ref =
our log-probs + N(0, 0.2). Our side, in this Python, calls grpo.micro_batch_loss on a grpo.Batch of
those tensors and backpropagates. TRL's side, bench/trl_loss_worker.py run by --trl-python, loads the
same directory, builds a GRPOTrainer per case (use_cpu, fp32, the case's GRPOConfig fields), calls
`trainer._compute_loss(model, inputs)` with the inputs dict TRL builds for itself (prompt_ids,
prompt_mask, completion_ids, completion_mask, advantages, num_items_in_batch, old_per_token_logps when
off-policy, ref_per_token_logps when beta > 0), backpropagates, and sends back the loss, the gradients
and its token log-probs. The cases are the product of the tables LOSS_TYPES x KL x ITERATIONS x LEVELS
below (a loss type is one line of LOSS_TYPES); a case our grpo.check_config refuses is listed as skipped.

The table, per case: |loss ours - loss TRL|; the largest |grad ours - grad TRL| over every entry of every
parameter, and that divided by the largest |grad TRL| entry (rel); the largest |log-prob ours - log-prob
TRL| over the completion tokens; and a verdict. What a difference means: fp32 rounding gives rel ~1e-7
to 1e-6 (the two sides add the same numbers in other orders: our log-softmax against TRL's chunked
fused LM head; position ids, below). `ok` = rel < 1e-5 and |dloss| < 1e-6 * max(1, |loss|). A case
whose conventions differ on purpose (TRL's use_bias_correction_kl, `bc` in its name) says so in its
verdict (`differs (expected)`), shows ours with TRL's extra term added (which must then agree), and is
left out of the overall maximum; anything else above the tolerance is a `MISMATCH`, with a cause to
find (the exit status is then 1). Measured with TRL 1.16.0: every same-convention case agrees to rel
<= 1.3e-6, |dloss| <= 6e-8, token log-probs to <= 1e-6 (1-2 ulps).

Conventions mapped here (ours -> TRL): epsilon_low -> epsilon, epsilon_high -> epsilon_high, except
cispo, whose IS weight ours caps at 1 + epsilon_high and TRL at epsilon_high (so TRL gets 1 + ours);
max_new_tokens -> max_completion_length (dr_grpo's constant); KL: both k3 of x = log pi - log pi_ref;
TRL's use_bias_correction_kl=True multiplies the per-token KL by the (differentiable) ratio, which ours
never does: with beta > 0 those cases differ in the gradient even on-policy (ratio 1, d ratio = d log pi)
and in the loss off-policy. Position ids: ours count real tokens (cumsum of the attention mask); TRL
passes none, so the model uses 0..T-1 and a left-padded row's positions are shifted by its padding.
RoPE depends only on relative positions, so the two agree up to rounding; the header prints the
log-prob differences for both position conventions. TRL's log-probs are 0 off the completion mask
(ours: the pad token's), which the loss never reads."""
import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
import kernels  # noqa: E402
import rollout  # noqa: E402
from model import token_logprobs  # noqa: E402

# ---- the cases -------------------------------------------------------------------------------------
EPS_LOW, EPS_HIGH = 0.2, 0.28           # ours: clip(rho, 1 - EPS_LOW, 1 + EPS_HIGH)
# loss types both have: ours -> (TRL's loss_type, TRL's epsilon_high from ours)
LOSS_TYPES = {
    "grpo": ("grpo", lambda e: e),
    "dapo": ("dapo", lambda e: e),
    "dr_grpo": ("dr_grpo", lambda e: e),
    "cispo": ("cispo", lambda e: 1 + e),  # TRL: min(rho, epsilon_high); ours: min(rho, 1 + epsilon_high)
    "sapo": ("sapo", lambda e: e),        # (no clipping: a sigmoid gate, sapo_temperature_pos / _neg)
}
KL = [(0.0, False), (0.04, False), (0.04, True)]  # (beta, TRL's use_bias_correction_kl)
ITERATIONS = [1, 2]                     # 1: no pi_old (ratio 1); 2: pi_old given
LEVELS = ["token", "sequence"]
SAPO_TEMPERATURES = (1.0, 1.05)         # TRL's defaults (sapo_temperature_pos, sapo_temperature_neg)

# ---- the batch -------------------------------------------------------------------------------------
B, P, C, G, V = 8, 6, 10, 4, 96         # rows, prompt width, completion width, group size, vocabulary
PROMPT_LENS = [6, 4, 5, 3, 6, 2, 5, 4]
COMPLETION_LENS = [10, 7, 10, 3, 5, 10, 1, 8]   # < C: ends with EOS; C: ran to the limit
ADVANTAGES = [-1.0, 0.8, -0.5, 1.2, -0.9, 1.1, 0.3, -0.6]
ROW_OFFSETS = [0.3, -0.3, 0.15, -0.15, 0.35, -0.35, 0.0, 0.25]  # pi_old - pi per row: sequence ratios cross both edges
ATTN = "eager"
PAD, EOS = 0, 1
GRAD_TOL, LOSS_TOL = 1e-5, 1e-6


def build_model(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i + 2 for i in range(V - 2)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         initializer_range=0.1, tie_word_embeddings=True, pad_token_id=PAD,
                                         eos_token_id=EOS, bos_token_id=None))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Qwen2ForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation=ATTN).train()


def build_batch(model):
    """[left-padded prompt | right-padded completion] as rollout.py lays it out, and the fixed log-probs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((B, P + C), PAD, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    cmask = torch.zeros((B, C))
    for i, (pl, cl) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        ids[i, P - pl:P] = torch.randint(2, V, (pl,), generator=g)
        comp = torch.randint(2, V, (cl,), generator=g)
        if cl < C:
            comp[-1] = EOS
        ids[i, P:P + cl] = comp
        attn[i, P - pl:P + cl] = 1
        cmask[i, :cl] = 1
    with torch.no_grad():
        lp = token_logprobs(model, ids, attn, C)
    on = cmask.bool()
    noise = 0.3 * torch.randn((B, C), generator=g) + torch.tensor(ROW_OFFSETS)[:, None]
    old = torch.where(on, lp + noise, lp)
    ref = torch.where(on, lp + 0.2 * torch.randn((B, C), generator=g), lp)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "prompt_len": P, "group_size": G,
            "advantages": torch.tensor(ADVANTAGES), "old_logp": old, "ref_logp": ref,
            "truncated": torch.tensor([cl == C for cl in COMPLETION_LENS])}


def clip_summary(d):
    """How often the clip edges bite in the off-policy cases: masked tokens (token level) and sequences."""
    m, A = d["completion_mask"], d["advantages"][:, None]
    with torch.no_grad():
        lp = token_logprobs(MODEL, d["input_ids"], d["attention_mask"], C)
    lr = (lp - d["old_logp"]) * m
    seq = (lr.sum(1, keepdim=True) / m.sum(1, keepdim=True)).exp()
    tok = lr.exp()
    low = lambda r, w: float((((r < 1 - EPS_LOW) & (A < 0)).float() * w).sum() / w.sum())
    high = lambda r, w: float((((r > 1 + EPS_HIGH) & (A > 0)).float() * w).sum() / w.sum())
    ones = torch.ones(B, 1)
    return {"token_clip_low": low(tok, m), "token_clip_high": high(tok, m),
            "token_ratio_range": [float(tok[m.bool()].min()), float(tok[m.bool()].max())],
            "seq_clip_low": low(seq, ones), "seq_clip_high": high(seq, ones),
            "seq_ratio_range": [float(seq.min()), float(seq.max())],
            "cispo_capped": float(((tok > 1 + EPS_HIGH).float() * m).sum() / m.sum())}


def make_cases():
    fields = {f.name for f in dataclasses.fields(grpo.GRPOConfig)}
    cases, skipped = [], []
    for (ours_lt, (trl_lt, trl_eps_high)), (beta, bias_kl), iters, level in itertools.product(
            LOSS_TYPES.items(), KL, ITERATIONS, LEVELS):
        name = f"{ours_lt:7s} beta={beta:<4g}{' bc' if bias_kl else '   '} it={iters} {level[:3]}"
        ours = dict(loss_type=ours_lt, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                    importance_sampling_level=level, num_iterations=iters)
        trl = dict(loss_type=trl_lt, beta=beta, epsilon=EPS_LOW, epsilon_high=trl_eps_high(EPS_HIGH),
                   importance_sampling_level=level, use_bias_correction_kl=bias_kl,
                   sapo_temperature_pos=SAPO_TEMPERATURES[0], sapo_temperature_neg=SAPO_TEMPERATURES[1])
        if ours_lt == "sapo":
            if not {"sapo_temperature_pos", "sapo_temperature_neg"} <= fields:
                skipped.append((name, "ours: GRPOConfig has no sapo_temperature_pos/_neg"))
                continue
            ours.update(sapo_temperature_pos=SAPO_TEMPERATURES[0], sapo_temperature_neg=SAPO_TEMPERATURES[1])
        cfg = grpo.GRPOConfig(**ours, temperature=1.0, max_new_tokens=C, kernels="off")
        refused = [msg for ok, msg in grpo.check_config(cfg) if not ok]
        if refused:
            skipped.append((name, "ours refuses: " + "; ".join(refused)))
            continue
        expected = None
        if bias_kl and beta != 0.0:
            expected = "TRL multiplies the KL by the ratio (use_bias_correction_kl); ours does not"
        cases.append({"name": name, "ours": ours, "trl": trl, "iterations": iters, "expected": expected})
    return cases, skipped


def ours_case(case, d, bias_corrected_kl=False):
    """Our loss and gradients; bias_corrected_kl adds beta * KL * (rho - 1) per token (TRL's
    use_bias_correction_kl: KL * rho in place of KL), to check that this alone explains those cases."""
    cfg = grpo.GRPOConfig(**case["ours"], temperature=1.0, max_new_tokens=C, kernels="off")
    mask = d["completion_mask"]
    roll = rollout.Rollout(d["input_ids"], d["attention_mask"], mask, torch.zeros_like(mask), d["truncated"], P)
    batch = grpo.Batch(roll, prompts=[None] * B, texts=[""] * B, per_fn=None, rewards=None,
                       advantages=d["advantages"], old_logp=d["old_logp"] if case["iterations"] > 1 else None,
                       ref_logp=d["ref_logp"] if case["ours"]["beta"] != 0.0 else None)
    MODEL.zero_grad(set_to_none=True)
    loss = grpo.micro_batch_loss(cfg, MODEL, batch, slice(0, B), num_seqs=B, num_tokens=int(mask.sum()))[0]
    if bias_corrected_kl:
        logp = token_logprobs(MODEL, d["input_ids"], d["attention_mask"], C)
        log_ratio = logp - (batch.old_logp if batch.old_logp is not None else logp.detach())
        if cfg.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        extra = cfg.beta * grpo.kl_penalty(logp, batch.ref_logp, cfg.kl_estimator) * (log_ratio.exp() - 1)
        loss = loss + grpo.aggregate(extra, mask, cfg.loss_type, B, int(mask.sum()), C)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in MODEL.named_parameters() if p.grad is not None}


def logp_with_positions(ids, attn, pos):
    """Our token log-probs with the given position ids (B, T) (to show what TRL's 0..T-1 changes)."""
    with torch.no_grad():
        h = MODEL.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        logits = MODEL.lm_head(h[:, -C - 1:-1]).float()
        return logits.log_softmax(-1).gather(-1, ids[:, -C:, None])[..., 0]


def differences(loss_o, grads_o, t):
    names = sorted(set(grads_o) | set(t["grads"]))
    missing = [n for n in names if n not in grads_o or n not in t["grads"]]
    diffs = {n: float((grads_o[n] - t["grads"][n]).abs().max()) for n in names if n not in missing}
    worst = max(diffs, key=diffs.get)
    gmax = max(float(g.abs().max()) for g in t["grads"].values())
    out = {"loss_diff": abs(loss_o - t["loss"]), "grad_diff": diffs[worst], "grad_max": gmax,
           "grad_rel": diffs[worst] / max(gmax, 1e-30), "worst_param": worst, "missing_grads": missing}
    out["agree"] = not missing and out["grad_rel"] < GRAD_TOL and out["loss_diff"] < LOSS_TOL * max(1.0, abs(t["loss"]))
    return out


def compare(case, d, t, logp_o, mask):
    loss_o, grads_o = ours_case(case, d)
    x = differences(loss_o, grads_o, t)
    row = {"case": case["name"], "loss_ours": loss_o, "loss_trl": t["loss"], **x,
           "logp_diff": float(((logp_o - t["logp"]).abs() * mask).max()), "expected": case["expected"]}
    if not case["expected"]:
        row["verdict"] = "ok" if x["agree"] else "MISMATCH"
    else:  # the expected cause, checked: ours with TRL's bias-corrected KL term added
        y = differences(*ours_case(case, d, bias_corrected_kl=True), t)
        row.update({"with_bias_correction_loss_diff": y["loss_diff"], "with_bias_correction_grad_rel": y["grad_rel"]})
        row["verdict"] = ("differs (expected)" if not x["agree"] else "agrees (despite expected difference)") + (
            f"; ours + beta*KL*(rho-1): rel {y['grad_rel']:.1e}, |dloss| {y['loss_diff']:.1e}"
            + ("" if y["agree"] else " NOT EXPLAINED"))
        row["explained"] = y["agree"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trl-python", required=True, help="a Python with trl installed (see the docstring)")
    ap.add_argument("--json", default="", help="also write the table (and the TRL defaults) to this file")
    a = ap.parse_args()
    global MODEL
    torch.set_num_threads(2)
    kernels.set_mode("off")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    cases, skipped = make_cases()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        MODEL = build_model(model_dir)
        d = build_batch(MODEL)
        torch.save({**d, "model_dir": model_dir, "attn_implementation": ATTN, "cases": cases},
                   os.path.join(tmp, "in.pt"))
        r = subprocess.run([a.trl_python, os.path.join(ROOT, "bench", "trl_loss_worker.py"), os.path.join(tmp, "in.pt"),
                            os.path.join(tmp, "out.pt")], capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            sys.exit(f"TRL worker failed ({r.returncode}):\n{r.stderr[-6000:]}")
        trl_out = torch.load(os.path.join(tmp, "out.pt"), weights_only=False)
    mask = d["completion_mask"]
    logp_o = token_logprobs(MODEL, d["input_ids"], d["attention_mask"], C).detach()
    attn = d["attention_mask"]
    logp_arange = logp_with_positions(d["input_ids"], attn, torch.arange(P + C)[None].expand(B, -1))
    logp_t = next(iter(trl_out["results"].values()))["logp"]
    positions = {"ours_vs_trl": float(((logp_o - logp_t).abs() * mask).max()),
                 "ours_with_trl_positions_vs_trl": float(((logp_arange - logp_t).abs() * mask).max()),
                 "ours_vs_ours_with_trl_positions": float(((logp_o - logp_arange).abs() * mask).max()),
                 "trl_off_mask_abs_max": float((logp_t.abs() * (1 - mask)).max())}
    clips = clip_summary(d)
    rows = [compare(c, d, trl_out["results"][c["name"]], logp_o, mask) for c in cases]

    print(f"TRL {trl_out['trl_version']} (transformers {trl_out['transformers_version']}, torch "
          f"{trl_out['torch_version']}) against ours (transformers {transformers.__version__}); "
          f"B={B} rows, prompt {P}, completion {C}, {int(mask.sum())} loss tokens, {ATTN} attention, fp32")
    print(f"off-policy inputs: token ratio {clips['token_ratio_range'][0]:.3f}..{clips['token_ratio_range'][1]:.3f}, "
          f"clipped low {clips['token_clip_low']:.2f} / high {clips['token_clip_high']:.2f} of tokens; sequence ratio "
          f"{clips['seq_ratio_range'][0]:.3f}..{clips['seq_ratio_range'][1]:.3f}, clipped low {clips['seq_clip_low']:.2f} "
          f"/ high {clips['seq_clip_high']:.2f} of sequences; cispo caps {clips['cispo_capped']:.2f} of tokens")
    print(f"token log-probs, max |diff| on the completion tokens: ours vs TRL {positions['ours_vs_trl']:.2e}; "
          f"ours with TRL's position ids 0..T-1 vs TRL {positions['ours_with_trl_positions_vs_trl']:.2e}; ours vs ours "
          f"with TRL's positions {positions['ours_vs_ours_with_trl_positions']:.2e}; TRL off the mask: "
          f"{positions['trl_off_mask_abs_max']:.1e}")
    print("TRL defaults: " + ", ".join(f"{k}={v!r}" for k, v in trl_out["defaults"].items()))
    print()
    head = f"{'case':30s} {'loss TRL':>11s} {'|dloss|':>9s} {'max|dgrad|':>10s} {'max|grad|':>9s} {'rel':>9s} " \
           f"{'max|dlogp|':>10s}  verdict"
    print(head)
    print("-" * len(head))
    for x in rows:
        print(f"{x['case']:30s} {x['loss_trl']:11.4e} {x['loss_diff']:9.2e} {x['grad_diff']:10.2e} {x['grad_max']:9.2e} "
              f"{x['grad_rel']:9.2e} {x['logp_diff']:10.2e}  {x['verdict']}"
              + (f" [worst: {x['worst_param']}]" if x["verdict"] != "ok" else "")
              + (f" missing grads: {x['missing_grads']}" if x["missing_grads"] else ""))
    for name, why in skipped:
        print(f"{name:30s} skipped: {why}")
    same = [x for x in rows if not x["expected"]]
    overall = {k: max((x[k] for x in same), default=0.0) for k in ("loss_diff", "grad_diff", "grad_rel", "logp_diff")}
    bad = [x["case"] for x in same if x["verdict"] != "ok"] + [x["case"] for x in rows if x.get("explained") is False]
    print()
    if any(x["expected"] for x in rows):
        print("bc = TRL's use_bias_correction_kl=True (its default): it multiplies the per-token KL by the ratio, which "
              "ours never does; the verdict shows ours with beta*KL*(rho-1) added against TRL")
    print(f"overall, the {len(same)} cases with the same conventions: max |dloss| {overall['loss_diff']:.2e}, max "
          f"|dgrad| {overall['grad_diff']:.2e} (rel {overall['grad_rel']:.2e}), max |dlogp| {overall['logp_diff']:.2e}; "
          + (f"MISMATCH in {len(bad)}: {', '.join(bad)}" if bad else "all agree")
          + f" ({time.time() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"trl_version": trl_out["trl_version"], "transformers_version": trl_out["transformers_version"],
                       "trl_defaults": trl_out["defaults"], "inputs": clips, "logp_positions": positions,
                       "cases": rows, "skipped": [{"case": n, "why": w} for n, w in skipped], "overall": overall,
                       "mismatches": bad}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
