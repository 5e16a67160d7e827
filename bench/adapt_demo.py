"""The adaptive-thinking demonstration (README, "Adaptive thinking"): the built-in adapt task over seeds,
each run a plain command of this repo:

    python sft.py  --task adapt --seed S --out runs/adapt/sft-sS
    python grpo.py --task adapt --init runs/adapt/sft-sS --seed S --steps N --reward-funcs accuracy --out runs/adapt/plain-sS
    python grpo.py --task adapt --init runs/adapt/sft-sS --seed S --steps N --reward-funcs "accuracy,no_thinking(delta=0.15)" \
        --scale-rewards none --out runs/adapt/aware-sS

(aware: AdaptThink's objective, accuracy + delta for an empty think, with Dr. GRPO's unscaled advantages:
with std scaling, a group of right answers that differ only by delta gets advantages of +-1, so the bonus
would outweigh accuracy on every easy-looking prompt instead of delta's worth)

then on the 500 held-out problems, greedy: accuracy, mean completion length, length and accuracy by
difficulty (easy: no carry; hard: a carry), the thinking rate, and the same with the mode forced in the
prompt (" [Easy]" / " [Hard]").

    python bench/adapt_demo.py [--seeds 0 1 2] [--steps 50] [--threads 2] [--out runs/adapt] [--plot docs/adapt_curves.svg]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(args, threads):
    cmd = [sys.executable, *args, "--threads", str(threads), "--save-every", "0"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(model_dir, n=500):
    """Greedy held-out completions, free and with each mode forced -> {mode: metrics}."""
    import evaluate as E
    import rewards
    from model import load
    model, tok = load(model_dir)
    out = {}
    for force in ("", " [Easy]", " [Hard]"):
        rows = E.builtin_rows("adapt", n)
        for r in rows:
            r["prompt"] = [{"role": "user", "content": r["prompt"][0]["content"] + force}]
        comps = E.complete(model, tok, rows, 1, 48, 1.0, 250, greedy=True)
        lengths = [len(tok(c, add_special_tokens=False).input_ids) + 1 for c in comps]   # + EOS
        correct = E.score(rewards.accuracy_reward, rows, comps)
        s = rewards.thinking_stats(comps, lengths, correct, [r["difficulty"] for r in rows])
        m = {k: v / c for k, (v, c) in s.items()}
        m.update(accuracy=sum(correct) / n, mean_length=sum(lengths) / n)
        out[force.strip() or "free"] = m
    return out


def plot(out, seeds, path):
    """Per GRPO step, mean over seeds: training accuracy, thinking rate and mean length / 40 tokens,
    plain (dashed) against aware (solid)."""
    from demo_table import svg_curve
    series = []
    for name, dashed in (("plain", True), ("aware", False)):
        rows = [[json.loads(l) for l in open(os.path.join(out, f"{name}-s{s}", "metrics.jsonl"))] for s in seeds]
        steps = min(len(r) for r in rows)
        mean = lambda key, k: statistics.mean(r[k][key] for r in rows)
        for label, key, scale, color in (("accuracy", "rewards/accuracy/mean", 1, "#2a7"),
                                         ("thinking rate", "thinking/rate", 1, "#c50"),
                                         ("length / 40 tokens", "completions/mean_length", 1 / 40, "#36c")):
            series.append((f"{name}: {label}", color, [(k + 1, mean(key, k) * scale) for k in range(steps)], dashed))
    svg_curve(series, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/adapt")
    ap.add_argument("--measure-only", action="store_true", help="measure runs already in --out")
    ap.add_argument("--plot", default="", help="also draw the per-step curves into this .svg")
    a = ap.parse_args()
    table = {}
    for s in a.seeds:
        d = lambda name: os.path.join(a.out, f"{name}-s{s}")
        common = ["--task", "adapt", "--seed", str(s)]
        if not a.measure_only:
            run(["sft.py", *common, "--out", d("sft")], a.threads)
            for name, extra in (("plain", ["--reward-funcs", "accuracy"]),
                                ("aware", ["--reward-funcs", "accuracy,no_thinking(delta=0.15)", "--scale-rewards", "none"])):
                run(["grpo.py", *common, "--init", d("sft"), "--steps", str(a.steps), *extra, "--out", d(name)], a.threads)
        table[s] = {name: measure(d(name)) for name in ("sft", "plain", "aware")}
        print(json.dumps({s: table[s]}), flush=True)
    keys = [("accuracy", "accuracy", 100), ("mean_length", "length", 1),
            ("thinking/accuracy/easy", "acc easy", 100), ("thinking/accuracy/hard", "acc hard", 100),
            ("thinking/length/easy", "len easy", 1), ("thinking/length/hard", "len hard", 1),
            ("thinking/rate", "thinks", 100)]
    print("\n| run (mode) | " + " | ".join(k[1] for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name in ("sft", "plain", "aware"):
        for mode in ("free", "[Easy]", "[Hard]"):
            cells = []
            for k, _, scale in keys:
                vals = [table[s][name][mode].get(k, float("nan")) * scale for s in a.seeds]
                cells.append(f"{statistics.mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})")
            print(f"| {name} ({mode}) | " + " | ".join(cells) + " |")
    with open(os.path.join(a.out, "adapt_demo.json"), "w") as f:
        json.dump(table, f, indent=1)
    if a.plot:
        plot(a.out, a.seeds, a.plot)


if __name__ == "__main__":
    main()
