"""Data: JSONL in TRL's vocabulary, checked line by line before any training starts, and turned into
token ids. A prompt is a string ("standard") or a list of {"role", "content"} ("conversational",
rendered with the tokenizer's chat template).

    rows = read_jsonl("train.jsonl", check)       # check(row) raises ValueError: reported as file:line
    p, c = encode_example(tok, prompt, completion) # prompt ids, completion ids ending with EOS
    ids, attn, mask = collate([(p, c), ...], pad_id, device)   # the training layout
    order = ShuffledCycle(len(rows), seed)         # epochs in seeded orders; resumable by position
"""
import json
import os
import random

import torch

def chat_ids(tok, messages, add_generation_prompt):
    """Render role/content messages with the tokenizer's chat template and tokenize without adding
    special tokens again (the template already has its own BOS, if any: no double BOS)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("conversational data needs a tokenizer with a chat template; this one has none")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False).input_ids



# -----------------------------------------------------------------------------
# Checking rows

ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    pass


class TooLong(ValueError):
    """A row over a length limit: an error, or skipped and counted with --truncation skip. Never cut:
    a truncated prompt is a different question, a truncated completion one that never ends."""


TRUNCATION = ("error", "skip")


def read_jsonl(path, check, truncation="error"):
    """Parse every line of a JSONL file; check(row) raises ValueError naming the bad field (TooLong for
    a row over a length limit). Any problem is reported as 'file:line: ...' before a single step is
    taken. With truncation="skip" rows over the limit are left out and their number is printed."""
    if truncation not in TRUNCATION:
        raise ValueError(f"--truncation must be error or skip, got {truncation!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows, too_long, n = [], 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to read") from None
            except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
                raise DataError(f"{path}:{n}: unreadable JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            try:
                check(row)
            except TooLong as e:
                if truncation == "error":
                    raise DataError(f"{path}:{n}: {e} (--truncation skip leaves such rows out)") from None
                too_long += 1
                continue
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}:{n}: {e}") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to check") from None
            rows.append(row)
    if too_long:
        print(f"{path}: skipped {too_long} of {len(rows) + too_long} rows over the length limit (--truncation skip)")
    if not rows:
        raise DataError(f"{path}: no rows" + (f" left: all {too_long} are over the length limit" if too_long else ""))
    return rows


def check_text_or_messages(row, field, last_role=None):
    """A field must be a non-empty string, or a non-empty list of role/content messages."""
    if field not in row:
        raise ValueError(f"missing field {field!r} (has: {', '.join(row)})")
    v = row[field]
    if isinstance(v, str):
        if not v.strip():
            raise ValueError(f"field {field!r} is empty")
        return
    if not isinstance(v, list) or not v:
        raise ValueError(f"field {field!r} must be a string or a non-empty list of messages, got {type(v).__name__}")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise ValueError(f"field {field!r}[{i}] must be {{'role': str, 'content': str}}, got {json.dumps(m)[:80]}")
        if m["role"] not in ROLES:
            raise ValueError(f"field {field!r}[{i}] has unknown role {m['role']!r} (known: {', '.join(sorted(ROLES))})")
    if not any(m["content"].strip() for m in v):
        raise ValueError(f"field {field!r} is empty (every message's content is blank)")
    if last_role and v[-1]["role"] != last_role:
        raise ValueError(f"field {field!r} must end with a {last_role!r} message, ends with {v[-1]['role']!r}")
    if last_role and not v[-1]["content"].strip():
        raise ValueError(f"field {field!r}[{len(v) - 1}]: the final {last_role!r} message is empty")


def _texts(x):
    """The data text of a field: the string, or each message's content."""
    return [x] if isinstance(x, str) else [m["content"] for m in x]


_token_chars = {}


