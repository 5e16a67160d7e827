"""model.py and rollout.py on the built-in tiny model: tokenizer, data layout, generation, log-probs,
masks, saving and data checks."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as M
import data as D
import checkpoint as CK
import lifecycle as L
import rollout
import sft
from conftest import dot_tol, greedy_agreement, logprob_tol, model_logprob_tol
from grpo import aggregate, per_token_loss

PROMPTS = ["12+34", "1+2", "345+678", "9+9", "7,3,2->23"]


def chat(tok, text):
    return D.encode_prompt(tok, [{"role": "user", "content": text}])


def varied_model(seed=0, eos_boost=8.0):
    """The tiny model with larger random weights (so greedy decoding does not just repeat one token)
    and a scaled-up EOS embedding, so that different rows emit EOS at different steps."""
    m, tok = M.load("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08, generator=g)
        m.get_input_embeddings().weight[tok.eos_token_id] *= eos_boost  # tied: also the EOS logit row
    return m.eval(), tok


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_ids_and_chat_template(tok):
    """pad != eos; the chat template renders a user turn + generation prompt to the exact ids; tags are
    single tokens; decoding without special tokens keeps the tags and drops <eos>/<pad>."""
    assert tok.pad_token_id != tok.eos_token_id
    v = tok.get_vocab()
    ids = D.chat_ids(tok, [{"role": "user", "content": "1+2"}], add_generation_prompt=True)
    assert ids == [v["<|user|>"], v["1"], v["+"], v["2"], v["<|assistant|>"]]
    assert D.chat_ids(tok, [{"role": "user", "content": "1+2"}], add_generation_prompt=False) == ids[:-1]
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tok(tag, add_special_tokens=False).input_ids == [v[tag]]
    text = "<think>1+2=3</think><answer>3</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 4 + len("1+2=3") + len("3")
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok.decode([v["<|user|>"]] + ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_through_autotokenizer(tok, tmp_path):
    """A saved checkpoint's tokenizer, reloaded with AutoTokenizer, is the same character tokenizer:
    same ids for text with spaces, tags and specials, spaces kept on decode, same chat template,
    left padding. (A generic tokenizer class would come back as a byte-level Qwen2Tokenizer, because
    AutoTokenizer picks the class from config.json's model_type, and would drop the spaces.)"""
    m, _ = M.load("tiny")
    CK.save(m, tok, str(tmp_path))
    t2 = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|user|>What is 12 + 345?<|assistant|><think>12 + 345 = 357</think> <answer>357</answer><eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len("What is 12 + 345?") + len("12 + 345 = 357") + len(" 357") + 7  # 7 tag/role tokens
    assert t2(text, add_special_tokens=False).input_ids == ids
    assert t2.decode(ids) == text
    assert t2.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert (len(t2), t2.pad_token_id, t2.eos_token_id, t2.padding_side) == (len(tok), tok.pad_token_id,
                                                                           tok.eos_token_id, "left")
    msgs = [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "<answer>3</answer>"}]
    assert D.chat_ids(t2, msgs, False) == D.chat_ids(tok, msgs, False)


def test_check_tokenizer_rejects_pad_equal_eos():
    """check_tokenizer raises when pad == eos (or a pad is missing) and accepts the built-in one."""
    t = M.build_char_tokenizer()
    M.check_tokenizer(t, "here")
    t.pad_token = t.eos_token
    with pytest.raises(ValueError, match="pad token == EOS"):
        M.check_tokenizer(t, "here")
    t2 = M.build_char_tokenizer()
    t2.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        M.check_tokenizer(t2, "here")


def test_encode_example_eos(tok):
    """Conversational completions end with exactly one EOS (from the template); standard strings get
    EOS appended; prompt + completion is the full rendering."""
    eos = tok.eos_token_id
    prompt = [{"role": "user", "content": "1+2"}]
    comp = [{"role": "assistant", "content": "<think>1+2=3</think><answer>3</answer>"}]
    p, c = D.encode_example(tok, prompt, comp)
    assert p == D.chat_ids(tok, prompt, True)
    assert p + c == D.chat_ids(tok, prompt + comp, False)
    assert c[-1] == eos and c.count(eos) == 1
    assert tok.decode(c, skip_special_tokens=True) == comp[0]["content"]
    v = tok.get_vocab()
    p, c = D.encode_example(tok, "1+2=", "3")
    assert p == [v["1"], v["+"], v["2"], v["="]]
    assert c == [v["3"], eos]
    with pytest.raises(ValueError, match="both"):
        D.encode_example(tok, prompt, "3")


