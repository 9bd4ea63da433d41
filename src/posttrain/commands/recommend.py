"""`posttrain recommend`: which method to use, and why (the doctrine's decision tree, posttrain.doctrine.select).

    posttrain recommend --data prefs.jsonl
    posttrain recommend --data math.jsonl --model 8B --gpu-memory 24GB
    posttrain recommend --data prompts.jsonl --judge judge.yaml
    posttrain recommend --task arithmetic --json

Prints the method, every branch of the tree taken (the reasons), the suggested `posttrain train`
command with the doctrine's defaults (beta, learning rate, LoRA rank by model size and method, group
size), and the alternatives. Exit code 0 with a recommendation, 1 when the inputs give none.
"""

from __future__ import annotations

import argparse
import json

HELP = "Recommend a method (DPO, GRPO, PPO, RLAIF) from the data, rewards, judge and memory, with reasons."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import memory_size

    parser.add_argument("--data", help="dataset file (TRL formats); its columns decide the branch")
    parser.add_argument("--task", help="a built-in task instead of --data (e.g. arithmetic)")
    parser.add_argument("--columns", help="comma-separated column names, instead of a file")
    parser.add_argument("--reward", help="reward spec you could use, e.g. math, 'reward_model(runs/rm/final)'")
    parser.add_argument("--judge", metavar="CONFIG", help="a judge config (YAML) available for AI feedback")
    parser.add_argument("--gpu-memory", type=memory_size, help="memory per GPU, e.g. 24GB or 80GiB")
    parser.add_argument("--model", help="model spec or size (8B); default: the embedded model")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _inputs(args: argparse.Namespace) -> tuple[str | None, list[str] | None]:
    """(data file or task name, columns), checked: at most one of --data, --task, --columns; a --judge
    config that loads (``ConfigError`` naming its file and field)."""
    from posttrain.commands._args import FlagError, task_flag

    given = [f"--{d}" for d in ("data", "task", "columns") if getattr(args, d)]
    if len(given) > 1:
        raise FlagError(f"{' and '.join(given)}: give one of --data, --task, --columns (each describes the data)")
    if args.task:
        task_flag("--task", args.task)
    if args.judge:
        from posttrain.rlaif.config import load_judge_config

        load_judge_config(args.judge)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    return args.data or args.task, columns


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.doctrine.select import recommend

    source, columns = _inputs(args)
    # a data file, model or reward spec that is wrong is a UserError (DataError, EstimateError,
    # RewardSpecError) naming the file or flag: cli.main reports it
    rec = recommend(source, columns, args.judge, args.reward, args.gpu_memory, args.model)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=1))
        return 0 if rec.method else 1
    console = Console(width=max(100, Console().width))
    title = rec.method.upper() if rec.method else "no method"
    if rec.method == "rlaif":
        title = "RLAIF (GRPO with the judge as reward)"
    console.print(f"[bold]recommended: {title}[/bold]")
    for i, reason in enumerate(rec.reasons, 1):
        console.print(f"  {i}. {reason}", highlight=False)
    if rec.command:
        console.print("\n[bold]command[/bold]")
        if rec.prepare:
            console.print(f"  {rec.prepare}", highlight=False, soft_wrap=True)
        console.print(f"  {rec.command}", highlight=False, soft_wrap=True)
        table = Table(title="defaults (doctrine)", title_justify="left")
        table.add_column("field")
        table.add_column("value")
        for k, v in rec.defaults.items():
            table.add_row(k, str(v))
        console.print(table)
    if rec.alternatives:
        console.print("[bold]alternatives[/bold]")
        for alt in rec.alternatives:
            console.print(f"  - {alt['method']}: {alt['why']}", highlight=False)
            if alt.get("command"):
                console.print(f"      {alt['command']}", highlight=False, soft_wrap=True)
    return 0 if rec.method else 1
