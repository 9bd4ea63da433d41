"""Benchmark: our DPO step vs TRL's DPOTrainer step, same model, data, batch size and max length.

    python bench/dpo_vs_trl.py                      # LoRA r32 and full fine-tuning, 5 timed steps each
    python bench/dpo_vs_trl.py --modes lora --steps 8 --rounds 2 --data pairs.jsonl

Both sides train SmolLM2-135M-Instruct (the embedded model, float32, CPU) on the same
conversational preference pairs (``--data``, or 96 synthetic two-digit-addition pairs whose
completions vary in length as sampled ones do), batch 8, ``--max-length``, beta 0.1, sigmoid
loss, AdamW; LoRA r=32 alpha=32 on all linear layers or full fine-tuning. Both in float32 (TRL would
default to bf16 autocast) and, by default, both with activation checkpointing of every decoder
layer (TRL's default; ``--no-checkpointing`` turns it off on both sides). TRL runs with its
defaults otherwise: the reference forward is part of each step (with LoRA the adapter is
disabled for it; with full fine-tuning TRL keeps a reference copy). Ours precomputes the
reference log-probs once before training; that one-off cost is reported too, amortised per step
of one epoch.

Each (implementation, mode) runs in its own child process; children alternate ours/TRL, round
after round, so drifting load on a shared machine hits both alike. Step time: the median of the
timed steps after ``--warmup`` steps, over all rounds (wall clock; process CPU time alongside,
less sensitive to other load). Memory: after the model is loaded the kernel's peak-RSS counter
is reset (``/proc/self/clear_refs``; else the growth of ``ru_maxrss`` is used, and said), and
"peak" = peak RSS at the end minus RSS at that point: everything the trainer adds (optimizer
state, reference copy, activations). glibc is told to return freed blocks >= 128 KiB at once, so
RSS follows live memory.
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


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs on two-digit addition: a short right answer vs a wrong one of varied length."""
    from posttrain.data.tasks import get_task

    rng = random.Random(seed)
    filler = ("so we add the tens and then the ones and carry when needed which gives us a total that we "
              "then double check by counting up from the larger number").split()
    out = []
    for row in get_task("arithmetic", "train", n=n, seed=seed):
        ans = int(row["answer"])
        talk = " ".join(rng.choice(filler) for _ in range(rng.randint(3, 40)))
        out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": f"{row['prompt'][8:15]} = {ans}. Answer: {ans}"}],
                    "rejected": [{"role": "assistant", "content": f"First, {talk}. Answer: {ans + rng.randint(1, 9)}"}]})
    return out


def _as_conversational(row: dict) -> dict:
    from posttrain.data import is_conversational

    p = row["prompt"] if is_conversational(row["prompt"]) else [{"role": "user", "content": row["prompt"]}]
    c, r = ([{"role": "assistant", "content": x}] if isinstance(x, str) else x for x in (row["chosen"], row["rejected"]))
    return {"prompt": p, "chosen": c, "rejected": r}


# ----------------------------------------------------------------------------------- children


def child_ours(spec: dict) -> dict:
    import posttrain.algorithms.dpo as dpo

    out = tempfile.mkdtemp(prefix="bench-dpo-")
    cfg = dpo.DPOConfig(data=spec["data"], lora=spec["mode"] == "lora", lora_rank=32, lora_alpha=32.0, lr=1e-5,
                        batch_size=BATCH, max_length=spec["max_length"], max_prompt_length=spec["max_length"] // 2,
                        max_steps=spec["warmup"] + spec["steps"], eval_fraction=0.0, eval_at_start=False,
                        checkpoint_every=10_000, output_dir=out, name="b", log_every=10_000, device="cpu",
                        activation_checkpointing=1 if spec["checkpointing"] else 0,
                        loss_type=spec.get("loss_type", "sigmoid"))  # bench/preference_memory.py: other losses
    with measure_ours(dpo, dpo) as state:
        res = dpo.train_dpo(cfg)
    peak = peak_kb(state["method"])
    data = json.loads((res.run_dir / "data.json").read_text())
    w = spec["warmup"]
    return {"times": [m["time/step"] for m in res.history][w:], "cpu": state["cpu"][w:],
            "peak_mb": (peak - state["base"]) / 1024, "method": state["method"],
            "reference_s": data["reference_seconds"], "pairs": data["train_pairs"]}


