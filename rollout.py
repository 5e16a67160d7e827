"""Batched sampling with a KV cache: prompts in, completions + masks + sampling log-probs out.

    r = generate(model, tok, [[ids of prompt 1], [ids of prompt 2], ...], max_new_tokens=64, temperature=1.0)
    r.input_ids       (B, P+C)  [left-padded prompt | right-padded completion], the training layout
    r.completion_mask (B, C)    1 up to and including the first EOS, 0 after it (pad != EOS)
    r.loss_mask       (B, C)    the tokens a loss is over: a copy of completion_mask the trainer may cut
    r.logprobs        (B, C)    log-prob of each sampled token under softmax(logits / temperature)

The loop: one forward over the left-padded prompts fills the cache, then one token per step for every
row, until every row has emitted EOS or max_new_tokens is reached. Rows that have finished keep
stepping (emitting pad) because a batch moves together; their tokens are masked out.

Sampling log-probs are taken from softmax(logits / temperature) over the whole vocabulary: that is the
distribution training recomputes (model.token_logprobs at the same temperature), so on-policy the
ratio pi_theta / pi_old is 1. A sampled token is drawn with the pad token removed (a pad inside a
completion would read as padding), and, with top-k / top-p, from the truncated distribution; so the
rollout is slightly off-policy with respect to those log-probs (by the pad's probability mass, which
a trained model gives ~0, and by whatever top-k / top-p cut off).

The engines compute the same thing (`engine=`):

  simple  the loop above with transformers' dynamic cache: the cache grows by concatenation and every
          step allocates, so the step cannot be replayed. Fine on a CPU, where the arithmetic dominates.
  static  a pre-allocated cache of P + max_new_tokens columns (transformers' StaticCache), fixed-shape
          buffers for the token, position, attention mask, outputs and "done" flags, and one function
          that does a whole decode step in place on them, with no host sync. Runs on any device.
  graph   static, with that decode step captured once into a CUDA graph and replayed: on a GPU the
          eager step is launch-bound (hundreds of small kernels per token), a replay is one launch.
  auto    graph on CUDA, simple elsewhere (the default).

Greedy output is the same token for token in every engine, and equals model.generate (tested).
Sampled tokens differ between simple and static/graph for the same seed: static draws with the
exponential race (argmax p / E, E ~ Exp(1), computed as the Gumbel-max argmax logit - log E), which
is exact sampling and capturable, where simple calls torch.multinomial.

The static engines keep their buffers with the model between calls (one set per batch size, prompt
width, max_new_tokens and sampling setting; at most MAX_DECODERS), so a training loop that generates
the same shape every step captures once. That memory (the K/V cache: 2 * layers * B * kv_heads *
(P + max_new_tokens) * head_dim elements, plus the graph's activations) stays allocated until
clear_decoders(model) or until the model is freed.
"""
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StaticCache

from model import position_ids


@dataclass
class Rollout:
    input_ids: torch.Tensor        # (B, P+C) long
    attention_mask: torch.Tensor   # (B, P+C) long, 0 on pads (left of the prompt, after the EOS)
    completion_mask: torch.Tensor  # (B, C) float, 1 on completion tokens up to and including EOS
    logprobs: torch.Tensor         # (B, C) float32, sampling log-probs (0 where masked)
    truncated: torch.Tensor        # (B,) bool, True when no EOS was produced within max_new_tokens
    prompt_len: int                # P
    loss_mask: torch.Tensor = None  # (B, C) float, the tokens training learns from: the completion mask
                                   # (its own copy), minus what the trainer drops (truncated rows with
                                   # --mask-truncated-completions; tokens the model did not write)
    tool_stats: dict = None        # with tools: per row (B,) counts: calls, errors, timeouts, over_limit,
                                   # output_tokens (tools.py)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask.clone()

    @property
    def completion_ids(self):
        return self.input_ids[:, self.prompt_len:]


