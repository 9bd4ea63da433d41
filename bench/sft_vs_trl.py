"""Benchmark: our SFT step vs TRL's SFTTrainer step, same model, data, batch size and max length.

    python bench/sft_vs_trl.py                       # LoRA r64 and full fine-tuning, 8 timed steps each
    python bench/sft_vs_trl.py --modes lora --steps 8 --rounds 2 --data sft.jsonl

Both sides train SmolLM2-135M-Instruct (the embedded model, float32, CPU) on the same
conversational prompt-completion rows (``--data``, or 96 synthetic two-digit additions whose
worked answers vary in length from ~15 to ~130 tokens, as real SFT data does), batch 8,
``--max-length``, loss on the completion only (TRL's default for prompt-completion data), AdamW
at lr 2e-5; LoRA r=64 (the doctrine's SFT rank) alpha=32 on all linear layers, or full
fine-tuning. Both in float32 and, by default, with activation checkpointing of every decoder
layer (TRL's SFTConfig default; ``--no-checkpointing`` turns it off on both sides). TRL runs
otherwise with its defaults: padded batches (``packing=False``, ``padding_free=False``) and the
full [B, T, V] logits (it also computes ``mean_token_accuracy`` from them). Ours runs with its
defaults: padding-free packing and the chunked output head at completion tokens only.
``ours-padded`` is ours with ``packing=False``: the padding-free vs padded comparison (tokens/s
counts the real, non-pad tokens of a step, the same for all three).

Each (implementation, mode) runs in child processes of its own, alternating, round after round:
one for time, with glibc's default allocator (what a user runs), one for memory, with
``MALLOC_MMAP_THRESHOLD_`` so RSS follows live memory (``children.run_child``); memory is the peak
RSS growth after the model has loaded (``peak_memory.py``). The synthetic data is exactly the
steps run (``--warmup`` + ``--steps`` batches of 8), so every side trains on every row once, in its
own shuffled order; the time compared is the sum over the timed steps (batches differ in length,
and a median of a few steps compares different batches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile

from children import measure_ours, run_child, touch, trl_timer  # bench/children.py
from peak_memory import peak_kb, reset_peak, status_kb  # bench/peak_memory.py

BATCH = 8
IMPLS = ("ours", "ours-padded", "trl")


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversational prompt-completion rows on two-digit addition, worked answers of varied length."""
    from posttrain.data.tasks import get_task

    rng = random.Random(seed)
    steps = ("add the tens", "add the ones", "carry the one", "check by counting up", "write the sum",
             "compare with an estimate", "subtract back to verify")
    out = []
    for row in get_task("arithmetic", "train", n=n, seed=seed):
        ans = row["answer"]
        work = ", then ".join(rng.choice(steps) for _ in range(rng.choice((0, 1, 2, 4, 8, 16))))
        text = (f"First {work}. " if work else "") + f"Answer: {ans}"
        out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                    "completion": [{"role": "assistant", "content": text}]})
    return out


# ----------------------------------------------------------------------------------- children


def child_ours(spec: dict) -> dict:
    import posttrain.algorithms.offline as offline
    import posttrain.algorithms.sft as sft

    out = tempfile.mkdtemp(prefix="bench-sft-")
    lora = {"lora": True, "lora_rank": 64, "lora_alpha": 32.0} if spec["mode"] == "lora" else {"lora": False}
    cfg = sft.SFTConfig(data=spec["data"], **lora, lr=2e-5,
                        batch_size=BATCH, max_length=spec["max_length"], max_steps=spec["warmup"] + spec["steps"],
                        eval_fraction=0.0, eval_at_start=False, checkpoint_every=10_000, output_dir=out, name="b",
                        log_every=10_000, device="cpu", packing=spec["impl"] == "ours",
                        activation_checkpointing=1 if spec["checkpointing"] else 0)
    with measure_ours(sft, offline) as state:
        res = sft.train_sft(cfg)
    peak = peak_kb(state["method"])
    w = spec["warmup"]
    return {"times": [m["time/step"] for m in res.history][w:], "cpu": state["cpu"][w:],
            "tokens": [m["tokens"] for m in res.history][w:], "peak_mb": (peak - state["base"]) / 1024,
            "method": state["method"]}


