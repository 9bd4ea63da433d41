"""`posttrain recommend`: which method to use, and why (the doctrine's decision tree, posttrain.doctrine.select).

    posttrain recommend --data prefs.jsonl
    posttrain recommend --data math.jsonl --model 8B --gpu-memory 24GB
    posttrain recommend --data prompts.jsonl --judge judge.yaml
    posttrain recommend --task arithmetic --json
    posttrain recommend --task arithmetic --teacher runs/demo     # on-policy distillation
    posttrain recommend --data math.jsonl --no-probe              # skip measuring the base model

Prints the method, every branch of the tree taken (the reasons), the suggested `posttrain train`
command with the doctrine's defaults (beta, learning rate, LoRA rank by model size and method, group
size), and the alternatives. Exit code 0 with a recommendation, 1 when the inputs give none.

When the tree reaches GRPO with a verifiable reward, the base model's pass rate is measured first
(``measure_probe``: --probe-prompts prompts of the data x --probe-samples completions, sampled and
scored by the trainers' own ``algorithms.collect.generate_and_score``, seeded by --probe-seed); near
zero, RFT is proposed first (posttrain.doctrine.probe, .stages). ``--no-probe`` skips it: nothing loads then.
A --teacher's tokenizer is checked against the model's before anything else loads.
"""

from __future__ import annotations

import argparse
import json

PROBE_TEMPERATURE = 0.7
"""The probe samples as the demo's GRPO preset does. Measured on the embedded model (16 prompts x 4
samples, seed 0): at 1.0 it passes 3.1% of arithmetic problems and 3.1% of reasoning-gym chain_sum
(3 terms), so the two could not be told apart, though GRPO at 0.7 learns arithmetic from 14% to 74%
(the demo) and stalls on chain_sum (issue 18); at 0.7, 9.4% and 1.6%. A lower temperature measures
the model near its best, so "near zero" there is near zero at the temperature GRPO samples at."""

HELP = ("Recommend a method (SFT, distillation, DPO, GRPO, RFT, PPO, RLAIF, online DPO) from the data, rewards, "
        "judge, teacher, memory and the base model's pass rate, with reasons.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import memory_size

    parser.add_argument("--data", help="dataset file (TRL formats); its columns decide the branch")
    parser.add_argument("--task", help="a built-in task instead of --data (e.g. arithmetic)")
    parser.add_argument("--env", metavar="SPEC", help="a multi-turn environment instead of --data/--task (guess_number, "
                        "tool_arithmetic, ta:GAME, module:Class; `posttrain tasks` lists them)")
    parser.add_argument("--columns", help="comma-separated column names, instead of a file")
    parser.add_argument("--reward", help="reward spec you could use, e.g. math, 'reward_model(runs/rm/final)'")
    parser.add_argument("--judge", metavar="CONFIG", help="a judge config (YAML) available for AI feedback")
    parser.add_argument("--gpu-memory", type=memory_size, help="memory per GPU, e.g. 24GB or 80GiB")
    parser.add_argument("--model", help="model spec or size (8B); default: the embedded model")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_stage_arguments(parser)


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """--teacher and the probe's flags, shared with `posttrain train auto`."""
    from posttrain.commands._args import float_in, int_at_least, nonnegative_int, positive_int

    parser.add_argument("--teacher", metavar="SPEC", help="a stronger model with the same tokenizer: on-policy "
                        "distillation (a model directory, a run directory or its final/)")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the base model's pass rate on a sample of the data before choosing GRPO "
                             "(--no-probe: skip; nothing loads)")
    parser.add_argument("--probe-prompts", type=positive_int, default=16, metavar="N",
                        help="prompts of the data the probe samples (default 16)")
    parser.add_argument("--probe-samples", type=int_at_least(2), default=4, metavar="K",
                        help="completions per prompt the probe samples (default 4)")
    parser.add_argument("--probe-max-new-tokens", type=positive_int, default=128, metavar="T",
                        help="completion length limit of the probe's samples (default 128)")
    parser.add_argument("--probe-temperature", type=float_in(0, 2, low_open=True), default=PROBE_TEMPERATURE,
                        metavar="T", help=f"sampling temperature of the probe (default {PROBE_TEMPERATURE}: the "
                        "demo's; near zero there is near zero at any temperature GRPO would use)")
    parser.add_argument("--probe-seed", type=nonnegative_int, default=0, metavar="SEED",
                        help="seed of the probe's prompts and samples (default 0)")