def left_pad(seqs, pad_id, device):
    """List of id lists -> (B, P) ids and mask, padded on the left so every prompt ends at column P-1.
    Built on the CPU and moved once (row by row on a GPU would be B small copies)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# Sampling: one function for every engine. Only device ops, no host sync, no host-to-device copy, so
# it can sit inside a captured CUDA graph.

@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False


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


def sample(logits, s: Sampling, pad_id=None, race=False):
    """logits (B, V) -> next token (B,) long, its log-prob (B,) fp32 under softmax(logits / temperature)
    over the full vocabulary (temperature 1 when greedy). A sampled token is drawn with pad_id removed;
    greedy is the plain argmax, exactly what model.generate does, so that it stays the reference.
    race=True draws with the exponential race instead of torch.multinomial (same distribution)."""
    scaled = logits.float()                                                   # (B, V)
    if not s.greedy and s.temperature != 1.0:
        scaled = scaled / s.temperature
    if s.greedy:
        nxt = scaled.argmax(-1)
    else:
        allowed = scaled
        if pad_id is not None:
            allowed = scaled.clone()
            allowed[:, pad_id].fill_(float("-inf"))   # a fill kernel: no host tensor to copy in a capture
        allowed = filter_logits(allowed, s.top_k, s.top_p)
        if race:
            # argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p; in logs, argmax_i logit_i - log E_i
            # (the Gumbel-max trick: -log E is Gumbel), which needs no softmax. E is clamped away from 0:
            # log 0 = -inf would turn a -inf logit into NaN, and argmax picks NaN.
            e = torch.empty_like(allowed).exponential_().clamp_min_(torch.finfo(allowed.dtype).tiny)
            nxt = (allowed - e.log_()).argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(allowed, dim=-1), 1).squeeze(-1)
    logp = scaled.gather(-1, nxt[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
    return nxt, logp


def finish(prompt_ids, prompt_mask, completion, logps, eos_id, forced=None, tool_stats=None):
    """Completion (B, C) + its sampling log-probs -> the Rollout (training layout and masks). forced (B, C)
    bool: tokens the model did not write (spliced tool output): in the sequence, out of the loss."""
    # Completion mask: every token up to and including the first EOS. cumsum of is-EOS counts EOSes
    # seen so far; a token is kept while no EOS came strictly before it.
    is_eos = (completion == eos_id).long()
    completion_mask = ((is_eos.cumsum(1) - is_eos) == 0).float()
    truncated = is_eos.sum(1) == 0
    input_ids = torch.cat([prompt_ids, completion], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    loss_mask = None if forced is None else completion_mask * (~forced).float()
    if tool_stats is not None:   # spliced tokens inside the completion (what a truncation left of them)
        tool_stats["forced_tokens"] = (forced.float() * completion_mask).sum(1)
    return Rollout(input_ids, attention_mask, completion_mask, logps * completion_mask, truncated,
                   prompt_ids.shape[1], loss_mask, tool_stats)


# -----------------------------------------------------------------------------
# The entry point

@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
             engine="auto", tools=None, prefixes=None):
    """Sample one completion per prompt (repeat prompts for G samples each). prompts: list of id lists.
    engine: auto | simple | static | graph (see the module docstring). tools: a tools.Tools, or None;
    with tools the simple engine runs (auto picks it; static / graph refuse them). prefixes: per row,
    (token ids, log-probs), n tokens in every row, that the completion opens with, with those log-probs as
    the sampler's (grpo.py --mode-prefixes): completion tokens the model did not sample. Those drawn among
    alternatives (log-prob < 0) are in the loss; those the sampler was certain of (log-prob 0) are not, like
    a tool's output: trained with the advantage of a sample they did not choose, a forced token would be
    pushed down wherever its mode loses on average, for every row of that mode, until the model no longer
    writes it (measured: "[Easy]" became "[Eas1"). The rest of the completion: max_new_tokens - n tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefixes is not None:
        return opened(model, tok, prompts, max_new_tokens, prefixes, dict(
            temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, engine=engine, tools=tools))
    device = next(model.parameters()).device
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # Masking the pad token when it is also the EOS would forbid stopping (check_tokenizer refuses
    # such tokenizers in load(); a tokenizer passed in directly may still have one).
    pad_to_mask = pad if pad != eos else None
    s = Sampling(temperature, top_k, top_p, greedy)
    if tools is not None:
        if engine in ("static", "graph"):
            raise ValueError(f"rollout engine {engine!r} cannot splice tool output into a row; use 'simple' or 'auto'")
        engine = "simple"
    engine = resolve_engine(model, engine, device)
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)                  # (B, P)
    if tools is not None:
        completion, logps, forced, stats = simple_decode(model, prompt_ids, prompt_mask, max_new_tokens, s, eos, pad,
                                                         pad_to_mask, tools)
        return finish(prompt_ids, prompt_mask, completion, logps, eos, forced, stats)
    if engine == "simple":
        completion, logps = simple_decode(model, prompt_ids, prompt_mask, max_new_tokens, s, eos, pad, pad_to_mask)
    else:
        dec = static_decoder(model, len(prompts), prompt_ids.shape[1], max_new_tokens, s, eos, pad, pad_to_mask,
                             use_graph=engine == "graph")
        completion, logps = dec.run(prompt_ids, prompt_mask)
    return finish(prompt_ids, prompt_mask, completion, logps, eos)


