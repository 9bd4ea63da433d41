"""Online DPO against one round of offline DPO (`examples/dpo_arithmetic.sh`) in the same training
time, side by side: held-out greedy accuracy on the arithmetic task, from the same start.

offline  the doctrine's recipe as the example runs it: `posttrain pairs` (200 prompts x 8 samples at
         temperature 1.0, best vs worst) then `posttrain train dpo` (LoRA r32, lr 1e-4, beta 0.1,
         batch 8, 2 epochs). Its time: the pairs command's wall time plus the DPO run's steps
         (`time/step`) and its reference pass (`data.json`), evaluation excluded.
online   `posttrain train online-dpo`, the same LoRA, lr, beta and batch, rounds of 48 prompts x 8
         samples at temperature 0.7, 6 steps per round, evaluated every `--eval-every` steps. Its
         time: the sum of `time/step` (a round's first step includes the round's sampling),
         evaluation excluded.

The online run is read at the last evaluation whose training time is within the offline recipe's
total, so the comparison is at equal time (or less, for online). Both go side by side, one thread
each (the load of a shared machine hits both alike; the online run is interrupted when the offline
recipe ends), or one after the other (`--sequential`, the online run capped by `--minutes`).

usage: python bench/online_vs_offline_dpo.py [--minutes 60] [--eval-size 100] [--out /tmp/online_dpo_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "posttrain.cli"]
COMMON = ["--lr", "1e-4", "--beta", "0.1", "--batch-size", "8", "--checkpoint-every", "0"]


def offline(args, out: Path, env: dict, log) -> float:
    """Run the offline recipe; its training time in seconds (rules in the module docstring)."""
    t0 = time.perf_counter()
    subprocess.run([*CLI, "pairs", "--task", "arithmetic", "--task-size", "200", "--n", "8", "--temperature", "1.0",
                    "--max-new-tokens", "64", "--seed", str(args.seed), "--out", str(out / "pairs.jsonl")],
                   env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    pairs_s = time.perf_counter() - t0
    subprocess.run([*CLI, "train", "dpo", "--data", str(out / "pairs.jsonl"), "--task", "arithmetic",
                    "--eval-size", str(args.eval_size), "--eval-max-new-tokens", "64", "--eval-fraction", "0",
                    "--epochs", "2", "--seed", str(args.seed), *COMMON, "--output-dir", str(out), "--name", "dpo"],
                   env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    steps_s = sum(m.get("time/step", 0.0) for m in _lines(out / "dpo" / "metrics.jsonl"))
    reference_s = json.loads((out / "dpo" / "data.json").read_text()).get("reference_seconds", 0.0)
    return pairs_s + steps_s + reference_s


def online_command(args, out: Path) -> list[str]:
    return [*CLI, "train", "online-dpo", "--task", "arithmetic", "--prompts-per-round", "48", "--group-size", "8",
            "--temperature", "0.7", "--max-new-tokens", "32", "--steps-per-round", "6", "--max-steps", "1000",
            "--max-minutes", str(args.minutes), "--eval-every", str(args.eval_every), "--eval-size",
            str(args.eval_size), "--seed", str(args.seed), *COMMON, "--output-dir", str(out), "--name", "online"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds up to it, held-out accuracy) of each evaluation."""
    elapsed, t = {0: 0.0}, 0.0
    for m in _lines(run_dir / "metrics.jsonl"):
        if "time/step" in m:
            t += m["time/step"]
            elapsed[m["step"]] = t
    return [(e["step"], elapsed.get(e["step"], t), e["accuracy"]) for e in _lines(run_dir / "evals.jsonl")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0,
                   help="the online run's cap (side by side, it is stopped when the offline recipe ends)")
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/online_dpo_bench")
    p.add_argument("--sequential", action="store_true", help="one after the other (default: side by side)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dpo", "online"):
        if (out / name).exists():
            sys.exit(f"{out / name} exists: give another --out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(out / "online.log", "w") as online_log, open(out / "offline.log", "w") as offline_log:
        # SIGINT back to its default in the child: a bench started in the background (`cmd &`) has it
        # ignored, and Python then never turns it into the KeyboardInterrupt that stops a run cleanly
        online = subprocess.Popen(online_command(args, out), env=env, stdout=online_log, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if args.sequential:
            online.wait()
        offline_s = offline(args, out, env, offline_log)
        if online.poll() is None:  # side by side: the offline recipe is done, so is the time to compare at
            online.send_signal(signal.SIGINT)  # checkpoints and stops; its evaluations so far are kept
            try:
                online.wait(timeout=600)
            except subprocess.TimeoutExpired:
                online.kill()
        elif online.wait() != 0:
            sys.exit(f"online DPO failed: see {out / 'online.log'}")
    dpo = curve(out / "dpo")
    online_curve = curve(out / "online")
    print(f"{'run':8} {'step':>5} {'train s':>8} {'accuracy':>9}")
    print(f"{'offline':8} {dpo[-1][0]:5d} {offline_s:8.0f} {dpo[-1][2]:9.3f}   (start {dpo[0][2]:.3f})")
    for step, seconds, accuracy in online_curve:
        print(f"{'online':8} {step:5d} {seconds:8.0f} {accuracy:9.3f}")
    within = [c for c in online_curve if c[1] <= offline_s]
    step, seconds, accuracy = within[-1]
    verdict = "above" if accuracy > dpo[-1][2] else "not above"
    print(f"at equal time ({offline_s:.0f} s of training): online DPO {accuracy:.3f} (step {step}, {seconds:.0f} s) "
          f"vs offline DPO {dpo[-1][2]:.3f}: online is {verdict}")


if __name__ == "__main__":
    main()
