"""`posttrain memory`: estimate peak memory of a run from a stated formula (posttrain.doctrine.memory).

    posttrain memory --model 8B --method grpo                 # full fine-tuning
    posttrain memory --model 8B --method grpo --lora          # LoRA with the doctrine's rank
    posttrain memory --model smollm2-135m-instruct --method dpo --lora 32 --device cpu
    posttrain memory --doctrine-table                         # the doctrine's 8B table, recomputed

Prints every part (weights, optimizer state, reference/value/reward models, activations, KV cache),
the total, which phase sets the peak, and the assumptions used.
"""

from __future__ import annotations

import argparse
import json

HELP = "Estimate peak memory for a method x model size x LoRA, with the breakdown and the assumptions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import lora_rank, memory_size, nonnegative_float, positive_int, remember_defaults
    from posttrain.doctrine.memory import DTYPE_BYTES, METHODS, OPTIMIZER_BYTES

    parser.add_argument("--model", default="8B", help="a size (8B, 135M) or a model spec (read from its config)")
    parser.add_argument("--method", default="grpo", choices=METHODS)
    parser.add_argument("--lora", nargs="?", const="auto", default=None, metavar="RANK", type=lora_rank,
                        help="LoRA; without a value, the doctrine's rank for the method and size (absent: full fine-tuning)")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                        help="gpu: the doctrine table's assumptions; cpu: posttrain's trainers on CPU (float32, AdamW)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="prompt + completion tokens (split half and half)")
    parser.add_argument("--prompt-len", type=positive_int, default=None)
    parser.add_argument("--completion-len", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=None, help="sequences (DPO: pairs) per forward/backward")
    parser.add_argument("--gen-batch", type=positive_int, default=None, help="sequences generated at once")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES))
    parser.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZER_BYTES))
    parser.add_argument("--fused-step", default=None, action=argparse.BooleanOptionalAction,
                        help="optimizer step inside backward (no full gradient buffer)")
    parser.add_argument("--master-weights", default=None, action=argparse.BooleanOptionalAction,
                        help="keep fp32 master weights (mixed precision)")
    parser.add_argument("--checkpointing", dest="grad_checkpointing", default=None,
                        action=argparse.BooleanOptionalAction, help="gradient checkpointing")
    parser.add_argument("--frozen-on-device", default=None, action=argparse.BooleanOptionalAction,
                        help="count the reference and reward models on this device")
    parser.add_argument("--beta", type=nonnegative_float, default=0.04, help="KL coefficient; 0 = no reference model")
    parser.add_argument("--gpu-memory", type=memory_size, default=None, help="say whether it fits in this much memory, e.g. 24GB")
    parser.add_argument("--doctrine-table", action="store_true", help="recompute the doctrine's 8B table")
    parser.add_argument("--json", action="store_true", help="print JSON")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    estimate = ("model", "method", "lora", "device", "seq_len", "prompt_len", "completion_len", "batch", "gen_batch",
                "dtype", "optimizer", "fused_step", "master_weights", "grad_checkpointing", "frozen_on_device",
                "beta", "gpu_memory")
    return (Rule(estimate, lambda a: a.doctrine_table,
                 "--doctrine-table recomputes the doctrine's fixed 8B table under its own assumptions"),
            Rule(("seq_len",), lambda a: a.prompt_len and a.completion_len,
                 "--prompt-len and --completion-len are both given, so there is nothing left for --seq-len to split"))


def _overrides(args: argparse.Namespace) -> dict:
    prompt_len, completion_len = args.prompt_len, args.completion_len
    if args.seq_len:
        prompt_len = prompt_len or args.seq_len // 2
        completion_len = completion_len or args.seq_len - prompt_len
    return {"prompt_len": prompt_len, "completion_len": completion_len, "micro_batch": args.batch,
            "gen_batch": args.gen_batch, "dtype": args.dtype, "optimizer": args.optimizer,
            "fused_step": args.fused_step, "master_weights": args.master_weights,
            "grad_checkpointing": args.grad_checkpointing, "frozen_on_device": args.frozen_on_device}


def _estimate(args: argparse.Namespace, memory):
    from posttrain.commands._args import FlagError

    try:
        return memory.estimate(args.model, args.method, args.lora, args.device, beta=args.beta, **_overrides(args))
    except memory.EstimateError as e:  # e.g. a --model that is neither a size nor a readable model config
        raise FlagError(f"cannot estimate {args.method} on --model {args.model}: {e}") from e


def _table(console, rows: list[tuple[str, str, str]], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in ("configuration", "estimate", "doctrine"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.commands._args import refuse_inapplicable
    from posttrain.doctrine import memory

    refuse_inapplicable(args, _rules())
    console = Console()
    if args.doctrine_table:
        ours = memory.doctrine_table()
        if args.json:
            print(json.dumps({"estimate_gb": ours, "doctrine_gb": memory.DOCTRINE_TABLE_8B}, indent=1))
            return 0
        _table(console, [(k, f"{v:.1f} GB", f"~{memory.DOCTRINE_TABLE_8B[k]:.0f} GB") for k, v in ours.items()],
               "8B model, default (gpu) assumptions")
        console.print(f"assumptions: {memory.GPU.describe()}", highlight=False)
        return 0
    est = _estimate(args, memory)
    budget = args.gpu_memory
    if args.json:
        out = est.to_dict()
        if budget is not None:
            out["fits"] = est.total_gb <= budget
        print(json.dumps(out, indent=1))
        return 0
    mode = f"LoRA r={est.lora_rank}" if est.lora_rank else "full fine-tuning"
    t = Table(title=f"{args.method} on {args.model} ({est.shape.n_params / 1e9:.3g}B params), {mode}, {args.device}",
              title_justify="left")
    t.add_column("part")
    t.add_column("GB", justify="right")
    for k, v in est.parts.items():
        t.add_row(k, f"{v / memory.GB:.2f}")
    t.add_row("total (peak)", f"{est.total_gb:.2f}", style="bold")
    console.print(t)
    console.print(f"the peak is set by the {est.phase} phase", highlight=False)
    for k, v in est.elsewhere.items():
        console.print(f"not counted (on another device): {k}, {v / memory.GB:.2f} GB", highlight=False)
    console.print(f"assumptions: {est.assumptions.describe()}", highlight=False)
    if not est.lora_rank and args.device == "gpu" and args.optimizer is None:
        std = memory.estimate(args.model, args.method, 0, "gpu", beta=args.beta,
                              **{**_overrides(args), "optimizer": "adamw", "master_weights": True, "fused_step": False})
        console.print(f"with standard mixed-precision AdamW instead (fp32 states + master weights, full gradient "
                      f"buffer): {std.total_gb:.1f} GB", highlight=False)
    if budget is not None:
        fits = est.total_gb <= budget
        console.print(f"{'fits' if fits else 'does NOT fit'} in {budget:g} GB", style="green" if fits else "red")
        return 0 if fits else 1
    return 0
