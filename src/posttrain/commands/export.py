"""`posttrain export runs/<name> --merge OUT`: write the run's final model as one merged HF model.

Nothing is lost: OUT must be absent or empty, unless ``--overwrite``; the model is written into a
temporary sibling of OUT and moved into place only when complete (with ``--overwrite`` the old OUT is
swapped out, and removed once the new one is in place), so a failed export leaves OUT as it was. OUT
may not be a run directory (this run's or any other), lie inside one, or hold one (a run's ``final/``
and ``checkpoints/`` are what it loads and resumes from), nor hold the model being exported. Every
check runs before the model loads.
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


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / m).exists() for m in _RUN_MARKERS)


def _run_root(path: Path) -> Path | None:
    """The run directory ``path`` is or lies in (its final/, a checkpoint, anything below), if any."""
    return next((p for p in (path, *path.parents) if _is_run(p)), None)


def _run_inside(path: Path) -> Path | None:
    """A run directory inside ``path`` (not ``path`` itself), if any; the first found."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            if _is_run(Path(root) / d):
                return Path(root) / d
    return None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_target(source: str, target: str, overwrite: bool) -> Path:
    """The resolved OUT, or a FlagError saying why it cannot be written: OUT may not be, or lie in, any
    run directory, nor hold one (with --overwrite it would replace the run's final/ and checkpoints/,
    what the run loads and resumes from), nor overlap the model exported, nor be non-empty without
    --overwrite."""
    from posttrain.commands._args import FlagError

    src, out = Path(source).expanduser().resolve(), Path(target).expanduser().resolve()
    run = _run_root(out)
    if run is not None:
        raise FlagError(f"--merge {target}: inside the run directory {run}, whose final/ and checkpoints/ are "
                        "what the run loads and resumes from; export to a directory outside any run")
    if _within(out, src) or _within(src, out):
        raise FlagError(f"--merge {target}: overlaps the model being exported ({source}); choose another directory")
    if out.exists() and not out.is_dir():
        raise FlagError(f"--merge {target}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FlagError(f"--merge {target}: the directory is not empty; choose an empty or new directory, or "
                        "pass --overwrite to replace its contents")
    inner = _run_inside(out) if out.is_dir() else None
    if inner is not None:
        raise FlagError(f"--merge {target}: holds the run directory {inner}, which --overwrite would delete; "
                        "export to a directory that holds no run")
    return out


def _write_swapped(out: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling of ``out``, then put it in ``out``'s place. On a failure the
    temporary directory is removed and ``out`` is as it was; the original ``out`` is removed only once the
    new one is in place (if it cannot be put back, the error says where it is, and it stays there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old, placed = None, False
    try:
        write(tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
        placed = True
    except BaseException:
        if old is not None and (old / out.name).exists() and not out.exists():  # put the original back
            try:
                os.rename(old / out.name, out)
            except OSError as e:
                raise OSError(f"export failed, and the original {out} could not be put back ({e}): it is kept "
                              f"in {old / out.name}") from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (placed or not (old / out.name).exists()):
            shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from posttrain.commands._args import load_model_flag
    from posttrain.models import check_model_flag
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
