"""`posttrain constitution`: Constitutional AI pairs: generate, critique against principles, revise.

    posttrain constitution --model SPEC --data prompts.jsonl --out pairs.jsonl [--principles principles.yaml]

For each prompt the model answers, critiques its answer against each principle and revises it;
each output row is a preference pair with chosen = the final revision, rejected = the original,
and every critique and revision kept under "critiques" for human review:

    {"prompt": ..., "chosen": ..., "rejected": ..., "critiques": [{"principle", "critique_request",
     "critique", "revision"}, ...], "constitution": {"row": 0, "model": ...}}

Without --principles, the doctrine's three example principles are used; the file format is in
posttrain.rlaif.constitution. Prompts whose revision did not change the answer are skipped (and
counted). Resumable like `posttrain label`: rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time

HELP = "Constitutional AI: answer, critique against principles, revise; write revised/original pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import nonnegative_float, nonnegative_int, positive_int
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
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")


def run(args: argparse.Namespace) -> int:
    from posttrain.commands._args import check_model_flag, load_model_flag
    from posttrain.data import load_rows
    from posttrain.models import resolve_device
    from posttrain.rlaif.backends import LocalBackend
    from posttrain.rlaif.config import JudgeConfig
    from posttrain.rlaif.constitution import ConstitutionConfig, DEFAULT_PRINCIPLES, constitutional_pairs, load_principles
    from posttrain.rlaif.resume import ResumableJsonl

    check_model_flag("--model", args.model)
    rows = load_rows(args.data, "prompt")
    principles, templates = load_principles(args.principles) if args.principles else (DEFAULT_PRINCIPLES, {})
    config = ConstitutionConfig(principles=principles, principles_per_prompt=args.principles_per_prompt,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                **templates)
    # the model loads before --out is opened: a model that cannot load leaves nothing behind
    model, tokenizer = load_model_flag("--model", args.model, device=resolve_device(args.device))
    backend = LocalBackend(JudgeConfig(backend="local", model=args.model, batch_size=args.batch_size,
                                       device=args.device), model=model, tokenizer=tokenizer, seed=args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    reasons: collections.Counter[str] = collections.Counter()
    meta = {"model": args.model, "principles": [p.name for p in principles]}
    with ResumableJsonl(args.out, "constitution", overwrite=args.overwrite) as out:
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
        written, skipped = out.written, out.skipped
    print(f"wrote {written} pairs to {args.out} ({skipped} prompts skipped) in {time.perf_counter() - t0:.1f}s")
    for why, n in reasons.most_common():
        print(f"  skipped {n}: {why}")
    return 0
