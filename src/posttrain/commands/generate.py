"""`posttrain generate`: answer prompts with a model (the embedded one by default)."""

from __future__ import annotations

import argparse

HELP = "Answer one or more chat prompts with a model (greedy by default)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands._args import nonnegative_float, nonnegative_int, positive_int, remember_defaults
    from posttrain.models import EMBEDDED

    parser.add_argument("--model", default=EMBEDDED, help="model spec: embedded name, directory, .gguf, run dir")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of sampling (with --temperature > 0)")
    remember_defaults(parser)


def _rules():
    from posttrain.commands._args import Rule

    return (Rule(("seed",), lambda a: a.temperature == 0,
                 "greedy decoding (--temperature 0, the default) draws no random numbers; give --temperature > 0 "
                 "to sample"),)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from posttrain.algorithms.inputs import context_length
    from posttrain.commands._args import FlagError, load_model_flag, refuse_inapplicable

    refuse_inapplicable(args, _rules())
    empty = [i for i, p in enumerate(args.prompt, 1) if not p.strip()]
    if empty:
        raise FlagError(f"--prompt #{empty[0]} is empty: give the text of the user message (a shell variable "
                        "that was not set?)")
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model_flag("--model", args.model)
    print(f"loaded {args.model} in {time.time() - t0:.1f}s")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in args.prompt]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_ctx = context_length(model)  # the trainers' prompt-length policy: never sample past the context
    if n_ctx is not None and batch["input_ids"].shape[1] + args.max_new_tokens > n_ctx:
        raise FlagError(f"--max-new-tokens {args.max_new_tokens}: with the {batch['input_ids'].shape[1]}-token prompt "
                        f"this is over the model's context of {n_ctx} tokens; lower it to at most "
                        f"{n_ctx - batch['input_ids'].shape[1]}")
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id)
    for prompt, ids in zip(args.prompt, out[:, batch["input_ids"].shape[1]:]):
        print(f"\n>>> {prompt}\n{tok.decode(ids, skip_special_tokens=True).strip()}")
    return 0