def opened(model, tok, prompts, max_new_tokens, prefixes, kw):
    """generate() with each completion opening with its row's prefix: the prefix is decoded as the end of
    the prompt, then the boundary moves n columns left. Equal lengths keep the left-padded layout: every
    prompt still ends at one column, P - n - 1."""
    n = len(prefixes[0][0])
    if any(len(ids) != n or len(lp) != n for ids, lp in prefixes) or len(prefixes) != len(prompts):
        raise ValueError("prefixes: one (ids, log-probs) per prompt, with the same number of tokens in every row")
    if max_new_tokens <= n:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room after a {n}-token prefix")
    r = generate(model, tok, [q + list(ids) for q, (ids, _) in zip(prompts, prefixes)], max_new_tokens - n, **kw)
    dev, B = r.input_ids.device, len(prompts)
    ones = torch.ones(B, n, dtype=r.completion_mask.dtype, device=dev)
    logp = torch.tensor([lp for _, lp in prefixes], dtype=r.logprobs.dtype, device=dev)     # (B, n)
    chosen = (logp < 0).to(r.loss_mask.dtype)     # a token the sampler was certain of (log-prob 0) taught nothing
    return Rollout(r.input_ids, r.attention_mask, torch.cat([ones, r.completion_mask], 1),
                   torch.cat([logp, r.logprobs], 1), r.truncated, r.prompt_len - n,
                   torch.cat([chosen, r.loss_mask], 1), r.tool_stats)


def resolve_engine(model, engine, device):
    if engine not in ("auto", "simple", "static", "graph"):
        raise ValueError(f"rollout engine must be auto, simple, static or graph, got {engine!r}")
    if engine == "auto":
        return "graph" if device.type == "cuda" and static_unsupported(model) is None else "simple"
    if engine in ("static", "graph") and static_unsupported(model) is not None:
        raise ValueError(f"rollout engine {engine!r}: {static_unsupported(model)}; use engine='simple'")
    if engine == "graph" and device.type != "cuda":
        raise ValueError(f"rollout engine 'graph' needs a CUDA model, this one is on {device}; "
                         f"use 'static' (same code without capture) or 'simple'")
    return engine


def static_unsupported(model):
    """Why the static engine cannot run this model, or None. It builds the 4-D attention mask itself,
    so it needs an attention that takes one (sdpa, eager), and it knows only full-attention layers."""
    cfg = model.config
    if cfg._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {cfg._attn_implementation!r} (supported: sdpa, eager)"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full_attention is supported)"
    return None


# -----------------------------------------------------------------------------
# simple: the plain loop with a growing cache

