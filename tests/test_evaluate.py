"""evaluate.py: the pass@k estimator by hand, scores aligned row by row with the prompts, the built-in
held-out path equal to the one sft/grpo/dpo report, and the command line on a saved directory."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import evaluate as E
import model as M
import data as D
import rewards
import sft
from conftest import TEST_THREADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTS = "toy_rewards:starts_with"


def test_pass_at_k_hand_values():
    """1 - C(n-c, k) / C(n, k): n=5, c=2 -> k=1: 2/5; k=2: 1 - 3/10; k=4: 1 - 0/5 (n-c < k) = 1.
    n=10, c=3, k=3: 1 - 35/120. No pass: 0. pass@1 is c/n for every c."""
    assert E.pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert E.pass_at_k(5, 2, 4) == 1.0
    assert E.pass_at_k(10, 3, 3) == pytest.approx(1 - 35 / 120, abs=1e-15)
    assert E.pass_at_k(8, 0, 8) == 0.0     # exact: an empty product is 1.0, and 1.0 - 1.0 is 0.0
    for c in range(9):
        assert E.pass_at_k(8, c, 1) == pytest.approx(c / 8, abs=1e-15)
        assert E.pass_at_k(8, c, 4) == pytest.approx(1 - math.comb(8 - c, 4) / math.comb(8, 4), abs=1e-15)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short SFT on 2-digit additions (150 steps): completions that are not empty, accuracy above 0."""
    out = str(tmp_path_factory.mktemp("sft") / "sft")
    sft.main(sft.SFTConfig(task="add2", out=out, steps=150, eval_n=0, save_every=0, threads=TEST_THREADS))
    return out


def rows_half_right(model, tok, n=10, right=6):
    """Eval rows whose `answer` is the first character of the model's own greedy completion for the first
    `right` rows and a character it never writes first for the others: accuracy must be right / n."""
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}"}]} for i in range(n)]
    greedy = E.complete(model, tok, rows, 1, 8, 1.0, 256, greedy=True)
    for i, (r, c) in enumerate(zip(rows, greedy)):
        assert c, "the test needs non-empty greedy completions"
        r["answer"] = c[0] if i < right else "\u2603"   # a snowman: not in the char vocabulary
    return rows


def test_scores_are_aligned_with_their_prompts(trained):
    """Greedy accuracy counts exactly the rows whose answer the model's completion starts with (6 of 10);
    with k samples, pass@1 equals mean@k for a 0/1 reward and pass@k never falls as k grows."""
    import toy_rewards
    model, tok = M.load(trained)
    rows = rows_half_right(model, tok)
    torch.manual_seed(0)
    result, greedy = E.evaluate(model, tok, rows, toy_rewards.starts_with, max_new_tokens=8, samples=8)
    assert result["accuracy"] == 0.6 and result["n"] == 10
    assert [s for _, _, s in greedy] == [1.0] * 6 + [0.0] * 4
    assert result["pass@1"] == pytest.approx(result["mean@8"], abs=1e-12)
    ks = [result[f"pass@{k}"] for k in (1, 2, 4, 8)]
    assert all(a <= b + 1e-12 for a, b in zip(ks, ks[1:])), ks
    assert 0 < result["pass@8"] <= 1


