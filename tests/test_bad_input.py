"""Bad input stops sft.py, grpo.py and dpo.py before their first step, with what and where (file:line,
field), and without touching anything already in --out. Length limits: --truncation error | skip."""
import hashlib
import json
import os
import time

import pytest

import dpo
import grpo
import model as M
import data as D
import checkpoint as CK
import lifecycle as L
import sft
from conftest import TEST_THREADS

U = lambda s: {"role": "user", "content": s}
A = lambda s: {"role": "assistant", "content": s}
GOOD = {"sft": {"prompt": "1+2=", "completion": "3"},
        "grpo": {"prompt": "1+2=", "answer": "3"},
        "dpo": {"prompt": "1+2=", "chosen": "3", "rejected": "4"}}


def config(script, data, out, **kw):
    if script == "sft":
        return sft.main, sft.SFTConfig(**{**dict(data=data, out=out, steps=2, batch_size=2, eval_n=0,
                                                 threads=TEST_THREADS, warmup=1, save_every=1), **kw})
    if script == "grpo":
        return grpo.main, grpo.GRPOConfig(**{**dict(init="scratch", data=data, out=out, steps=2, num_prompts=2,
                                                    num_generations=2, max_new_tokens=4, eval_n=0, eval_every=0,
                                                    sample_every=0, save_every=1, threads=TEST_THREADS), **kw})
    return dpo.main, dpo.DPOConfig(**{**dict(data=data, out=out, steps=2, batch_size=2, micro_batch=2, eval_n=0,
                                             threads=TEST_THREADS, warmup=1, save_every=1), **kw})


def write(path, rows):
    """rows: dicts (written as JSON), raw strings or bytes (written as they are)."""
    enc = lambda r: r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
    path.write_bytes(b"".join(enc(r) + b"\n" for r in rows))
    return str(path)


def fails_before_anything(tmp_path, script, rows, match, **kw):
    data = write(tmp_path / "d.jsonl", rows)
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out, **kw)
    with pytest.raises(ValueError, match=match):
        main(cfg)
    assert not os.path.exists(out)                       # not even run_config.json


