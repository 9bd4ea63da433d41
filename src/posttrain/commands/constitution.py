"""`posttrain constitution`: Constitutional AI pairs: generate, critique against principles, revise.

    posttrain constitution --model SPEC --data prompts.jsonl --out pairs.jsonl [--principles principles.yaml]

For each prompt the model answers, critiques its answer against each principle and revises it;
each output row is a preference pair with chosen = the final revision, rejected = the original,
and every critique and revision kept under "critiques" for human review:

    {"prompt": ..., "chosen": ..., "rejected": ..., "critiques": [{"principle", "critique_request",
     "critique", "revision"}, ...], "constitution": {"row": 0, "model": ...}}

Without --principles, the doctrine's three example principles are used; the file format is in
posttrain.rlaif.constitution. Prompts whose revision did not change the answer, or whose answer was
empty, are skipped (and counted, with the reason). Resumable like `posttrain label`: rerun the same
command to continue.

Exit codes: 0 done; 2 bad input; 3 the prompts processed in this run gave no pair at all, or more than
--max-skip-rate of them were skipped: the message gives the counts and the reasons, and the pairs
written are kept in --out.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time

HELP = "Constitutional AI: answer, critique against principles, revise; write revised/original pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import float_in, nonnegative_float, nonnegative_int, positive_int, remember_defaults
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help="model spec that answers, critiques and revises")
    parser.add_argument("--data", required=True, help="prompt rows {\"prompt\", ...} (.jsonl/.json/.parquet/.csv)")
    parser.add_argument("--out", required=True, help="output .jsonl of preference pairs")
    parser.add_argument("--principles", default=None, metavar="YAML",
                        help="principles file (default: the doctrine's three example principles)")
    parser.add_argument("--principles-per-prompt", type=nonnegative_int, default=0,
                        help="rounds per prompt with a principle drawn at random (0 = every principle in order)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="limit of each answer, critique, revision")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts processed together (then written)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--max-skip-rate", type=float_in(0.0, 1.0), default=0.5,
                        help="exit 3 when more than this share of the prompts processed gave no pair (default: 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    return (Rule(("seed",), lambda a: a.temperature == 0 and a.principles_per_prompt == 0,
                 "greedy decoding (--temperature 0) with every principle in order draws no random numbers"),)


def _process(backend, rows, config, args, out, reasons) -> int:
    """Answer, critique and revise the prompts not done in ``out``, batch by batch, writing each batch as it
    finishes; skip reasons are counted in ``reasons``. Returns the number of prompts processed."""
    from posttrain.rlaif.constitution import constitutional_pairs

    rng = random.Random(args.seed)
    meta = {"model": args.model, "principles": [p.name for p in config.principles]}
    todo = [i for i in range(len(rows)) if i not in out.done]
    if out.resumed:
        print(f"resuming {args.out}: {len(rows) - len(todo)} of {len(rows)} prompts done", file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        results = constitutional_pairs(backend.generate, [rows[i]["prompt"] for i in chunk], config, rng)
        for i, (pair, why) in zip(chunk, results):
            if pair is not None:
                extra = {k: v for k, v in rows[i].items() if k not in pair and k != "constitution"}
                pair = {**pair, **extra, "constitution": dict(meta)}
            else:
                reasons[why] += 1
            out.add(i, pair, why)
        print(f"processed {min(start + args.batch_size, len(todo))}/{len(todo)} prompts", file=sys.stderr)
    return len(todo)


def _failed(processed: int, reasons: collections.Counter, args, written: int) -> str | None:
    """The error message when this run's prompts gave no pair, or more than --max-skip-rate were skipped."""
    skipped = sum(reasons.values())
    if not processed or (skipped < processed and skipped <= args.max_skip_rate * processed):
        return None
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    what = (f"none of the {processed} prompts processed gave a pair" if skipped == processed else
            f"{skipped} of the {processed} prompts processed gave no pair, more than --max-skip-rate {args.max_skip_rate:g}")
    return (f"{what} (skipped: {why}). The {written} pairs written are kept in {args.out}; try a larger "
            "--max-new-tokens, a --temperature above 0, a stronger --model, or other --principles")


def run(args: argparse.Namespace) -> int:
    from posttrain.commands._args import load_model_flag, refuse_inapplicable, resumable_out
    from posttrain.models import check_model_flag
    from posttrain.data import load_rows
    from posttrain.models import resolve_device
    from posttrain.rlaif.backends import LocalBackend
    from posttrain.rlaif.config import JudgeConfig
    from posttrain.rlaif.constitution import ConstitutionConfig, DEFAULT_PRINCIPLES, load_principles
    from posttrain.rlaif.resume import ResumableJsonl

    refuse_inapplicable(args, _rules())
    check_model_flag("--model", args.model)
    resumable_out("--out", args.out, "constitution", args.overwrite)
    rows = load_rows(args.data, "prompt")
    principles, templates = load_principles(args.principles) if args.principles else (DEFAULT_PRINCIPLES, {})
    config = ConstitutionConfig(principles=principles, principles_per_prompt=args.principles_per_prompt,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                **templates)
    # the model loads before --out is opened: a model that cannot load leaves nothing behind
    model, tokenizer = load_model_flag("--model", args.model, device=resolve_device(args.device))
    backend = LocalBackend(JudgeConfig(backend="local", model=args.model, batch_size=args.batch_size,
                                       device=args.device), model=model, tokenizer=tokenizer, seed=args.seed)
    t0 = time.perf_counter()
    reasons: collections.Counter[str] = collections.Counter()
    with ResumableJsonl(args.out, "constitution", overwrite=args.overwrite) as out:
        processed = _process(backend, rows, config, args, out, reasons)
        written, skipped = out.written, out.skipped
    print(f"wrote {written} pairs to {args.out} ({skipped} prompts skipped) in {time.perf_counter() - t0:.1f}s")
    for why, n in reasons.most_common():
        print(f"  skipped {n}: {why}")
    failure = _failed(processed, reasons, args, written)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 3
    return 0
