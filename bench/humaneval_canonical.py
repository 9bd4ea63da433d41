"""How long the code reward takes to score all 164 HumanEval canonical solutions.

    python bench/humaneval_canonical.py [--workers N] [--stubs]

Each problem runs in two fresh sandboxes (the candidate and the judge; see
posttrain/rewards/code.py). Target: under 60 s on 2 cores. `--stubs` also scores the 164
bodies replaced by `pass` (all must score 0.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from posttrain.rewards import sandbox
from posttrain.rewards.code import code_rewards
from posttrain.data.tasks.humaneval import humaneval


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None, help="parallel evaluations (default and cap: core count)")
    ap.add_argument("--stubs", action="store_true", help="also score the `pass` stubs")
    args = ap.parse_args()
    rows = humaneval()
    workers = min(args.workers or os.cpu_count() or 1, os.cpu_count() or 1)
    print(f"isolation={sandbox.isolation()} cores={os.cpu_count()} workers={workers} problems={len(rows)}")
    ok = True
    runs = [("canonical", [r["canonical_solution"] for r in rows], 1.0)]
    if args.stubs:
        runs.append(("pass stubs", ["    pass\n"] * len(rows), 0.0))
    for name, completions, expected in runs:
        t = time.perf_counter()
        scores = code_rewards(rows, completions, max_workers=workers)
        took = time.perf_counter() - t
        wrong = [r["task_id"] for r, s in zip(rows, scores) if s != expected]
        ok &= not wrong
        print(f"{name}: {len(rows)} problems in {took:.1f} s ({1000 * took / len(rows):.0f} ms each), "
              f"mean score {sum(scores) / len(scores):.3f}, expected {expected}: {'all' if not wrong else wrong}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
