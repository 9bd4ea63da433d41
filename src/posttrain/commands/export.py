"""`posttrain export runs/<name> --merge OUT`: write the run's final model as one merged HF model.

Nothing is lost: OUT must be absent or empty, unless ``--overwrite``; the model is written into a
temporary sibling of OUT and moved into place only when complete (with ``--overwrite`` the old OUT is
swapped out then removed), so a failed export leaves OUT as it was. OUT may not be the run's own
directory or inside it (its ``final/`` and ``checkpoints/`` are what the run loads and resumes from),
nor hold the model being exported. Every check runs before the model loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

HELP = "Export a run's final model; --merge folds a LoRA adapter into the base weights."

_RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final")
"""A directory holding any of these (with its config.yaml) is a run directory."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (or an adapter/model directory)")
    parser.add_argument("--merge", metavar="OUT", required=True, help="output directory for the merged model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT (written beside it first, then swapped in)")


def _run_root(path: Path) -> Path | None:
    """The run directory ``path`` is (or lies in: its final/, a checkpoint), if any."""
    for p in (path, *list(path.parents)[:2]):
        if (p / "config.yaml").is_file() and any((p / m).exists() for m in _RUN_MARKERS):
            return p
    return None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_target(source: str, target: str, overwrite: bool) -> Path:
    """The resolved OUT, or a FlagError saying why it cannot be written."""
    from posttrain.commands._args import FlagError

    src, out = Path(source).expanduser().resolve(), Path(target).expanduser().resolve()
    run = _run_root(src)
    if run is not None and _within(out, run):
        raise FlagError(f"--merge {target}: inside the run directory {run}, whose final/ and checkpoints/ are "
                        "what the run loads and resumes from; export to a directory outside the run")
    if _within(out, src) or _within(src, out):
        raise FlagError(f"--merge {target}: overlaps the model being exported ({source}); choose another directory")
    if out.exists() and not out.is_dir():
        raise FlagError(f"--merge {target}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FlagError(f"--merge {target}: the directory is not empty; choose an empty or new directory, or "
                        "pass --overwrite to replace its contents")
    return out


def _write_swapped(out: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling of ``out``, then put it in ``out``'s place; on any failure
    the temporary directory is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        write(tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():  # put the original back
            os.rename(old / out.name, out)
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from posttrain.commands._args import check_model_flag, load_model_flag
    from posttrain.models import save_pretrained

    check_model_flag("RUN", args.run)
    out = check_target(args.run, args.merge, args.overwrite)
    model, tok = load_model_flag("RUN", args.run)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp)
        tok.save_pretrained(tmp)

    _write_swapped(out, write)
    print(f"wrote {out} ({type(model).__name__})")
    return 0