def simple_decode(model, prompt_ids, prompt_mask, max_new_tokens, s, eos, pad, pad_to_mask, tools=None):
    """-> completion (B, C) long, sampling log-probs (B, C); C <= max_new_tokens (stops when all rows did).
    With tools, also forced (B, C) bool and the per-row tool counts (ToolLoop)."""
    B = prompt_ids.shape[0]
    mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                logits_to_keep=1)                                             # only the last position's logits
    cache, logits = out.cache, out.logits[:, -1]                              # logits (B, V)
    pos = position_ids(mask)[:, -1]                                           # (B,) position of last token
    tokens, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    loop = ToolLoop(tools, B, prompt_ids.device) if tools is not None else None
    for step in range(max_new_tokens):
        nxt, logp = sample(logits, s, pad_to_mask)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)               # finished rows emit pad
        logp = torch.where(done, torch.zeros_like(logp), logp)
        if loop is not None:      # a row with tool output pending takes its next token instead of the sample
            nxt, logp = loop.force(nxt, logp)
        tokens.append(nxt)
        logps.append(logp)
        done = done | (nxt == eos)
        if loop is not None:      # rows that have just closed a call: run the calls, queue their outputs
            loop.after_step(nxt, done)
        if (bool(done.all()) and (loop is None or not loop.pending())) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], dim=1)  # attend to tokens up to EOS
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    if loop is None:
        return torch.stack(tokens, 1), torch.stack(logps, 1)
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(loop.forced_steps, 1), loop.close()


class ToolLoop:
    """The tool side of the decode loop: each row's text, its queue of forced tokens, its counts. The calls
    that rows close at one step run together (in parallel, each bounded by the tool's timeout) before the
    next step, so a row's layout depends only on the tokens, never on how long a call took: greedy rollouts
    and resumed runs are reproducible. Forced tokens are fed one per step, like sampled ones."""

    def __init__(self, tools, B, device):
        self.tools, self.device = tools, device
        self.ids = [[] for _ in range(B)]
        self.queue = [[] for _ in range(B)]
        self.forced_steps = []
        self.stats = {k: [0] * B for k in ("calls", "errors", "timeouts", "over_limit", "output_tokens")}
        self.pool = tools.pool()
        last = tools.spec.call_end[-1]      # a cheap filter: only a token ending in call_end's last character
        self.may_end = {i for t, i in tools.tok.get_vocab().items()
                        if tools.tok.convert_tokens_to_string([t]).endswith(last)}

    def force(self, nxt, logp):
        is_forced = torch.zeros_like(nxt, dtype=torch.bool)
        rows = [i for i, q in enumerate(self.queue) if q]
        if rows:
            idx = torch.tensor(rows, device=self.device)
            nxt = nxt.clone()
            nxt[idx] = torch.tensor([self.queue[i].pop(0) for i in rows], device=self.device)
            logp = logp.masked_fill(torch.zeros_like(is_forced).index_fill_(0, idx, True), 0.0)
            is_forced[idx] = True
        self.forced_steps.append(is_forced)
        self.last_forced = set(rows)
        return nxt, logp

    def after_step(self, nxt, done):
        tok, calls = self.tools.tok, []
        for i, t in enumerate(nxt.tolist()):
            if bool(done[i]):
                continue
            self.ids[i].append(t)
            if i in self.last_forced or t not in self.may_end:
                continue
            call = self.tools.call_text(tok.decode(self.ids[i]))
            if call is None:
                continue
            if self.stats["calls"][i] >= self.tools.spec.max_calls:
                self.stats["over_limit"][i] += 1
                continue
            calls.append((i, call))
        if not calls:
            return
        for (i, _), (text, error, timeout) in zip(calls, self.tools.run([c for _, c in calls], self.pool)):
            ids = self.tools.output_ids(text)
            self.queue[i] = ids
            self.stats["calls"][i] += 1
            self.stats["errors"][i] += int(error)
            self.stats["timeouts"][i] += int(timeout)
            self.stats["output_tokens"][i] += len(ids)

    def pending(self):
        return any(self.queue)

    def close(self):
        self.pool.shutdown(wait=False)
        return {k: torch.tensor(v, device=self.device) for k, v in self.stats.items()}


