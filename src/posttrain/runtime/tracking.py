"""Run directories, metrics, samples for human review, TensorBoard, and progress display.

``runs/<name>/`` holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per step, flushed at
each step so a crash loses nothing already logged), ``samples.jsonl`` (prompts, completions and
rewards kept for human review: the doctrine's "human oversight"), ``evals.jsonl``, optional
TensorBoard event files under ``tb/``, checkpoints, ``final/``, ``resumes.jsonl`` (one line per
resume: the step and what changed) and ``run.lock``.

On resume, lines logged after the checkpoint being resumed from are dropped, so the files read as
if the run had never stopped. A run killed while writing a line leaves it torn (no newline at its
end, not JSON): readers skip it and say so once (:func:`read_jsonl`), a resume drops it; a line
that is not JSON anywhere else is an error naming the file and line.

A run directory has one owner at a time: :class:`RunLock` holds an ``fcntl.flock`` on ``run.lock``
(which records the owner's PID) for as long as the run lives; the operating system releases it
when the process ends, however it ends, so a killed run leaves no stale lock. Default run names
(``<method>-<time>``) are created exclusively and get a ``-2``, ``-3``... suffix when two runs start
in the same second.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import yaml

from posttrain.errors import RunLockedError, UserError
from posttrain.runtime import faults

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: runs are not locked there
    fcntl = None

# metrics shown in the progress line, in this order, when present ("monitor reward vs KL")
KEY_METRICS = ("reward/mean", "kl", "loss", "rewards/accuracy", "rewards/margin", "len/mean", "time/step")

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "evals.jsonl")
"""The per-step logs of a run, truncated to the resumed step on resume."""

LOCK_FILE = "run.lock"


class RunDirError(UserError, RuntimeError):
    pass


class RunFileError(UserError, ValueError):
    """A run's log file has a line that is not JSON (not a torn last line); names file and line."""


def check_run_name(name: str) -> None:
    """:class:`RunDirError` (naming ``--name``) unless ``name`` can name a run directory: letters,
    digits, '.', '_' and '-', and not only dots ('.' and '..' are the directory itself and its parent)."""
    if not re.fullmatch(r"[\w.\-]+", name):
        raise RunDirError(f"--name {name!r}: a run name may use letters, digits, '.', '_' and '-' only")
    if not name.strip("."):
        raise RunDirError(f"--name {name!r}: a run name needs a letter, digit, '_' or '-' (a name of dots only "
                          f"is a directory path, not a new run)")


