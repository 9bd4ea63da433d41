"""The Doctor: runs the rules on a growing history, reports each problem once (doctor.jsonl and
the console), ends a run with its report (posttrain.doctrine.report, which never imports the
doctor: the events are passed to it), and replays a finished run (diagnose, diagnose_run,
run_events)."""

from __future__ import annotations

import bisect
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor import human
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.rules import POINT_RULES, RULES
from posttrain.doctrine.doctor.thresholds import Thresholds


class Doctor:
    """Runs the rules on a growing history and reports each problem once, when it appears."""

    def __init__(self, thresholds: Thresholds | None = None, every: int = 10, rules: Iterable[str] | None = None,
                 echo: bool = True, **overrides: Any):
        self.th = dataclasses.replace(thresholds or Thresholds(), **overrides)
        self.every = max(1, every)
        self.rules = {name: RULES[name] for name in (rules or RULES)}
        self.echo = echo
        self.active: set[str] = set()
        self.events: list[Event] = []
        self._since = -1
        self._samples: list[dict] = []
        self._offset = 0
        self._started = False
        self._cache: dict = {}
        self._quiet_since: dict[str, int] = {}
        self._flagged = 0  # samples a reviewer marked hacked, as last reported

    def check(self, history: Sequence[dict], samples: Sequence[dict] = ()) -> list[Event]:
        """New events at the latest step of ``history`` (rules that fire now and did not at the last check)."""
        if not history:
            return []
        ctx = Context(history, samples, self.th, self._since, self._cache, frozenset(self.active))
        new = []
        for name, rule in self.rules.items():
            ev = rule(ctx)
            if ev is not None:
                self._quiet_since.pop(name, None)
                if name not in self.active:
                    self.active.add(name)
                    new.append(ev)
            elif name in self.active:  # clears after a window of quiet steps: no flapping near a threshold
                quiet = self._quiet_since.setdefault(name, ctx.step)
                if name in POINT_RULES or ctx.step - quiet >= self.th.window:
                    self.active.discard(name)
                    self._quiet_since.pop(name)
        self._since = ctx.step
        self.events.extend(new)
        return new

    def due(self, step: int) -> bool:
        """Whether ``watch`` checks at ``step``: every ``every`` steps, and once at ``no_signal_steps``
        (a run with no learning signal is told so within its first steps, not at step ``every``)."""
        return step % self.every == 0 or step == self.th.no_signal_steps

    def _read_samples(self, path: Path) -> list[dict]:
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self._offset += len(complete.encode("utf-8"))
            self._samples.extend(json.loads(line) for line in complete.splitlines() if line.strip())
        if self._samples:  # rules read the first window (format_hacking's baseline) and the last ones
            first, last, w = self._samples[0].get("step", 0), self._samples[-1].get("step", 0), self.th.window
            keep = max(2 * w, self.th.plateau_window)
            self._samples = [s for s in self._samples
                             if s.get("step", 0) < first + w or s.get("step", 0) > last - keep]
        return self._samples

    def watch(self, run_dir: str | Path, history: Sequence[dict], samples: Sequence[dict] | None = None,
              force: bool = False) -> list[Event]:
        """Every ``every`` steps, at ``no_signal_steps`` (or with ``force``): check, append new events to
        ``<run_dir>/doctor.jsonl``, print them. Samples are read from ``samples.jsonl`` when not given.
        On the first call of a resumed run, events logged after the current step are dropped and the
        rules' state is rebuilt by replaying the history."""
        if not history:
            return []
        run_dir = Path(run_dir)
        step = int(history[-1].get("step", len(history)))
        if samples is None:
            samples = self._read_samples(run_dir / "samples.jsonl")
        log = run_dir / "doctor.jsonl"
        if not self._started:
            self._started = True
            if log.is_file():
                from posttrain.runtime.tracking import read_lines

                records = [(ln, ev) for ln, ev in read_lines(log)[0] if ev["step"] <= step]  # torn line dropped
                log.write_text("".join(ln + "\n" for ln, _ in records))
                self._flagged = human.reported(ev for _, ev in records)
                for i in range(1, len(history)):  # rebuild which rules are active
                    if self.due(int(history[i - 1].get("step", i))):
                        self.check(history[:i], _upto(samples, history[i - 1].get("step", i)))
                self.events.clear()
        if not force and not self.due(step):
            return []
        new = self.check(history, samples) + self._human(run_dir, step)
        if new:
            with log.open("a", encoding="utf-8") as f:
                for ev in new:
                    f.write(json.dumps(ev.to_dict()) + "\n")
            if self.echo:
                from rich.console import Console

                console = Console(stderr=True, soft_wrap=True)
                for ev in new:
                    style = {"error": "bold red", "warning": "yellow"}.get(ev.severity, "")
                    console.print(f"doctor: {ev.line()}", style=style, highlight=False)
        return new

    def _human(self, run_dir: Path, step: int) -> list[Event]:
        """A new event when more samples are marked reward-hacked on the review page than last reported."""
        records = human.flagged(run_dir)
        if len(records) <= self._flagged:
            self._flagged = len(records)
            return []
        self._flagged = len(records)
        event = human.human_event(records, step)
        self.events.append(event)
        return [event]

    def finish(self, run_dir: str | Path, history: Sequence[dict], report: bool = True) -> Path | None:
        """End of a run: a last check (whatever the step), then ``report.html`` (posttrain.doctrine.report) with
        the events of ``doctor.jsonl``: no file means the doctor watched and found nothing, so the report
        shows exactly what was logged live. A failing report only warns: `posttrain report runs/<name>`
        can write it again."""
        self.watch(run_dir, history, force=True)
        if not report:
            return None
        try:
            from posttrain.doctrine.report import write_report
            from posttrain.runtime.tracking import read_jsonl

            return write_report(run_dir, events=read_jsonl(Path(run_dir) / "doctor.jsonl"))
        except Exception as e:  # noqa: BLE001 - never lose a finished run to a plotting error
            import warnings

            warnings.warn(f"could not write the report of {run_dir}: {type(e).__name__}: {e}", stacklevel=2)
            return None


