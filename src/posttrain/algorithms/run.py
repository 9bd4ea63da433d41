"""A run: its directory (config, metrics, samples, evaluations), checkpoints and exact resume, the
safe stop on Ctrl-C, the doctor's watch, the final model and report; and the step timer.

Under several processes (``posttrain.runtime.distributed``) the run directory, metrics, samples,
evals, reports and ``final/`` are written by rank 0 only; every rank loads the same checkpoint and
its own RNG state (evaluation across the ranks: ``evaluate.greedy_eval_sharded``).

Resume rules (``--resume RUN_DIR``; ``resume_config`` for the CLI, ``Run`` for every caller):
- the run's saved ``config.yaml`` is the truth. A setting given again with another value is
  refused, with the list of differences, unless it is in ``MUTABLE`` (the length of the run, the
  time budget, how often to evaluate, checkpoint and log, a new learning rate, the device): those
  are applied (a new ``lr`` to the optimizer and the schedule's base rate, once the checkpoint has
  loaded) and recorded in ``resumes.jsonl`` (one line per resume: step, checkpoint, changes, time)
  and in ``config.yaml``;
- nothing in the run directory is written before the checkpoint has loaded, except ``run.lock``
  (the run's owner: ``tracking.RunLock``); a damaged newest checkpoint falls back to the newest
  whole one, and is then set aside as ``.damaged-step-N`` (``checkpoint.load_latest``; an error
  that is not damage stops the resume with its traceback); then stale ``.tmp-step-*`` directories
  are removed and the logs are cut back to the resumed step (a torn last line dropped, with a message).
A fresh run that fails before it logs its first step (also while it opens its directory and logs)
removes its directory, unless it holds a checkpoint (``Run.close``); a resumed run never removes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from posttrain.errors import ResumeError
from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime import config as cfgmod
from posttrain.runtime import distributed
from posttrain.runtime.tracking import RunLock, Tracker, append_record, make_run_dir, read_jsonl

if TYPE_CHECKING:
    from posttrain.algorithms.common import PromptStream, TrainConfig

MUTABLE: dict[str, str] = {
    "max_steps": "the run's length",
    "epochs": "the run's length in passes over the pairs (DPO: it sets max_steps when > 0)",
    "max_minutes": "the time budget",
    "eval_every": "how often to evaluate",
    "eval_at_start": "an evaluation before step 1 (only a run resumed at step 0 has one to do)",
    "checkpoint_every": "how often to checkpoint",
    "keep_last": "how many checkpoints to keep",
    "log_every": "how often to print",
    "tensorboard": "TensorBoard logging",
    "lr": "applied to the optimizer and to the schedule's base rate once the checkpoint has loaded",
    "device": "where the run computes (the RNG of another device type starts afresh)",
}
"""The settings a resumed run may change, and what changing one does; every other one is fixed
for the life of a run (model, LoRA, data, task, reward, group and batch sizes, seed, losses...)."""

NOT_COMPARED = ("resume", "name", "output_dir")
"""Not settings of the run: where it lives is ``--resume``'s (a run copied elsewhere resumes as well)."""

_OPEN: list["Run"] = []
"""Runs of this process not yet closed (``closes_runs_on_failure``)."""


def check_resumable(run_dir: Path) -> None:
    """``ResumeError`` unless ``run_dir`` is a run directory with a complete checkpoint."""
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoints").is_dir():
        raise ResumeError(f"--resume {run_dir}: not a run directory (no config.yaml, no checkpoints/); give the "
                          f"directory a training run wrote, e.g. runs/grpo-20260101-120000")
    if not ckpt.checkpoint_dirs(run_dir):
        raise ckpt.no_checkpoint(run_dir)


def resume_changes(saved, given, run_dir: Path | str) -> dict[str, tuple[Any, Any]]:
    """The settings of config ``given`` that differ from the run's ``saved`` one: {field: (saved,
    given)}, all in ``MUTABLE``; any other difference is a ``ResumeError`` listing them all."""
    old, new = cfgmod.to_dict(saved), cfgmod.to_dict(given)
    diff = {k: (old.get(k), v) for k, v in new.items() if k not in NOT_COMPARED and old.get(k) != v}
    fixed = {k: d for k, d in diff.items() if k not in MUTABLE}
    if fixed:
        rows = "\n".join(f"  --{k.replace('_', '-')}: the run has {o!r}, given {n!r}" for k, (o, n) in fixed.items())
        raise ResumeError(f"--resume {run_dir}: these settings cannot change in the middle of a run:\n{rows}\n"
                          f"resume without them (the run's config.yaml holds its settings), or start a new run. "
                          f"What a resume may change: {', '.join('--' + k.replace('_', '-') for k in MUTABLE)}")
    return diff


