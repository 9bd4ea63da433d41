"""`posttrain tasks`: list the built-in tasks (and the environments and tools), show a few rows,
export a split to jsonl.

    posttrain tasks                                   # the tables of tasks and environments
    posttrain tasks show arithmetic --n 3 [--split test] [--seed 0] [--opt digits=3]
    posttrain tasks export arithmetic --split test --n 200 --out test.jsonl
"""

from __future__ import annotations

import argparse
import json

HELP = "List the built-in tasks, show rows of one, or export a split to a jsonl file."


def _common(p: argparse.ArgumentParser, default_n: int | None) -> None:
    from posttrain.commands._args import nonnegative_int, positive_int

    p.add_argument("name", help="task name (see `posttrain tasks`)")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--n", type=positive_int, default=default_n, help="number of rows (default: %(default)s; none = task default)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="task option, e.g. digits=3 (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the tasks (the default)")
    _common(sub.add_parser("show", help="print a few rows of a task"), 3)
    export = sub.add_parser("export", help="write a split of a task to a jsonl file")
    _common(export, None)
    export.add_argument("--out", required=True, help="output .jsonl path")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out file")


def _options(pairs: list[str]) -> dict:
    from posttrain.commands._args import FlagError
    from posttrain.data.values import parse_value

    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise FlagError(f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = parse_value(value)
    return options


def _print_envs(console) -> None:
    """The environments of ``train grpo --env`` and the tools they offer."""
    from rich.markup import escape
    from rich.table import Table

    from posttrain.envs import list_envs
    from posttrain.envs.tools import TOOLS

    table = Table(title="environments (train grpo --env SPEC; module:Class for your own)")
    for column in ("environment", "turns", "tools", "description"):
        table.add_column(column)
    for e in list_envs():
        table.add_row(e.name, "multi" if e.multi_turn else "one", ",".join(e.tools) or "-", escape(e.description))
    console.print(table)
    console.print("tools: " + ", ".join(sorted(TOOLS)) + " (an environment lists its own; see README: tools)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.data import tasks

    console, err = Console(width=max(120, Console().width)), Console(stderr=True)
    action = getattr(args, "action", None) or "list"
    if action == "list":
        table = Table(title="built-in tasks")
        for column in ("task", "splits", "reward", "columns", "description"):
            table.add_column(column)
        for t in tasks.list_tasks():
            table.add_row(t.name, ",".join(t.splits), t.reward, ",".join(t.columns), t.description)
        console.print(table)
        _print_envs(console)
        return 0
    from posttrain.commands._args import FlagError, out_file, task_flag, write_jsonl

    task_flag("TASK", args.name, args.split)
    options = _options(args.opt)
    try:
        tasks.check_options(args.name, options)
    except tasks.TaskError as e:
        raise FlagError(f"--opt: {e}") from e
    if action == "export":
        out_file("--out", args.out, args.overwrite)
    rows = tasks.get_task(args.name, split=args.split, n=args.n, seed=args.seed, **options)
    if action == "show":
        for i, row in enumerate(rows):
            console.rule(f"{args.name} {args.split} #{i}")
            for key, value in row.items():
                console.print(f"[bold]{key}[/bold]: ", end="")
                console.print(value if isinstance(value, str) else json.dumps(value), markup=False, highlight=False)
        return 0
    write_jsonl(args.out, rows)
    err.print(f"wrote {len(rows)} rows of {args.name} ({args.split}, seed {args.seed}) to {args.out}")
    return 0