def _upto(samples: Sequence[dict], step: int) -> Sequence[dict]:
    """The samples logged up to ``step`` (samples are in step order)."""
    steps = [s.get("step", 0) for s in samples]
    return samples[: bisect.bisect_right(steps, step)]


def diagnose(history: Sequence[dict], samples: Sequence[dict] = (), thresholds: Thresholds | None = None,
             every: int | None = None, **overrides: Any) -> list[Event]:
    """Replay a finished run: every event with the step it appeared at (checked when the live doctor
    would: every ``every`` steps and at ``no_signal_steps``; default ``every``: each step for runs up
    to 500 steps, else ~500 checks)."""
    every = every or max(1, len(history) // 500)
    doc = Doctor(thresholds, every=every, echo=False, **overrides)
    samples = sorted(samples, key=lambda s: s.get("step", 0))
    steps = [s.get("step", 0) for s in samples]
    for i in range(1, len(history) + 1):
        if doc.due(int(history[i - 1].get("step", i))) or i == len(history):
            doc.check(history[:i], samples[: bisect.bisect_right(steps, history[i - 1].get("step", i))])
    return doc.events


def diagnose_run(run_dir: str | Path, **overrides: Any) -> list[Event]:
    """`diagnose` on a run directory's metrics.jsonl and samples.jsonl."""
    from posttrain.runtime.tracking import read_jsonl

    run_dir = Path(run_dir)
    events = diagnose(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "samples.jsonl"), **overrides)
    flagged = human.human_event(human.flagged(run_dir))
    return sorted(events + [flagged], key=lambda e: e.step) if flagged else events


def run_events(run_dir: str | Path) -> list[dict] | list[Event]:
    """What the doctor says about a run, for its report: the events of ``doctor.jsonl`` as logged
    live, else (a run the doctor did not watch) a fresh `diagnose_run`."""
    from posttrain.runtime.tracking import read_jsonl

    log = Path(run_dir) / "doctor.jsonl"
    if not log.is_file():
        return diagnose_run(run_dir)
    events = read_jsonl(log)
    records = human.flagged(run_dir)  # labels made after the run's last check are not in its log
    if len(records) > human.reported(events):
        events = sorted(events + [human.human_event(records).to_dict()], key=lambda e: e.get("step", 0))
    return events
