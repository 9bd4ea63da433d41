"""Our GRPO step vs TRL's GRPOTrainer step over a grid of the configurations users run.

A cell is (group size, LoRA placement, completion lengths, beta):
  group size   completions per prompt (--groups, default 4,8,16), --prompts prompts a step;
  LoRA         `attn` (q/k/v/o projections), `all` (every linear layer but the head), `full`
               (full fine-tuning), r16 alpha 32 on both sides;
  lengths      `forced` (min_new_tokens = max_new_tokens: equal work on both sides) or `natural`
               (each samples until EOS or --new-tokens at temperature 1; the tokens each side
               sampled are in the table, and the time per completion token beside the step time);
  beta         the KL coefficient (0: no reference pass on either side).
Same model, prompts, learning rate, one optimizer update per batch.

Time: each framework runs in its own worker process, as its users run it (ours sets up the process as
`train_grpo` does, `common.start`; TRL's keeps glibc's defaults), and the two alternate step by step
(a TRL step, then one of ours, the other process waiting), so machine noise hits both alike. The
median over the measured steps after warm-up is reported, with per-phase times: generation, the
log-prob passes before the update (ours: the reference; TRL's: reference and scoring) and the update.

Peak memory: each worker's peak RSS growth over its RSS once the trainer is built (the kernel's
VmHWM reset there), over warm-up and the measured steps, as run (each with its framework's
allocator settings), or the CUDA peak on a GPU. TRL is a benchmark-only dependency
(`pip install -e .[bench]`, `make bench`).

Results go to --out (JSON: the machine's CPU model and flags, torch and TRL versions, threads, date,
and one record per cell); a cell already in that file is skipped, so a long grid can be resumed.

usage: python bench/grpo_vs_trl.py [--groups 4,8,16] [--loras attn,all,full] [--lengths natural,forced]
           [--betas 0,0.04] [--prompts 2] [--new-tokens 64] [--steps 5] [--warmup 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peak_memory import peak_kb, reset_peak, rss_kb  # bench/peak_memory.py

QUESTIONS = [(23, 45), (61, 17), (38, 54), (72, 19), (15, 66), (49, 28), (83, 11), (26, 37)]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {"attn": ATTN, "all": "all-linear", "full": None}  # LoRA placement -> target modules
LR = 1e-5


def prompts(n: int) -> list[str]:
    return [f"What is {a} + {b}? Put the final answer after 'Answer:'." for a, b in (QUESTIONS * n)[:n]]


def trl_reward(prompts, completions, **_):
    from posttrain.rewards.math import extract_answer

    return [1.0 if extract_answer(c[-1]["content"] if isinstance(c, list) else c) else 0.0 for c in completions]


class Peak:
    """Peak RSS growth (MB) since construction, or the CUDA peak."""

    def __init__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.base, self.how = rss_kb(), reset_peak()

    def mb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        return (peak_kb(self.how) - self.base) / 1024


# ------------------------------------------------------------------------------------------ ours
def _adapter(cell: dict) -> dict:
    targets = TARGETS[cell["lora"]]
    return dict(lora=targets is not None, **({} if targets is None else dict(
        lora_rank=16, lora_alpha=32, lora_target=",".join(targets) if isinstance(targets, list) else targets)))


class Ours:
    """Our GRPO step, its stages called as `train_grpo`'s loop calls them."""

    def __init__(self, cell: dict, args):
        from posttrain.algorithms import common, grpo
        from posttrain.algorithms.optim import OptimizerStep, trainable_params
        from posttrain.algorithms.reference import Reference

        self.grpo = grpo
        self.cfg = self._config(grpo, cell, args)
        self._load(common)
        self.opt = common.build_optimizer(self.policy, self.cfg, self.cfg.lr)
        self.sched = common.build_scheduler(self.opt, self.cfg)
        self.ref = Reference(self.policy, self.cfg.lora) if self.cfg.beta > 0 else None  # as train_grpo
        self.rule = OptimizerStep(self.opt, [trainable_params(self.policy)], self.cfg.max_grad_norm, [self.policy])
        self._sampler(common)

    @staticmethod
    def _shape(cell: dict, args) -> dict:
        forced = args.new_tokens if cell["lengths"] == "forced" else 0
        return dict(data="unused", group_size=cell["group"], prompts_per_step=args.prompts, lr=LR, temperature=1.0,
                    max_new_tokens=args.new_tokens, min_new_tokens=forced, **_adapter(cell))

    def _config(self, grpo, cell: dict, args):
        return grpo.GRPOConfig(beta=cell["beta"], **self._shape(cell, args))

    def _load(self, common) -> None:
        """The policy, the rows and the reward."""
        from posttrain import rewards as rw

        common.start(self.cfg)  # as the trainers: seeds, and on CPU keeps freed memory for reuse
        self.policy, self.tok = common.load_policy(self.cfg)
        self.rows = [{"prompt": p} for p in prompts(64)]
        self.reward = rw.from_spec("format(pattern=.*Answer.*)")

    def _sampler(self, common) -> None:
        from posttrain.sampling.rollout_model import rollout_model

        self.rollout = rollout_model(self.policy, self.cfg.rollout_dtype)  # as the trainers sample
        self.stream = common.PromptStream(self.rows, 0)
        self.sampling = self.cfg.sampling()
        self.gen = torch.Generator().manual_seed(0)

    def _collect(self):
        from posttrain.algorithms.collect import collect

        self.policy.eval()
        return collect(self.policy, self.tok, self.stream, self.cfg.prompts_per_step, self.cfg.group_size,
                       self.sampling, self.reward, self.gen, rollout=self.rollout)[0]

    def _before_update(self, batch):
        return self.grpo.advantages(self.policy, self.ref, self.cfg, batch)

    def _update(self, batch, prepared) -> None:
        self.grpo.optimise(self.policy, self.rule, self.cfg, batch, prepared)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self._collect()
        t1 = time.perf_counter()
        prepared = self._before_update(batch)
        t2 = time.perf_counter()
        self._update(batch, prepared)
        self.sched.step()  # as the loop does once per step
        t3 = time.perf_counter()
        tokens = int(batch.rollouts.completion_mask_BC.sum())
        return {"step": t3 - t0, "gen": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2, "tokens": tokens}


