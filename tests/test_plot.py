"""plot.py: a run directory's metrics become one SVG with a panel per metric, the points where the
log puts them; a torn last line is skipped; sft.py writes its curves at the end of a run."""
import json
import os
import re

import pytest

import grpo
import plot
import sft
from conftest import TEST_THREADS


def write_log(d, rows, torn=False):
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 9, "rew' if torn else ""))


def polylines(svg):
    return [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in re.findall(r'points="([^"]*)"', svg)]


def test_panels_and_points(tmp_path):
    """Two metrics of the log (reward, entropy) and the held-out history of result.json: three panels, in
    PANELS order, with one point per logged step; within a panel the highest value is drawn highest
    (SVG y grows downwards) and the steps go left to right. NaN and unknown keys are left out."""
    d = str(tmp_path)
    write_log(d, [{"step": s, "reward": r, "entropy": 1.0 - 0.1 * s, "mystery": 3, "kl": float("nan")}
                  for s, r in ((1, 0.2), (2, 0.9), (3, 0.5))], torn=True)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"history": [{"step": 0, "held_out_accuracy": 0.5}, {"step": 3, "held_out_accuracy": 0.8}]}, f)
    svg = open(plot.draw(d)).read()
    titles = re.findall(r'font-weight="bold">([^<]*)<', svg)
    assert titles == [plot.PANELS[k] for k in ("held_out_accuracy", "reward", "entropy")]
    held, reward, entropy = polylines(svg)
    assert len(held) == 2 and len(reward) == 3 and len(entropy) == 3
    assert [x for x, _ in reward] == sorted(x for x, _ in reward)
    ys = [y for _, y in reward]
    assert ys[1] == min(ys) and ys[0] == max(ys)          # 0.9 on top, 0.2 at the bottom
    assert entropy[0][1] < entropy[2][1]                  # falling entropy is drawn going down
    assert held[0][1] > held[1][1]


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.draw(str(tmp_path))


def test_sft_and_grpo_runs_write_their_curves(tmp_path):
    out = str(tmp_path / "s")
    sft.main(sft.SFTConfig(out=out, steps=3, batch_size=4, num_examples=16, eval_n=0, save_every=0,
                           threads=TEST_THREADS))
    svg = open(os.path.join(out, "curves.svg")).read()
    assert plot.PANELS["loss"] in svg and len(polylines(svg)[0]) == 3
    g = str(tmp_path / "g")
    grpo.main(grpo.GRPOConfig(init="scratch", out=g, steps=2, num_prompts=2, num_generations=2, max_new_tokens=4,
                              eval_n=0, sample_every=0, save_every=0, threads=TEST_THREADS))
    svg = open(os.path.join(g, "curves.svg")).read()
    assert plot.PANELS["frac_reward_zero_std"] in svg and len(polylines(svg)[0]) == 2
