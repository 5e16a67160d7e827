"""The tool-use demonstration (README, "Tools inside the rollout"): the built-in calc task (a*b+c, two-digit
numbers) over seeds, each run a plain command of this repo:

    python sft.py  --task calc --tools calculator --seed S --out runs/tools/sft-sS
    python grpo.py --task calc --tools calculator --init runs/tools/sft-sS --seed S --out runs/tools/grpo-tools-sS
    python grpo.py --task calc                    --init runs/tools/sft-sS --seed S --out runs/tools/grpo-none-sS
    python grpo.py --task calc --tools calculator --init scratch          --seed S --out runs/tools/grpo-scratch-sS

(the default budgets: SFT 1,000 steps, GRPO 50 steps, as `python grpo.py`)
then held-out greedy accuracy (200 problems; with the calculator for the tool runs, without it for the
no-tool run) and ReTool's view of tool use on those completions: the share that call the tool, that hand it
the whole expression, whose call errs, and whose <answer> is not the tool's last output.

    python bench/tool_demo.py [--seeds 0 1 2] [--threads 2] [--out runs/tools]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(args, threads):
    cmd = [sys.executable, *args, "--threads", str(threads), "--eval-n", "200", "--save-every", "0"]
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  {time.time() - t:.0f} s", flush=True)


def tool_use(model_dir, tools_on):
    """Greedy held-out completions of a saved model -> accuracy and tool-use shares."""
    import evaluate as E
    import rewards
    import tools
    from model import load
    model, tok = load(model_dir)
    rows = E.builtin_rows("calc", 200)
    tool = tools.Tools(tools.calculator, tools.ToolSpec(), tok) if tools_on else None
    comps = E.complete(model, tok, rows, 1, 48, 1.0, 250, greedy=True, tools=tool)
    acc = E.score(rewards.accuracy_reward, rows, comps)
    calls = [re.findall(r"<c>(.*?)</c>", c) for c in comps]
    outs = [re.findall(r"<o>(.*?)</o>", c) for c in comps]
    answered = [rewards.extract_answer(c) for c in comps]
    n = len(rows)
    called = [bool(c) for c in calls]
    return {"accuracy": sum(acc) / n, "call_rate": sum(called) / n,
            "whole_expression": sum(bool(c) and c[-1] == r["prompt"][0]["content"] for c, r in zip(calls, rows)) / n,
            "error_rate": sum(any(o.startswith("error") for o in os_) for os_ in outs) / max(sum(called), 1),
            "ignores_output": sum(bool(o) and a != o[-1] for o, a in zip(outs, answered)) / max(sum(called), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/tools")
    a = ap.parse_args()
    table = {}
    for s in a.seeds:
        d = lambda name: os.path.join(a.out, f"{name}-s{s}")
        common = ["--task", "calc", "--seed", str(s)]
        run(["sft.py", *common, "--tools", "calculator", "--out", d("sft")], a.threads)
        run(["grpo.py", *common, "--tools", "calculator", "--init", d("sft"), "--eval-every", "0",
             "--out", d("grpo-tools")], a.threads)
        run(["grpo.py", *common, "--init", d("sft"), "--eval-every", "0", "--out", d("grpo-none")],
            a.threads)
        run(["grpo.py", *common, "--tools", "calculator", "--init", "scratch", "--eval-every", "0",
             "--out", d("grpo-scratch")], a.threads)
        table[s] = {"sft (with the tool)": tool_use(d("sft"), True), "sft -> grpo with the tool": tool_use(d("grpo-tools"), True),
                    "sft -> grpo without it": tool_use(d("grpo-none"), False),
                    "grpo from scratch, with the tool": tool_use(d("grpo-scratch"), True)}
        print(json.dumps({s: table[s]}), flush=True)
    print("\n| run | held-out accuracy, mean over seeds (each) | calls the tool | whole expression | answer ignores the output |")
    print("|---|---|---|---|---|")
    for name in table[a.seeds[0]]:
        col = lambda k: [table[s][name][k] for s in a.seeds]
        acc = col("accuracy")
        print(f"| {name} | {100 * statistics.mean(acc):.1f} ({', '.join(f'{100 * x:.1f}' for x in acc)}) | "
              f"{100 * statistics.mean(col('call_rate')):.0f}% | {100 * statistics.mean(col('whole_expression')):.0f}% | "
              f"{100 * statistics.mean(col('ignores_output')):.0f}% |")
    with open(os.path.join(a.out, "tool_demo.json"), "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