class OursPPO(Ours):
    """Our PPO step on the same shape (`ppo_vs_grpo.py`): kl_coef = the cell's beta, `ppo_epochs` passes
    of one minibatch, the critic as `train_ppo` builds it (a LoRA adapter on the policy's base with
    LoRA, a second model with full fine-tuning). "logprobs" is `rollout_stats`: the old log-probs,
    the reference's and the critic's values."""

    def __init__(self, cell: dict, args):
        from posttrain.algorithms import common, ppo
        from posttrain.algorithms.optim import OptimizerStep
        from posttrain.algorithms.ppo_parts import build_optimizer, make_value_model, policy_params
        from posttrain.algorithms.reference import Reference

        self.ppo = ppo
        self.cfg = ppo.PPOConfig(kl_coef=cell["beta"], ppo_epochs=cell["ppo_epochs"], minibatches=1,
                                 **self._shape(cell, args))
        self._load(common)
        self.ref = Reference(self.policy, self.cfg.lora) if self.cfg.kl_coef > 0 else None
        self.critic = make_value_model(self.cfg, self.policy, self.cfg.seed)
        sets = (policy_params(self.policy), self.critic.parameters())
        self.opt = build_optimizer(*sets, self.cfg, LR, LR * ppo.VALUE_LR_MULTIPLIER)
        self.sched = common.build_scheduler(self.opt, self.cfg)
        separate = self.critic.model if self.critic.adapter is None else None
        self.rule = OptimizerStep(self.opt, sets, self.cfg.max_grad_norm, [self.policy, separate])
        self.mb_gen = torch.Generator().manual_seed(1)
        self._sampler(common)

    def _before_update(self, batch):
        return self.ppo.rollout_stats(self.policy, self.critic, self.ref, self.cfg, batch, self.cfg.kl_coef)

    def _update(self, batch, ro) -> None:
        self.ppo.update(self.policy, self.critic, self.rule, self.cfg, batch, ro, self.mb_gen)


OURS = {"ours": Ours, "ppo": OursPPO}  # worker name -> our trainer's step


