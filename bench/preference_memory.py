"""Benchmark: peak memory (and step time) of SimPO, ORPO and KTO against DPO, ours and TRL's, on the
same pairs, model, batch size and max length.

    python bench/preference_memory.py                    # LoRA r32 and full fine-tuning, 3 timed steps each
    python bench/preference_memory.py --modes full --ours sigmoid,simpo --trl dpo,simpo

A sibling of ``bench/dpo_vs_trl.py``, with its measurement: each (implementation, loss, mode) in its
own child process, the model loaded and paged in, the kernel's peak-RSS counter reset, "peak" =
peak RSS at the end minus RSS at that point (everything the trainer adds: optimizer state, a
reference copy, activations, the reference pass). Ours: ``posttrain train dpo --loss-type
sigmoid|simpo|orpo|kto`` (DPO and KTO precompute their reference log-probs before the first step
from the policy itself, no copy; simpo and orpo have no reference at all). TRL 1.16: DPOTrainer
(its reference forward inside each step: with full fine-tuning a reference copy of the model),
CPOTrainer ``loss_type="simpo"`` with ``cpo_alpha=0`` (SimPO), ORPOTrainer, KTOTrainer (reference
copy with full fine-tuning; its KL completions forwarded each step), the last three with
defaults otherwise, in float32, activation checkpointing on both sides (TRL's default).
Batch: 8 pairs; KTO gets the same pairs split into desirable and undesirable examples, 8 examples
a step (each forwarded with its KL completion, so about the same tokens per step as 8 pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import dpo_vs_trl as base  # bench/dpo_vs_trl.py: synthetic pairs, our child, TRL's DPO child
from children import run_child, touch, trl_timer  # bench/children.py
from peak_memory import peak_kb, reset_peak, status_kb

TRL_LOSSES = ("dpo", "simpo", "orpo", "kto")


def child_trl_other(spec: dict) -> dict:
    """TRL's CPO (SimPO), ORPO or KTO trainer: the same model, data and settings as its DPO child."""
    from datasets import Dataset

    from posttrain.models import load_model

    model, tok = load_model()
    touch(model)
    rss0, method = status_kb("VmRSS"), reset_peak()
    rows = [base._as_conversational(json.loads(line)) for line in open(spec["data"])]
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=base.BATCH,
                  max_length=spec["max_length"], learning_rate=1e-5, max_steps=spec["warmup"] + spec["steps"],
                  logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                  disable_tqdm=True, seed=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  bf16=False, gradient_checkpointing=spec["checkpointing"])
    extra = {}
    if spec["loss"] == "simpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer

        args = Config(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)
    elif spec["loss"] == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer

        args = Config(beta=0.1, **common)
    else:  # kto: the pairs split into desirable and undesirable examples
        from trl import KTOConfig as Config, KTOTrainer as Trainer

        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
        args = Config(beta=0.1, **common)
        if spec["mode"] == "full":
            extra["ref_model"], _ = load_model()
    peft_config = None
    if spec["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times: list[float] = []
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=peft_config, callbacks=[trl_timer(times, [])], **extra)
    trainer.train()
    peak = peak_kb(method)
    return {"times": times[spec["warmup"]:], "peak_mb": (peak - rss0) / 1024, "method": method}


def child(spec: dict) -> dict:
    if spec["impl"] == "ours":
        return base.child_ours(spec)
    return base.child_trl(spec) if spec["loss"] == "dpo" else child_trl_other(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help="preference .jsonl (default: synthetic arithmetic pairs)")
    ap.add_argument("--pairs", type=int, default=64, help="synthetic pairs (default 64)")
    ap.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--ours", default="sigmoid,simpo,orpo,kto", help="our loss types (default: all four)")
    ap.add_argument("--trl", default=",".join(TRL_LOSSES), help="TRL trainers: dpo, simpo, orpo, kto ('' for none)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child (default 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        import torch

        torch.set_num_threads(spec["threads"])
        print(json.dumps(child(spec)))
        return
    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="bench-pref-data-"), "pairs.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in base.synthetic_pairs(args.pairs))
    print(f"data: {data}; batch {base.BATCH}, max_length {args.max_length}, {args.warmup} warm-up + {args.steps} "
          f"timed steps per child, {args.threads} threads, float32, activation checkpointing on; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for mode in args.modes.split(","):
        runs = [("ours", loss) for loss in args.ours.split(",") if loss] + \
               [("trl", loss) for loss in args.trl.split(",") if loss]
        for impl, loss in runs:
            spec = {"impl": impl, "mode": mode, "data": data, "steps": args.steps, "warmup": args.warmup,
                    "max_length": args.max_length, "threads": args.threads, "checkpointing": True,
                    "loss": loss, "loss_type": loss}
            r = run_child(__file__, spec, keep_errors=True)
            name = f"{impl} {'dpo' if loss == 'sigmoid' else loss}"
            if "error" in r:
                print(f"  {mode:4s} {name:10s}: failed: {r['error']}", flush=True)
                continue
            t = statistics.median(r["times"])
            rows.append((mode, name, r["peak_mb"], t))
            print(f"  {mode:4s} {name:10s}: peak +{r['peak_mb']:.0f} MB ({r['method']}), {t:.2f} s/step", flush=True)
    print(f"\n{'mode':5s} {'trainer':11s} {'peak MB':>8s} {'vs ours dpo':>11s} {'vs TRL dpo':>10s} {'s/step':>7s}")
    for mode, name, mb, t in rows:
        ref = {n: m for md, n, m, _ in rows if md == mode}
        vs = lambda key: f"{mb / ref[key]:.2f}" if key in ref else "-"  # noqa: E731
        print(f"{mode:5s} {name:11s} {mb:8.0f} {vs('ours dpo'):>11s} {vs('trl dpo'):>10s} {t:7.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