def test_builtin_held_out_equals_what_training_reports(trained):
    """evaluate.py on the built-in task scores what training reports (HeldOut, which sft/grpo/dpo run):
    the same rows, checker, greedy decoding and batches (250 prompts each) on the same model, so equal
    exactly. A short SFT makes the accuracy non-trivial."""
    model, tok = M.load(trained)
    cfg = E.EvalConfig(model=trained, task="add2", n=250, batch_size=250)
    name, fn = E.resolve_reward(cfg.reward, cfg.task, builtin=True)
    assert name == "accuracy"
    ours = E.evaluate(model, tok, E.load_rows(cfg, tok), fn, cfg.max_new_tokens, batch_size=250)[0]["accuracy"]
    held = E.HeldOut(sft.SFTConfig(task="add2", eval_n=250), tok, E.criterion(sft.SFTConfig(task="add2")), 512,
                     cfg.max_new_tokens)
    assert held(model, tok, 0)["held_out_accuracy"] == ours
    assert [r["prompt"] for r in held.rows] == [p.row()["prompt"] for p in rewards.held_out("add2", 250)]
    assert ours > 0.05, ours   # 150 steps on 2-digit additions: well above 0 (seen ~0.1-0.3)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--threads", str(TEST_THREADS), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_command_line_on_a_saved_directory(tmp_path, trained):
    """python evaluate.py --model DIR --data eval.jsonl scores a saved checkpoint as evaluate() scores
    the model in memory (6 of 10), writes eval_result.json and one eval_samples.jsonl line per prompt;
    a bad row stops it with file:line."""
    d = trained
    model, tok = M.load(d)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_half_right(model, tok)))
    out = str(tmp_path / "eval")
    p = run_cli("--model", d, "--data", str(data), "--reward", STARTS, "--max-new-tokens", "8", "--out", out)
    assert p.returncode == 0, p.stderr
    res = json.load(open(os.path.join(out, "eval_result.json")))
    assert res["accuracy"] == 0.6 and res["reward"] == STARTS
    lines = [json.loads(line) for line in open(os.path.join(out, "eval_samples.jsonl"))]
    assert [x["score"] for x in lines] == [1.0] * 6 + [0.0] * 4
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + json.dumps({"answer": "2"}) + "\n")
    p = run_cli("--model", d, "--data", str(data))
    assert p.returncode != 0 and "eval.jsonl:2: missing field 'prompt'" in p.stderr, p.stderr[-500:]
    data.write_text(json.dumps({"prompt": "1+1" + tok.eos_token + "2", "answer": "2"}) + "\n")
    p = run_cli("--model", d, "--data", str(data))                  # data text never becomes structure
    assert p.returncode != 0 and "eval.jsonl:1:" in p.stderr and tok.eos_token in p.stderr, p.stderr[-500:]


def test_grpo_eval_data_before_every_and_after(tmp_path, trained):
    """grpo.py --data prompts --eval-data held-out: the held-out rows are scored by the first reward
    function before training (exactly evaluate()'s 6 of 10 on the same model: the same greedy code on
    the same batch), every --eval-every steps, and after; result.json has before/after and the history."""
    import grpo
    model, tok = M.load(trained)
    rows = rows_half_right(model, tok)
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": "1"}) + "\n" for r in rows))
    out = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(init=trained, data=str(data), eval_data=str(held), out=out, steps=4, eval_every=2,
                              num_prompts=2, num_generations=4, max_new_tokens=8, reward_funcs=STARTS,
                              sample_every=0, save_every=0, threads=TEST_THREADS))
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["held_out_accuracy_before"] == 0.6 and res["n"] == 10
    assert [h["step"] for h in res["history"]] == [0, 2, 4]
    assert res["held_out_accuracy_after"] == res["history"][-1]["held_out_accuracy"]
    ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in ms if "held_out_accuracy" in m] == [2]
    assert ms[1]["held_out_accuracy"] == res["history"][1]["held_out_accuracy"]
    held.write_text(json.dumps({"answer": "1"}) + "\n")
    with pytest.raises(D.DataError, match=r"held\.jsonl:1: missing field 'prompt'"):
        grpo.main(grpo.GRPOConfig(init=trained, data=str(data), eval_data=str(held), out=str(tmp_path / "h"),
                                  steps=1, reward_funcs=STARTS, threads=TEST_THREADS))
    assert not os.path.exists(str(tmp_path / "h" / "metrics.jsonl"))