# -----------------------------------------------------------------------------
# layouts

def test_collate_exact_layout():
    """[left-padded prompt | right-padded completion] with the completion mask on completion tokens."""
    ex = [([1, 2], [3, 4, 5]), ([6, 7, 8], [9])]
    ids, attn, cmask = D.collate(ex, pad_id=0, device="cpu")
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 0, 0]]
    assert attn.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert cmask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert cmask.dtype == torch.float32 and ids.dtype == torch.long


def test_left_pad_exact():
    """Prompts end at the last column; the mask marks real tokens; an empty prompt is an error."""
    ids, mask = rollout.left_pad([[5, 6], [7], [8, 9, 10]], 0, "cpu")
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 10]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="empty"):
        rollout.left_pad([[1], []], 0, "cpu")


def test_position_ids_left_padding():
    """Positions count real tokens only, starting at 0 on the first real token."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert M.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_filter_logits_top_k_top_p():
    """top_k keeps the k largest; top_p keeps the smallest prefix of the sorted distribution whose
    mass reaches p (the token that crosses p is kept), in the original token order."""
    inf = float("-inf")
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    # (exact comparisons: filtering only selects, the kept values are the inputs themselves)
    assert rollout.filter_logits(logits, top_k=2).tolist() == [[inf, 4.0, inf, 3.0]]
    assert torch.equal(rollout.filter_logits(logits), logits)
    assert torch.equal(rollout.filter_logits(logits, top_k=4), logits)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.15, 0.05, 0.5]])
    lg = probs.log()
    keep = lambda t: torch.isfinite(t).int().tolist()
    assert keep(rollout.filter_logits(lg, top_p=0.4)) == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert keep(rollout.filter_logits(lg, top_p=0.6)) == [[0, 1, 0, 1], [1, 0, 0, 1]]   # 0.5 + 0.3 crosses 0.6
    assert keep(rollout.filter_logits(lg, top_p=0.9)) == [[0, 1, 1, 1], [1, 1, 0, 1]]
    kept = rollout.filter_logits(lg, top_p=0.6)
    assert torch.equal(kept[torch.isfinite(kept)], lg[torch.isfinite(kept)])            # values untouched
    assert keep(rollout.filter_logits(lg, top_k=3, top_p=0.9)) == [[0, 1, 1, 1], [1, 1, 0, 1]]
    assert keep(rollout.filter_logits(lg, top_k=1, top_p=0.9)) == [[0, 1, 0, 0], [0, 0, 0, 1]]


# -----------------------------------------------------------------------------
# generation

def test_greedy_matches_hf_generate_with_eos_at_different_steps():
    """generate(greedy=True) equals model.generate(do_sample=False) token for token on left-padded
    prompts of mixed length, including rows that stop at different steps and a truncated row."""
    torch.manual_seed(0)
    m, tok = varied_model()
    prompts = [chat(tok, t) for t in PROMPTS]
    ids, mask = rollout.left_pad(prompts, tok.pad_token_id, "cpu")
    r = rollout.generate(m, tok, prompts, max_new_tokens=20, greedy=True)
    ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert r.prompt_len == ids.shape[1]
    assert torch.equal(r.input_ids[:, :r.prompt_len], ids)
    # two implementations of the same logits: equal token for token but at a near-tie (tests/conftest.py)
    greedy_agreement(m, ids, mask, r.completion_ids, ref[:, ids.shape[1]:], tok.pad_token_id)
    # the scenario is really exercised: rows end at different steps, one row never ends
    eos_at = [(row == tok.eos_token_id).nonzero()[0].item() if (row == tok.eos_token_id).any() else None
              for row in r.completion_ids]
    ended = [e for e in eos_at if e is not None]
    assert len(set(ended)) >= 2 and None in eos_at, eos_at


def test_completion_mask_after_eos():
    """Mask is 1 up to and including the first EOS, 0 after; tokens after EOS are pad; truncated is
    'no EOS'; attention over the completion equals the completion mask; log-probs are 0 where masked."""
    torch.manual_seed(0)
    m, tok = varied_model()
    prompts = [chat(tok, t) for t in PROMPTS]
    checked_eos = 0
    for greedy, temp in ((True, 1.0), (False, 1.0), (False, 0.7)):
        r = rollout.generate(m, tok, prompts * 2, max_new_tokens=20, temperature=temp, greedy=greedy)
        C = r.completion_ids.shape[1]
        assert torch.equal(r.attention_mask[:, r.prompt_len:].float(), r.completion_mask)
        for row, msk, lp, tr in zip(r.completion_ids, r.completion_mask, r.logprobs, r.truncated):
            eos = (row == tok.eos_token_id).nonzero().flatten()
            if len(eos):
                e = eos[0].item()
                checked_eos += 1
                assert not tr
                assert msk[:e + 1].tolist() == [1.0] * (e + 1)      # EOS itself is inside the mask
                assert msk[e + 1:].tolist() == [0.0] * (C - e - 1)
                assert (row[e + 1:] == tok.pad_token_id).all()
                assert (lp[e + 1:] == 0).all() and lp[e] < 0
            else:
                assert tr and (msk == 1).all()
                assert C == 20
    assert checked_eos >= 5


def test_sampling_logprobs_equal_training_logprobs():
    """The log-probs recorded while sampling at temperature 0.7 are the ones token_logprobs recomputes
    at the same temperature (so on-policy rho == 1); likewise greedy at temperature 1."""
    torch.manual_seed(0)
    m, tok = varied_model()
    prompts = [chat(tok, t) for t in PROMPTS]
    for greedy, temp in ((False, 0.7), (True, 1.0)):
        r = rollout.generate(m, tok, prompts, max_new_tokens=16, temperature=temp, greedy=greedy)
        C = r.completion_ids.shape[1]
        with torch.no_grad():
            lp = M.token_logprobs(m, r.input_ids, r.attention_mask, C, temperature=temp)
        assert torch.isfinite(lp).all()
        assert (r.completion_mask == 0).any()     # some masked positions are part of the check
        # decode (KV cache, one query) vs a full forward: the same logits to rounding (tests/conftest.py)
        tol, _ = model_logprob_tol(m, r.input_ids, r.attention_mask, temp)
        assert ((lp * r.completion_mask - r.logprobs).abs() <= tol).all()


def test_sampling_with_top_k_only_draws_top_k_tokens():
    """With top_k=1 sampling is greedy decoding over the tokens that can be sampled (the pad token is
    never sampled), whatever the temperature: model.generate greedy with the pad suppressed."""
    torch.manual_seed(0)
    m, tok = varied_model()
    prompts = [chat(tok, t) for t in PROMPTS]
    ids, mask = rollout.left_pad(prompts, tok.pad_token_id, "cpu")
    g = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                   suppress_tokens=[tok.pad_token_id])
    s = rollout.generate(m, tok, prompts, max_new_tokens=12, temperature=1.5, top_k=1)
    greedy_agreement(m, ids, mask, s.completion_ids, g[:, ids.shape[1]:], tok.pad_token_id,
                     suppress=[tok.pad_token_id])


# -----------------------------------------------------------------------------
# token log-probs

def test_token_logprobs_match_naive_reference():
    """token_logprobs equals log_softmax of the full fp32 logits gathered at the targets, and its
    entropy equals -(p * log p).sum, at temperature 1 and 0.7."""
    torch.manual_seed(0)
    m, tok = varied_model(eos_boost=1.0)
    ex = [D.encode_example(tok, [{"role": "user", "content": p}],
                           [{"role": "assistant", "content": "<think>" + p[::-1] + "</think>"}]) for p in PROMPTS]
    ids, attn, cmask = D.collate(ex, tok.pad_token_id, "cpu")
    T, C = ids.shape[1], cmask.shape[1]
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=attn, position_ids=M.position_ids(attn)).logits.float()
        for temp in (1.0, 0.7):
            lsm = torch.log_softmax(full[:, T - C - 1:T - 1] / temp, -1)
            ref_lp = lsm.gather(-1, ids[:, T - C:, None]).squeeze(-1)
            ref_ent = -(lsm.exp() * lsm).sum(-1)
            lp, ent = M.token_logprobs(m, ids, attn, C, temperature=temp, entropy=True)
            assert lp.shape == ent.shape == (len(PROMPTS), C)
            # the lm_head on the selected rows vs on all of them (another matmul shape), log_softmax vs
            # logsumexp: to rounding (tests/conftest.py)
            tol_lp, tol_ent = model_logprob_tol(m, ids, attn, temp)
            assert ((lp - ref_lp).abs() <= tol_lp).all()
            assert ((ent - ref_ent).abs() <= tol_ent).all()
            # the entropy=False call: the same forward and the same log-softmax on the same shapes (the
            # entropy is computed beside them, from the same logits): bitwise
            assert torch.equal(M.token_logprobs(m, ids, attn, C, temperature=temp), lp)
    # The grad-enabled call computes the same numbers, bitwise: grad mode only decides whether autograd
    # records the ops; on the CPU the same kernels run on the same inputs and shapes (this is what makes
    # GRPO's on-policy ratio exactly 1). Same code, same shapes, same thread count.
    lp_grad = M.token_logprobs(m, ids, attn, C)
    assert lp_grad.requires_grad
    assert torch.equal(lp_grad.detach(), M.token_logprobs(m, ids, attn, C).detach())


def test_logprobs_from_hidden_chunked_equals_unchunked():
    """Row chunking (chunk_rows=3, 10 rows: chunks of 3,3,3,1) changes nothing."""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(10, 8, generator=g), torch.randn(20, 8, generator=g)
    w = M.Head(W)
    t = torch.randint(0, 20, (10,), generator=g)
    a, ea = M.logprobs_from_hidden(h, w, t, temperature=0.8, entropy=True, chunk_rows=3)
    b, eb = M.logprobs_from_hidden(h, w, t, temperature=0.8, entropy=True)
    # Other matmul shapes (3 rows vs 10) may add the length-8 dots in another order: each logit within
    # dot_tol(8, sum |h w|) / T, then log p and entropy as in conftest.logprob_tol.
    S = (h.abs() @ W.abs().T).max(-1).values / 0.8                           # (10,) max_j sum |h w_j| / T
    tol_lp, tol_ent = logprob_tol(dot_tol(8, S), S, 20)
    assert ((a - b).abs() <= tol_lp).all() and ((ea - eb).abs() <= tol_ent).all()
    ref = torch.log_softmax(h @ W.T / 0.8, -1).gather(-1, t[:, None]).squeeze(-1)
    assert ((a - ref).abs() <= tol_lp).all()
    assert ((M.logprobs_from_hidden(h, w, t, chunk_rows=3) - M.logprobs_from_hidden(h, w, t)).abs() <= tol_lp).all()
    e = M.logprobs_from_hidden(h[:0], w, t[:0], entropy=True)
    assert e[0].shape == (0,) and e[1].shape == (0,)


def test_masked_tokens_get_zero_gradient():
    """Through the whole pipeline (token_logprobs -> per_token_loss -> aggregate), d loss / d logp is
    exactly 0 on masked tokens (after EOS, or masked by hand) and non-zero on the others."""
    torch.manual_seed(0)
    m, tok = varied_model()
    prompts = [chat(tok, t) for t in PROMPTS[:4] for _ in range(2)]
    r = rollout.generate(m, tok, prompts, max_new_tokens=12)
    C = r.completion_ids.shape[1]
    mask = r.completion_mask.clone()
    mask[0, :3] = 0.0
    mask[3] = 0.0
    logp = M.token_logprobs(m, r.input_ids, r.attention_mask, C)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.0, -1.0])
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        lt, _ = per_token_loss(logp, logp.detach(), adv, mask, 0.2, 0.28)
        loss = aggregate(lt, mask, loss_type, len(prompts), int(mask.sum()), C)
        (g,) = torch.autograd.grad(loss, logp, retain_graph=True)
        assert (g[mask == 0] == 0).all()
        assert (g[mask == 1] != 0).all()
    assert (mask == 0).sum() > 3 + C     # positions after EOS are also among the masked ones


# -----------------------------------------------------------------------------
# saving

def test_save_load_round_trip(tmp_path):
    """save() writes a plain HF checkpoint: from_pretrained gives identical logits and tokenization,
    the chat template survives, trainer_state is written when given and does not bother from_pretrained,
    logs already in the directory are kept, and no .tmp is left behind."""
    m, tok = varied_model()
    d = str(tmp_path / "ckpt")
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    CK.save(m, tok, d, state={"step": 3, "data": {"position": 17}})
    for name in ("model.safetensors", "config.json", "generation_config.json", "trainer_state/state.pt",
                 "metrics.jsonl"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert not os.path.exists(os.path.join(d, ".tmp"))
    assert CK.load_state(d)["step"] == 3 and CK.load_state(d)["data"] == {"position": 17}

    m2 = AutoModelForCausalLM.from_pretrained(d).eval()
    tok2 = AutoTokenizer.from_pretrained(d)
    text = "<think>12+34=46</think><answer>46</answer>"
    assert tok2(text).input_ids == tok(text).input_ids
    msgs = [{"role": "user", "content": "12+34"}]
    assert D.chat_ids(tok2, msgs, True) == D.chat_ids(tok, msgs, True)
    assert tok2.chat_template == tok.chat_template
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    M.check_tokenizer(tok2, d)
    prompts = [chat(tok, t) for t in PROMPTS]
    ids, mask = rollout.left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():  # the same weights (saved and read back exactly) through the same code: bitwise
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=M.position_ids(mask))
        assert torch.equal(m(**kw).logits, m2(**kw).logits)
    with open(os.path.join(d, "generation_config.json")) as f:
        gc = json.load(f)
    assert gc["eos_token_id"] == tok.eos_token_id and gc["pad_token_id"] == tok.pad_token_id
    # model.load reads it back the same way, and saving again replaces the checkpoint in place
    m3, tok3 = M.load(d)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m3.state_dict().values()))
    CK.save(m3, tok3, d, state={"step": 5})
    assert CK.load_state(d)["step"] == 5
    with open(os.path.join(d, "metrics.jsonl")) as f:
        assert f.read() == '{"step": 1}\n'


def test_load_missing_directory():
    """A path that is not a local directory is a clear error (nothing is downloaded)."""
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        M.load("/nonexistent/model-dir")


# -----------------------------------------------------------------------------
# data checks

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_jsonl_malformed_line(tmp_path):
    """Malformed JSON on line 3 is reported as 'file:3'; blank lines still count as lines."""
    ok = json.dumps({"prompt": "a", "completion": "b"})
    p = write_lines(tmp_path / "d.jsonl", [ok, ok, '{"prompt": "a", ', ok])
    with pytest.raises(D.DataError, match=r"d\.jsonl:3: malformed JSON"):
        D.read_jsonl(p, sft.check_sft_row)
    p = write_lines(tmp_path / "e.jsonl", [ok, "", ok, "[1, 2]"])
    with pytest.raises(D.DataError, match=r"e\.jsonl:4: expected a JSON object"):
        D.read_jsonl(p, sft.check_sft_row)
    p = write_lines(tmp_path / "f.jsonl", [ok, "", ok])
    assert len(D.read_jsonl(p, sft.check_sft_row)) == 2
    with pytest.raises(D.DataError, match="no rows"):
        D.read_jsonl(write_lines(tmp_path / "g.jsonl", ["", " "]), sft.check_sft_row)
    with pytest.raises(D.DataError, match="no such file"):
        D.read_jsonl(str(tmp_path / "missing.jsonl"), sft.check_sft_row)


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"prompt": "  ", "completion": "b"}, "field 'prompt' is empty"),
    ({"prompt": 3, "completion": "b"}, "must be a string or a non-empty list"),
    ({"prompt": [], "completion": "b"}, "must be a string or a non-empty list"),
    ({"prompt": [{"role": "bot", "content": "hi"}], "completion": "b"}, "unknown role 'bot'"),
    ({"prompt": [{"role": "user"}], "completion": "b"}, r"\[0\] must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
     "must end with a 'assistant' message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "at least a prompt message"),
])
def test_check_sft_row_errors(tmp_path, row, msg):
    """Each malformed row is rejected with file:line and a message naming the problem."""
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    p = write_lines(tmp_path / "d.jsonl", [good, json.dumps(row)])
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: .*" + msg):
        D.read_jsonl(p, sft.check_sft_row)


def test_shuffled_cycle_epochs_and_resume():
    """Every epoch is a permutation of the rows; (epoch, pos) restores the exact continuation."""
    a = D.ShuffledCycle(5, seed=3)
    first = a.take(5)
    assert sorted(first) == list(range(5))
    a.take(3)
    st = a.state()
    assert st == {"epoch": 1, "pos": 3, "n": 5}
    rest = a.take(9)
    b = D.ShuffledCycle(5, seed=3)
    b.load(st)
    assert b.take(9) == rest
    assert sorted(rest[2:7]) == list(range(5))            # epoch 2 is a full permutation again
    assert D.ShuffledCycle(5, seed=4).take(5) != first or D.ShuffledCycle(5, seed=5).take(5) != first


def test_parse_config_flags():
    """Dataclass fields become --dashed flags with their types; bools get --x / --no-x."""
    from grpo import GRPOConfig
    cfg = L.parse_config(GRPOConfig, ["--lr", "1e-4", "--num-prompts", "3", "--resume", "--loss-type", "grpo",
                                      "--no-dynamic-sampling"])
    assert cfg.lr == 1e-4 and cfg.num_prompts == 3 and cfg.resume is True and cfg.loss_type == "grpo"
    assert cfg.dynamic_sampling is False and cfg.steps == GRPOConfig.steps
