"""`posttrain <verb>`: the command-line entry point.

Each verb lives in its own module under `posttrain.commands` and exposes
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Verbs are
found by name, so adding a command means adding a module, nothing else.
Modules are imported only when their verb runs (or for `--help`), so the
CLI starts fast and one broken verb cannot break the others.

The error contract (``posttrain.errors``): a ``UserError`` from any verb prints ``error: <message>``
on stderr and exits 2, with no traceback unless ``--debug`` (before the verb) or
``POSTTRAIN_DEBUG=1``; any other exception shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import posttrain.commands as _commands
from posttrain.errors import EXIT_USER_ERROR, UserError


def _verbs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_"))


class Parser(argparse.ArgumentParser):
    """argparse with the error contract: a bad flag is one line on stderr naming it, then exit 2
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="posttrain", description="Post-train language models with RL.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also POSTTRAIN_DEBUG=1)")
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
    debug = args.debug or os.environ.get("POSTTRAIN_DEBUG", "") not in ("", "0")
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
