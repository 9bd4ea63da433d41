"""Run directories, metrics, samples for human review, TensorBoard, and progress display.

``runs/<name>/`` holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per step, flushed at
each step so a crash loses nothing already logged), ``samples.jsonl`` (prompts, completions and
rewards kept for human review: the doctrine's "human oversight"), optional TensorBoard event files
under ``tb/``, checkpoints and ``final/``. On resume, lines logged after the checkpoint being
resumed from are dropped, so the files read as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import yaml

from posttrain.errors import UserError

# metrics shown in the progress line, in this order, when present ("monitor reward vs KL")
KEY_METRICS = ("reward/mean", "kl", "loss", "rewards/accuracy", "rewards/margin", "len/mean", "time/step")


class RunDirError(UserError, RuntimeError):
    pass


def make_run_dir(root: str | Path = "runs", name: str | None = None, method: str = "run", resume: bool = False) -> Path:
    """Create (or, with ``resume``, find) ``<root>/<name>``; the default name is ``<method>-<time>``."""
    root = Path(root)
    if name is None:
        if resume:
            raise RunDirError("resume needs the run's name or directory")
        name = f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[\w.\-]+", name):
        raise RunDirError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = root / name
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: no such run to resume")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists already: pass --resume {run_dir} to continue it, or another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def to_jsonable(value: Any) -> Any:
    """Floats for 0-d tensors and numpy scalars; NaN/inf as strings (JSON has no such numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the records of ``path`` with ``step`` <= step (atomically rewritten)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class Tracker:
    """Writes a run's metrics and samples. ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any] | None = None,
        header: str | None = None,
        resume_step: int | None = None,
        tensorboard: bool = False,
        enabled: bool = True,
        total_steps: int | None = None,
        print_every: int = 1,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.print_every = max(1, print_every)
        self._tb = None
        self._progress = None
        self._task = None
        self.history: list[dict] = []
        if not enabled:
            from rich.console import Console

            self.console = Console(stderr=True, quiet=True)  # other ranks: nothing printed
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            text = yaml.safe_dump(to_jsonable(config), sort_keys=False)
            (self.run_dir / "config.yaml").write_text(f"# {header}\n{text}" if header else text)
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                _truncate_after(self.run_dir / name, resume_step)
            self.history = read_jsonl(self.run_dir / "metrics.jsonl")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self._start_progress(resume_step or 0)

    # -- progress -------------------------------------------------------------------------
    def _start_progress(self, done: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._t0 = time.time()
        if self.total_steps and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.run_dir.name, total=self.total_steps, completed=done, metrics="")

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        parts = []
        for k in KEY_METRICS:
            v = metrics.get(k)
            if isinstance(v, (int, float)):
                parts.append(f"{k}={v:.4g}")
        return "  ".join(parts)

    # -- logging --------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one step's metrics (flushed at once); return them as written."""
        record = {"step": step, **to_jsonable(metrics)}
        if not self.enabled:
            return record
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self.history.append(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=self.summary(record))
        elif step % self.print_every == 0 or step == self.total_steps:
            total = f"/{self.total_steps}" if self.total_steps else ""
            self.console.print(f"step {step}{total}  {self.summary(record)}", highlight=False)
        return record

    def log_samples(self, step: int, samples: Iterable[dict[str, Any]]) -> None:
        """Keep prompts, completions and rewards for human review."""
        if not self.enabled:
            return
        for s in samples:
            self._samples.write(json.dumps({"step": step, **to_jsonable(s)}) + "\n")
        self._samples.flush()

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.run_dir / name
        if self.enabled:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(to_jsonable(obj), indent=1))
            os.replace(tmp, path)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
        for f in (self._metrics, self._samples):
            if not f.closed:
                f.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