def check_teacher(teacher: str | None, model: str | None) -> None:
    """A --teacher that is not a model, or whose tokenizer differs from the model's: a UserError naming
    --teacher, before any model loads (tokenizer files only)."""
    if not teacher:
        return
    from types import SimpleNamespace

    from posttrain.algorithms.distill import check_tokenizers
    from posttrain.doctrine.memory import parse_size
    from posttrain.models import EMBEDDED, check_model_flag

    check_model_flag("--teacher", teacher)
    if model is None or not parse_size(model):  # a size (8B) names no tokenizer to compare
        check_tokenizers(SimpleNamespace(model=model or EMBEDDED, teacher=teacher))


def prober(args: argparse.Namespace, source: str | None):
    """The ``probe(reward_spec)`` callable the tree calls, or None (--no-probe, a model given as a size,
    no data to sample)."""
    from posttrain.doctrine.memory import parse_size

    if not args.probe or source is None or (args.model and parse_size(args.model)):
        return None

    def probe(reward_spec: str):
        return measure_probe(source, reward_spec, args.model, args.probe_prompts, args.probe_samples,
                             args.probe_max_new_tokens, args.probe_seed, args.probe_temperature)
    return probe


def probe_rows(source: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of a data file or a task's train split (test when it has none), drawn with ``seed``."""
    import random

    from posttrain.data import load_rows
    from posttrain.data.tasks import get_task, task_info

    try:
        info = task_info(source)
    except KeyError:
        rows = load_rows(source, "prompt")
        return random.Random(seed).sample(rows, min(n, len(rows)))
    return get_task(source, "train" if "train" in info.splits else "test", n=n, seed=seed)


def measure_probe(source: str, reward_spec: str, model: str | None, prompts: int = 16, samples: int = 4,
                  max_new_tokens: int = 128, seed: int = 0, temperature: float = PROBE_TEMPERATURE, chunk: int = 8):
    """The base model's pass rate on ``prompts`` rows of ``source`` x ``samples`` completions each, sampled
    at ``temperature`` and scored by ``algorithms.collect.generate_and_score``: a ``Probe``."""
    import time

    import torch

    from posttrain.algorithms.collect import generate_and_score, prompt_generators
    from posttrain.commands._args import load_model_flag, reward_flag
    from posttrain.doctrine.probe import summarise
    from posttrain.models import EMBEDDED
    from posttrain.sampling.generation import SamplingConfig

    rows = probe_rows(source, prompts, seed)
    reward_fn = reward_flag("--reward", reward_spec)
    t0 = time.perf_counter()
    policy, tok = load_model_flag("--model", model or EMBEDDED)
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    rewards_PG: list[list[float]] = []
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        gens = prompt_generators(gen, slice(i, i + len(part)), torch.device("cpu"))
        batch = generate_and_score(policy, tok, part, samples, cfg, reward_fn, None, prompt_generators=gens)
        rewards_PG += batch.rewards_B.view(len(part), samples).tolist()
    return summarise(rewards_PG, reward_spec, seconds=time.perf_counter() - t0)


def _inputs(args: argparse.Namespace) -> tuple[str | None, list[str] | None]:
    """(data file or task name, columns), checked: at most one of --data, --task, --columns; a --judge
    config that loads (``ConfigError`` naming its file and field); a --teacher sharing the tokenizer."""
    from posttrain.commands._args import FlagError, task_flag

    given = [f"--{d}" for d in ("data", "task", "columns", "env") if getattr(args, d)]
    if len(given) > 1:
        raise FlagError(f"{' and '.join(given)}: give one of --data, --task, --columns, --env (each describes the data)")
    if args.env:
        from posttrain.envs import EnvError, get_env

        try:
            get_env(args.env)
        except EnvError as e:
            raise FlagError(f"--env: {e}") from None
    if args.task:
        task_flag("--task", args.task)
    if args.judge:
        from posttrain.rlaif.config import load_judge_config

        load_judge_config(args.judge)
    check_teacher(args.teacher, args.model)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    return args.data or args.task, columns


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.doctrine.select import recommend

    source, columns = _inputs(args)
    # a data file, model or reward spec that is wrong is a UserError (DataError, EstimateError,
    # RewardSpecError) naming the file or flag: cli.main reports it
    rec = recommend(source, columns, args.judge, args.reward, args.gpu_memory, args.model, args.teacher,
                    prober(args, source), env=args.env)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=1))
        return 0 if rec.method else 1
    console = Console(width=max(100, Console().width))
    title = {"rlaif": "RLAIF (GRPO with the judge as reward)", "online-dpo": "ONLINE DPO",
             "distill": "ON-POLICY DISTILLATION", "rft": "RFT (rejection-sampling fine-tuning)"}.get(
        rec.method, rec.method.upper() if rec.method else "no method")
    console.print(f"[bold]recommended: {title}[/bold]")
    for i, reason in enumerate(rec.reasons, 1):
        console.print(f"  {i}. {reason}", highlight=False)
    if rec.command:
        console.print("\n[bold]command[/bold]")
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
