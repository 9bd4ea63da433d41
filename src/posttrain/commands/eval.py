"""`posttrain eval`: greedy accuracy of a model (or a run's final model) on a task or data file,
optionally side by side with a baseline; `--suite sycophancy` runs the adversarial probe."""

from __future__ import annotations

import argparse

HELP = "Evaluate a model or run: greedy accuracy on a task/data file, or an adversarial suite."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help="model spec or run directory (uses its final/)")
    parser.add_argument("--baseline", help="a second model spec or run to compare with, side by side")
    parser.add_argument("--task", help="built-in task (see `posttrain tasks`)")
    parser.add_argument("--data", help="prompt file with the columns the reward needs")
    parser.add_argument("--reward", help="reward spec (default: the task's reward)")
    parser.add_argument("--split", default="test", help="task split (default: test)")
    parser.add_argument("--n", type=int, default=200, help="rows to evaluate (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--suite", choices=["sycophancy"], help="an adversarial suite instead of a task")
    parser.add_argument("--examples", type=int, default=2, help="example completions to print")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _rows(args):
    from posttrain.data import load_rows
    from posttrain.data.tasks import get_task, task_info

    if args.task:
        return get_task(args.task, args.split, n=args.n, seed=args.seed), args.reward or task_info(args.task).reward
    if args.data:
        if not args.reward:
            raise SystemExit("error: --data needs --reward")
        from posttrain.rewards import row_checks

        return load_rows(args.data, "prompt", checks=row_checks(args.reward))[: args.n], args.reward
    raise SystemExit("error: give --task, --data or --suite")


def _evaluate(spec: str, args, rows, reward):
    from posttrain.models import load_model

    model, tok = load_model(spec)
    if args.suite == "sycophancy":
        from posttrain.doctrine.adversarial.sycophancy import run_sycophancy

        return run_sycophancy(model, tok, max_new_tokens=args.max_new_tokens)
    from posttrain.algorithms.evaluate import greedy_eval

    return greedy_eval(model, tok, rows, reward, args.max_new_tokens, args.batch_size, examples=args.examples)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    rows, reward = (None, None) if args.suite else _rows(args)
    specs = [args.model] + ([args.baseline] if args.baseline else [])
    results = {spec: _evaluate(spec, args, rows, reward) for spec in specs}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    console = Console()
    key = "agreement_rate" if args.suite == "sycophancy" else "accuracy"
    table = Table(title=f"{args.suite or args.task or args.data} ({key})")
    for col in ("model", key, "n"):
        table.add_column(col)
    for spec, res in results.items():
        table.add_row(spec, f"{res[key]:.3f}", str(res["n"]))
    console.print(table)
    for spec, res in results.items():
        for ex in res.get("examples", [])[: args.examples]:
            console.print(f"[bold]{spec}[/bold] | {ex['prompt']}\n  -> {ex['completion']!r}  (reward {ex.get('reward')})",
                          highlight=False)
    return 0
