"""The README's results table: base vs GRPO-only vs cold-start SFT vs SFT -> GRPO vs SFT -> DPO,
several seeds, greedy accuracy on the same 500 held-out problems. Runs the default commands once per seed:

    python sft.py  --seed S --out runs/demo/sft-sS
    python grpo.py --seed S --init runs/demo/sft-sS --out runs/demo/grpo-sS     # = python grpo.py
    python grpo.py --seed S --init scratch          --out runs/demo/scratch-sS  # no cold start
    python dpo.py  --seed S --init runs/demo/sft-sS --out runs/demo/dpo-sS      # = python dpo.py

then prints the table (mean ± sample std over seeds) and draws docs/grpo_curve.svg (reward and
held-out accuracy over GRPO steps). Usage: python bench/demo_table.py [--seeds 0 1 2] [--jobs 2] [--threads 1]
Any extra arguments after -- go to every grpo.py call."""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "demo")


def run(args, threads):
    cmd = [sys.executable, *args, "--threads", str(threads)]
    log = os.path.join(OUT, os.path.basename(args[args.index("--out") + 1]) + ".log")
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def seed_runs(seed, threads, extra):
    sft, grpo, scratch, dpo = (os.path.join(OUT, f"{k}-s{seed}") for k in ("sft", "grpo", "scratch", "dpo"))
    run(["sft.py", "--seed", str(seed), "--out", sft], threads)
    run(["grpo.py", "--seed", str(seed), "--init", sft, "--out", grpo, *extra], threads)
    run(["grpo.py", "--seed", str(seed), "--init", "scratch", "--out", scratch, *extra], threads)
    run(["dpo.py", "--seed", str(seed), "--init", sft, "--out", dpo], threads)


def read(path, name):
    with open(os.path.join(path, name)) as f:
        return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def fmt(xs, pct=True):
    k = 100 if pct else 1
    m = statistics.mean(xs) * k
    s = statistics.stdev(xs) * k if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.2f} ± {s:.2f}"


def svg_curve(series, path, width=640, height=300):
    """A dependency-free line chart: series = [(label, color, [(x, y)], dashed)], y in [0, 1]."""
    pad, top, xmax = 40, 20 + 14 * len(series), max(x for _, _, pts, _ in series for x, _ in pts) or 1
    height += top
    X = lambda x: pad + (width - 2 * pad) * x / xmax
    Y = lambda y: height - pad - (height - pad - top) * y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{pad}" x2="{width - pad}" y1="{Y(t)}" y2="{Y(t)}" stroke="#ddd"/>'
                   f'<text x="{pad - 6}" y="{Y(t) + 4}" text-anchor="end">{t:.2f}</text>')
    for t in range(0, xmax + 1, max(1, xmax // 4)):
        out.append(f'<text x="{X(t)}" y="{height - pad + 14}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">GRPO step</text>')
    for i, (label, color, pts, dashed) in enumerate(series):
        d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{d}"/>')
        out.append(f'<line x1="{pad}" x2="{pad + 24}" y1="{10 + 14 * i}" y2="{10 + 14 * i}" stroke="{color}"{dash}/>'
                   f'<text x="{pad + 30}" y="{14 + 14 * i}" fill="{color}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: 2 // jobs)")
    ap.add_argument("--report-only", action="store_true", help="only read finished runs")
    a, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    os.makedirs(OUT, exist_ok=True)
    if not a.report_only:
        threads = a.threads or max(1, 2 // a.jobs)
        with ThreadPoolExecutor(a.jobs) as ex:
            list(ex.map(lambda s: seed_runs(s, threads, extra), a.seeds))
    base, scratch, scratch_zero, sft, rl, dpo = [], [], [], [], [], []
    for s in a.seeds:
        g, z = read(os.path.join(OUT, f"grpo-s{s}"), "result.json"), read(os.path.join(OUT, f"scratch-s{s}"), "result.json")
        base.append(z["held_out_accuracy_before"])
        scratch.append(z["held_out_accuracy_after"])
        scratch_zero.append(statistics.mean(m["frac_reward_zero_std"] for m in read(os.path.join(OUT, f"scratch-s{s}"), "metrics.jsonl")))
        sft.append(g["held_out_accuracy_before"])
        rl.append(g["held_out_accuracy_after"])
        dpo.append(read(os.path.join(OUT, f"dpo-s{s}"), "result.json")["held_out_accuracy_after"])
    n = len(a.seeds)
    print(f"| run | held-out accuracy, % (mean ± std over {n} seeds) |\n|---|---|")
    print(f"| base (untrained) | {fmt(base)} |")
    print(f"| GRPO only, no cold start (`--init scratch`) | {fmt(scratch)} (frac_reward_zero_std {fmt(scratch_zero, False)}) |")
    print(f"| cold-start SFT only | {fmt(sft)} |")
    print(f"| cold-start SFT → GRPO (the default) | {fmt(rl)} |")
    print(f"| cold-start SFT → DPO | {fmt(dpo)} |")
    print(f"\nper seed: sft {sft}\n          sft->grpo {rl}\n          sft->dpo {dpo}")
    print(f"gain grpo {[round(b - a_, 3) for a_, b in zip(sft, rl)]}\ngain dpo {[round(b - a_, 3) for a_, b in zip(sft, dpo)]}")
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    series = []
    for i, s in enumerate(a.seeds[:3]):
        m = read(os.path.join(OUT, f"grpo-s{s}"), "metrics.jsonl")
        w = 10  # moving average of the training reward (accuracy part), noisy per step
        acc = [x["rewards/accuracy/mean"] for x in m]
        smooth = [(j + 1, statistics.mean(acc[max(0, j - w + 1):j + 1])) for j in range(len(acc))]
        hist = read(os.path.join(OUT, f"grpo-s{s}"), "result.json")["history"]
        series.append((f"seed {s}: training accuracy reward (T=1, moving avg {w})", colors[i % 3], smooth, False))
        series.append((f"seed {s}: held-out greedy accuracy", colors[i % 3], [(h["step"], h["held_out_accuracy"]) for h in hist], True))
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    svg_curve(series, os.path.join(ROOT, "docs", "grpo_curve.svg"))
    print("plot: docs/grpo_curve.svg")