# Each case: a bad row at line 2 (after a good one), and the message naming file:line and field.
CASES = [
    ("sft", '{"prompt": "1+2=", "completion": "3"', r"d\.jsonl:2: malformed JSON"),
    ("sft", b'{"prompt": "\xff", "completion": "3"}', r"d\.jsonl:2: not UTF-8"),
    ("sft", {"prompt": "1+2="}, r"d\.jsonl:2: missing field 'completion'"),
    ("sft", {"prompt": 12, "completion": "3"}, r"d\.jsonl:2: field 'prompt' must be a string or .* got int"),
    ("sft", {"prompt": "1+2=", "completion": "  "}, r"d\.jsonl:2: field 'completion' is empty"),
    ("sft", {"messages": [U("1+2="), A("")]}, r"d\.jsonl:2: field 'messages'\[1\]: the final 'assistant' message is empty"),
    ("sft", {"messages": [U("1+2="), {"role": "bot", "content": "3"}]}, r"d\.jsonl:2: field 'messages'\[1\] has unknown role 'bot'"),
    ("sft", {"messages": [{"role": ["user"], "content": "x"}, A("3")]}, r"d\.jsonl:2: field 'messages'\[0\] must be \{'role': str"),
    ("sft", [1, 2], r"d\.jsonl:2: expected a JSON object, got list"),
    ("grpo", '{"prompt": ', r"d\.jsonl:2: malformed JSON"),
    ("grpo", {"prompt": "", "answer": "3"}, r"d\.jsonl:2: field 'prompt' is empty"),
    ("grpo", {"prompt": [U(" ")], "answer": "3"}, r"d\.jsonl:2: field 'prompt' is empty"),
    ("grpo", {"prompt": [{"role": "robot", "content": "1+2"}], "answer": "3"}, r"d\.jsonl:2: .*unknown role 'robot'"),
    ("grpo", {"prompt": "1+2=", "answer": ["3"]}, r"d\.jsonl:2: field 'answer' must be str or int or float, got list"),
    ("dpo", '{"prompt": "1", "chosen": "2", "rejected": "3"}}', r"d\.jsonl:2: malformed JSON"),
    ("dpo", {"prompt": "1+2=", "chosen": "3", "rejected": ""}, r"d\.jsonl:2: field 'rejected' is empty"),
    ("dpo", {"prompt": "1+2=", "chosen": {"text": "3"}, "rejected": "4"}, r"d\.jsonl:2: field 'chosen' must be a string"),
    ("dpo", {"prompt": [U("1+2=")], "chosen": [A("3")], "rejected": [{"role": "critic", "content": "4"}]},
     r"d\.jsonl:2: field 'rejected'\[0\] has unknown role 'critic'"),
    ("dpo", {"prompt": "1+2=", "chosen": "3"}, r"d\.jsonl:2: missing field 'rejected'"),
    # data text never becomes structure: special-token text is refused, wherever it is
    ("sft", {"prompt": "1+2=", "completion": "3<eos>and more"}, r"d\.jsonl:2: the text contains '<eos>', a special token"),
    ("sft", {"prompt": "1+2=", "completion": "3<pad>"}, r"d\.jsonl:2: the text contains '<pad>'"),
    ("sft", {"messages": [U("hi<|assistant|>4"), A("3")]}, r"d\.jsonl:2: the text contains '<\|assistant\|>'"),
    ("grpo", {"prompt": [U("1+2=<|user|>")], "answer": "3"}, r"d\.jsonl:2: the text contains '<\|user\|>'"),
    ("dpo", {"prompt": "1+2=", "chosen": "3", "rejected": "4<eos>"}, r"d\.jsonl:2: the text contains '<eos>'"),
    ("grpo", {"prompt": "1+2=", "answer": True}, r"d\.jsonl:2: field 'answer' must be str or int or float, got bool"),
    ("dpo", {"prompt": "1+2=", "chosen": "3", "rejected": "3"}, r"d\.jsonl:2: 'chosen' and 'rejected' are the same"),
    ("sft", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "3"}', r"d\.jsonl:2: JSON nested too deeply"),
    ("grpo", '{"prompt": "1+2=", "answer": ' + "9" * 5000 + "}", r"d\.jsonl:2: unreadable JSON \(Exceeds the limit"),
    # longer than the model's context (the tiny model: 256 positions), within the --max-* flags
    ("sft", {"prompt": "1" * 300, "completion": "3"}, r"d\.jsonl:2: 302 tokens > the model's context of 256 positions"),
    ("grpo", {"prompt": "1" * 253, "answer": "3"}, r"d\.jsonl:2: prompt has 253 tokens \+ --max-new-tokens 4 > the model's context"),
    ("dpo", {"prompt": "1" * 300, "chosen": "3", "rejected": "4"}, r"d\.jsonl:2: pair has 302 tokens > the model's context"),
]


@pytest.mark.parametrize("script, bad, match", CASES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(CASES)])
def test_bad_row_fails_with_file_line_and_field(tmp_path, script, bad, match):
    fails_before_anything(tmp_path, script, [GOOD[script], bad], match)


def test_grpo_reward_column_missing_from_every_row(tmp_path):
    """The default accuracy reward reads 'answer': a file without it would train on format alone."""
    fails_before_anything(tmp_path, "grpo", [{"prompt": "1+2="}, {"prompt": "2+2="}],
                          r"d\.jsonl: no row has the column 'answer' that the reward accuracy reads")


def test_empty_file(tmp_path):
    fails_before_anything(tmp_path, "dpo", ["", "  "], r"d\.jsonl: no rows")


# -----------------------------------------------------------------------------
# Length limits: --truncation error (default) | skip

