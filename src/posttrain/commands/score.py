"""`posttrain score`: score completions in a data file with reward functions.

    posttrain score --reward 'math,format:0.2' --data scored.jsonl [--completions-field completion]

Each row needs "prompt" and the completions field; its other columns ("answer", "tests", ...)
go to the reward functions. Prints the mean of the combined reward over the rows it could
judge, how many were None, and each function's mean and None count. `--out` writes every row
back with "reward" and "reward/<name>" columns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "Score completions in a data file with reward functions: mean, None count, per-function means."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import positive_int

    parser.add_argument("--reward", required=True, help="reward spec, e.g. 'math' or 'math,format:0.2' (quote it)")
    parser.add_argument("--data", required=True, help="prompt-format data: .jsonl/.json/.parquet/.csv with a completions field")
    parser.add_argument("--completions-field", default="completion", help="column holding the completion (default: completion)")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes for parallel rewards (code); default: core count")
    parser.add_argument("--out", default=None, help="write rows with their rewards to this .jsonl file")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain import rewards
    from posttrain.data import load_rows

    from posttrain.commands._args import reward_flag
    from posttrain.data import DataError

    reward = reward_flag("--reward", args.reward)
    rows = load_rows(args.data, "prompt", checks=rewards.row_checks(args.reward))
    field = args.completions_field
    missing = [i + 1 for i, r in enumerate(rows) if field not in r]
    if missing:
        raise DataError(str(args.data), missing[0], None, f"{len(missing)} rows lack the field {field!r} (the first "
                        "is this one); name the column holding the completions with --completions-field", "row")
    prompts = [r["prompt"] for r in rows]
    completions = [r[field] for r in rows]
    extras = [{k: v for k, v in r.items() if k != field} for r in rows]
    start = time.perf_counter()
    totals, parts = rewards.score_batch(reward, prompts, completions, extras, max_workers=args.workers)
    seconds = time.perf_counter() - start

    table = Table(title=f"{args.data}: {len(rows)} rows, reward {args.reward} ({seconds:.1f}s)")
    for column in ("reward", "weight", "mean", "None"):
        table.add_column(column, justify="left" if column == "reward" else "right")
    table.add_row("total", "", _fmt(rewards.mean(totals)), str(sum(v is None for v in totals)), style="bold")
    for (name, values), weight in zip(parts.items(), reward.weights):
        table.add_row(name, f"{weight:g}", _fmt(rewards.mean(values)), str(sum(v is None for v in values)))
    Console(width=max(100, Console().width)).print(table)

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                scored = {**row, "reward": totals[i], **{f"reward/{n}": v[i] for n, v in parts.items()}}
                f.write(json.dumps(scored, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0