def test_dpo_eval_data_before_and_after(tmp_path, trained):
    """dpo.py --data pairs --eval-data held-out: the held-out rows are scored by the accuracy checker
    before DPO (exactly evaluate()'s 6 of 10: answers taken from the model's own greedy completions for
    the first six) and after; result.json has both and the history."""
    import dpo
    model, tok = M.load(trained)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i + 3}"}]} for i in range(10, 20)]
    greedy = E.complete(model, tok, rows, 1, 48, 1.0, 256, greedy=True)
    answers = [rewards.extract_answer(c) for c in greedy]
    assert all(answers), greedy                               # the short SFT writes <answer> tags
    for i, (r, a) in enumerate(zip(rows, answers)):
        r["answer"] = a if i < 6 else "x"
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": "1"}],
                                         "rejected": [{"role": "assistant", "content": "2"}]}) + "\n" for r in rows))
    out = str(tmp_path / "d")
    dpo.main(dpo.DPOConfig(model=trained, data=str(pairs), eval_data=str(held), out=out, steps=2, batch_size=4,
                           eval_every=0, save_every=0, threads=TEST_THREADS))
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["held_out_accuracy_before"] == 0.6 and res["n"] == 10
    assert [h["step"] for h in res["history"]] == [0, 2]


def test_sft_eval_data_before_and_after(tmp_path, trained):
    """sft.py --eval-data: the held-out rows are scored by the accuracy checker before SFT (exactly
    evaluate()'s 6 of 10 on the same model) and after, into sft_result.json."""
    model, tok = M.load(trained)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i + 3}"}]} for i in range(10, 20)]
    answers = [rewards.extract_answer(c) for c in E.complete(model, tok, rows, 1, 48, 1.0, 256, greedy=True)]
    assert all(answers)
    for i, (r, a) in enumerate(zip(rows, answers)):
        r["answer"] = a if i < 6 else "x"
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "s")
    sft.main(sft.SFTConfig(model=trained, task="add2", eval_data=str(held), out=out, steps=2, batch_size=4,
                           num_examples=8, eval_n=0, save_every=0, threads=TEST_THREADS))
    res = json.load(open(os.path.join(out, "sft_result.json")))
    assert res["held_out_accuracy_before"] == 0.6 and res["n"] == 10 and 0 <= res["held_out_accuracy"] <= 1


def test_grpo_eval_samples_logs_pass_at_k_without_changing_the_run(tmp_path, trained):
    """--eval-samples 4: every evaluation also logs held_out/pass@1,2,4 and mean@4 (pass@1 = mean@4 for a 0/1
    reward, pass@k non-decreasing), in metrics.jsonl and the history; the samples come from a generator of
    their own, so the run trains exactly as without them (same code, same shapes: bitwise equal weights)."""
    import grpo
    from safetensors.torch import load_file
    runs = {}
    for k in (0, 4):
        out = str(tmp_path / f"g{k}")
        grpo.main(grpo.GRPOConfig(task="add2", init=trained, out=out, steps=2, num_prompts=4, num_generations=4,
                                  max_new_tokens=12, eval_n=8, eval_every=1, eval_samples=k, sample_every=0,
                                  save_every=0, threads=TEST_THREADS))
        runs[k] = (load_file(os.path.join(out, "model.safetensors")),
                   json.load(open(os.path.join(out, "result.json")))["history"],
                   [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))])
    w0, w4 = runs[0][0], runs[4][0]
    assert all(torch.equal(w0[n], w4[n]) for n in w0)
    hist = runs[4][1]
    assert [h["step"] for h in hist] == [0, 1, 2]
    for h in hist:
        assert h["held_out/pass@1"] == pytest.approx(h["held_out/mean@4"], abs=1e-12)
        assert h["held_out/pass@1"] <= h["held_out/pass@2"] + 1e-12 <= h["held_out/pass@4"] + 2e-12
    assert "held_out/pass@4" in runs[4][2][0] and "held_out/pass@4" not in runs[0][2][0]
    assert [h["held_out_accuracy"] for h in runs[0][1]] == [h["held_out_accuracy"] for h in hist]
    samples = [json.loads(line) for line in open(os.path.join(tmp_path / "g4", "samples.jsonl"))]
    assert [s["step"] for s in samples if s.get("eval")] == [0, 0, 1, 1, 2, 2]   # two eval completions each
    assert all({"prompt", "completion", "score"} <= set(s) for s in samples if s.get("eval"))
