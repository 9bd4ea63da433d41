"""`posttrain demo`: GRPO on the embedded SmolLM2-135M-Instruct, two-digit addition, greedy
accuracy on 200 held-out problems before and after (the job `make demo` runs)."""

from __future__ import annotations

import argparse

HELP = "Run the demo: GRPO on the embedded model (two-digit addition), accuracy before and after."

# The preset, tuned on 2 CPU cores to fit in about 15 minutes (README: "The demo").
PRESET = dict(
    task="arithmetic",
    eval_size=200,
    task_size=5000,
    group_size=8,
    prompts_per_step=4,
    max_new_tokens=48,
    eval_max_new_tokens=48,
    temperature=0.7,
    beta=0.0,
    lora_rank=16,
    lr=1e-4,
    max_steps=100,
    max_minutes=11.0,
    checkpoint_every=25,
    samples_per_step=1,
    log_every=5,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import nonnegative_int, positive_float, positive_int

    parser.add_argument("--steps", type=positive_int, default=PRESET["max_steps"], help="training steps")
    parser.add_argument("--minutes", type=positive_float, default=PRESET["max_minutes"], help="training time budget")
    parser.add_argument("--eval-size", type=positive_int, default=PRESET["eval_size"], help="held-out problems evaluated")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default=None)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    from posttrain.objectives.losses import POLICY_LOSSES

    parser.add_argument("--policy-loss", choices=tuple(POLICY_LOSSES), default="ppo_clip",
                        help="policy loss (" + "; ".join(f"{k}: {v.help}" for k, v in POLICY_LOSSES.items()) + ")")


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from posttrain.algorithms.grpo import GRPOConfig, train_grpo

    console = Console()
    cfg = GRPOConfig(**{**PRESET, "max_steps": args.steps, "max_minutes": args.minutes,
                        "eval_size": args.eval_size, "output_dir": args.output_dir, "name": args.name, "seed": args.seed,
                        "policy_loss": args.policy_loss})
    console.print(f"[bold]posttrain demo[/bold]: GRPO ({cfg.policy_loss}) on {cfg.model}, task {cfg.task}, "
                  f"{cfg.prompts_per_step} prompts x "
                  f"{cfg.group_size} completions per step, LoRA r{cfg.lora_rank}, lr {cfg.lr}, "
                  f"up to {cfg.max_steps} steps / {cfg.max_minutes:g} min")
    t0 = time.time()
    res = train_grpo(cfg)
    before, after = res.evals[0], res.evals[-1]
    console.print(f"\n[bold]held-out greedy accuracy[/bold] ({after['n']} problems): "
                  f"before {before['accuracy']:.1%}  ->  after {after['accuracy']:.1%} "
                  f"(step {after['step']}, {(time.time() - t0) / 60:.1f} min)")
    for b, a in zip(before["examples"], after["examples"]):
        console.print(f"\n[bold]{b['prompt']}[/bold]\n  before: {b['completion']!r}\n  after:  {a['completion']!r}",
                      highlight=False)
    console.print(f"\nrun directory: {res.run_dir}")
    return 0
