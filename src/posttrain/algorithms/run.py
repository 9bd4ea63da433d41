"""A run: its directory (config, metrics, samples, evaluations), checkpoints and exact resume, the
safe stop on Ctrl-C, the doctor's watch, the final model and report; and the step timer.

Under several processes (``posttrain.runtime.distributed``) the run directory, metrics, samples,
evals, reports and ``final/`` are written by rank 0 only; every rank loads the same checkpoint and
its own RNG state (evaluation across the ranks: ``evaluate.greedy_eval_sharded``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime import config as cfgmod
from posttrain.runtime import distributed
from posttrain.runtime.tracking import Tracker, make_run_dir, read_jsonl

if TYPE_CHECKING:
    from posttrain.algorithms.common import PromptStream, TrainConfig


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    """The last step's metrics."""
    evals: list[dict[str, Any]]
    """Every evaluation: {"step", "accuracy"/"reward", ...}."""

    @property
    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "metrics.jsonl")


class Run:
    """A run directory with its tracker, checkpoints and resume logic."""

    def __init__(self, config: TrainConfig, method: str, total_steps: int):
        self.config, self.method = config, method
        self.main = distributed.is_main()
        if config.resume:
            run_dir = Path(config.resume)
            self.run_dir = make_run_dir(run_dir.parent, run_dir.name, resume=True)
        else:  # rank 0 names and creates it (the default name has the time in it)
            self.run_dir = distributed.broadcast(
                make_run_dir(config.output_dir, config.name, method=method) if self.main else None)
        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume else None
        if config.resume and self.resume_from is None:
            raise ckpt_error(self.run_dir)
        resume_step = int(self.resume_from.name.split("-")[1]) if self.resume_from else None
        self.tracker = Tracker(self.run_dir, cfgmod.to_dict(config), header=f"posttrain train {method}",
                               resume_step=resume_step, enabled=self.main,
                               tensorboard=config.tensorboard, total_steps=total_steps, print_every=config.log_every)
        self.evals: list[dict[str, Any]] = read_jsonl(self.run_dir / "evals.jsonl") if resume_step else []
        if resume_step is not None:
            self.evals = [e for e in self.evals if e["step"] <= resume_step]
        self.generators: dict[str, torch.Generator] = {}
        self.started = time.time()
        from posttrain.doctrine.doctor import Doctor

        self.doctor = Doctor()

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict] | None = None) -> None:
        """Log a step's metrics (and samples for review), then let the doctor read them."""
        self.tracker.log(step, metrics)
        if samples:
            self.tracker.log_samples(step, samples)
        if self.main:
            self.doctor.watch(self.run_dir, self.tracker.history)

    def out_of_time(self) -> bool:
        """True once the run has used its max_minutes budget (never when it is 0); rank 0's clock
        decides for every rank."""
        if self.config.max_minutes <= 0:
            return False
        return bool(distributed.broadcast(time.time() - self.started > 60 * self.config.max_minutes))

    def restore(self, model, optimizer, scheduler, stream: PromptStream | None) -> tuple[int, dict]:
        """Load the newest checkpoint when resuming; returns (step done, saved extra state)."""
        if self.resume_from is None:
            return 0, {}
        state = ckpt.load_checkpoint(self.resume_from, model, optimizer, scheduler, generators=self.generators,
                                     rank=distributed.rank(), world_size=distributed.world_size())
        if stream is not None and "stream" in state:
            stream.restore(state["stream"])
        self.tracker.console.print(f"resumed {self.run_dir} at step {state['step']}")
        return int(state["step"]), state.get("extra", {})

    def checkpoint(self, step: int, model, optimizer, scheduler, stream: PromptStream | None, extra: dict | None = None):
        """Save ``checkpoints/step-<step>/`` (every rank calls it: each adds its RNG state)."""
        distributed.check_in_sync(trainable(model, optimizer))
        state = {"stream": stream.state() if stream else None, "extra": extra or {}}
        path = ckpt.save_checkpoint(self.run_dir, step, model, optimizer, scheduler, state=state,
                                    generators=self.generators, keep_last=self.config.keep_last,
                                    rank=distributed.rank(), world_size=distributed.world_size())
        distributed.barrier()
        return path

    @contextlib.contextmanager
    def stop_safely(self, step: int, model, optimizer, scheduler, stream: PromptStream | None,
                    extra: dict[str, Any] | None = None):
        """Wrap a step's collect phase (``loop.py``: everything before its first weight change): if
        it is interrupted (Ctrl-C) or a judge keeps failing
        (``JudgeFailureRate``), put the data position and generators back to where the step
        began, checkpoint the last completed step, and re-raise: nothing done is lost, and
        ``--resume`` redoes this step exactly. Under several processes the others may be inside a
        collective, so nothing is saved: ``--resume`` continues from the last periodic checkpoint."""
        from posttrain.rlaif import JudgeFailureRate

        saved = (stream.state() if stream else None, {k: g.get_state() for k, g in self.generators.items()})
        try:
            yield
        except (JudgeFailureRate, KeyboardInterrupt) as e:
            if distributed.world_size() > 1:
                self.tracker.console.print(f"stopped at step {step} ({type(e).__name__}); resume from the last "
                                           f"checkpoint with --resume {self.run_dir}")
                self.tracker.close()
                raise
            if stream is not None:
                stream.restore(saved[0])
            for k, g in self.generators.items():
                g.set_state(saved[1][k])
            path = self.checkpoint(step - 1, model, optimizer, scheduler, stream, extra=extra)
            self.tracker.console.print(f"stopped at step {step} ({type(e).__name__}); saved {path}: "
                                       f"resume with --resume {self.run_dir}")
            self.tracker.close()
            raise

    def due(self, step: int, every: int, last: int) -> bool:
        return step == last or (every > 0 and step % every == 0)

    def end_step(self, step: int, last: int, evaluate, checkpoint) -> int:
        """The end of a training step, the same in every trainer: the step becomes the last one
        when the time budget is spent; ``evaluate(step)`` every ``eval_every`` steps (the last
        step's evaluation is ``final_eval``'s); ``checkpoint(step)`` when due. Returns the last step."""
        if self.out_of_time():
            last = step
        if self.config.eval_every and step % self.config.eval_every == 0 and step != last:
            evaluate(step)
        if self.due(step, self.config.checkpoint_every, last):
            checkpoint(step)
        return last

    def final_eval(self, last: int, evaluate) -> None:
        """Evaluate after the last step unless that step was evaluated already."""
        if not self.evals or self.evals[-1]["step"] != last:
            evaluate(last)

    def log_eval(self, step: int, result: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **result}
        self.evals.append(record)
        if self.main:
            with open(self.run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        summary = "  ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
        self.tracker.console.print(f"eval @ step {step}: {summary}", highlight=False)
        return record

    def finish(self, model, tokenizer, metrics: dict[str, Any]) -> RunResult:
        """Save final/ (HF format), run the doctor's last check and write report.html (rank 0)."""
        distributed.check_in_sync(trainable(model))
        full = distributed.full_state_dict(model) if distributed.is_sharded(model) else None  # every rank
        if self.main:
            ckpt.save_model(model, self.run_dir / "final", tokenizer, state_dict=full)
        self.tracker.close()
        if self.main:
            self.doctor.finish(self.run_dir, self.tracker.history)
        distributed.barrier()
        return RunResult(self.run_dir, metrics, self.evals)


def trainable(*holders) -> list[torch.Tensor]:
    """The trainable tensors of models and of ``TrainState``-like holders (their ``parts``), in a
    fixed order: what must stay identical on every rank."""
    out: list[torch.Tensor] = []
    for h in holders:
        if isinstance(h, torch.nn.Module):
            out += [p for p in h.parameters() if p.requires_grad]
        for part in getattr(h, "parts", {}).values():
            params = part.parameters()
            out += [p for p in params if p.requires_grad]
    return out


def ckpt_error(run_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from (checkpoints/step-N/state.json)")


class StepTimer:
    """Wall-clock phases of one step, reported as time/<phase>."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.phases.items()}
        out["time/step"] = time.perf_counter() - self.t0
        return out


class Phase:
    """``with Phase(timer, "update"):`` adds the block's wall-clock time to ``time/update``."""

    def __init__(self, timer: StepTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> "Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.add(self.name, time.perf_counter() - self.t0)
