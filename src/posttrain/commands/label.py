"""`posttrain label`: turn N responses per prompt into chosen/rejected pairs with an AI judge.

    posttrain label --judge judge.yaml --data responses.jsonl --out pairs.jsonl [--strategy score|compare]

Input rows: {"prompt": ..., "responses": ["...", "...", ...]} (at least two responses; extra
columns are kept). Output rows: {"prompt", "chosen", "rejected", ..., "label": {...the judge's
scores or wins...}}, ready for `posttrain train dpo` or `train rm`. See posttrain.rlaif.labeling for
the strategies and posttrain.rlaif.config for the judge YAML format.

Resumable: rows are judged in chunks and written as they finish; running the same command again
continues after the last row done (`--overwrite` starts over). Judge replies are cached on disk
too, so a repeated row costs nothing. Exit codes: 0 done, 2 bad input or config, 3 the judge's
failure rate passed its threshold, during the run or over the whole run at its end (a judge that
failed every request, however few): the message gives the count and the last error, and the pairs
written so far are kept in --out.

Each judge request is read by probability (the judge config's ``scoring``: the expected rating, or
p(A) vs p(B), from the judge's token probabilities; the local backend, or an OpenAI-compatible
server that returns logprobs) or by parsing one sampled answer; the summary line counts both
(``by probability``, ``parsed``) and the answers that held no verdict (``unparsable``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

HELP = "Label N responses per prompt with an AI judge into chosen/rejected pairs (resumable)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import float_in, positive_int, remember_defaults

    parser.add_argument("--judge", required=True, metavar="YAML", help="judge config file (backend, model, ...)")
    parser.add_argument("--data", required=True, help='rows {"prompt", "responses": [...]} (.jsonl/.json/.parquet/.csv)')
    parser.add_argument("--out", required=True, help="output .jsonl of preference pairs")
    parser.add_argument("--strategy", choices=("score", "compare"), default="score",
                        help="score each response (N requests) or compare every two (N(N-1) requests)")
    parser.add_argument("--responses-field", default="responses", help="column holding the responses")
    parser.add_argument("--min-margin", type=float_in(0.0, 1.0, high_open=True), default=0.0,
                        help="score strategy: keep a pair only when best - worst score (in [0, 1]) exceeds this")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows judged together (then written)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    return (Rule(("min_margin",), lambda a: a.strategy == "compare",
                 "--min-margin is a gap between scores (--strategy score); compare keeps consistent wins"),)


def _label(judge, rows, args, out, reasons) -> None:
    """Judge the rows not done yet, chunk by chunk, writing each chunk as it finishes."""
    from posttrain.rlaif.labeling import JUDGE_FAILED, label_rows

    todo = [i for i in range(len(rows)) if i not in out.done]
    if out.resumed:
        print(f"resuming {args.out}: {len(rows) - len(todo)} of {len(rows)} rows done", file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        for i, (record, why) in zip(chunk, label_rows(judge, [rows[i] for i in chunk], args.strategy,
                                                      args.responses_field, args.min_margin)):
            if why != JUDGE_FAILED:  # a row the judge failed on stays to do: the next run retries it
                out.add(i, record, why)
            if record is None:
                reasons[why] += 1
        print(f"labeled {min(start + args.batch_size, len(todo))}/{len(todo)} rows", file=sys.stderr)
    judge.check_run_failures()


def run(args: argparse.Namespace) -> int:
    from posttrain.commands._args import refuse_inapplicable, resumable_out
    from posttrain.rlaif.judges import Judge, JudgeFailureRate
    from posttrain.rlaif.labeling import load_response_rows
    from posttrain.rlaif.resume import ResumableJsonl

    refuse_inapplicable(args, _rules())
    resumable_out("--out", args.out, "label", args.overwrite)
    rows = load_response_rows(args.data, args.responses_field)
    judge = Judge.from_config(args.judge)
    t0 = time.perf_counter()
    reasons: collections.Counter[str] = collections.Counter()
    with judge, ResumableJsonl(args.out, "label", overwrite=args.overwrite) as out:
        try:
            _label(judge, rows, args, out, reasons)
        except JudgeFailureRate as e:
            print(f"error: {e}\n{out.written} pairs are in {args.out} ({len(out.done)} of {len(rows)} rows done, "
                  f"{len(rows) - len(out.done)} left for the next run); fix the judge, then run the same command "
                  "again to resume.", file=sys.stderr)
            return 3
        written, skipped = out.written, out.skipped
    m = judge.metrics()
    print(f"wrote {written} pairs to {args.out} ({skipped} rows skipped) in {time.perf_counter() - t0:.1f}s; "
          f"judge requests {m['judge/requests']:.0f} (by probability {m['judge/by_probability']:.0f}, "
          f"parsed {m['judge/parsed']:.0f}, unparsable {m['judge/unparsable']:.0f}, "
          f"failures {m['judge/failures']:.0f}), cache hits {m['judge/cache_hits']:.0f}")
    for why, n in reasons.most_common():
        print(f"  skipped {n}: {why}")
    return 0
