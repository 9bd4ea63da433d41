"""Trains a tiny model for the checkpoint round-trip test, in its own process.

usage: ckpt_worker.py RUN_DIR {full,lora} {first,resume}
  first:  train 3 steps, checkpoint, train 2 more, save the weights to RUN_DIR/<phase>.pt
  resume: restore the checkpoint, train the same 2 steps, save the weights
Dropout is on and batches come from a seeded generator, so an inexact restore of the RNG or
the data position changes the weights.
"""

import random
import sys
from pathlib import Path

import numpy as np
import torch

from posttrain.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.models import add_lora, tiny_model


def main(run_dir: Path, mode: str, phase: str) -> None:
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    model, _ = tiny_model(seed=0, attention_dropout=0.1)
    if mode == "lora":
        model = add_lora(model, rank=4, dropout=0.1)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    data = torch.randint(0, 1000, (64, 12), generator=torch.Generator().manual_seed(0))
    order_gen = torch.Generator().manual_seed(42)
    order, pos = torch.randperm(64, generator=order_gen).tolist(), 0

    def step():
        nonlocal pos, order
        if pos + 4 > len(order):
            order, pos = torch.randperm(64, generator=order_gen).tolist(), 0
        batch = data[order[pos:pos + 4]]
        pos += 4
        noise = random.random() + float(np.random.rand())  # python and numpy RNG matter too
        loss = model(input_ids=batch, labels=batch).loss * (1 + 1e-3 * noise)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()

    if phase == "first":
        for _ in range(3):
            step()
        save_checkpoint(run_dir, 3, model, opt, sched, state={"pos": pos, "order": order},
                        generators={"order": order_gen})
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, run_dir / "at-checkpoint.pt")
    else:
        state = load_checkpoint(latest_checkpoint(run_dir), model, opt, sched, generators={"order": order_gen})
        pos, order = state["pos"], state["order"]
    for _ in range(2):
        step()
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, run_dir / f"{phase}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
