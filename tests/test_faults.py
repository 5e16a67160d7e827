"""Runs that survive faults: atomic checkpoints, kill -9 then --resume ending bitwise identical to an
uninterrupted run (real subprocesses, SIGKILL), and steps with a non-finite gradient skipped."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import dpo
import grpo
import model as M
import data as D
import checkpoint as CK
import lifecycle as L
import sft
from conftest import TEST_THREADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "toy_rewards:digit_fraction"   # a dense reward: every step changes the weights


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def same_weights(a, b):
    # Bitwise, for the kill/resume tests: the resumed run restores the whole state exactly (weights, AdamW
    # moments, schedule, RNG, data position) and then runs the same code on the same shapes, on this
    # machine, with the same thread count (cfg.threads, in the child process too) as the uninterrupted
    # run: the same operations on the same numbers in the same order.
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "step_time"} for r in rows]


def cli(cfg):
    """A config dataclass -> its command-line flags."""
    args = []
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def lines(path):
    """Complete lines in a file another process is appending to."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


def run_and_kill(script, cfg, log_name, kill_after):
    """Start `python script` with cfg's flags, wait until its metrics log has `kill_after` lines (its
    step-k checkpoint is being written or done) and then a random 0-0.2 s more, so the kill lands
    anywhere in a step or a save; SIGKILL it. Returns the steps it logged and the delay."""
    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "MKL_NUM_THREADS": str(TEST_THREADS),
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    log = os.path.join(cfg.out, log_name)
    with open(os.path.join(os.path.dirname(cfg.out), script + ".stderr"), "w") as err:
        p = subprocess.Popen([sys.executable, script, *cli(cfg)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if lines(log) >= kill_after:
                break
            time.sleep(0.005)
        delay = random.uniform(0, 0.2)
        time.sleep(delay)
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert alive, f"{script} exited before it could be killed (rc {p.returncode}); see {err.name}"
    return lines(log), delay


# -----------------------------------------------------------------------------
# Atomic checkpoints

def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    """A crash while the new checkpoint is written leaves the previous one whole; a crash after the
    commit point (in the middle of swapping files in) is completed on the next load: either way what
    loads is exactly one checkpoint, weights and state together."""
    model, tok = tiny
    out = str(tmp_path / "ck")
    CK.save(model, tok, out, {"step": 1})
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        CK.save(model, tok, out, {"step": 2})                     # dies writing the training state
    monkeypatch.setattr(torch, "save", real_save)
    assert CK.load_state(out)["step"] == 1
    assert all(torch.equal(w1[k], v) for k, v in M.load(out)[0].state_dict().items())
    assert not os.path.exists(os.path.join(out, CK.TMP))         # the partial write is cleaned up

    real_replace, moved = os.replace, []

    def dying_replace(src, dst):                                # dies after moving the first file in
        if os.path.basename(os.path.dirname(src)) == CK.READY and moved:
            raise KeyboardInterrupt("killed mid-swap")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        CK.save(model, tok, out, {"step": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.isdir(os.path.join(out, CK.READY))            # committed, half swapped in
    assert CK.load_state(out)["step"] == 2                       # rolled forward on load
    assert not os.path.exists(os.path.join(out, CK.READY))
    w2 = M.load(out)[0].state_dict()
    assert all(torch.equal(w2[k], v) for k, v in model.state_dict().items())


def test_a_full_disk_during_a_save_is_said_in_words(tmp_path, tiny, monkeypatch):
    import errno
    model, tok = tiny
    out = str(tmp_path / "ckpt")
    CK.save(model, tok, out, {"step": 1})
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("model.safetensors", "checksums.json")}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(CK.torch, "save", full)
    with pytest.raises(OSError, match="could not write the checkpoint: the disk is full .* previous checkpoint "
                                      "there is intact"):
        CK.save(model, tok, out, {"step": 2})
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, CK.TMP))          # the partial one is gone (its space too)
    assert all(open(os.path.join(out, f), "rb").read() == b for f, b in before.items())
    assert CK.load_state(out)["step"] == 1


def test_bit_damage_in_a_checkpoint_is_refused_at_load(tmp_path, tiny):
    model, tok = tiny
    out = str(tmp_path / "ckpt")
    CK.save(model, tok, out, {"step": 1})
    M.load(out), CK.load_state(out)                               # whole: both load
    for name, loader in (("model.safetensors", M.load), (os.path.join("trainer_state", "state.pt"), CK.load_state)):
        path = os.path.join(out, name)
        data = bytearray(open(path, "rb").read())
        data[-100] ^= 1                                           # one bit, inside the tensor data
        open(path, "wb").write(bytes(data))
        with pytest.raises(OSError, match="damaged"):
            loader(out)


def test_trim_log_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)))
    L.trim_log(str(path), 3)
    assert [r["step"] for r in metrics(path)] == [1, 2, 3]


