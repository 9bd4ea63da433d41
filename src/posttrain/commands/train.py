"""`posttrain train <method>`: run a trainer from a YAML config and/or flags.

Each method is a dataclass config plus a train function, imported directly in ``methods()``; the
flags come from the dataclass fields (see ``posttrain.runtime.config``), so a method added there
gets its CLI for free. Precedence:
dataclass defaults < ``--config run.yaml`` < flags. ``--resume runs/<name>`` continues a run from
its newest checkpoint, with the run's saved config.yaml as the truth: a flag or ``--config`` value
that changes a setting fixed for the life of a run is refused with the list of differences,
before any model loads (``algorithms.run.resume_config``; what may change: ``run.MUTABLE``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

HELP = "Train with a method: sft, rft, grpo, dpo, online-dpo, distill, rm, ppo, or auto (the doctrine's decision tree picks)."

METHODS: dict[str, tuple[type, Callable]] = {}
"""Methods added at run time (a plugin's or a test's): name -> (config class, train function)."""


def methods() -> dict[str, tuple[type, Callable]]:
    """method name -> (config class, train function): the built-in trainers, imported here, when a
    `train` command is parsed, not when the CLI starts (they import torch), then ``METHODS``."""
    from posttrain.algorithms.dpo import DPOConfig, train_dpo
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.algorithms.ppo import PPOConfig, train_ppo
    from posttrain.algorithms.reward_model import RewardModelConfig, train_reward_model
    from posttrain.algorithms.sft import SFTConfig, train_sft
    from posttrain.algorithms.rft import RFTConfig, train_rft
    from posttrain.algorithms.online_dpo import OnlineDPOConfig, train_online_dpo
    from posttrain.algorithms.distill import DistillConfig, train_distill

    return {
        "sft": (SFTConfig, train_sft),
        "grpo": (GRPOConfig, train_grpo),
        "dpo": (DPOConfig, train_dpo),
        "rm": (RewardModelConfig, train_reward_model),
        "ppo": (PPOConfig, train_ppo),
        "rft": (RFTConfig, train_rft),
        "online-dpo": (OnlineDPOConfig, train_online_dpo),
        "distill": (DistillConfig, train_distill),
        **METHODS,
    }


def resolve(method: str) -> tuple[type, Callable]:
    return methods()[method]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.runtime import config

    sub = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, (cls, _) in methods().items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        p.add_argument("--config", dest="_config", metavar="YAML", help="a YAML file of config fields")
        p.add_argument("--resume", dest="_resume", metavar="RUN_DIR",
                       help="continue runs/<name> from its newest checkpoint (same RNG and data position)")
        config.add_arguments(p, cls, skip=("resume",))
    _add_auto(sub)


def _add_auto(sub) -> None:
    """`posttrain train auto`: the doctrine's decision tree (posttrain.doctrine.select) picks the method and
    its defaults from the data, the rewards, a judge and the memory; the reasons are printed."""
    p = sub.add_parser("auto", help="pick the method with the doctrine's decision tree, then train")
    p.add_argument("--data", help="dataset file (preference pairs or prompts)")
    p.add_argument("--task", help="a built-in task instead of --data")
    p.add_argument("--reward", help="reward spec, if any")
    p.add_argument("--judge", help="judge config (YAML) for RLAIF")
    p.add_argument("--gpu-memory", help="memory available, e.g. 24GB")
    p.add_argument("--model", help="model spec")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config field of the chosen method (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the choice and the config, do not train")
    from posttrain.commands.recommend import add_stage_arguments

    add_stage_arguments(p)  # --teacher, --probe/--no-probe, --probe-prompts, --probe-samples, ...


def run_auto(args: argparse.Namespace) -> int:
    from posttrain.runtime import config
    from posttrain.commands.recommend import check_teacher, prober
    from posttrain.doctrine.select import choose_method

    # a NoMethodError / DataError / ConfigError is a UserError: cli.main reports it (exit 2)
    check_teacher(args.teacher, args.model)
    method, reasons, fields = choose_method(data=args.data, task=args.task, reward=args.reward, judge=args.judge,
                                            model=args.model, gpu_memory_gb=args.gpu_memory, teacher=args.teacher,
                                            probe=prober(args, args.data or args.task))
    print(f"method: {method}")
    for reason in reasons:
        print(f"  - {reason}")
    cls, train = resolve(method)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in fields.items() if k in names}
    given = {"data": args.data, "task": args.task, "model": args.model,
             "reward": args.reward or (f"judge({args.judge})" if args.judge else None)}
    values.update({k: v for k, v in given.items() if v is not None and k in names})
    for item in args.set:
        key, _, value = item.partition("=")
        values[key.strip().replace("-", "_")] = value
    cfg = config.build(cls, values, source="posttrain train auto")
    print(f"config: {config.to_dict(cfg)}")
    if not args.dry_run:
        train(cfg)
    return 0


def build_config(method: str, args: argparse.Namespace):
    from posttrain.runtime import config

    cls, _ = resolve(method)
    overrides = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("verb", "method")}
    if args._resume:
        from posttrain.algorithms.run import resume_config

        cfg = resume_config(cls, Path(args._resume), args._config, overrides, method=method)
    else:
        cfg = config.from_sources(cls, args._config, overrides)
    # what the user gave (not the run's saved config.yaml): a field that would do nothing is refused
    given: dict = {k: f"{args._config}:{n}" for k, n in (config.read_yaml(args._config)[1] if args._config else {}).items()}
    given.update(dict.fromkeys(overrides))  # flags: the message names the flag
    config.inapplicable(cfg, given)
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.method == "auto":
        return run_auto(args)
    _, train = resolve(args.method)
    cfg = build_config(args.method, args)  # a ConfigError / ResumeError: cli.main prints it, exit 2
    train(cfg)  # a fresh run that fails before its first step leaves no directory (run.closes_runs_on_failure)
    return 0
