"""Our PPO step against our GRPO step at equal sampling work (TRL 1.x has no PPO trainer to compare).

Both sample the same prompts x group size x forced lengths (`grpo_vs_trl.py`'s cell shape: 2 prompts,
64 tokens, temperature 1), with the KL on (GRPO beta = PPO kl_coef = 0.04), LoRA r16 on every linear
layer or full fine-tuning. What PPO adds is measured: the critic (an adapter on the policy's base
with LoRA, a second model with full fine-tuning), its value pass before the update and its
forward/backward in each update, the old log-probs pass, and its `ppo_epochs` passes over the batch
(1: the same one optimizer update as GRPO; 4: PPO's default, TRL's old PPOTrainer's). Workers
alternate step by step as in `grpo_vs_trl.py` (its `measure`, `Ours` and `OursPPO`); median of the
steps after warm-up; peak RSS growth once built. Ratios are PPO's over GRPO's.

usage: python bench/ppo_vs_grpo.py [--loras all,full] [--epochs 1,4] [--group 8] [--steps 5]
           [--out bench/results/ppo_vs_grpo.json] [--remeasure]
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

import grpo_vs_trl as B  # bench/grpo_vs_trl.py


def key(cell: dict) -> str:
    return f"g{cell['group']}-{cell['lora']}-e{cell['ppo_epochs']}"


def table(cells: list[dict]) -> str:
    head = ("| group | LoRA | PPO epochs | GRPO s/step (gen/logp/upd) | PPO s/step (gen/logp/upd) | time ratio "
            "| peak MB GRPO/PPO | memory ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    phases = lambda x: f"{x['step']:.1f} ({x['gen']:.1f}/{x['logprobs']:.1f}/{x['update']:.1f})"  # noqa: E731
    for r in cells:
        c, g, p = r["cell"], r["ours"], r["ppo"]
        lines.append(f"| {c['group']} | {c['lora']} | {c['ppo_epochs']} | {phases(g)} | {phases(p)} "
                     f"| {r['time_ratio']:.2f} | {g['peak_mb']:.0f}/{p['peak_mb']:.0f} | {r['memory_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loras", default="all,full")
    p.add_argument("--epochs", default="1,4")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench/results/ppo_vs_grpo.json")
    p.add_argument("--remeasure", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    grid = [{"group": args.group, "lora": lo, "lengths": "forced", "beta": 0.04, "ppo_epochs": int(e)}
            for lo, e in itertools.product(args.loras.split(","), args.epochs.split(","))]
    saved = B.run_cells(grid, args, key, lambda cell: B.measure(cell, args, pair=("ours", "ppo")), table)
    wanted = {key(c) for c in grid}
    print(f"\n{saved['machine'].get('cpu', '')}; ratios are PPO's over GRPO's (forced {args.new_tokens} tokens, "
          f"{args.prompts} prompts x {args.group}, KL 0.04)")
    print(table([r for r in saved["cells"] if key(r["cell"]) in wanted]))


if __name__ == "__main__":
    main()