# ------------------------------------------------------------------------------------------- TRL
def build_trl(cell: dict, args, max_steps: int, callbacks=()):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import ensure_embedded, load_model

    torch.manual_seed(0)
    model, tok = load_model()
    model.config._name_or_path = str(ensure_embedded())  # TRL loads its reference copy from this path
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts(64)]
    forced = {"min_new_tokens": args.new_tokens} if cell["lengths"] == "forced" else {}
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.prompts * cell["group"],
        num_generations=cell["group"], max_completion_length=args.new_tokens, generation_kwargs=forced,
        temperature=1.0, beta=cell["beta"], learning_rate=LR, max_steps=max_steps, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, gradient_accumulation_steps=1,
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    targets = TARGETS[cell["lora"]]
    peft_config = None if targets is None else LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                          task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=peft_config, callbacks=list(callbacks))
    return trainer, timed_phases(trainer)


def timed_phases(trainer) -> dict:
    """Time TRL's generation and its generate-and-score stage (the log-prob passes are the
    difference), and count the tokens the model sampled: its ``_generate`` returns (prompt_ids,
    completion_ids, tool_mask, ...); with tools, tool_mask marks the model's tokens among them."""
    phases = {"gen": 0.0, "gen_and_score": 0.0, "tokens": 0}

    def timed(name, fn, count=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                out = fn(*a, **k)
                if count:
                    phases["tokens"] += sum(map(sum, out[2])) if out[2] is not None else sum(map(len, out[1]))
                return out
            finally:
                phases[name] += time.perf_counter() - t
        return wrapper

    trainer._generate = timed("gen", trainer._generate, count=True)
    trainer._generate_and_score_completions = timed("gen_and_score", trainer._generate_and_score_completions)
    return phases


# ------------------------------------------------------------------------------------ the workers
MARK = "@@bench "  # prefix of the workers' protocol lines (TRL prints its logs to stdout too)


def _send(obj) -> None:
    print(MARK + json.dumps(obj), flush=True)


def worker(framework: str, cell: dict, args, ours_table: dict | None = None, build=None) -> None:
    """One framework in its own process: 'ready', then a step per line read from stdin, each
    reported with the peak memory growth so far. ``ours_table`` (name -> our step's class) and
    ``build`` (TRL's trainer and its phases) default to this bench's."""
    total = args.warmup + args.steps
    ours_table = OURS if ours_table is None else ours_table
    if framework in ours_table:
        ours = ours_table[framework](cell, args)
        peak = Peak()
        _send("ready")
        for _ in range(total):
            sys.stdin.readline()
            _send({**ours.step(), "peak_mb": peak.mb()})
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
            _send({"step": dt, "gen": gen, "logprobs": gs - gen, "update": dt - gs,
                   "tokens": phases["tokens"] - self.p0["tokens"], "peak_mb": peak.mb()})

    trainer, phases = (build or build_trl)(cell, args, total, callbacks=[Gate()])
    peak = Peak()
    _send("ready")
    trainer.train()


class Worker:
    def __init__(self, framework: str, cell: dict, args, started: list, script: str | None = None):
        cmd = [sys.executable, script or __file__, "--worker", framework, "--cell", json.dumps(cell),
               *_shape_args(args)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self.name = framework
        started.append(self)
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


def _shape_args(args) -> list[str]:
    return ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]


def measure(cell: dict, args, pair: tuple[str, str] = ("trl", "ours"), script: str | None = None) -> dict:
    """One cell: both workers (of ``script``, default this file) alternating step by step; medians
    after warm-up and the final peaks. The ratios are the second worker's over the first's."""
    workers = []
    try:
        for name in pair:
            Worker(name, cell, args, workers, script)
        rows = {name: [] for name in pair}
        for _ in range(args.warmup + args.steps):
            for w in workers:
                rows[w.name].append(w.step())
        for w in workers:
            w.close()
    finally:  # a worker that failed or was left behind must not run on ungated
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    out = {}
    for name, steps in rows.items():
        kept = steps[args.warmup:]
        out[name] = {k: statistics.median(r[k] for r in kept) for k in ("step", "gen", "logprobs", "update", "tokens")}
        out[name]["peak_mb"] = steps[-1]["peak_mb"]
    out["time_ratio"] = out[pair[1]]["step"] / out[pair[0]]["step"]
    out["memory_ratio"] = out[pair[1]]["peak_mb"] / out[pair[0]]["peak_mb"]
    return out


# ------------------------------------------------------------------------------------- the grid
def machine() -> dict:
    info = {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", "")
        info["cpu_flags"] = fields.get("flags", "").split()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def commit() -> str:
    """The posttrain commit measured (``+`` when the work tree had changes), or '' outside git."""
    here = Path(__file__).resolve().parent
    run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("rev-parse", "--short", "HEAD")
    return head + ("+" if head and run("status", "--porcelain", "--untracked-files=no", "--", "../src") else "")


def key(cell: dict) -> str:
    return f"g{cell['group']}-{cell['lora']}-{cell['lengths']}-b{cell['beta']}"


TARGETS_MET = {"time_ratio": 0.5, "memory_ratio": 0.7}  # the targets: at most these ratios


def _ratio(r: dict, key: str) -> str:
    """A ratio to two places, bold where it meets its target (compared unrounded)."""
    return f"**{r[key]:.2f}**" if r[key] <= TARGETS_MET[key] else f"{r[key]:.2f}"


def table(cells: list[dict]) -> str:
    head = ("| group | LoRA | lengths | beta | TRL s/step (gen/logp/upd) | ours s/step (gen/logp/upd) | tokens TRL/ours "
            "| time ratio | peak MB TRL/ours | memory ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in cells:
        c, t, o = r["cell"], r["trl"], r["ours"]
        phases = lambda x: f"{x['step']:.1f} ({x['gen']:.1f}/{x['logprobs']:.1f}/{x['update']:.1f})"
        lines.append(f"| {c['group']} | {c['lora']} | {c['lengths']} | {c['beta']} | {phases(t)} | {phases(o)} "
                     f"| {t['tokens']:.0f}/{o['tokens']:.0f} | {_ratio(r, 'time_ratio')} "
                     f"| {t['peak_mb']:.0f}/{o['peak_mb']:.0f} | {_ratio(r, 'memory_ratio')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", default="4,8,16")
    p.add_argument("--loras", default="attn,all,full")
    p.add_argument("--lengths", default="natural,forced")
    p.add_argument("--betas", default="0,0.04")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench/results/grpo_grid.json")
    p.add_argument("--worker", choices=[*OURS, "trl"])
    p.add_argument("--cell")
    p.add_argument("--remeasure", action="store_true", help="measure the chosen cells again, replacing their results")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.worker:
        worker(args.worker, json.loads(args.cell), args)
        return
    grid = [{"group": int(g), "lora": lo, "lengths": ln, "beta": float(b)} for g, lo, ln, b in itertools.product(
        args.groups.split(","), args.loras.split(","), args.lengths.split(","), args.betas.split(","))]
    print(f"GRPO step, {args.prompts} prompts x group x up to {args.new_tokens} tokens, torch threads "
          f"{torch.get_num_threads()}, {len(grid)} cells")
    saved = run_cells(grid, args, key, lambda cell: measure(cell, args), table)
    print(f"\n{saved['machine'].get('cpu', '')}; targets (bold where met): time ratio <= "
          f"{TARGETS_MET['time_ratio']}, memory ratio <= {TARGETS_MET['memory_ratio']}")
    wanted = {key(c) for c in grid}
    print(table([r for r in saved["cells"] if key(r["cell"]) in wanted]))


def run_cells(grid: list[dict], args, key_of, measure_one, table_of) -> dict:
    """Measure the cells of ``grid`` missing from ``args.out`` (all of them with ``args.remeasure``),
    saving the file atomically after each, and return its contents. Exits when the file holds
    cells of another machine or setup."""
    out = Path(args.out)
    here = machine()
    saved = json.loads(out.read_text()) if out.exists() else {"machine": here, "cells": []}
    if any(saved["machine"].get(k) != here.get(k) for k in ("cpu", "cpu_flags", "torch", "trl", "threads")):
        sys.exit(f"{out} holds cells measured on another machine or setup ({saved['machine'].get('cpu')}, torch "
                 f"{saved['machine'].get('torch')}): give another --out")
    done = set() if args.remeasure else {key_of(r["cell"]) for r in saved["cells"]}
    for cell in grid:
        if key_of(cell) in done:
            continue
        res = {"cell": cell, "prompts": args.prompts, "new_tokens": args.new_tokens, "steps": args.steps,
               "date": datetime.date.today().isoformat(), "commit": commit(), **measure_one(cell)}
        saved["cells"] = [r for r in saved["cells"] if key_of(r["cell"]) != key_of(cell)] + [res]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, out)
        print(table_of([res]).splitlines()[-1], flush=True)
    return saved


if __name__ == "__main__":
    main()