def saved_config(cls: type, run_dir: Path):
    """The run's config as its ``config.yaml`` holds it, or None (a run written without one)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    values, lines = cfgmod.read_yaml(path)
    return cfgmod.build(cls, values, str(path), lines)


def resume_config(cls: type, run_dir: str | Path, config_file: str | Path | None = None,
                  flags: dict[str, Any] | None = None, method: str | None = None):
    """The config to resume ``run_dir`` with (the CLI's ``--resume``): its ``config.yaml`` with the
    given ``--config`` file and flags over it, refused (``ResumeError``) when they change a setting
    that cannot change mid-run, when the run was trained with another ``method``, when its
    config.yaml is gone (resuming on defaults would change the run), when ``--name`` or
    ``--output-dir`` is given (the run is where ``--resume`` says) and when the run has already
    done ``max_steps``. Checked before any model loads; nothing is written."""
    run_dir = Path(run_dir)
    check_resumable(run_dir)
    moved = [cfgmod.flag(f) for f in NOT_COMPARED if f != "resume" and f in (flags or {})]
    if moved:
        raise ResumeError(f"--resume {run_dir}: {' and '.join(moved)} {'does' if len(moved) == 1 else 'do'} not "
                          "apply: the run is the directory "
                          "--resume names (copy or move the directory to put it elsewhere)")
    if not (run_dir / "config.yaml").is_file():
        raise ResumeError(f"--resume {run_dir}: its config.yaml is missing, so the run's settings are unknown and "
                          "resuming on defaults would change the run; put config.yaml back, or start a new run")
    trained_with = _method_of(run_dir)
    if method is not None and trained_with is not None and trained_with != method:
        raise ResumeError(f"--resume {run_dir}: the run was trained with '{trained_with}', not '{method}'; "
                          f"resume it with posttrain train {trained_with} --resume {run_dir}")
    saved = saved_config(cls, run_dir)
    base = cfgmod.to_dict(saved) if saved is not None else {}
    given: dict[str, Any] = {}
    if config_file is not None:
        values, lines = cfgmod.read_yaml(config_file)
        cfgmod.build(cls, {**base, **values}, str(config_file), lines)  # its errors name the file and line
        given.update(values)
    given.update(flags or {})
    given["resume"] = str(run_dir)
    if saved is None:  # no config.yaml (an old run): the flags are the whole config
        return cfgmod.from_sources(cls, None, given)
    config = cfgmod.from_sources(cls, run_dir / "config.yaml", given)
    changes = resume_changes(saved, config, run_dir)
    done = int(ckpt.latest_checkpoint(run_dir).name.split("-")[1])
    # a new --epochs (DPO) sets the length anew when the trainer starts: not judged here
    max_steps = None if "epochs" in changes else getattr(config, "max_steps", None)
    # report.html is the last thing a finished run writes: without it (a kill while saving final/)
    # the resume completes the run's final evaluation and save
    if max_steps is not None and done >= max_steps and (run_dir / "report.html").is_file():
        raise ResumeError(f"--resume {run_dir}: the run has done {done} steps and max_steps is {max_steps}: "
                          f"nothing to do (its model is in {run_dir / 'final'}); pass --max-steps N > {done} to "
                          "train further")
    return config


def _method_of(run_dir: Path) -> str | None:
    """The method in config.yaml's header line (``# posttrain train grpo``), if it has one."""
    with open(run_dir / "config.yaml", encoding="utf-8", errors="replace") as f:
        first = f.readline().split()
    return first[3] if first[:3] == ["#", "posttrain", "train"] and len(first) > 3 else None


def _apply_lr(scheduler, new_base: list[float]) -> None:
    """A new lr on resume: the schedule's base rates become the new config's (those the optimizer
    was built with), and each group's rate keeps its place in the schedule."""
    groups = scheduler.optimizer.param_groups
    for i, (group, base) in enumerate(zip(groups, new_base)):
        lambdas = getattr(scheduler, "lr_lambdas", None)
        old = scheduler.base_lrs[i]
        factor = lambdas[i](scheduler.last_epoch) if lambdas else (group["lr"] / old if old else 1.0)
        group["initial_lr"], group["lr"] = base, base * factor
    scheduler.base_lrs = list(new_base)
    scheduler._last_lr = [g["lr"] for g in groups]


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
    """A run directory with its tracker, checkpoints and resume logic (the module docstring)."""

    def __init__(self, config: TrainConfig, method: str, total_steps: int):
        self.config, self.method = config, method
        self.main = distributed.is_main()
        self.run_dir: Path | None = None
        self.lock: RunLock | None = None
        self.tracker: Tracker | None = None
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.closed = False
        self.header = f"posttrain train {method}"
        _OPEN.append(self)  # from here on close() gives back whatever was made, whoever calls it
        try:
            self._open(total_steps)
        except BaseException:
            self.close(failed=True)
            raise
        self.evals: list[dict[str, Any]] = []
        self.generators: dict[str, torch.Generator] = {}
        self.started = time.time()
        from posttrain.doctrine.doctor import Doctor

        self.doctor = Doctor()

    def _open(self, total_steps: int) -> None:
        """The run directory, its lock and the tracker: a resumed run's checked (nothing written:
        restore() opens the logs once a checkpoint loaded), a fresh one's created (rank 0 names it)."""
        config = self.config
        tracker = dict(enabled=self.main, tensorboard=config.tensorboard, total_steps=total_steps,
                       print_every=config.log_every)
        if config.resume:
            self.run_dir = Path(config.resume)
            check_resumable(self.run_dir)
            saved = saved_config(type(config), self.run_dir)
            self.changes = resume_changes(saved, config, self.run_dir) if saved is not None else {}
            self.lock = RunLock(self.run_dir) if self.main else None
            self.resume_from = ckpt.latest_checkpoint(self.run_dir)
            self.tracker = Tracker(self.run_dir, defer=True, **tracker)
        else:  # the default name has the time in it
            self.run_dir = distributed.broadcast(
                make_run_dir(config.output_dir, config.name, method=self.method) if self.main else None)
            self.lock = RunLock(self.run_dir) if self.main else None
            self.resume_from = None
            self.tracker = Tracker(self.run_dir, cfgmod.to_dict(config), header=self.header, **tracker)

    def close(self, failed: bool = False) -> None:
        """Close the logs and give up the run directory (idempotent). ``failed``: a fresh run that
        logged no step and saved no checkpoint holds nothing of value, so its directory goes (only
        when this process owned it: a run whose lock was refused removes nothing)."""
        if self.closed:
            return
        self.closed = True
        _OPEN.remove(self)
        if self.tracker is not None:
            self.tracker.close()
        owned = self.lock is not None
        if self.lock is not None:
            self.lock.release()
        if failed and self.main and owned and not self.config.resume \
                and not (self.tracker is not None and self.tracker.history) and not ckpt.checkpoint_dirs(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)

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
        """Load the newest whole checkpoint when resuming (falling back past damaged ones), then
        apply the resume's changes, remove stale temporaries and open the logs at that step;
        returns (step done, saved extra state)."""
        if self.resume_from is None:
            return 0, {}
        new_base = list(getattr(scheduler, "base_lrs", None) or [])  # the rates this run's config asks for
        say = lambda msg: self.tracker.console.print(msg, highlight=False, soft_wrap=True)  # noqa: E731
        path, state = ckpt.load_latest(self.run_dir, model, optimizer, scheduler, generators=self.generators,
                                       rank=distributed.rank(), world_size=distributed.world_size(), say=say)
        self.resume_from = path
        if stream is not None and "stream" in state:
            stream.restore(state["stream"])
        if "lr" in self.changes and new_base:
            _apply_lr(scheduler, new_base)
        step = int(state["step"])
        if self.main:
            for name in ckpt.remove_stale_temporaries(self.run_dir):
                say(f"removed {self.run_dir / 'checkpoints' / name} (a checkpoint the run was stopped writing)")
            self.tracker.open(cfgmod.to_dict(self.config), self.header, resume_step=step)
            self._record_resume(step, path, say)
        distributed.barrier()
        self.evals = [e for e in read_jsonl(self.run_dir / "evals.jsonl") if e["step"] <= step]
        say(f"resumed {self.run_dir} at step {step}")
        return step, state.get("extra", {})

    def _record_resume(self, step: int, path: Path, say) -> None:
        """One line of ``resumes.jsonl``: when, from which checkpoint, and what changed."""
        changes = {k: [old, new] for k, (old, new) in self.changes.items()}
        record = {"step": step, "checkpoint": path.name, "time": datetime.now().isoformat(timespec="seconds"),
                  "changes": changes}
        append_record(self.run_dir / "resumes.jsonl", record)
        for k, (old, new) in changes.items():
            say(f"changed on resume: {k} {old!r} -> {new!r} ({MUTABLE[k]})")

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
                self.close()
                raise
            if stream is not None:
                stream.restore(saved[0])
            for k, g in self.generators.items():
                g.set_state(saved[1][k])
            path = self.checkpoint(step - 1, model, optimizer, scheduler, stream, extra=extra)
            self.tracker.console.print(f"stopped at step {step} ({type(e).__name__}); saved {path}: "
                                       f"resume with --resume {self.run_dir}")
            self.close()
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
        self.close()
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


def closes_runs_on_failure(train_fn: Callable) -> Callable:
    """Decorates each ``train_*``: when it raises, every run it opened and left open is closed with
    ``Run.close(failed=True)`` (a fresh run that logged nothing and saved no checkpoint leaves no
    directory), for the CLI and library callers alike; the exception goes on."""

    @functools.wraps(train_fn)
    def train(config, *args, **kwargs):
        already = set(map(id, _OPEN))
        try:
            return train_fn(config, *args, **kwargs)
        except BaseException:
            for run in [r for r in _OPEN if id(r) not in already]:
                run.close(failed=True)
            raise

    return train


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
