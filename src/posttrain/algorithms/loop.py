"""The training loop, once for every trainer.

    if start == 0 and eval_at_start:  evaluate(0)
    for step in start+1 .. max_steps:
        batch   = collect(step)          # no weight changes yet: a Ctrl-C here checkpoints step-1
        result  = update(batch)          # losses, backward passes, optimizer updates (optim.py)
        schedule.step()                  # once per training step, whatever the update did
        log(metrics, samples); doctor    # metrics.jsonl, samples.jsonl, the doctor's watch
        evaluate every eval_every; checkpoint every checkpoint_every; stop early on max_minutes
    evaluate(last)                       # unless that step was just evaluated

A trainer supplies only a ``Trainer``: its model, optimizer (or ``TrainState``), schedule and data
stream (what a checkpoint holds), and three functions: ``collect`` (draw the step's data; sample and
score it; in DPO and the reward model also the forward/backward passes, which change no weight),
``update`` (the optimizer updates; returns a ``StepResult``) and ``evaluate``. Everything else (time
budget, periodic evaluation, checkpoints, exact resume, the doctor, the final evaluation) is here
and in ``run.Run``, the same for all.

The learning-rate schedule advances once per training step in every trainer (``warmup_steps`` and
``max_steps`` count training steps, also when GRPO makes ``num_iterations`` updates per batch or
PPO ``ppo_epochs`` x ``minibatches``); the metric ``lr`` is the rate after that advance.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Optional

from posttrain.algorithms.common import PromptStream
from posttrain.algorithms.run import Phase, Run, StepTimer
from posttrain.runtime import faults


@dataclasses.dataclass
class StepResult:
    """What ``update`` returns: the step's metrics, the tokens it trained on (over every process;
    for ``tokens_per_s``) and the rows kept for human review (``samples.jsonl``), if any."""

    metrics: dict[str, Any]
    tokens: float
    samples: Optional[list[dict]] = None


@dataclasses.dataclass
class Trainer:
    run: Run
    model: Any
    """Saved in HF format in every checkpoint and in ``final/``."""
    optimizer: Any
    """The optimizer, or a ``TrainState`` holding it and the other trained parts (a head, a critic)."""
    scheduler: Any
    stream: Optional[PromptStream]
    collect: Callable[[int, StepTimer], Any]
    """The step's batch; runs inside ``Run.stop_safely`` (no weight may change in it)."""
    update: Callable[[Any], StepResult]
    evaluate: Callable[[int], None]
    extra: Callable[[], dict] = dict
    """Trainer state saved in checkpoints beside the model (PPO's KL coefficient)."""

    def checkpoint(self, step: int):
        return self.run.checkpoint(step, self.model, self.optimizer, self.scheduler, self.stream, extra=self.extra())


def train(t: Trainer, start: int) -> dict[str, Any]:
    """Run steps ``start + 1`` .. ``max_steps`` (see the module docstring); returns the last step's
    metrics (on a failure, the ``train_*`` function's ``run.closes_runs_on_failure`` closes the run)."""
    run, config = t.run, t.run.config
    if start == 0 and config.eval_at_start:
        t.evaluate(0)
    metrics: dict[str, Any] = {}
    last = config.max_steps
    for step in range(start + 1, config.max_steps + 1):
        timer = StepTimer()
        with run.stop_safely(step, t.model, t.optimizer, t.scheduler, t.stream, extra=t.extra()):
            batch = t.collect(step, timer)
            faults.point("collect")  # the fault test kills runs at these points (runtime/faults.py)
        with Phase(timer, "update"):
            result = t.update(batch)
        faults.point("update")
        with warnings.catch_warnings():
            # when the first update was skipped (a non-finite loss: reported as nonfinite_steps) torch
            # warns that the schedule stepped before the optimizer; advancing it is the rule (optim.py)
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"),
                                    category=UserWarning)
            t.scheduler.step()
        metrics = {**result.metrics, "lr": t.scheduler.get_last_lr()[0], **timer.metrics()}
        metrics["tokens_per_s"] = result.tokens / max(1e-9, metrics["time/step"])
        run.log(step, metrics, result.samples)
        last = run.end_step(step, last, t.evaluate, t.checkpoint)
        if step == last:
            break
    run.final_eval(last, t.evaluate)
    return metrics
