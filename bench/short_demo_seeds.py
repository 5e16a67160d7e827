"""The learning test of tests/test_demo.py (2-digit SFT -> GRPO) over seeds x thread counts, to check
that its bars hold far from every run, not just the seed the test uses.

    python bench/short_demo_seeds.py                 # seeds 0-4 x --threads 1, 2 (about 15 minutes on 2 cores)
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from test_demo import short_demo  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
a = p.parse_args()
rows = []
for t in a.threads:
    for s in a.seeds:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as out:
            before, after, carry = short_demo(out, s, t)
        rows.append((s, t, before, after, carry, time.time() - t0))
        print(f"RUN seed {s} threads {t}: before {before:.3f} after {after:.3f} (+{100 * (after - before):.1f}) "
              f"carrying {carry:.3f} wall {rows[-1][-1]:.0f} s", flush=True)
gains = [100 * (r[3] - r[2]) for r in rows]
print(f"\n{len(rows)} runs: before {min(r[2] for r in rows):.3f}-{max(r[2] for r in rows):.3f}, "
      f"gain min +{min(gains):.1f} max +{max(gains):.1f} points, carrying after min {min(r[4] for r in rows):.3f}")
