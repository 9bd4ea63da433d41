"""On-policy distillation vs GRPO from the same start in the same time: the student's held-out
arithmetic accuracy against training wall time.

The teacher is the model `posttrain demo` trains (GRPO + LoRA on two-digit addition; its run
directory or final/ is a model spec): make one with

    posttrain demo --output-dir /tmp/distill_teacher --name t          # ~12 minutes on 2 cores

Both students start from the embedded base model with the demo's preset (LoRA r16, lr 1e-4,
4 prompts x 8 completions per step, 48 new tokens, temperature 0.7, task arithmetic): GRPO with the
task's reward (beta 0, as the demo), distillation with ``--teacher`` and no reward in the loss (the
task's reward is only reported). Each gets the same training budget (``--minutes``); held-out greedy
accuracy every ``--eval-every`` steps on ``--eval-size`` test problems. The two runs go side by side
(``--parallel``, one thread each) so that the load of a shared machine hits both alike, or one
after the other. Time is the sum of the steps' ``time/step`` (sampling + update), evaluation
excluded. The teacher's own accuracy on the same problems is read from its run (``evals.jsonl``)
when there, else measured.

usage: python bench/distill_vs_grpo.py --teacher /tmp/distill_teacher/t [--minutes 8] [--eval-every 10]
                                       [--eval-size 100] [--out /tmp/distill_bench] [--sequential]
                                       [--no-eval-at-start]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRESET = ["--task", "arithmetic", "--task-size", "5000", "--group-size", "8", "--prompts-per-step", "4",
          "--max-new-tokens", "48", "--eval-max-new-tokens", "48", "--temperature", "0.7", "--lora-rank", "16",
          "--lr", "1e-4", "--max-steps", "1000", "--checkpoint-every", "0", "--samples-per-step", "1", "--log-every", "5"]


def command(method: str, args, name: str) -> list[str]:
    extra = ["--beta", "0"] if method == "grpo" else ["--teacher", args.teacher]
    return [sys.executable, "-m", "posttrain.cli", "train", method, *PRESET, *extra,
            "--max-minutes", str(args.minutes), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
            "--seed", str(args.seed), "--output-dir", str(args.out), "--name", name,
            *(["--no-eval-at-start"] if args.no_eval_at_start else [])]


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training minutes up to that step, held-out accuracy) of each evaluation."""
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed, t = {0: 0.0}, 0.0
    for m in metrics:
        if "time/step" in m:
            t += m["time/step"]
            elapsed[m["step"]] = t
    evals = [json.loads(l) for l in (run_dir / "evals.jsonl").read_text().splitlines()]
    return [(e["step"], elapsed.get(e["step"], t) / 60, e["accuracy"]) for e in evals]


def teacher_accuracy(args) -> tuple[float, str]:
    from posttrain.models import local_dir

    run = Path(args.teacher)
    run = run.parent if run.name == "final" else run
    if (run / "evals.jsonl").is_file() and (run / "config.yaml").is_file():
        last = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()][-1]
        cfg = (run / "config.yaml").read_text()
        if f"eval_size: {args.eval_size}\n" in cfg and f"seed: {args.seed}\n" in cfg:
            return last["accuracy"], f"its run's last evaluation (step {last['step']})"
    from posttrain import rewards
    from posttrain.algorithms.evaluate import greedy_eval
    from posttrain.data.tasks import get_task
    from posttrain.models import load_model

    model, tok = load_model(str(local_dir(args.teacher)))
    rows = get_task("arithmetic", "test", n=args.eval_size, seed=args.seed)
    return greedy_eval(model, tok, rows, rewards.from_spec("math"), 48)["accuracy"], "measured here"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher: a demo run directory or its final/")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget of each method")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/distill_bench")
    p.add_argument("--no-eval-at-start", action="store_true",
                   help="skip the base model's evaluation (the same for both: greedy, same problems)")
    p.add_argument("--sequential", action="store_true", help="one run after the other (default: side by side)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"distill": "distill", "grpo": "grpo"}
    procs = {}
    for method, name in runs.items():
        log = open(Path(args.out).mkdir(parents=True, exist_ok=True) or Path(args.out) / f"{name}.log", "w")
        procs[method] = subprocess.Popen(command(method, args, name), env=env, stdout=log, stderr=subprocess.STDOUT)
        if args.sequential:
            procs[method].wait()
    for method, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"{method} failed: see {Path(args.out) / runs[method]}.log")
    acc, how = teacher_accuracy(args)
    print(f"teacher {args.teacher}: held-out accuracy {acc:.3f} ({how})")
    print(f"{'method':8} {'step':>5} {'train min':>10} {'accuracy':>9}")
    for method, name in runs.items():
        for step, minutes, accuracy in curve(Path(args.out) / name):
            print(f"{method:8} {step:5d} {minutes:10.2f} {accuracy:9.3f}")
    for method, name in runs.items():
        c = curve(Path(args.out) / name)
        reach = next((m for _, m, a in c if a >= 0.9 * acc), None)
        print(f"{method}: final {c[-1][2]:.3f} after {c[-1][1]:.1f} train min; 90% of the teacher's accuracy "
              + (f"first at {reach:.1f} min" if reach is not None else "not reached"))


if __name__ == "__main__":
    main()
