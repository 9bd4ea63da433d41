"""`posttrain <verb>`: the command-line entry point.

Each verb lives in its own module under `posttrain.commands` and exposes
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Verbs are
found by name, so adding a command means adding a module, nothing else.
Modules are imported only when their verb runs (or for `--help`), so the
CLI starts fast and one broken verb cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import posttrain.commands as _commands


def _verbs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_"))


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-train language models with RL.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in _verbs():
        if verb is not None and name != verb:
            sub.add_parser(name.replace("_", "-"))
            continue
        module = importlib.import_module(f"posttrain.commands.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    known = verb is not None and verb.replace("-", "_") in _verbs()
    parser = build_parser(verb.replace("-", "_") if known else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
