"""`posttrain review runs/<name>` (or a directory of runs): a live review page, or `--export-pairs`.

Serves the page (``posttrain.review.server``) on 127.0.0.1 by default and prints its address; it
updates while the run trains. ``--export-pairs FILE`` instead writes the preference pairs of the
labels made on the page (``posttrain.review.labels``) and exits; a file that exists is replaced only
with ``--overwrite``. Bad input (a path that is not a run or a directory of runs, a port in use, no
pairs to export, an export path that cannot be written) is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse

HELP = "Review a run in the browser: plots, doctor events, samples; label samples, export preference pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run directory (runs/<name>) or a directory of runs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--export-pairs", metavar="FILE",
                        help="write the labelled samples as preference pairs (JSON lines for train dpo / train rm) "
                             "and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace an --export-pairs file that exists")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from posttrain.commands._args import FlagError, out_file
    from posttrain.review.server import find_runs

    path = Path(args.path)
    if not path.is_dir():
        raise FlagError(f"{path}: no such directory: give a run directory (runs/<name>) or a directory of runs")
    runs = find_runs(path)
    if not runs:
        raise FlagError(f"{path}: not a run (no metrics.jsonl or samples.jsonl) and holds no run directory")
    if args.export_pairs:
        from posttrain.review.labels import export_pairs

        out_file("--export-pairs", args.export_pairs, args.overwrite)  # a user's file is never replaced unasked
        try:
            n, episodes = export_pairs(list(runs.values()), args.export_pairs)
        except OSError as e:
            raise FlagError(f"--export-pairs {args.export_pairs}: cannot write it ({e.strerror or e})") from None
        note = f"; {episodes} labelled multi-turn episode(s) make no pairs" if episodes else ""
        print(f"{args.export_pairs}: {n} preference pair(s) from {len(runs)} run(s){note}")
        return 0
    if not 0 <= args.port <= 65535:
        raise FlagError(f"--port {args.port}: must be within 0..65535")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: the page is reachable from other machines; label writes still need "
              f"the page's token", file=sys.stderr)
    from posttrain.review.server import serve

    def ready(url: str) -> None:
        print(f"review: {url}  ({len(runs)} run(s): {', '.join(runs)}; Ctrl-C to stop)", flush=True)

    try:
        serve(path, "127.0.0.1" if args.host == "localhost" else args.host, args.port, ready)
    except OSError as e:
        raise FlagError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    return 0
