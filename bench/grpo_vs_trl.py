"""Our GRPO step vs TRL's GRPOTrainer step: same model, prompts, group size, completion length
(forced equal with min_new_tokens = max_new_tokens), beta, and LoRA/full setting.

Time: each framework runs in its own worker process, as its users run it (ours sets up the process
as `train_grpo` does, `common.start`: on CPU that keeps freed memory for reuse, see
`posttrain.runtime.cpu_allocator`; TRL's keeps glibc's defaults), and the two alternate step by step (a
TRL step, then one of ours, the other process waiting), so machine noise hits both alike. The
median over the measured steps after warm-up is reported, with per-phase times.

Peak memory: each framework runs warm-up + 3 steps in its own child process, which reports its
peak RSS growth over the RSS once the trainer is built (the peak counter VmHWM reset there), or
the CUDA peak (GPU). Two readings on CPU: "live", with glibc told to return freed blocks at once so
RSS follows live memory (what a GPU's max_memory_allocated reports), and "as run", each process
with the allocator settings its framework runs with (ours then keeps its peak resident).
TRL is a benchmark-only dependency (`pip install -e .[bench]`).

usage: python bench/grpo_vs_trl.py [--modes lora,full] [--steps 5] [--warmup 1] [--prompts 2]
                                   [--group-size 8] [--new-tokens 64] [--beta 0.04]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from peak_memory import peak_kb, reset_peak, rss_kb  # bench/peak_memory.py

QUESTIONS = [(23, 45), (61, 17), (38, 54), (72, 19), (15, 66), (49, 28), (83, 11), (26, 37)]


def prompts(n: int) -> list[str]:
    return [f"What is {a} + {b}? Put the final answer after 'Answer:'." for a, b in (QUESTIONS * n)[:n]]


def trl_reward(prompts, completions, **_):
    from posttrain.rewards.math import extract_answer

    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(1.0 if extract_answer(text) else 0.0)
    return out


def current_rss_mb() -> float:
    return rss_kb() / 1024


# ------------------------------------------------------------------------------------------ ours
class Ours:
    def __init__(self, args, lora: bool):
        from posttrain import rewards as rw
        from posttrain.algorithms import common, grpo
        from posttrain.sampling.generation import SamplingConfig
        from posttrain.sampling.rollout_model import rollout_model

        self.grpo, self.common = grpo, common
        self.cfg = grpo.GRPOConfig(
            data="unused", group_size=args.group_size, prompts_per_step=args.prompts, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, beta=args.beta, lora=lora, lora_rank=16, lr=1e-5, temperature=1.0)
        common.start(self.cfg)  # as train_grpo: seeds, and on CPU keeps freed memory for reuse
        self.policy, self.tok = common.load_policy(self.cfg)
        self.opt = common.build_optimizer(self.policy, self.cfg, self.cfg.lr)
        self.sched = common.build_scheduler(self.opt, self.cfg)
        from posttrain.algorithms.optim import OptimizerStep, trainable_params
        from posttrain.algorithms.reference import Reference

        self.ref = Reference(self.policy, self.cfg.lora) if self.cfg.beta > 0 else None  # as train_grpo
        self.rule = OptimizerStep(self.opt, [trainable_params(self.policy)], self.cfg.max_grad_norm, [self.policy])
        self.rollout = rollout_model(self.policy, self.cfg.rollout_dtype)  # as train_grpo samples
        self.stream = common.PromptStream([{"prompt": p} for p in prompts(64)], 0)
        self.sampling = SamplingConfig(1.0, 1.0, 0, args.new_tokens, args.new_tokens)
        self.reward = rw.from_spec("format(pattern=.*Answer.*)")
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> dict[str, float]:
        from posttrain.algorithms.collect import collect

        t0 = time.perf_counter()
        self.policy.eval()
        batch, m = collect(self.policy, self.tok, self.stream, self.cfg.prompts_per_step, self.cfg.group_size,
                           self.sampling, self.reward, self.gen, rollout=self.rollout)
        t1 = time.perf_counter()
        self.grpo.update(self.policy, self.rule, self.cfg, batch, self.ref)
        self.sched.step()  # as the loop does once per step
        t2 = time.perf_counter()
        assert int(batch.rollouts.completion_mask_BC.sum()) == self.cfg.prompts_per_step * self.cfg.group_size * self.cfg.max_new_tokens
        return {"step": t2 - t0, "gen": m["time/gen"], "update": t2 - t1}


# ------------------------------------------------------------------------------------------- TRL
def build_trl(args, lora: bool, max_steps: int, callbacks=()):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import load_model

    from posttrain.models import ensure_embedded

    torch.manual_seed(0)
    model, tok = load_model()
    model.config._name_or_path = str(ensure_embedded())  # TRL loads its reference copy from this path
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts(64)]
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, beta=args.beta,
        learning_rate=1e-5, max_steps=max_steps, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_accumulation_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=peft_config, callbacks=list(callbacks))
    phases = {"gen": 0.0, "gen_and_score": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - t
        return wrapper

    trainer._generate = timed("gen", trainer._generate)
    trainer._generate_and_score_completions = timed("gen_and_score", trainer._generate_and_score_completions)
    return trainer, phases


MARK = "@@bench "  # prefix of the workers' protocol lines (TRL prints its logs to stdout too)


def _send(obj) -> None:
    print(MARK + json.dumps(obj), flush=True)


def worker(framework: str, lora: bool, args) -> None:
    """One framework in its own process: 'ready', then a step per line read from stdin."""
    total = args.warmup + args.steps
    if framework == "ours":
        ours = Ours(args, lora)
        _send("ready")
        for _ in range(total):
            sys.stdin.readline()
            _send(ours.step())
        return
    from transformers import TrainerCallback

    class Gate(TrainerCallback):  # each TRL step waits for the parent's go
        def on_step_begin(self, a, state, control, **kw):
            sys.stdin.readline()
            self.t0, self.p0 = time.perf_counter(), dict(phases)

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            gen = phases["gen"] - self.p0["gen"]
            gs = phases["gen_and_score"] - self.p0["gen_and_score"]
            _send({"step": dt, "gen": gen, "logprob_passes": gs - gen, "update": dt - gs})

    trainer, phases = build_trl(args, lora, total, callbacks=[Gate()])
    _send("ready")
    trainer.train()


class Worker:
    def __init__(self, framework: str, mode: str, args):
        cmd = [sys.executable, __file__, "--worker", framework, *_shape_args(mode, args)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self.name = framework
        self.read()  # "ready"

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.seek(0)
        raise RuntimeError(f"{self.name} worker ended early:\n{self.log.read()[-3000:]}")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=600)


def interleaved(args, lora: bool) -> dict:
    mode = "lora" if lora else "full"
    trl = Worker("trl", mode, args)
    ours = Worker("ours", mode, args)
    trl_times, our_times = [], []
    for _ in range(args.warmup + args.steps):
        trl_times.append(trl.step())
        our_times.append(ours.step())
    trl.close()
    ours.close()
    trl_m, our_m = trl_times[args.warmup:], our_times[args.warmup:]
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    return {
        "trl": {k: med(trl_m, k) for k in trl_m[0]},
        "ours": {k: med(our_m, k) for k in our_m[0]},
        "ratio": med(our_m, "step") / med(trl_m, "step"),
        "steps": len(our_m),
    }


def _shape_args(mode: str, args) -> list[str]:
    return ["--modes", mode, "--prompts", str(args.prompts), "--group-size", str(args.group_size),
            "--new-tokens", str(args.new_tokens), "--beta", str(args.beta), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]


def child_memory(framework: str, mode: str, args, live: bool) -> float:
    cmd = [sys.executable, __file__, "--child", framework, *_shape_args(mode, args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if live:  # glibc returns freed blocks >= 128 KiB at once, so RSS follows live memory (as in bench/dpo_vs_trl.py)
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def run_child(framework: str, lora: bool, args) -> None:
    from posttrain.models import load_model

    load_model()  # warm the model cache into the baseline
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if framework == "ours":
        ours = Ours(args, lora)
        base, how = current_rss_mb(), reset_peak()
        for _ in range(4):
            ours.step()
    else:
        trainer, _ = build_trl(args, lora, 4)
        base, how = current_rss_mb(), reset_peak()
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_kb(how) / 1024 - base
    print(json.dumps({"peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--child", choices=["ours", "trl"])
    p.add_argument("--worker", choices=["ours", "trl"])
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child:
        run_child(args.child, args.modes == "lora", args)
        return
    if args.worker:
        worker(args.worker, args.modes == "lora", args)
        return
    print(f"GRPO step, {args.prompts} prompts x {args.group_size} completions x {args.new_tokens} tokens (forced), "
          f"beta {args.beta}, torch threads {torch.get_num_threads()}")
    for mode in args.modes.split(","):
        res = interleaved(args, mode == "lora")
        o, t = res["ours"], res["trl"]
        print(f"\n[{mode}] median over {res['steps']} steps after {args.warmup} warm-up")
        print(f"  TRL : step {t['step']:.2f}s  gen {t['gen']:.2f}s  logprob passes {t['logprob_passes']:.2f}s  update {t['update']:.2f}s")
        print(f"  ours: step {o['step']:.2f}s  gen {o['gen']:.2f}s  update (ref pass + fwd/bwd) {o['update']:.2f}s")
        print(f"  step time ratio ours/TRL: {res['ratio']:.2f}  (target <= 0.5)")
        if args.no_memory:
            continue
        readings = ["live", "as run"] if not torch.cuda.is_available() else ["live"]
        for reading in readings:
            mo, mt = (child_memory(f, mode, args, reading == "live") for f in ("ours", "trl"))
            print(f"  peak memory growth ({reading}): ours {mo:.0f} MB, TRL {mt:.0f} MB, ratio {mo / mt:.2f}  (target <= 0.8)")


if __name__ == "__main__":
    main()