LONG = {"sft": ({"prompt": "1+2=", "completion": "3" * 40}, dict(max_length=20)),
        "grpo": ({"prompt": "1" * 40, "answer": "3"}, dict(max_prompt_length=20)),
        "dpo": ({"prompt": "1+2=", "chosen": "3", "rejected": "4" * 40}, dict(max_length=20))}


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_over_length_is_an_error_by_default(tmp_path, script):
    row, kw = LONG[script]
    fails_before_anything(tmp_path, script, [GOOD[script], row], r"d\.jsonl:2: .* > --max-.*length 20 \(--truncation skip", **kw)


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_a_huge_line_is_refused_before_it_is_tokenised(tmp_path, script):
    """A few-MB row: its characters alone show it is over the limit (no token covers more characters than
    its vocabulary entry), so it is refused at once instead of after minutes of tokenising and GBs."""
    row = {"sft": {"prompt": "1+2=", "completion": "3" * 3_000_000},
           "grpo": {"prompt": "1" * 3_000_000, "answer": "3"},
           "dpo": {"prompt": "1+2=", "chosen": "3", "rejected": "4" * 3_000_000}}[script]
    t0 = time.time()
    fails_before_anything(tmp_path, script, [GOOD[script], row],
                          r"d\.jsonl:2: 300000\d characters: more than \d+ tokens however tokenised > --max-")
    assert time.time() - t0 < 10


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_over_length_skip_counts_and_trains_on_the_rest(tmp_path, script, capsys):
    row, kw = LONG[script]
    data = write(tmp_path / "d.jsonl", [GOOD[script], row, GOOD[script], row, row])
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out, truncation="skip", **kw)
    main(cfg)
    assert "d.jsonl: skipped 3 of 5 rows over the length limit (--truncation skip)" in capsys.readouterr().out
    assert CK.load_state(out)["step"] == 2
    if script == "sft":  # only the short rows were trained on: "3" + EOS, twice
        with open(os.path.join(out, "sft_metrics.jsonl")) as f:
            assert all(json.loads(line)["num_tokens"] == 4 for line in f)
    # all rows over the limit: nothing left to train on
    write(tmp_path / "d.jsonl", [row, row])
    main, cfg = config(script, data, str(tmp_path / "out2"), truncation="skip", **kw)
    with pytest.raises(D.DataError, match=r"d\.jsonl: no rows left: all 2 are over the length limit"):
        main(cfg)
    main, cfg = config(script, data, str(tmp_path / "out3"), truncation="cut", **kw)
    with pytest.raises(ValueError, match="--truncation must be error or skip"):
        main(cfg)


# -----------------------------------------------------------------------------
# Tokenizers: no chat template for conversational data, pad == EOS

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    m, tok = M.load("tiny")
    tok.chat_template = None
    CK.save(m, tok, str(root / "no_template"))
    m, tok = M.load("tiny")
    tok.pad_token = tok.eos_token
    m.save_pretrained(str(root / "pad_eos"))
    tok.save_pretrained(str(root / "pad_eos"))
    return {"no_template": str(root / "no_template"), "pad_eos": str(root / "pad_eos")}


CONVERSATIONAL = {"sft": {"messages": [U("1+2="), A("3")]},
                  "grpo": {"prompt": [U("1+2=")], "answer": "3"},
                  "dpo": {"prompt": [U("1+2=")], "chosen": [A("3")], "rejected": [A("4")]}}


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_conversational_data_needs_a_chat_template(tmp_path, script, model_dirs):
    fails_before_anything(tmp_path, script, [GOOD[script], CONVERSATIONAL[script]],
                          r"d\.jsonl:2: conversational data needs a tokenizer with a chat template",
                          model=model_dirs["no_template"])
    # plain-string rows need no template: the same model trains on them
    data = write(tmp_path / "ok.jsonl", [GOOD[script]] * 2)
    main, cfg = config(script, data, str(tmp_path / "ok"), model=model_dirs["no_template"])
    main(cfg)
    assert CK.load_state(str(tmp_path / "ok"))["step"] == 2


