"""`posttrain pairs`: preference pairs from a model's own samples (the doctrine's DPO data recipe).

    posttrain pairs --task arithmetic --task-size 200 --n 8 --out pairs.jsonl
    posttrain pairs --model runs/sft/final --data prompts.jsonl --reward math --n 8 --out pairs.jsonl

Samples --n completions per prompt, scores them with --reward (default: the task's reward), and
writes the best (chosen) and the worst (rejected) as a TRL preference row with their scores.
Prompts whose samples all score the same are skipped and counted. Interrupted? Run the same
command again: prompts already done are skipped (see posttrain.algorithms.pairs).
"""

from __future__ import annotations

import argparse

HELP = "Make DPO preference pairs: sample N per prompt, score, pair the best with the worst."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import (int_at_least, nonnegative_int, positive_float, positive_int, probability,
                                          remember_defaults)
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help=f"model spec to sample from (default: {EMBEDDED})")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prompt file (.jsonl/.json/.parquet/.csv): {prompt, ...columns for the reward}")
    src.add_argument("--task", help="a built-in task (see `posttrain tasks`): prompts from its train split")
    parser.add_argument("--task-size", type=positive_int, default=200, help="prompts drawn from the task (default: 200)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="task split (default: train)")
    parser.add_argument("--limit", type=nonnegative_int, default=0,
                        help="use only the first N prompts of --data or of the task's rows (0 = all)")
    parser.add_argument("--reward", default=None, help="reward spec, e.g. math, code, 'math,format:0.2' (default: the task's)")
    parser.add_argument("--n", type=int_at_least(2), default=8, help="samples per prompt, >= 2 to make a pair (default: 8)")
    parser.add_argument("--out", required=True, help="output .jsonl; re-run with the same --out to resume")
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="sampling temperature, > 0: greedy samples would all be the same (default: 1.0)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling threshold (default: 1 = off)")
    parser.add_argument("--top-k", type=nonnegative_int, default=0, help="top-k sampling (default: 0 = off)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="completion length limit (default: 256)")
    parser.add_argument("--batch-prompts", type=positive_int, default=8, help="prompts sampled together (default: 8)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the task rows and of sampling (default: 0)")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="do not wrap plain-string prompts in the chat template")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="sampling dtype; auto = bfloat16 where it is fast (CUDA, AVX512-BF16 CPUs), else float32")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    return (Rule(("task_size", "split"), lambda a: a.data,
                 "--task-size and --split choose a task's prompts; with --data use --limit"),)


def load_prompts(args) -> tuple[list[dict], str | None]:
    """(prompt rows, the task's reward spec or None); --limit keeps the first N of either."""
    if args.task:
        from posttrain.commands._args import task_flag
        from posttrain.data.tasks import get_task

        info = task_flag("--task", args.task, args.split)
        rows, reward = get_task(args.task, args.split, n=args.task_size, seed=args.seed), info.reward
    else:
        from posttrain.data import load_rows
        from posttrain.rewards import row_checks

        rows, reward = load_rows(args.data, "prompt", checks=row_checks(args.reward)), None
    return (rows[:args.limit] if args.limit > 0 else rows), reward


def _check(args):
    """Everything checked before the model loads: flags, prompts, reward. Returns (rows, spec, reward_fn)."""
    from posttrain.commands._args import (FlagError, refuse_inapplicable,
                                          reward_flag)
    from posttrain.doctrine.select import check_reward_columns
    from posttrain.models import check_model_flag

    refuse_inapplicable(args, _rules())
    check_model_flag("--model", args.model)
    rows, task_reward = load_prompts(args)
    spec = args.reward or task_reward
    if spec is None:
        raise FlagError("--data needs --reward (e.g. math, code, 'reward_model(runs/rm/final)')")
    reward_fn = reward_flag("--reward", spec)
    if args.data:
        check_reward_columns(args.data, rows, spec)
    return rows, spec, reward_fn


def _settings(args, spec: str) -> dict:
    """What identifies the configuration in --out's progress log: another run must match it to continue."""
    return {"model": args.model, "source": args.data or f"task:{args.task}:{args.split}:{args.task_size}",
            "reward": spec, "n": args.n, "sampling": [args.temperature, args.top_p, args.top_k, args.max_new_tokens],
            "seed": args.seed, "chat_template": args.chat_template, "batch_prompts": args.batch_prompts}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.algorithms.pairs import check_output, make_pairs
    from posttrain.commands._args import load_model_flag
    from posttrain.models import resolve_device
    from posttrain.rewards.judge import find_judges, judge_metrics
    from posttrain.rlaif import JudgeFailureRate
    from posttrain.sampling.generation import SamplingConfig
    from posttrain.sampling.rollout_model import rollout_model

    err = Console(stderr=True)
    rows, spec, reward_fn = _check(args)
    settings = _settings(args, spec)
    check_output(args.out, settings)  # an --out made by another command or with other settings: a PairsFileError
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    model, tok = load_model_flag("--model", args.model, device=resolve_device(args.device))
    model = rollout_model(model, args.dtype).model  # sampling only: the bfloat16 copy where it is faster

    def show(r):
        err.print(f"  {r.already_done + r.sampled}/{r.prompts} prompts, {r.total_pairs} pairs, "
                  f"{r.seconds:.0f}s", highlight=False)

    try:
        report = make_pairs(model, tok, rows, args.out, args.n, reward_fn, sampling, settings, seed=args.seed,
                            batch_prompts=args.batch_prompts, chat_template=args.chat_template, on_batch=show)
        for _, judge_reward in find_judges(reward_fn):
            judge_reward.judge.check_run_failures()
    except JudgeFailureRate as e:  # the batches already scored are in --out: the same command resumes
        err.print(f"error: {e}\nthe pairs made so far are in {args.out}; run the same command again "
                  "to resume.", highlight=False, markup=False)
        return 3
    err.print(report.summary(), highlight=False)
    judged = judge_metrics(reward_fn)
    if judged:
        err.print("  " + ", ".join(f"{k} {v:.0f}" for k, v in judged.items() if k.rsplit("/", 1)[-1] in
                                   ("requests", "by_probability", "parsed", "unparsable", "failures",
                                    "cache_hits")), highlight=False)
    print(f"wrote {args.out}: {report.total_pairs} pairs")
    return 0
