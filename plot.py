"""Every run draws its curves: one SVG of a run directory's metrics, next to its logs, with no plotting
package. sft.py, grpo.py and dpo.py call it at the end of a run; on demand:

    python plot.py runs/grpo                 # -> runs/grpo/curves.svg
    python plot.py runs/sft runs/dpo         # several runs, one file each

It reads OUT/metrics.jsonl (SFT: sft_metrics.jsonl) and, where there is one, the held-out accuracy
history of OUT/result.json (GRPO, DPO: steps 0, every --eval-every, the end). One panel per metric
that the log has, in the order of PANELS, each with its own y range.
"""
import json
import math
import os
import sys

# metric -> panel title, in drawing order; a metric missing from the log is left out
PANELS = {
    "held_out_accuracy": "held-out greedy accuracy",
    "reward": "reward (mean over the batch)",
    "rewards/accuracy/mean": "accuracy reward",
    "rewards/format/mean": "format reward",
    "frac_reward_zero_std": "frac_reward_zero_std (groups without signal)",
    "loss": "loss",
    "rewards/accuracies": "DPO: rewards/accuracies",
    "rewards/margins": "DPO: rewards/margins",
    "completions/mean_length": "completion length (tokens)",
    "entropy": "entropy (nats/token)",
    "kl": "KL to the reference",
    "clip_ratio/region_mean": "clipped share of tokens",
    "grad_norm": "grad norm (before clipping)",
    "learning_rate": "learning rate",
    "lr": "learning rate",
}
W, H, PAD = 300, 170, 42   # one panel (pixels), and the margin for its axis labels


def read_run(out):
    """{metric: [(step, value)]} of a run directory."""
    name = next((n for n in ("metrics.jsonl", "sft_metrics.jsonl") if os.path.exists(os.path.join(out, n))), None)
    if name is None:
        raise FileNotFoundError(f"{out}: no metrics.jsonl or sft_metrics.jsonl to plot")
    series = {}
    with open(os.path.join(out, name)) as f:
        for line in f:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:   # a torn last line (a write cut short): nothing to draw
                continue
            for k, v in m.items():
                if k in PANELS and isinstance(v, (int, float)) and math.isfinite(v):
                    series.setdefault(k, []).append((m["step"], float(v)))
    try:
        with open(os.path.join(out, "result.json")) as f:
            history = json.load(f).get("history", [])
    except (OSError, json.JSONDecodeError):
        history = []
    if history:   # the full held-out curve, step 0 and the end included
        series["held_out_accuracy"] = [(h["step"], h["held_out_accuracy"]) for h in history]
    return series


def panel(x0, y0, title, pts):
    """SVG elements of one line chart at (x0, y0): axes labelled with the data's own range."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ylo, yhi = min(ys), max(ys)
    if yhi - ylo <= 1e-9 * max(abs(ylo), abs(yhi)):   # a constant: a small band around it
        half = 0.1 * abs(ylo) or 0.5
        ylo, yhi = ylo - half, yhi + half
    X = lambda x: x0 + PAD + (W - PAD - 8) * (x - xlo) / (xhi - xlo)
    Y = lambda y: y0 + H - 22 - (H - 44) * (y - ylo) / (yhi - ylo)
    out = [f'<text x="{x0 + PAD}" y="{y0 + 14}" font-weight="bold">{title}</text>',
           f'<rect x="{x0 + PAD}" y="{y0 + 22}" width="{W - PAD - 8}" height="{H - 44}" fill="none" stroke="#ccc"/>']
    for v in (ylo, yhi):
        out.append(f'<text x="{x0 + PAD - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in (xlo, xhi):
        out.append(f'<text x="{X(v):.1f}" y="{y0 + H - 8}" text-anchor="middle">{v:g}</text>')
    d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
    out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{d}"/>')
    if len(pts) < 12:   # a few points (held-out evaluations): mark them
        out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="#1f77b4"/>' for x, y in pts]
    return out


def draw(out, cols=3):
    """Write OUT/curves.svg from the run's logs; returns its path."""
    series = read_run(out)
    keys = [k for k in PANELS if k in series and not (k == "lr" and "learning_rate" in series)]
    rows = max(1, math.ceil(len(keys) / cols))
    body = []
    for i, k in enumerate(keys):
        body += panel((i % cols) * W, 24 + (i // cols) * H, PANELS[k], series[k])
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * W}" height="{24 + rows * H}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           f'<text x="8" y="16" font-size="13">{out}: x = step</text>\n' + "\n".join(body) + "\n</svg>\n")
    path = os.path.join(out, "curves.svg")
    with open(path + ".tmp", "w") as f:
        f.write(svg)
    os.replace(path + ".tmp", path)   # a reader never sees half a picture
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python plot.py RUN_DIR [RUN_DIR ...]")
    for d in sys.argv[1:]:
        print(draw(d))