# -----------------------------------------------------------------------------
# static / graph: every tensor the decode step touches is allocated once, and the step updates them in
# place, so the same kernels on the same addresses can be replayed for every token.

DONE_CHECK_EVERY = 16   # decode steps between host reads of "all rows done?" (each read is a sync)
GRAPH_PROMPT_BUCKET = 64  # graph engine: prompt width rounded up to this, so one capture serves many calls
WARMUP_STEPS = 2        # eager decode steps before capture (kernel selection and workspaces happen here)


class StaticDecoder:
    """Buffers (and, with use_graph, the captured decode step) for B rows, a prompt width of P columns
    and T new tokens. Cache column c holds the token at column c of [left-padded prompt | completion];
    every row is at the same column, so the cache writes one shared column per step."""

    def __init__(self, model, B, P, T, s: Sampling, eos, pad, pad_to_mask, use_graph):
        dev = next(model.parameters()).device
        # A weak reference: decoders are kept in a dict keyed weakly by the model, and a strong one here
        # would keep the model (and its cache and graph) alive forever.
        self.model = weakref.proxy(model)
        self.B, self.P, self.T, self.s = B, P, T, s
        self.eos, self.pad, self.pad_to_mask, self.use_graph = eos, pad, pad_to_mask, use_graph
        L = P + T
        self.cache = StaticCache(config=model.config, max_cache_len=L)      # (B, kv_heads, L, head_dim) per layer
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)        # key column holds a real token
        self.token = torch.zeros(B, 1, dtype=torch.long, device=dev)        # token fed to the next decode step
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)          # its position id
        self.step = torch.zeros((), dtype=torch.long, device=dev)           # completion column written next
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        self.logps = torch.zeros(B, T, dtype=torch.float32, device=dev)
        self.graph = None
        self.capture_seconds = None    # wall time of warm-up + capture, for the benchmark
        self.eager_attention = model.config._attn_implementation == "eager"  # wants an additive float mask

    def attention_bias(self, mask4d):
        """(B, 1, Q, L) bool, True = attend -> what the model's attention takes: sdpa the bool mask,
        eager an additive mask (0 / dtype min)."""
        if not self.eager_attention:
            return mask4d
        dtype = self.model.dtype
        return torch.zeros(mask4d.shape, dtype=dtype, device=mask4d.device).masked_fill(
            ~mask4d, torch.finfo(dtype).min)

    def emit(self, logits):
        """Sample from logits (B, V) and write the token into completion column `step` (device index)."""
        nxt, logp = sample(logits, self.s, self.pad_to_mask, race=True)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad), nxt)     # finished rows emit pad
        logp = torch.where(self.done, torch.zeros_like(logp), logp)
        col = self.step.expand(self.B, 1)                                     # (B, 1)
        self.tokens.scatter_(1, col, nxt[:, None])
        self.logps.scatter_(1, col, logp[:, None])
        self.valid.scatter_(1, col + self.P, ~self.done[:, None])             # attend to tokens up to EOS
        self.done |= nxt == self.eos
        self.token.copy_(nxt[:, None])
        self.step += 1

    def decode_step(self):
        """Feed `token` at the next cache column, sample the following one. In place, no host sync."""
        self.pos += 1
        mask = self.attention_bias(self.valid[:, None, None, :])             # (B, 1, 1, L)
        logits = self.model(input_ids=self.token, attention_mask=mask, position_ids=self.pos,
                            cache=self.cache, use_cache=True).logits[:, -1]   # (B, V)
        self.emit(logits)

    def prefill(self, prompt_ids, prompt_mask):
        """Reset every buffer, run the prompts through the model once (eager) and sample token 0."""
        self.cache.reset()
        self.valid.zero_()
        self.valid[:, :self.P] = prompt_mask.bool()
        self.step.zero_()
        self.done.zero_()
        self.tokens.fill_(self.pad)
        self.logps.zero_()
        pos = position_ids(prompt_mask)                                       # (B, P)
        self.pos.copy_(pos[:, -1:])
        # Query i attends to real keys j <= i. Each query also attends to itself, so a left-pad query
        # is never fully masked (its output is unused, but NaN there would reach the cache).
        i = torch.arange(self.P, device=self.valid.device)[:, None]
        j = torch.arange(self.P + self.T, device=self.valid.device)[None, :]
        mask = ((j <= i) & self.valid[:, None, :]) | (j == i)                 # (B, P, L)
        logits = self.model(input_ids=prompt_ids, attention_mask=self.attention_bias(mask[:, None]),
                            position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.emit(logits)

    def capture(self):
        """Record decode_step into a CUDA graph. The warm-up steps before it are real decode steps (they
        advance the state like any other), run on a side stream as capture requires."""
        with torch.cuda.device(self.valid.device):   # streams and graph on the model's GPU
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.decode_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    self.decode_step()   # recorded, not run: the state does not advance here
            finally:  # a capture that fails in capture_end leaves torch.cuda.graph's own stream current
                torch.cuda.set_stream(stream)
        self.graph = graph
        return WARMUP_STEPS

    def run(self, prompt_ids, prompt_mask):
        """Left-padded prompts (B, <= P) -> completion (B, C) long, log-probs (B, C) fp32, the same C
        and values as simple_decode (C = steps until every row emitted EOS, at most T)."""
        extra = self.P - prompt_ids.shape[1]                                  # more left padding, masked out
        self.prefill(F.pad(prompt_ids, (extra, 0), value=self.pad), F.pad(prompt_mask, (extra, 0), value=0))
        done_steps = 1                                                        # token 0 came from the prefill
        if self.use_graph and self.graph is None and self.T > WARMUP_STEPS + 1:
            try:
                t0 = time.perf_counter()
                done_steps += self.capture()
                self.capture_seconds = time.perf_counter() - t0
            except Exception as e:   # an op in this model's forward that cannot be captured
                warnings.warn(f"rollout: CUDA graph capture failed ({e!r:.300}); decoding eagerly with the "
                              f"static cache instead", RuntimeWarning)
                self.use_graph = False
                return self.run(prompt_ids, prompt_mask)
        while done_steps < self.T:
            if done_steps % DONE_CHECK_EVERY == 0 and bool(self.done.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.decode_step()
            done_steps += 1
        # Rows that stopped kept emitting pad, up to DONE_CHECK_EVERY - 1 steps past the last EOS: cut
        # the completion where the simple loop would have stopped.
        is_eos = self.tokens == self.eos                                      # (B, T)
        C = int(is_eos.float().argmax(1).max()) + 1 if bool(is_eos.any(1).all()) else self.T
        return self.tokens[:, :C].clone(), self.logps[:, :C].clone()


# One decoder per shape and sampling setting, kept with the model so that a training loop that calls
# generate with the same batch shape every step captures once. A captured graph holds the addresses
# of the weights: in-place updates (optimizer steps, load_state_dict) are seen by the replay; moving or
# re-creating the parameters changes the first parameter's address, which is part of the key.
_decoders = weakref.WeakKeyDictionary()   # model -> OrderedDict(key -> StaticDecoder), at most MAX_DECODERS
MAX_DECODERS = 3


def static_decoder(model, B, P, T, s, eos, pad, pad_to_mask, use_graph):
    if use_graph:
        P = -(-P // GRAPH_PROMPT_BUCKET) * GRAPH_PROMPT_BUCKET
    p0 = next(model.parameters())
    key = (B, P, T, s, eos, pad, pad_to_mask, use_graph, p0.data_ptr(), p0.dtype)
    cached = _decoders.setdefault(model, OrderedDict())
    if key not in cached:
        if len(cached) >= MAX_DECODERS:
            cached.popitem(last=False)
        cached[key] = StaticDecoder(model, B, P, T, s, eos, pad, pad_to_mask, use_graph)
    cached.move_to_end(key)
    return cached[key]


def clear_decoders(model):
    """Free the static caches and graphs kept for this model (e.g. before a memory-hungry phase)."""
    _decoders.pop(model, None)