def check_data_text(tok, *fields, max_tokens=None, limit="the length limit"):
    """Data text stays text. A special token's text inside it (an EOS inside a completion, pad text, a
    role token inside user content) would be read as that token by the tokenizer, and by the chat
    template, which renders content to text before it is tokenised: the model would be trained not to
    stop, or on a turn the data never had. Such a row is refused, naming the token; it is not split into
    characters, because after templating content can no longer be told apart from structure.
    With max_tokens: text that surely has more tokens than that is refused (TooLong) before it is
    tokenised, so a 50 MB line costs a length check, not minutes and GBs: no token covers more
    characters than its vocabulary entry has (byte-level BPE: one per byte, each byte >= 1 character)."""
    key = id(tok)
    if key not in _token_chars:  # (tok kept alive beside its id, so the id cannot be reused)
        special = {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)
        _token_chars[key] = (tok, sorted(special), max(map(len, tok.get_vocab())))
    _, special, per_token = _token_chars[key]
    texts = [t for f in fields for t in _texts(f)]
    chars = sum(map(len, texts))
    if max_tokens is not None and chars > max_tokens * per_token:
        raise TooLong(f"{chars} characters: more than {max_tokens} tokens however tokenised > {limit} {max_tokens}")
    for t in texts:
        for s in special:
            if s in t:
                raise ValueError(f"the text contains {s!r}, a special token of this tokenizer: data text must not "
                                 f"become structure (remove it, or spell it differently)")


def encode_prompt(tok, prompt):
    """Prompt ids: conversational prompts through the chat template with the generation prompt,
    standard strings as they are (with the tokenizer's own BOS, if it has one). The text must have
    passed check_data_text (read_jsonl's checks call it) for its special tokens to be structure only."""
    if isinstance(prompt, list):
        return chat_ids(tok, prompt, add_generation_prompt=True)
    return tok(prompt).input_ids


def encode_example(tok, prompt, completion):
    """(prompt_ids, completion_ids) for SFT; the completion always ends with EOS so the model learns to
    stop. Conversational: the completion is what the template adds after the generation prompt."""
    p = encode_prompt(tok, prompt)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("prompt and completion must both be strings or both be message lists")
    if isinstance(completion, list):
        full = chat_ids(tok, prompt + completion, add_generation_prompt=False)
        if full[:len(p)] != p:
            raise ValueError("the chat template renders the prompt differently with and without the completion")
        c = full[len(p):]
    else:
        c = tok(completion, add_special_tokens=False).input_ids
    if tok.eos_token_id not in c:  # (after check_data_text, an EOS in c is the template's own)
        c = c + [tok.eos_token_id]
    return p, c



def collate(examples, pad_id, device):
    """[(prompt_ids, completion_ids[, completion_loss_mask])] -> input_ids, attention_mask (B, P+C) laid out
    as [left-padded prompt | right-padded completion], and the completion's loss mask (B, C): 1 on its
    tokens, or the example's own mask (0 on spliced tool output, tools.output_mask)."""
    P = max(len(e[0]) for e in examples)
    C = max(len(e[1]) for e in examples)
    ids = torch.full((len(examples), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c, *_) in enumerate(examples):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p):P + len(c)] = 1
    mask = attn[:, P:].float()
    for i, e in enumerate(examples):
        if len(e) > 2:
            mask[i, :len(e[2])] = torch.tensor(e[2], dtype=torch.float32)
    return ids.to(device), attn.to(device), mask.to(device)


class ShuffledCycle:
    """Epochs over n rows, each in a fresh seeded order. (epoch, pos) is the whole state: a resumed run
    sees exactly the rows an uninterrupted run would have seen, across epoch boundaries too."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.order = self._order()

    def _order(self):
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k):
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load(self, s):
        # the saved position indexes an order of n rows: rows of another count are other data
        n = s.get("n", max(self.n, s["pos"]))
        if n != self.n:
            raise DataError(f"--resume: the data has {self.n} rows, the checkpoint was trained on {n} (at row "
                              f"{s['pos']} of epoch {s['epoch']}); resume with the same data, or start a new --out")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self.order = self._order()


