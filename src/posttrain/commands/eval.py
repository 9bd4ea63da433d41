"""`posttrain eval`: greedy accuracy of a model (or a run's final model) on a task or data file,
optionally side by side with a baseline; `--suite sycophancy` runs the adversarial probe."""

from __future__ import annotations

import argparse

HELP = "Evaluate a model or run: greedy accuracy on a task/data file, or an adversarial suite."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import nonnegative_int, positive_int, remember_defaults
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help="model spec or run directory (uses its final/)")
    parser.add_argument("--baseline", help="a second model spec or run to compare with, side by side")
    parser.add_argument("--task", help="built-in task (see `posttrain tasks`)")
    parser.add_argument("--data", help="prompt file with the columns the reward needs")
    parser.add_argument("--reward", help="reward spec (default: the task's reward)")
    parser.add_argument("--split", default="test", help="task split (default: test)")
    parser.add_argument("--n", type=positive_int, default=200, help="rows to evaluate (default 200)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the task rows drawn")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--suite", choices=["sycophancy"], help="an adversarial suite instead of a task")
    parser.add_argument("--env", help="an environment (see `posttrain tasks`): greedy episodes on its --split rows; "
                        "accuracy is the mean episode reward")
    parser.add_argument("--max-turns", type=positive_int, default=4, help="model turns per episode (with --env)")
    parser.add_argument("--max-episode-tokens", type=positive_int, default=1024,
                        help="tokens per episode after its first messages (with --env)")
    parser.add_argument("--examples", type=nonnegative_int, default=2, help="example completions to print")
    parser.add_argument("--json", action="store_true", help="print JSON")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    return (
        Rule(("reward", "split", "n", "seed"), lambda a: a.suite,
             "--suite runs its own fixed probes, greedily, scored by its own verdict"),
        Rule(("split", "seed"), lambda a: a.data,
             "--data rows are read from the file in order (--split and --seed draw a task's rows)"),
        Rule(("reward",), lambda a: a.env, "--env scores its own episodes"),
        Rule(("max_turns", "max_episode_tokens"), lambda a: not a.env, "they bound the episodes of --env"),
    )


def _env_rows(args):
    """(rows, runner) of --env: its --split rows and the episode runner that plays and scores them."""
    from posttrain.algorithms.episodes import EpisodeRunner
    from posttrain.commands._args import FlagError
    from posttrain.envs import EnvError, get_env
    from posttrain.sampling.turns import TurnLimits

    try:
        factory = get_env(args.env)
        rows = factory.rows(args.split, args.n, args.seed)
    except EnvError as e:
        raise FlagError(f"--env: {e} (see `posttrain tasks`)") from None
    return rows, EpisodeRunner(factory, TurnLimits(args.max_turns, args.max_episode_tokens))


def _rows(args):
    """(rows, reward spec) of --task or --data, checked before any model loads."""
    from posttrain.commands._args import FlagError, reward_flag, task_flag
    from posttrain.doctrine.select import check_reward_columns
    from posttrain.data import load_rows
    from posttrain.data.tasks import get_task

    if args.task:
        info = task_flag("--task", args.task, args.split)
        reward = args.reward or info.reward
        reward_flag("--reward", reward)
        return get_task(args.task, args.split, n=args.n, seed=args.seed), reward
    if not args.reward:
        raise FlagError("--data needs --reward (the reward that scores each completion, e.g. math)")
    reward_flag("--reward", args.reward)
    from posttrain.rewards import row_checks

    rows = load_rows(args.data, "prompt", checks=row_checks(args.reward))[: args.n]
    check_reward_columns(args.data, rows, args.reward)
    return rows, args.reward


def _evaluate(spec: str, flag: str, args, rows, reward):
    from posttrain.commands._args import load_model_flag

    model, tok = load_model_flag(flag, spec)
    if args.suite == "sycophancy":
        from posttrain.doctrine.adversarial.sycophancy import run_sycophancy

        return run_sycophancy(model, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              examples=args.examples)
    if args.env:
        return reward.evaluate(model, tok, rows, args.max_new_tokens, args.batch_size, examples=args.examples)
    from posttrain.algorithms.evaluate import greedy_eval

    return greedy_eval(model, tok, rows, reward, args.max_new_tokens, args.batch_size, examples=args.examples)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from posttrain.commands._args import exactly_one, refuse_inapplicable
    from posttrain.models import check_model_flag

    exactly_one(args, "task", "data", "suite", "env")
    refuse_inapplicable(args, _rules())
    models = {"--model": args.model, **({"--baseline": args.baseline} if args.baseline else {})}
    for flag, spec in models.items():
        check_model_flag(flag, spec)
    rows, reward = (None, None) if args.suite else _env_rows(args) if args.env else _rows(args)
    results = {spec: _evaluate(spec, flag, args, rows, reward) for flag, spec in models.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    console = Console()
    key = "agreement_rate" if args.suite == "sycophancy" else "accuracy"
    table = Table(title=f"{args.suite or args.task or args.data or args.env} ({key})")
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
