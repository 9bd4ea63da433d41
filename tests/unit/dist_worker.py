"""Runs one trainer in each process of a multi-process launch, for tests/unit/test_distributed.py.

usage: torchrun --nproc_per_node N dist_worker.py SPEC.json
       accelerate launch --multi_gpu --num_processes N dist_worker.py SPEC.json

SPEC: {"method": "grpo" | "dpo" | "rm" | "ppo", "config": {field: value}, "kill_after_checkpoint": step or null,
       "resume_copy": step or null, "inf_reward_on_rank": rank or null}

With ``inf_reward_on_rank`` the reward ``inf_on_rank`` is registered: +inf on that rank, 1 elsewhere.

Each rank saves its trainable tensors to <run dir>/weights-rank<R>.pt when the run finishes (so a
test can check the ranks hold identical weights; FSDP-sharded ones as the rank's local shard, with
their sizes in shards-rank<R>.json; info-rank<R>.json names the modules with activation
checkpointing on, and whether DDP reduced the model's gradients). The reward-model and PPO trainers keep more trained tensors
beside the model (a head, a value adapter or model) in the ``TrainState`` they checkpoint: those
are saved too, as ``<part>.<name>`` (``head.linear.weight``, ``value.weights.<param>``, ...).

With ``resume_copy`` the finished run's directory is copied to ``<name>-resumed`` without what
came after that step's checkpoint, and the same processes resume it to the end (a resume test
without paying for a second launch; a resume in new processes is the SIGKILL test's). With ``kill_after_checkpoint`` every rank
SIGKILLs itself right after that step's checkpoint is complete: a crash, not a clean stop.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from posttrain.runtime import distributed
from posttrain.algorithms import run as runmod
from posttrain.commands.train import resolve


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    cls, train = resolve(spec["method"])
    kill_at = spec.get("kill_after_checkpoint")
    checkpoint, finish = runmod.Run.checkpoint, runmod.Run.finish
    parts = {}  # the TrainState's extra modules (every trainer checkpoints at its last step)

    def checkpoint_then_maybe_die(self, step, model, optimizer, *args, **kw):
        parts.update(getattr(optimizer, "parts", {}))
        path = checkpoint(self, step, model, optimizer, *args, **kw)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def finish_and_dump(self, model, tokenizer, metrics):
        # an FSDP-sharded parameter is dumped as this rank's local shard, with its full shape
        # (name -> [local elements, full elements]) in shards-rank<R>.json
        weights, shards = {}, {}
        for n, p in model.named_parameters():
            if distributed.is_dtensor(p):
                shards[n] = [p.to_local().numel(), p.numel()]
            if p.requires_grad:
                weights[n] = (p.to_local() if distributed.is_dtensor(p) else p).detach().clone()
        for k, part in parts.items():
            weights.update(flat(distributed.local_state(part.state_dict()), k))
        torch.save(weights, self.run_dir / f"weights-rank{distributed.rank()}.pt")
        checkpointed = [type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        ddp = any(getattr(p, distributed.DDP_MARK, False) for p in model.parameters())
        (self.run_dir / f"info-rank{distributed.rank()}.json").write_text(json.dumps({
            "activation_checkpointing": checkpointed, "ddp": ddp}))
        if shards:
            (self.run_dir / f"shards-rank{distributed.rank()}.json").write_text(json.dumps(shards))
        return finish(self, model, tokenizer, metrics)

    runmod.Run.checkpoint, runmod.Run.finish = checkpoint_then_maybe_die, finish_and_dump
    if spec.get("inf_reward_on_rank") is not None:  # a reward that fails on one process only
        from posttrain import rewards as rw

        bad = spec["inf_reward_on_rank"]  # distributed.rank() is known once the trainer has joined the group
        rw.register("inf_on_rank", replace=True)(
            lambda prompt, completion, **_: float("inf") if distributed.rank() == bad else 1.0)
    config = spec["config"]
    train(cls(**config))
    if spec.get("resume_copy"):
        run_dir = Path(config["output_dir"]) / config["name"]
        copy = run_dir.with_name(run_dir.name + "-resumed")
        if distributed.is_main():
            later = {f"step-{s}" for s in range(spec["resume_copy"] + 1, config["max_steps"] + 1)}
            shutil.copytree(run_dir, copy, ignore=lambda d, names: [
                n for n in names if n in later or n == "final" or n.startswith(("weights-", "shards-"))])
        distributed.barrier()
        parts.clear()
        train(cls(**{**config, "name": copy.name, "resume": str(copy)}))


def flat(state, prefix: str) -> dict:
    if isinstance(state, dict):
        return {n: t for k, v in state.items() for n, t in flat(v, f"{prefix}.{k}").items()}
    return {prefix: state}


if __name__ == "__main__":
    main(sys.argv[1])
