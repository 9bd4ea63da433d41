"""`posttrain doctor runs/<name>`: diagnose a run from its metrics and samples.

Replays the doctor's rules (posttrain.doctrine.doctor) over the run's metrics.jsonl and samples.jsonl and
prints each problem at the step it appeared: symptom, likely cause and fix, from the doctrine's
debugging table and reward-hacking section, and the samples a reviewer marked reward-hacked on the
review page (``reviews.jsonl``, ``posttrain review``). Thresholds can be changed with --set name=value.
Exit code 0 when no error-level event fired, 1 otherwise; 2 for a bad input (the error contract,
``posttrain.errors``). A torn last line of metrics.jsonl or samples.jsonl (a run killed, or still
writing) is skipped with a note; any other line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import argparse
import json

HELP = "Diagnose a run: symptoms, likely causes and fixes from the doctrine's debugging table."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (runs/<name>) with metrics.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold, e.g. --set kl_target=0.05 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the events as JSON lines")


def _thresholds(pairs: list[str]) -> dict:
    import dataclasses

    from posttrain.commands._args import FlagError
    from posttrain.doctrine.doctor import Thresholds

    fields = {f.name: f.type for f in dataclasses.fields(Thresholds)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields:
            raise FlagError(f"--set {pair}: unknown threshold {name!r}; known: {', '.join(fields)}")
        try:
            out[name] = int(value) if fields[name] in ("int", int) else float(value)
        except ValueError:
            raise FlagError(f"--set {pair}: {name} must be a number, got {value!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from posttrain.doctrine.doctor import RULES, diagnose
    from posttrain.doctrine.doctor.human import flagged, human_event
    from posttrain.runtime.tracking import RunDirError, read_jsonl

    run_dir = Path(args.run_dir)
    history = read_jsonl(run_dir / "metrics.jsonl")
    if not history:
        raise RunDirError(f"{run_dir / 'metrics.jsonl'}: missing or empty: give the directory of a run that "
                          f"logged at least one step")
    overrides = _thresholds(args.set)  # a FlagError: cli.main reports it (exit 2)
    events = diagnose(history, read_jsonl(run_dir / "samples.jsonl"), **overrides)
    human = human_event(flagged(run_dir))  # samples a reviewer marked reward-hacked (`posttrain review`)
    events = sorted(events + [human], key=lambda e: e.step) if human else events
    if args.json:
        for ev in events:
            print(json.dumps(ev.to_dict()))
        return 1 if any(e.severity == "error" for e in events) else 0
    console = Console(width=max(120, Console().width))
    last = history[-1].get("step", len(history))
    if not events:
        console.print(f"{run_dir}: {len(history)} steps (last {last}), no problems found by "
                      f"{len(RULES)} rules", style="green")
        return 0
    table = Table(title=f"{run_dir}: {len(history)} steps, {len(events)} event(s)", title_justify="left",
                  show_lines=True)
    for col in ("step", "severity", "rule", "symptom", "likely cause", "fix"):
        table.add_column(col, overflow="fold", justify="right" if col == "step" else "left")
    colors = {"error": "bold red", "warning": "yellow"}
    for ev in events:
        table.add_row(str(ev.step), f"[{colors.get(ev.severity, '')}]{ev.severity}[/]", ev.rule, ev.symptom,
                      ev.cause, ev.fix)
    console.print(table)
    return 1 if any(e.severity == "error" for e in events) else 0
