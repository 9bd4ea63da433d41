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
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help=f"model spec to sample from (default: {EMBEDDED})")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prompt file (.jsonl/.json/.parquet/.csv): {prompt, ...columns for the reward}")
    src.add_argument("--task", help="a built-in task (see `posttrain tasks`): prompts from its train split")
    parser.add_argument("--task-size", type=int, default=200, help="prompts drawn from the task (default: 200)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="task split (default: train)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts of --data (0 = all)")
    parser.add_argument("--reward", default=None, help="reward spec, e.g. math, code, 'math,format:0.2' (default: the task's)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default: 8)")
    parser.add_argument("--out", required=True, help="output .jsonl; re-run with the same --out to resume")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit (default: 256)")
    parser.add_argument("--batch-prompts", type=int, default=8, help="prompts sampled together (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task rows and of sampling (default: 0)")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="do not wrap plain-string prompts in the chat template")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="sampling dtype; auto = bfloat16 where it is fast (CUDA, AVX512-BF16 CPUs), else float32")


def load_prompts(args) -> tuple[list[dict], str | None]:
    """(prompt rows, the task's reward spec or None)."""
    if args.task:
        from posttrain.data.tasks import get_task, task_info

        info = task_info(args.task)
        if args.split not in info.splits:
            raise ValueError(f"task {args.task!r} has no {args.split!r} split (splits: {', '.join(info.splits)})")
        return get_task(args.task, args.split, n=args.task_size, seed=args.seed), info.reward
    from posttrain.data import load_rows
    from posttrain.rewards import row_checks

    rows = load_rows(args.data, "prompt", checks=row_checks(args.reward))
    return (rows[:args.limit] if args.limit > 0 else rows), None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain import rewards
    from posttrain.data import DataError
    from posttrain.sampling.generation import SamplingConfig
    from posttrain.models import ModelError, load_model, resolve_device
    from posttrain.algorithms.pairs import make_pairs
    from posttrain.sampling.rollout_model import rollout_model

    err = Console(stderr=True)
    try:
        rows, task_reward = load_prompts(args)
        spec = args.reward or task_reward
        if spec is None:
            raise ValueError("no reward: pass --reward (e.g. math, code, 'reward_model(runs/rm/final)')")
        reward_fn = rewards.from_spec(spec)
        if args.n < 2:
            raise ValueError(f"--n must be >= 2 to make a pair, got {args.n}")
    except (ValueError, KeyError, ImportError, DataError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    settings = {"model": args.model, "source": args.data or f"task:{args.task}:{args.split}:{args.task_size}",
                "reward": spec, "n": args.n, "sampling": [args.temperature, args.top_p, args.top_k, args.max_new_tokens],
                "seed": args.seed, "chat_template": args.chat_template, "batch_prompts": args.batch_prompts}
    try:
        model, tok = load_model(args.model, device=resolve_device(args.device))
        model = rollout_model(model, args.dtype).model  # sampling only: the bfloat16 copy where it is faster
    except ModelError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2

    def show(r):
        err.print(f"  {r.already_done + r.sampled}/{r.prompts} prompts, {r.total_pairs} pairs, "
                  f"{r.seconds:.0f}s", highlight=False)

    from posttrain.rewards.judge import judge_metrics
    from posttrain.rlaif import JudgeFailureRate

    try:
        report = make_pairs(model, tok, rows, args.out, args.n, reward_fn, sampling, settings, seed=args.seed,
                            batch_prompts=args.batch_prompts, chat_template=args.chat_template, on_batch=show)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    except JudgeFailureRate as e:  # the batches already scored are in --out: the same command resumes
        err.print(f"[red]error:[/red] {e}\nthe pairs made so far are in {args.out}; run the same command again "
                  "to resume.", highlight=False)
        return 3
    err.print(report.summary(), highlight=False)
    judged = judge_metrics(reward_fn)
    if judged:
        err.print("  " + ", ".join(f"{k} {v:.0f}" for k, v in judged.items() if k.rsplit("/", 1)[-1] in
                                   ("requests", "cache_hits", "unparsable", "failures")), highlight=False)
    print(f"wrote {args.out}: {report.total_pairs} pairs")
    return 0