def child_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_model

    model, tok = load_model()
    touch(model)
    base, method = status_kb("VmRSS"), reset_peak()
    rows = [json.loads(line) for line in open(spec["data"])]
    ds = Dataset.from_list([_as_conversational(r) for r in rows])
    peft_config = ref_model = None
    if spec["mode"] == "full":  # what TRL would load itself from the model's path (here a local cache copy)
        ref_model, _ = load_model()
    else:
        from peft import LoraConfig

        peft_config = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times: list[float] = []
    cpu: list[float] = []
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=BATCH,
                     max_length=spec["max_length"], learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"],
                     max_steps=spec["warmup"] + spec["steps"], logging_steps=10_000, save_strategy="no",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=False,
                     gradient_checkpointing=spec["checkpointing"])
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config,
                         callbacks=[trl_timer(times, cpu)])
    trainer.train()
    peak = peak_kb(method)
    w = spec["warmup"]
    return {"times": times[w:], "cpu": cpu[w:], "peak_mb": (peak - base) / 1024, "method": method}


# ----------------------------------------------------------------------------------- parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help="preference .jsonl (default: synthetic arithmetic pairs)")
    ap.add_argument("--pairs", type=int, default=96, help="synthetic pairs (default 96)")
    ap.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per child (default 5)")
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
        print(json.dumps((child_ours if spec["impl"] == "ours" else child_trl)(spec)))
        return

    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="bench-dpo-data-"), "pairs.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic_pairs(args.pairs))
    print(f"data: {data}; batch {BATCH}, max_length {args.max_length}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per child, {args.rounds} round(s), {args.threads} threads, float32, activation checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            for impl in ("ours", "trl"):
                spec = {"impl": impl, "mode": mode, "data": data, "steps": args.steps, "warmup": args.warmup,
                        "max_length": args.max_length, "threads": args.threads,
                        "checkpointing": not args.no_checkpointing}
                r = run_child(__file__, spec)
                results.setdefault((impl, mode), []).append(r)
                print(f"  round {rnd + 1} {impl:4s} {mode:4s}: steps {', '.join(f'{t:.2f}' for t in r['times'])} s "
                      f"(CPU {', '.join(f'{t:.2f}' for t in r['cpu'])} s); "
                      f"peak +{r['peak_mb']:.0f} MB ({r['method']})", flush=True)
    print(f"\n{'mode':5s} {'ours s/step':>11s} {'TRL s/step':>10s} {'ratio':>6s} {'CPU ratio':>9s} {'ours MB':>8s} "
          f"{'TRL MB':>7s} {'mem ratio':>9s}  ours + reference amortised over one epoch")
    for mode in args.modes.split(","):
        ours, trl = results[("ours", mode)], results[("trl", mode)]
        t_o = statistics.median(t for r in ours for t in r["times"])
        t_t = statistics.median(t for r in trl for t in r["times"])
        c_o = statistics.median(t for r in ours for t in r["cpu"])
        c_t = statistics.median(t for r in trl for t in r["cpu"])
        m_o, m_t = max(r["peak_mb"] for r in ours), max(r["peak_mb"] for r in trl)
        ref = statistics.median(r["reference_s"] for r in ours) / max(1.0, ours[0]["pairs"] / BATCH)
        print(f"{mode:5s} {t_o:11.2f} {t_t:10.2f} {t_o / t_t:6.2f} {c_o / c_t:9.2f} {m_o:8.0f} {m_t:7.0f} "
              f"{m_o / m_t:9.2f}  {t_o + ref:.2f} s/step (ratio {(t_o + ref) / t_t:.2f})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