def test_trim_log_drops_a_torn_last_line_and_refuses_damage_inside(tmp_path):
    path = tmp_path / "m.jsonl"
    whole = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2))
    path.write_text(whole + '{"step": 3, "lo')                   # a write cut short (disk full, kill)
    L.trim_log(str(path), 3)
    assert path.read_text() == whole
    path.write_text(whole + '{"step": 3}')                        # whole JSON, newline lost: appends stay lines
    L.trim_log(str(path), 3)
    assert path.read_text().endswith('{"step": 3}\n')
    path.write_text('{"st\n' + whole)
    with pytest.raises(D.DataError, match=r"m\.jsonl:1: not a JSON line"):
        L.trim_log(str(path), 3)


def test_sft_resumes_after_a_torn_metrics_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2=", "completion": "3"}\n' * 4)
    out = str(tmp_path / "out")
    cfg = sft.SFTConfig(data=str(data), out=out, steps=2, batch_size=2, eval_n=0, threads=TEST_THREADS, save_every=1)
    sft.main(cfg)
    log = os.path.join(out, "sft_metrics.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 0.')
    sft.main(sft.SFTConfig(**{**vars(cfg), "steps": 3, "resume": True}))
    assert [r["step"] for r in metrics(log)] == [1, 2, 3]


# -----------------------------------------------------------------------------
# kill -9, then --resume: bitwise the uninterrupted run

def test_sft_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """8 examples, batch 4: every second step ends an epoch, so the resumed run always crosses
    epoch boundaries (and may start exactly on one). Checkpoint every step; SIGKILL lands wherever
    the third step's checkpoint happens to be, possibly mid-save."""
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    kw = dict(steps=10, save_every=1, batch_size=4, num_examples=8, eval_n=0, threads=TEST_THREADS, warmup=3)
    sft.main(sft.SFTConfig(out=a, **kw))
    logged, delay = run_and_kill("sft.py", sft.SFTConfig(out=b, **kw), "sft_metrics.jsonl", kill_after=3)
    st = CK.load_state(b)
    assert 2 <= st["step"] < 10, st["step"]                     # at least the step-2 checkpoint is whole
    sft.main(sft.SFTConfig(out=b, resume=True, **kw))
    assert same_weights(a, b), (logged, delay, st["step"])
    sa, sb = CK.load_state(a), CK.load_state(b)
    assert sa["data"] == sb["data"] == {"epoch": 4, "pos": 8, "n": 8}
    assert all(torch.equal(x, y) for x, y in zip(sa["rng"]["torch"], sb["rng"]["torch"]))
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert sa["scheduler"] == sb["scheduler"]
    la = without_time(metrics(os.path.join(a, "sft_metrics.jsonl")))
    lb = without_time(metrics(os.path.join(b, "sft_metrics.jsonl")))
    assert la == lb and [r["step"] for r in lb] == list(range(1, 11))   # no step logged twice


def test_grpo_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """JSONL prompts (3 rows, 2 per step: epochs end mid-batch), a dense reward, two optimizer steps
    per rollout and a KL term, so weights, Adam state, sampling RNG and data position all matter."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("12+3", "4+56", "7+8")))
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    kw = dict(init="scratch", data=str(data), steps=8, save_every=1, num_prompts=2, num_generations=4,
              max_new_tokens=8, eval_n=0, eval_every=0, sample_every=1, threads=TEST_THREADS, reward_funcs=TOY,
              lr=1e-3, num_iterations=2, beta=0.04)
    grpo.main(grpo.GRPOConfig(out=a, **kw))
    logged, delay = run_and_kill("grpo.py", grpo.GRPOConfig(out=b, **kw), "metrics.jsonl", kill_after=3)
    killed_at = CK.load_state(b)["step"]
    assert 2 <= killed_at < 8
    grpo.main(grpo.GRPOConfig(out=b, resume=True, **kw))
    assert same_weights(a, b), (logged, delay, killed_at)
    assert CK.load_state(a)["data"] == CK.load_state(b)["data"]
    assert without_time(metrics(os.path.join(a, "metrics.jsonl"))) == \
        without_time(metrics(os.path.join(b, "metrics.jsonl")))
    assert metrics(os.path.join(a, "samples.jsonl")) == metrics(os.path.join(b, "samples.jsonl"))


# -----------------------------------------------------------------------------
# Non-finite gradients: the step is skipped, the run goes on

def nan_on_call(module, n, when=lambda *a, **k: True):
    """Wrap module.token_logprobs: the n-th call for which when(...) holds returns NaN log-probs.
    Also records the weights seen at each such call (= the weights before that step)."""
    real, calls, seen = module.token_logprobs, [], []

    def wrapped(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if not when(*args, **kwargs):
            return out
        calls.append(1)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(calls) == n:
            out = tuple(o * math.nan for o in out) if isinstance(out, tuple) else out * math.nan
        return out
    return wrapped, seen


def assert_skipped_once(seen, rows, n):
    """Step n (1-based) had a NaN loss: weights before step n+1 == before step n; later steps move.
    (Bitwise: a skipped step does no arithmetic on the weights at all.)"""
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)
    assert same(seen[n - 1], seen[n])                 # step n changed nothing
    assert not same(seen[n - 2], seen[n - 1])         # the step before did train
    assert not same(seen[n], seen[n + 1])             # and training goes on
    assert [r["skipped_steps"] for r in rows] == [int(r["step"] == n) for r in rows]
    # the NaN grad norm is logged as null (lifecycle.metrics_line: the log stays strict JSON)
    assert rows[n - 1]["grad_norm"] is None and all(math.isfinite(r["grad_norm"]) for r in rows if r["step"] != n)


def test_sft_skips_a_nan_step(tmp_path, monkeypatch):
    out = str(tmp_path / "s")
    wrapped, seen = nan_on_call(sft, 3)
    monkeypatch.setattr(sft, "token_logprobs", wrapped)
    sft.main(sft.SFTConfig(out=out, steps=5, batch_size=4, num_examples=8, eval_n=0, save_every=0, threads=TEST_THREADS,
                           warmup=1))
    assert_skipped_once(seen, metrics(os.path.join(out, "sft_metrics.jsonl")), 3)
    # Adam's state never saw the NaN step: its step count is 4 of 5 and its moments are finite
    st = CK.load_state(out)["optimizer"]["state"]
    assert all(int(s["step"]) == 4 and torch.isfinite(s["exp_avg_sq"]).all() for s in st.values())


def test_grpo_skips_a_nan_step(tmp_path, monkeypatch):
    out = str(tmp_path / "g")
    wrapped, seen = nan_on_call(grpo, 2, when=lambda *a, **k: k.get("entropy", False))  # training passes only
    monkeypatch.setattr(grpo, "token_logprobs", wrapped)
    grpo.main(grpo.GRPOConfig(init="scratch", out=out, steps=4, num_prompts=2, num_generations=4, max_new_tokens=8,
                              eval_n=0, eval_every=0, sample_every=0, save_every=0, threads=TEST_THREADS,
                              reward_funcs=TOY,
                              lr=1e-3))
    assert_skipped_once(seen, metrics(os.path.join(out, "metrics.jsonl")), 2)


def test_dpo_skips_a_nan_step(tmp_path, monkeypatch):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "d")
    wrapped, seen = nan_on_call(dpo, 2, when=lambda *a, **k: torch.is_grad_enabled())   # not the reference pass
    monkeypatch.setattr(dpo, "token_logprobs", wrapped)
    dpo.main(dpo.DPOConfig(data=str(data), out=out, steps=4, batch_size=2, micro_batch=2, eval_n=0, save_every=0,
                           threads=TEST_THREADS, warmup=1, lr=1e-3))
    assert_skipped_once(seen, metrics(os.path.join(out, "metrics.jsonl")), 2)


def test_k3_and_log_ratio_are_clamped_as_verl():
    """x = logp - ref clamped to [-20, 20] before exp, k3 clamped to [-10, 10]: finite for any gap."""
    logp = torch.tensor([-100.0, -2.0, 0.0, 50.0])
    k3 = grpo.kl_penalty(logp, torch.zeros(4), "k3")
    assert torch.isfinite(k3).all()
    assert k3[0] == 10.0 and k3[3] == 10.0                        # exp(100) - 101, 49 -> both clamped
    assert k3[1].item() == pytest.approx(math.exp(2) - 2 - 1)      # inside the bounds: unchanged
    assert k3[2] == 0.0                                           # exp(0) + 0 - 1: exact
    loss, st = grpo.per_token_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1),
                                   0.2, 0.28)
    assert st["ratio"].item() == pytest.approx(math.exp(20.0), rel=1e-6)


# -----------------------------------------------------------------------------
# --resume with other flags; two runs into one OUT

def test_resume_refuses_what_the_checkpoint_was_made_with(tmp_path):
    from test_bad_input import GOOD, config, snapshot, write
    data = write(tmp_path / "d.jsonl", [GOOD["sft"]] * 4)
    out = str(tmp_path / "out")
    main, cfg = config("sft", data, out)
    main(cfg)
    before = snapshot(out)
    for bad in (dict(seed=1), dict(batch_size=4), dict(max_length=100), dict(model=out)):
        main, cfg = config("sft", data, out, resume=True, steps=3, **bad)
        with pytest.raises(L.ConfigError, match="--resume cannot change --"):
            main(cfg)
        assert snapshot(out) == before, bad


@pytest.mark.parametrize("script", ["sft", "grpo", "dpo"])
def test_resume_refuses_data_of_another_size(tmp_path, script):
    """Fewer rows than the saved position crashed with IndexError after run_config.json was rewritten."""
    from test_bad_input import GOOD, config, snapshot, write
    data = write(tmp_path / "d.jsonl", [GOOD[script]] * 4)
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out)
    main(cfg)
    before = snapshot(out)
    main, cfg = config(script, write(tmp_path / "d.jsonl", [GOOD[script]] * 2), out, resume=True, steps=3)
    with pytest.raises(D.DataError, match="the data has 2 rows, the checkpoint was trained on 4"):
        main(cfg)
    assert snapshot(out) == before


@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_resume_applies_a_new_lr_and_records_it(tmp_path, script, capsys):
    """The optimizer state would bring the old lr back while run_config.json recorded the new one."""
    from test_bad_input import GOOD, config, write
    data = write(tmp_path / "d.jsonl", [GOOD[script]] * 4)
    out = str(tmp_path / "out")
    main, cfg = config(script, data, out, lr=1e-3)
    main(cfg)
    main, cfg = config(script, data, out, lr=4e-3, steps=3, resume=True)
    main(cfg)
    printed = capsys.readouterr().out
    assert "--lr 0.001 -> 0.004" in printed and "--steps 2 -> 3" in printed
    name = "sft_metrics.jsonl" if script == "sft" else "metrics.jsonl"
    key = "learning_rate"
    last = metrics(os.path.join(out, name))[-1]
    want = 4e-3 * (L.cosine_lr(1, 3)(3) if script == "sft" else 1.0)   # grpo: warmup 0, constant
    assert last["step"] == 3 and last[key] == pytest.approx(want, rel=1e-12)
    assert json.load(open(os.path.join(out, "run_config.json")))["lr"] == 4e-3


def test_a_second_run_into_a_locked_out_fails_at_once(tmp_path):
    import fcntl
    from test_bad_input import GOOD, config, snapshot, write
    data = write(tmp_path / "d.jsonl", [GOOD["sft"]] * 4)
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, ".lock"), "w") as held:     # another run's lock (its own open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        main, cfg = config("sft", data, out)
        with pytest.raises(RuntimeError, match="is in use by another run"):
            main(cfg)
        assert snapshot(out) == {".lock": snapshot(out)[".lock"]}   # nothing else written
    main(cfg)                                                # released: the run goes ahead