def check_new_run_dir(root: str | Path, name: str | None) -> None:
    """:class:`RunDirError` when a new run could not be made as ``<root>/<name>``: a bad name, a
    run or file of that name there already, an output directory that is a file or that cannot be
    written. Makes nothing: the trainers call it before any model loads."""
    if name is not None:
        check_run_name(name)
    root = Path(root)
    for existing in (root, *root.parents):
        if existing.exists():
            if not existing.is_dir():
                raise RunDirError(f"--output-dir {root}: {existing} is a file, not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise RunDirError(f"--output-dir {root}: {existing} is not writable")
            break
    run_dir = root / name if name is not None else None
    if run_dir is not None and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(f"{run_dir} exists already: pass --resume {run_dir} to continue it, or another --name")


def make_run_dir(root: str | Path = "runs", name: str | None = None, method: str = "run", resume: bool = False) -> Path:
    """Create (or, with ``resume``, find) ``<root>/<name>``; the default name is ``<method>-<time>``,
    created exclusively (a suffix ``-2``, ``-3``... when another run took it in the same second).
    A directory the system refuses to make is a :class:`RunDirError` naming ``--output-dir``."""
    try:
        return _make_run_dir(Path(root), name, method, resume)
    except (NotADirectoryError, FileExistsError, PermissionError, FileNotFoundError) as e:
        raise RunDirError(f"--output-dir {root}: cannot make the run directory there ({e.strerror}: {e.filename})") from None


def _make_run_dir(root: Path, name: str | None, method: str, resume: bool) -> Path:
    if name is None:
        if resume:
            raise RunDirError("resume needs the run's name or directory")
        return _new_default_dir(root, f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    check_run_name(name)
    run_dir = root / name
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: no such run to resume")
        return run_dir
    check_new_run_dir(root, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _new_default_dir(root: Path, base: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RunDirError(f"{root}: could not create a new run directory named {base}-N")


class RunLock:
    """Ownership of a run directory: an exclusive ``flock`` on ``<run_dir>/run.lock``, which holds
    the owner's PID. A second owner gets :class:`RunLockedError` naming that PID."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another process (PID {pid}): a run directory has "
                                 f"one owner at a time; wait for it to end or stop it (kill {pid}), then resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    __del__ = release


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


_TORN_NOTED: set[str] = set()


def note_once(path: Path, message: str) -> None:
    """Print ``message`` about ``path`` on stderr, once per file in this process."""
    if str(path) not in _TORN_NOTED:
        _TORN_NOTED.add(str(path))
        print(f"note: {message}", file=sys.stderr)


def bad_line(path: str | Path, number: int, line: str) -> RunFileError:
    """The error for line ``number`` of a run file that is not a JSON object."""
    return RunFileError(f"{path}:{number}: not a JSON object ({line[:60]!r}); the file was edited or damaged: "
                        "fix or delete that line")


def read_lines(path: str | Path) -> tuple[list[tuple[str, dict]], bool]:
    """The records of a JSON-lines run file as (line, record) pairs, and whether a torn last line
    (written in part when the run was killed: no newline at its end, not JSON) was left out. Any
    other line that is not a JSON object: :class:`RunFileError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    out: list[tuple[str, dict]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # the last line, without its newline: torn by a kill
                return out, True
            raise bad_line(path, number, line)
        out.append((line, record))
    return out, False


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines run file; a torn last line is skipped with a note (once)."""
    records, torn = read_lines(path)
    if torn:
        note_once(Path(path), f"{path}: skipped its incomplete last line (the run was stopped while writing it)")
    return [r for _, r in records]


def append_record(path: str | Path, record: dict) -> None:
    """Add one line to a small JSON-lines history (``resumes.jsonl``) by rewriting it atomically:
    a kill leaves the old file or the new one, never a torn line."""
    path = Path(path)
    lines = [line for line, _ in read_lines(path)[0]] + [json.dumps(to_jsonable(record))]
    _write_atomic(path, "".join(line + "\n" for line in lines))


def _truncate_after(path: Path, step: int) -> bool:
    """Keep only the records of ``path`` with ``step`` <= step (atomically rewritten); returns
    whether a torn last line was dropped."""
    if not path.is_file():
        return False
    records, torn = read_lines(path)
    kept = [line for line, record in records if record.get("step", 0) <= step]
    _write_atomic(path, "".join(line + "\n" for line in kept))
    return torn


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Tracker:
    """Writes a run's metrics and samples. ``enabled=False`` (ranks other than 0) writes nothing.
    ``defer=True`` writes nothing until :meth:`open` (a resumed run: once its checkpoint loaded);
    ``write_json`` calls made before are written then."""

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
        defer: bool = False,
    ):
        from rich.console import Console

        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.print_every = max(1, print_every)
        self.tensorboard = tensorboard
        self._tb = None
        self._progress = None
        self._task = None
        self._metrics = self._samples = None
        self._pending: dict[str, Any] = {}
        self.history: list[dict] = []
        # other ranks print nothing; soft_wrap: no line breaks inserted at 80 columns when stderr is a
        # file or pipe, so a path in a message ("--resume runs/...") stays whole
        self.console = Console(stderr=True, quiet=not enabled, soft_wrap=True)
        if enabled and not defer:
            try:
                self.open(config, header, resume_step)
            except BaseException:  # e.g. the TensorBoard writer: give back the logs already opened
                self.close()
                raise

    def open(self, config: dict[str, Any] | None = None, header: str | None = None,
             resume_step: int | None = None) -> None:
        """Write ``config.yaml``; on resume drop what was logged after ``resume_step`` (and a torn
        last line, with a message); open the logs for appending."""
        if not self.enabled or self._metrics is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in RUN_FILES:  # a line that is not JSON mid-file is an error before anything is written
                read_lines(self.run_dir / name)
        if config is not None:
            text = yaml.safe_dump(to_jsonable(config), sort_keys=False)
            _write_atomic(self.run_dir / "config.yaml", f"# {header}\n{text}" if header else text)
        if resume_step is not None:
            for name in RUN_FILES:
                if _truncate_after(self.run_dir / name, resume_step):
                    self.console.print(f"{self.run_dir / name}: dropped its incomplete last line (the run was "
                                       f"stopped while writing it)", highlight=False, soft_wrap=True)
            self.history = read_jsonl(self.run_dir / "metrics.jsonl")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        for name, obj in self._pending.items():
            self.write_json(name, obj)
        self._pending.clear()
        self._start_progress(resume_step or 0)

    # -- progress -------------------------------------------------------------------------
    def _start_progress(self, done: int) -> None:
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
        line = json.dumps(record) + "\n"
        self._metrics.write(line[: len(line) // 2])
        faults.point("metrics.write", before=self._metrics.flush)  # the fault test tears a line here
        self._metrics.write(line[len(line) // 2:])
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
        if self.enabled and self._metrics is None:
            self._pending[name] = obj  # deferred: written by open()
        elif self.enabled:
            _write_atomic(path, json.dumps(to_jsonable(obj), indent=1))
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
            if f is not None and not f.closed:
                f.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
