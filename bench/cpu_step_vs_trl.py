"""Seconds per GRPO step on the CPU: our grpo.py against TRL's GRPOTrainer, side by side in one run.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl
    python bench/cpu_step_vs_trl.py --trl-python /tmp/trl/bin/python

Same shape on both sides: the tiny model's dimensions (Qwen2, 128 wide, 4 layers, 4 heads, 2 KV heads)
with random weights (near-uniform next-token distributions, so most completions run to the
32-token limit; the mean completion length of each side is printed); 16 prompts x 8 generations;
beta = 0 and one iteration (neither side computes old or reference log-probs); 2 threads. The two
alternate, round after round, and the medians are printed. Each side's figure is the wall time of its
training loop divided by the number of steps (model building and checkpoint writing excluded)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(steps):
    out = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--init", "scratch", "--steps", str(steps),
           "--num-prompts", "16", "--num-generations", "8", "--max-new-tokens", "32", "--lr", "1e-4",
           "--eval-n", "0", "--sample-every", "0", "--save-every", "0", "--threads", "2", "--out", out]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f]
    return sum(x["step_time"] for x in m) / len(m), statistics.mean(x["completions/mean_length"] for x in m)


def trl(python, steps):
    r = subprocess.run([python, os.path.join(ROOT, "bench", "trl_grpo_step.py"), str(steps)],
                       check=True, capture_output=True, text=True, cwd=tempfile.mkdtemp())
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["trl_step_s"], d["mean_length"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trl-python", required=True, help="a Python with trl installed")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for i in range(a.rounds):
        (t, tl), (o, ol) = trl(a.trl_python, a.steps), ours(a.steps)
        rows.append((t, o))
        print(f"round {i + 1}: trl {t:.3f} s/step (mean length {tl:.1f}), ours {o:.3f} s/step (mean length {ol:.1f}), "
              f"ratio {o / t:.2f}", flush=True)
    t, o = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    ratio = statistics.median(r[1] / r[0] for r in rows)
    print(json.dumps({"trl_step_s": round(t, 3), "ours_step_s": round(o, 3), "ours_over_trl": round(ratio, 3)}))