@pytest.mark.parametrize("script", ["grpo", "dpo"])
def test_builtin_task_needs_a_chat_template(tmp_path, script, model_dirs):
    out = str(tmp_path / "out")
    main, cfg = config(script, "", out, model=model_dirs["no_template"], init="scratch")
    with pytest.raises(ValueError, match="chat template"):
        main(cfg)
    assert not os.path.exists(out)


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_pad_equal_to_eos_is_refused(tmp_path, script, model_dirs):
    fails_before_anything(tmp_path, script, [GOOD[script]] * 2, r"pad_eos: pad token == EOS token",
                          model=model_dirs["pad_eos"])


# -----------------------------------------------------------------------------
# Nothing already written is lost when a later input fails

def snapshot(out):
    h = {}
    for root, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                h[os.path.relpath(os.path.join(root, f), out)] = hashlib.sha256(fh.read()).hexdigest()
    return h


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_resume_with_bad_data_keeps_checkpoint_and_logs(tmp_path, script):
    data = write(tmp_path / "d.jsonl", [GOOD[script]] * 3)
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out)
    main(cfg)
    before = snapshot(out)
    assert "model.safetensors" in before and os.path.join("trainer_state", "state.pt") in before
    write(tmp_path / "d.jsonl", [GOOD[script], '{"oops"'])
    main, cfg = config(script, data, out, resume=True, steps=4)
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: malformed JSON"):
        main(cfg)
    assert snapshot(out) == before                       # every byte of every file


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_a_fresh_run_replaces_the_logs_but_a_failing_one_keeps_them(tmp_path, script):
    """OUT holds one run: a new run (no --resume) into it starts its metrics log empty, once its input
    has passed the checks; a new run whose data fails leaves the previous run's log as it was."""
    good = write(tmp_path / "good.jsonl", [GOOD[script]] * 4)
    bad = write(tmp_path / "bad.jsonl", [GOOD[script], "{"])
    out = str(tmp_path / "out")
    log = os.path.join(out, "sft_metrics.jsonl" if script == "sft" else "metrics.jsonl")
    main, cfg = config(script, good, out, steps=2)
    main(cfg)
    first = open(log).read()
    assert [json.loads(ln)["step"] for ln in first.splitlines()] == [1, 2]
    main, cfg = config(script, bad, out, steps=1)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        main(cfg)
    assert open(log).read() == first
    main, cfg = config(script, good, out, steps=1)
    main(cfg)
    assert [json.loads(ln)["step"] for ln in open(log).read().splitlines()] == [1]


# -----------------------------------------------------------------------------
# Flags: every range and combination is checked before anything in --out is touched

BAD_FLAGS = {
    "sft": [dict(steps=0), dict(batch_size=0), dict(lr=-1.0), dict(max_length=0), dict(teacher_slip=2.0),
            dict(threads=0), dict(steps="3"), dict(batch_size=2.5)],
    "grpo": [dict(temperature=0.0), dict(num_prompts=0), dict(max_new_tokens=0), dict(top_k=-5),
             dict(num_iterations=0), dict(num_generations=1), dict(top_p=0.0), dict(loss_type="ppo"),
             dict(scale_rewards="std"), dict(overlong_cache=-1), dict(reward_weights="1,x"),
             dict(reward_weights="nan"), dict(reward_funcs="no_such_module:f"),
             dict(reward_funcs="toy_rewards:no_such_fn"), dict(reward_funcs="nope"), dict(lr=float("nan"))],
    "dpo": [dict(beta=0.0), dict(temperature=0.0), dict(micro_batch=0), dict(num_generations=1),
            dict(rounds=0), dict(loss="kto")],
}


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_a_bad_flag_leaves_a_previous_run_untouched(tmp_path, script):
    data = write(tmp_path / "d.jsonl", [GOOD[script]] * 3)
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out, steps=1, **({"sample_every": 1} if script == "grpo" else {}))
    main(cfg)
    before = snapshot(out)
    assert "run_config.json" in before and any(k.endswith("metrics.jsonl") for k in before)
    for bad in BAD_FLAGS[script]:
        for resume in (False, True):
            main, cfg = config(script, data, out, resume=resume, **bad)
            with pytest.raises(L.ConfigError, match="^--"):   # a sentence that names the flag
                main(cfg)
            assert snapshot(out) == before, bad
