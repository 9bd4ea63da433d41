"""`posttrain export runs/<name> --merge OUT`: write the run's final model as one merged HF model."""

from __future__ import annotations

import argparse

HELP = "Export a run's final model; --merge folds a LoRA adapter into the base weights."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (or an adapter/model directory)")
    parser.add_argument("--merge", metavar="OUT", required=True, help="output directory for the merged model")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.models import load_model

    model, tok = load_model(args.run)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(args.merge)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"wrote {out} ({type(model).__name__})")
    return 0
