"""`posttrain train <method>`: run a trainer from a YAML config and/or flags.

Each method is a dataclass config plus a train function, listed in METHODS; the flags come from the
dataclass fields (see posttrain.config), so a method added there gets its CLI for free. Precedence:
dataclass defaults < ``--config run.yaml`` < flags. ``--resume runs/<name>`` continues a run from
its newest checkpoint, with the run's saved config.yaml as the base.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

HELP = "Train with a method: " + ", ".join(["grpo", "dpo", "rm", "ppo"]) + "."

# method -> (module, config class, train function)
METHODS: dict[str, tuple[str, str, str]] = {
    "grpo": ("posttrain.algorithms.grpo", "GRPOConfig", "train_grpo"),
    "dpo": ("posttrain.algorithms.dpo", "DPOConfig", "train_dpo"),
    "rm": ("posttrain.algorithms.reward_model", "RewardModelConfig", "train_reward_model"),
    "ppo": ("posttrain.algorithms.ppo", "PPOConfig", "train_ppo"),
}


def available() -> dict[str, tuple[str, str, str]]:
    out = {}
    for name, entry in METHODS.items():
        try:
            found = importlib.util.find_spec(entry[0]) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out[name] = entry
    return out


def resolve(method: str):
    module, cls_name, fn_name = METHODS[method]
    mod = importlib.import_module(module)
    return getattr(mod, cls_name), getattr(mod, fn_name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain import config

    sub = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in available():
        cls, _ = resolve(name)
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        p.add_argument("--config", dest="_config", metavar="YAML", help="a YAML file of config fields")
        p.add_argument("--resume", dest="_resume", metavar="RUN_DIR",
                       help="continue runs/<name> from its newest checkpoint (same RNG and data position)")
        config.add_arguments(p, cls, skip=("resume",))


def build_config(method: str, args: argparse.Namespace):
    from posttrain import config

    cls, _ = resolve(method)
    config_file = args._config
    overrides = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("verb", "method")}
    if args._resume:
        run_dir = Path(args._resume)
        if config_file is None and (run_dir / "config.yaml").is_file():
            config_file = run_dir / "config.yaml"
        overrides["resume"] = str(run_dir)
    return config.from_sources(cls, config_file, overrides)


def run(args: argparse.Namespace) -> int:
    from posttrain.config import ConfigError

    _, train = resolve(args.method)
    try:
        cfg = build_config(args.method, args)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    train(cfg)
    return 0