def child_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from posttrain.models import load_model

    model, tok = load_model()
    touch(model)
    base, method = status_kb("VmRSS"), reset_peak()
    rows = [json.loads(line) for line in open(spec["data"])]
    peft_config = None
    if spec["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=64, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times: list[float] = []
    cpu: list[float] = []
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=BATCH,
                     max_length=spec["max_length"], learning_rate=2e-5, max_steps=spec["warmup"] + spec["steps"],
                     logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     bf16=False, gradient_checkpointing=spec["checkpointing"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config, callbacks=[trl_timer(times, cpu)])
    trainer.train()
    peak = peak_kb(method)
    w = spec["warmup"]
    return {"times": times[w:], "cpu": cpu[w:], "peak_mb": (peak - base) / 1024, "method": method}


# ----------------------------------------------------------------------------------- parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help="SFT .jsonl, conversational prompt-completion (default: synthetic arithmetic)")
    ap.add_argument("--rows", type=int, default=0, help="synthetic rows (default: 8 per step run)")
    ap.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per child (default 8)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="children per (implementation, mode), alternated")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="both sides without activation checkpointing (default: with, TRL's default)")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        import torch

        torch.set_num_threads(spec["threads"])
        print(json.dumps((child_trl if spec["impl"] == "trl" else child_ours)(spec)))
        return

    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="bench-sft-data-"), "sft.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic_rows(args.rows or BATCH * (args.warmup + args.steps)))
    impls = args.impls.split(",")
    print(f"data: {data}; batch {BATCH}, max_length {args.max_length}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per child, {args.rounds} round(s), {args.threads} threads, float32, activation checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            for impl in impls:
                spec = {"impl": impl, "mode": mode, "data": data, "steps": args.steps, "warmup": args.warmup,
                        "max_length": args.max_length, "threads": args.threads,
                        "checkpointing": not args.no_checkpointing}
                r = run_child(__file__, {**spec, "measure": "time"})
                r["peak_mb"], r["method"] = (m := run_child(__file__, {**spec, "measure": "memory"}))["peak_mb"], m["method"]
                results.setdefault((impl, mode), []).append(r)
                print(f"  round {rnd + 1} {impl:11s} {mode:4s}: steps {', '.join(f'{t:.2f}' for t in r['times'])} s; "
                      f"peak +{r['peak_mb']:.0f} MB ({r['method']})", flush=True)
    print(f"\n{'mode':5s} {'impl':11s} {'s/step':>7s} {'CPU s':>6s} {'tokens/s':>8s} {'peak MB':>8s} "
          f"{'time vs TRL':>11s} {'mem vs TRL':>10s}")
    for mode in args.modes.split(","):  # s/step: the timed steps' total over their number, averaged over rounds
        mean_s = {impl: statistics.mean(t for r in results[(impl, mode)] for t in r["times"]) for impl in impls}
        cpu = {impl: statistics.mean(t for r in results[(impl, mode)] for t in r["cpu"]) for impl in impls}
        mem = {impl: max(r["peak_mb"] for r in results[(impl, mode)]) for impl in impls}
        ours_tokens = [t for r in results.get(("ours", mode), []) for t in r.get("tokens", [])]
        for impl in impls:
            # real tokens per step: ours-padded feeds the same batches as ours; TRL its own shuffle of the rows
            tps = statistics.mean(ours_tokens) / mean_s[impl] if ours_tokens else float("nan")
            vs = (f"{mean_s[impl] / mean_s['trl']:11.2f} {mem[impl] / mem['trl']:10.2f}" if "trl" in mean_s and impl != "trl"
                  else f"{'':11s} {'':10s}")
            print(f"{mode:5s} {impl:11s} {mean_s[impl]:7.2f} {cpu[impl]:6.2f} {tps:8.0f} {mem[impl]:8.0f} {vs}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
