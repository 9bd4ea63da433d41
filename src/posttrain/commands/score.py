"""`posttrain score`: score completions in a data file with reward functions.

    posttrain score --reward 'math,format:0.2' --data scored.jsonl [--completions-field completion]

Each row needs "prompt" and the completions field (text, or a list of chat messages); its other
columns ("answer", "tests", ...) go to the reward functions. A row without a column its reward scores
against is judged None (and counted); a file where no row has it is refused. Prints the mean of the
combined reward over the rows it could judge, how many were None, and each function's mean and None
count. `--out` (not the --data file) writes every row back with "reward" and "reward/<name>" columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "Score completions in a data file with reward functions: mean, None count, per-function means."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import positive_int

    parser.add_argument("--reward", required=True, help="reward spec, e.g. 'math' or 'math,format:0.2' (quote it)")
    parser.add_argument("--data", required=True, help="prompt-format data: .jsonl/.json/.parquet/.csv with a completions field")
    parser.add_argument("--completions-field", default="completion", help="column holding the completion (default: completion)")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes for parallel rewards (code); default: core count")
    parser.add_argument("--out", default=None, help="write rows with their rewards to this .jsonl file")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out file")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _check_completions(source: str, rows: list[dict], field: str) -> None:
    """Every row holds a completion in ``field``: text, or a list of chat messages (a DataError naming the
    first row that does not, and how many do not)."""
    from posttrain.data import DataError

    def is_text(value) -> bool:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))

    for problem, bad in (("lack the field", lambda r: field not in r),
                         ("hold no completion text (a string, or a list of messages) in the field",
                          lambda r: not is_text(r[field]))):
        rows_bad = [i + 1 for i, r in enumerate(rows) if bad(r)]
        if rows_bad:
            raise DataError(source, rows_bad[0], None, f"{len(rows_bad)} rows {problem} {field!r} (the first is "
                            "this one); name the column holding the completions with --completions-field", "row")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain import rewards
    from posttrain.commands._args import FlagError, out_file, reward_flag, write_jsonl
    from posttrain.doctrine.select import check_reward_columns
    from posttrain.data import load_rows

    reward = reward_flag("--reward", args.reward)
    if args.out:
        if Path(args.out).expanduser().resolve() == Path(args.data).expanduser().resolve():
            raise FlagError(f"--out {args.out}: is the --data file, which it would overwrite; write to another file")
        out_file("--out", args.out, args.overwrite)
    field = args.completions_field
    rows = load_rows(args.data, "prompt", checks=rewards.row_checks(args.reward))
    _check_completions(str(args.data), rows, field)
    check_reward_columns(args.data, rows, args.reward)
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
        write_jsonl(args.out, ({**row, "reward": totals[i], **{f"reward/{n}": v[i] for n, v in parts.items()}}
                               for i, row in enumerate(rows)))
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0
