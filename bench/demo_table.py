"""The README's results table: base vs GRPO-only vs cold-start SFT vs SFT -> GRPO vs SFT -> DPO, over
seeds 0-4 x --threads 1 and 2 (10 runs of each row), greedy accuracy on the same 500 held-out problems.
Each run is the README's default command with only the seed, the thread count and the directories set:

    python sft.py  --seed S --threads T --out runs/demo/sft-sS-tT
    python grpo.py --seed S --threads T --init runs/demo/sft-sS-tT --out runs/demo/grpo-sS-tT   # = python grpo.py
    python grpo.py --seed S --threads T --init scratch --out runs/demo/scratch-sS-tT            # no cold start
    python dpo.py  --seed S --threads T --init runs/demo/sft-sS-tT --out runs/demo/dpo-sS-tT    # = python dpo.py

(`python grpo.py` alone runs the same sft.py into runs/sft first.) Runs at one thread go two at a time,
runs at two threads one at a time, so a 2-core machine is never oversubscribed. Then prints the table
(mean ± sample std over the runs, and every run's value), the wall time of each command, and draws
docs/grpo_curve.svg (reward and held-out accuracy over GRPO steps).

    python bench/demo_table.py                      # seeds 0-4 x threads 1, 2 (about an hour on 2 cores)
    python bench/demo_table.py --seeds 0 --threads 2 --report-only
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "demo")


def run(args, threads):
    """One command, its output in runs/demo/NAME.log; returns its wall time in seconds."""
    cmd = [sys.executable, *args, "--threads", str(threads)]
    name = os.path.basename(args[args.index("--out") + 1])
    t0 = time.time()
    with open(os.path.join(OUT, name + ".log"), "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t0
    with open(os.path.join(OUT, name, "wall_time.json"), "w") as f:
        json.dump({"command": " ".join(cmd[1:]), "wall_s": wall}, f)
    return wall


def tag(seed, threads):
    return f"s{seed}-t{threads}"


def seed_runs(seed, threads, extra):
    sft, grpo, scratch, dpo = (os.path.join(OUT, f"{k}-{tag(seed, threads)}") for k in ("sft", "grpo", "scratch", "dpo"))
    s = ["--seed", str(seed)]
    run(["sft.py", *s, "--out", sft], threads)
    run(["grpo.py", *s, "--init", sft, "--out", grpo, *extra], threads)
    run(["grpo.py", *s, "--init", "scratch", "--out", scratch, *extra], threads)
    run(["dpo.py", *s, "--init", sft, "--out", dpo], threads)


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


def wall(path):
    with open(os.path.join(path, "wall_time.json")) as f:
        return json.load(f)["wall_s"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads per run")
    ap.add_argument("--cores", type=int, default=2, help="runs in parallel = cores // threads")
    ap.add_argument("--report-only", action="store_true", help="only read finished runs")
    a, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    os.makedirs(OUT, exist_ok=True)
    runs = [(s, t) for t in a.threads for s in a.seeds]
    if not a.report_only:
        for t in a.threads:
            with ThreadPoolExecutor(max(1, a.cores // t)) as ex:
                list(ex.map(lambda s: seed_runs(s, t, extra), a.seeds))
    base, scratch, scratch_zero, sft, rl, dpo, times = [], [], [], [], [], [], {}
    for s, t in runs:
        d = lambda k: os.path.join(OUT, f"{k}-{tag(s, t)}")
        g, z = read(d("grpo"), "result.json"), read(d("scratch"), "result.json")
        base.append(z["held_out_accuracy_before"])
        scratch.append(z["held_out_accuracy_after"])
        scratch_zero.append(statistics.mean(m["frac_reward_zero_std"] for m in read(d("scratch"), "metrics.jsonl")))
        sft.append(g["held_out_accuracy_before"])
        rl.append(g["held_out_accuracy_after"])
        dpo.append(read(d("dpo"), "result.json")["held_out_accuracy_after"])
        for k in ("sft", "grpo", "scratch", "dpo"):
            times.setdefault((k, t), []).append(wall(d(k)))
    n = len(runs)
    each = lambda xs: ", ".join(f"{100 * x:.1f}" for x in xs)
    print(f"runs: {', '.join(tag(s, t) for s, t in runs)}\n")
    print(f"| run | held-out accuracy, % (mean ± std over {n} runs) | every run |\n|---|---|---|")
    print(f"| base (untrained tiny model) | {fmt(base)} | {each(base)} |")
    print(f"| GRPO only, no cold start (`python grpo.py --init scratch`) | {fmt(scratch)}; `frac_reward_zero_std` "
          f"{fmt(scratch_zero, False)} | {each(scratch)} |")
    print(f"| cold-start SFT only (`python sft.py`) | {fmt(sft)} | {each(sft)} |")
    print(f"| cold-start SFT → GRPO (`python grpo.py`, the default) | **{fmt(rl)}** | {each(rl)} |")
    print(f"| cold-start SFT → DPO (`python dpo.py`) | {fmt(dpo)} | {each(dpo)} |")
    gain = lambda xs: [round(100 * (b - a_), 1) for a_, b in zip(sft, xs)]
    print(f"\ngain over its own SFT, points: grpo {gain(rl)} (min {min(gain(rl))})\n"
          f"                                dpo  {gain(dpo)} (min {min(gain(dpo))})")
    print("\nwall time per command, seconds (median, min-max):")
    for (k, t), xs in sorted(times.items()):
        print(f"  {k:8s} --threads {t}: {statistics.median(xs):6.1f} ({min(xs):.1f}-{max(xs):.1f})")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    series = []
    for i, (s, t) in enumerate(runs[:3]):
        m = read(os.path.join(OUT, f"grpo-{tag(s, t)}"), "metrics.jsonl")
        w = 5  # moving average of the training reward (accuracy part), noisy per step
        acc = [x["rewards/accuracy/mean"] for x in m]
        smooth = [(j + 1, statistics.mean(acc[max(0, j - w + 1):j + 1])) for j in range(len(acc))]
        hist = read(os.path.join(OUT, f"grpo-{tag(s, t)}"), "result.json")["history"]
        series.append((f"{tag(s, t)}: training accuracy reward (T=1, moving avg {w})", colors[i % 5], smooth, False))
        series.append((f"{tag(s, t)}: held-out greedy accuracy", colors[i % 5],
                       [(h["step"], h["held_out_accuracy"]) for h in hist], True))
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    svg_curve(series, os.path.join(ROOT, "docs", "grpo_curve.svg"))
    print("plot: docs/grpo_curve.svg")
