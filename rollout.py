"""Batched sampling with a KV cache: prompts in, completions + masks + sampling log-probs out.

    r = generate(model, tok, [[ids of prompt 1], [ids of prompt 2], ...], max_new_tokens=64, temperature=1.0)
    r.input_ids       (B, P+C)  [left-padded prompt | right-padded completion], the training layout
    r.completion_mask (B, C)    1 up to and including the first EOS, 0 after it (pad != EOS)
    r.logprobs        (B, C)    log-prob of each sampled token under softmax(logits / temperature)

The loop: one forward over the left-padded prompts fills the cache, then one token per step for every
row, until every row has emitted EOS or max_new_tokens is reached. Rows that have finished keep
stepping (emitting pad) because a batch moves together; their tokens are masked out.

Sampling log-probs are taken from softmax(logits / temperature) before top-k / top-p: that is the
distribution training recomputes (model.token_logprobs at the same temperature), so on-policy the
ratio pi_theta / pi_old is 1. With top-k / top-p the tokens are drawn from the truncated
distribution instead, so the rollout is slightly off-policy with respect to those log-probs.
"""
from dataclasses import dataclass

import torch

from model import position_ids


@dataclass
class Rollout:
    input_ids: torch.Tensor        # (B, P+C) long
    attention_mask: torch.Tensor   # (B, P+C) long, 0 on pads (left of the prompt, after the EOS)
    completion_mask: torch.Tensor  # (B, C) float, 1 on completion tokens up to and including EOS
    logprobs: torch.Tensor         # (B, C) float32, sampling log-probs (0 where masked)
    truncated: torch.Tensor        # (B,) bool, True when no EOS was produced within max_new_tokens
    prompt_len: int                # P

    @property
    def completion_ids(self):
        return self.input_ids[:, self.prompt_len:]


def left_pad(seqs, pad_id, device):
    """List of id lists -> (B, P) ids and mask, padded on the left so every prompt ends at column P-1."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), P), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids, mask


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set everything outside the top-k / nucleus (top-p) set to -inf. logits (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p             # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    """Sample one completion per prompt (repeat prompts for G samples each). prompts: list of id lists."""
    device = next(model.parameters()).device
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)                  # (B, P)
    B, P = prompt_ids.shape
    mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                logits_to_keep=1)                                             # only the last position's logits
    cache, logits = out.cache, out.logits[:, -1]                              # logits (B, V)
    pos = position_ids(mask)[:, -1]                                           # (B,) position of last token
    tokens, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = logits.float()
        if greedy:
            nxt = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
        else:
            scaled = logits / temperature
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1).squeeze(-1)                     # (B,)
            logp = torch.log_softmax(scaled, -1).gather(-1, nxt[:, None]).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)               # finished rows emit pad
        tokens.append(nxt)
        logps.append(torch.where(done, torch.zeros_like(logp), logp))
        done = done | (nxt == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], dim=1)  # attend to tokens up to EOS
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    completion = torch.stack(tokens, 1)                                       # (B, C)
    # Completion mask: every token up to and including the first EOS. cumsum of is-EOS counts EOSes
    # seen so far; a token is kept while no EOS came strictly before it.
    is_eos = (completion == eos).long()
    completion_mask = ((is_eos.cumsum(1) - is_eos) == 0).float()
    truncated = is_eos.sum(1) == 0
    input_ids = torch.cat([prompt_ids, completion], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    return Rollout(input_ids, attention_mask, completion_mask, torch.stack(logps, 1) * completion_mask,
                   truncated, P)
