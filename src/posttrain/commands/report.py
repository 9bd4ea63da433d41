"""`posttrain report runs/<name>`: write the run's report.html with PNG plots (posttrain.doctrine.report).

Reward vs KL on one figure, length, entropy, clip fraction, each reward function, loss, held-out
evaluations, the doctor's events on the timeline, and sample completions from early and late in
training. Trainers write it at the end of a run; this command (re)writes it at any time, also
while a run is going. A torn last line of a log (a run killed, or still writing) is skipped with a
note; any other line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import argparse

HELP = "Write runs/<name>/report.html: reward vs KL, length, entropy, doctor events, samples."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (runs/<name>)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.doctrine.doctor import run_events
    from posttrain.doctrine.report import write_report
    from posttrain.runtime.tracking import RunDirError

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "evals.jsonl").is_file():
        raise RunDirError(f"{run_dir}: no metrics.jsonl (not a run directory?): give the directory a training "
                          f"run wrote, e.g. runs/grpo-20260101-120000")
    path = write_report(run_dir, events=run_events(run_dir))  # doctor.jsonl, else a fresh diagnosis
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    print(f"wrote {path} ({len(pngs)} plots: {', '.join(pngs)})")
    return 0
