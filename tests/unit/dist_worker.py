"""Runs one trainer in each process of a multi-process launch, for tests/unit/test_distributed.py.

usage: torchrun --nproc_per_node N dist_worker.py SPEC.json
       accelerate launch --multi_gpu --num_processes N dist_worker.py SPEC.json

SPEC: {"method": "grpo" | "dpo" | ..., "config": {field: value}, "kill_after_checkpoint": step or null}

Each rank saves its trainable tensors to <run dir>/weights-rank<R>.pt when the run finishes (so a
test can check the ranks hold identical weights). With ``kill_after_checkpoint`` every rank
SIGKILLs itself right after that step's checkpoint is complete: a crash, not a clean stop.
"""

import json
import os
import signal
import sys

import torch

from posttrain import distributed
from posttrain.algorithms import common
from posttrain.commands.train import resolve


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    cls, train = resolve(spec["method"])
    kill_at = spec.get("kill_after_checkpoint")
    checkpoint, finish = common.Run.checkpoint, common.Run.finish

    def checkpoint_then_maybe_die(self, step, *args, **kw):
        path = checkpoint(self, step, *args, **kw)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def finish_and_dump(self, model, tokenizer, metrics):
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, self.run_dir / f"weights-rank{distributed.rank()}.pt")
        return finish(self, model, tokenizer, metrics)

    common.Run.checkpoint, common.Run.finish = checkpoint_then_maybe_die, finish_and_dump
    train(cls(**spec["config"]))


if __name__ == "__main__":
    main(sys.argv[1])
