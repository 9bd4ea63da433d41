"""Atomic checkpoints and exact resume.

A checkpoint ``runs/<name>/checkpoints/step-N/`` holds:
- the model in Hugging Face format: a PEFT adapter (``adapter_model.safetensors``) when the model
  is a ``PeftModel``, else the full model (``model.safetensors``), so a checkpoint can be evaluated
  or exported like ``final/``;
- ``optimizer.pt`` and ``scheduler.pt`` (state dicts);
- ``rng.pt`` (python, numpy, torch CPU and CUDA generator states, plus any named generators the
  trainer owns), one file per process rank (``rng-rank<R>.pt``) under multi-process runs;
- ``state.json``: the step, the data position and anything else the trainer needs to continue,
  and ``files``: the size of every other file of the checkpoint. It is written last.

It is written to a temporary sibling directory, fsynced, then renamed into place, so a crash
leaves either the whole checkpoint or none of it (plus a ``.tmp-step-*`` directory, removed when the
run resumes: :func:`remove_stale_temporaries`). ``keep_last`` older ones are pruned afterwards.
Restoring puts back weights, optimizer, scheduler and RNG states exactly, so a resumed run
reproduces an uninterrupted one step for step.

A checkpoint damaged afterwards (a file deleted or truncated: a disk, a copy, a hand) is found
before anything is loaded (:func:`damage`: a file missing or of another size than ``state.json``
recorded) or by the error reading it raises (:data:`DAMAGE`: what safetensors and ``torch.load``
raise on a truncated or overwritten file), and :func:`load_latest` falls back to the newest
checkpoint that is whole and loads, saying which ones it skipped and why; once one has loaded, the
skipped ones are renamed ``checkpoints/.damaged-step-N`` (kept for inspection, never loaded, pruned
or overwritten again). Any other error while loading (out of memory, a bug) is not damage: it goes
on with its traceback, and nothing is renamed or removed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError

from posttrain.errors import ResumeError
from posttrain.models import save_pretrained
from posttrain.runtime import faults

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_model(model, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Save ``model`` (adapter or full) and optionally its tokenizer in HF format to ``out_dir``.
    ``state_dict``: the weights to write instead of the model's own (an FSDP-sharded model's
    gathered ``distributed.full_state_dict``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_weights(model, ckpt_dir: str | Path) -> None:
    """Load the weights saved by :func:`save_model` back into the same (wrapped) model, exactly."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(ckpt_dir / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{ckpt_dir}: adapter weights do not fit the model: {unexpected[:5]}")
        return
    files = [ckpt_dir / "model.safetensors"]
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({ckpt_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied |= set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    state: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    keep_last: int | None = 3,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and prune all but the ``keep_last`` newest.
    Under several processes every rank calls this: each rank writes its own RNG file into a
    shared temporary directory name, they wait for each other, then rank 0 writes the model,
    optimizer, scheduler and state and renames the directory into place (the run directory must
    be on a filesystem every rank sees). An FSDP-sharded model is gathered into full weights
    (every rank takes part, rank 0 writes them) and each rank writes its shard of the optimizer
    state (``optimizer-rank<R>.pt``)."""
    from posttrain.runtime import distributed

    sharded = world_size > 1 and distributed.is_sharded(model)
    full_state = distributed.full_state_dict(model) if sharded else None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    rng_name = "rng.pt" if world_size == 1 else f"rng-rank{rank}.pt"
    if world_size > 1:
        # ranks write into one agreed temporary name; rank 0 renames once all are in (caller syncs)
        tmp = root / f".tmp-step-{step}"
        tmp.mkdir(exist_ok=True)
        torch.save(rng_state(generators), tmp / rng_name)
        if sharded and optimizer is not None:
            torch.save(distributed.local_optimizer_state(optimizer), tmp / f"optimizer-rank{rank}.pt")
        distributed.barrier()  # every rank's RNG file is in before rank 0 renames the directory
        if rank != 0:
            return final
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
        torch.save(rng_state(generators), tmp / rng_name)
    try:
        save_model(model, tmp, state_dict=full_state)
        faults.point("checkpoint.write")  # the fault test kills a run here: half a checkpoint written
        if optimizer is not None and not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"step": step, "world_size": world_size, **(state or {}), "files": files}
        (tmp / "state.json").write_text(json.dumps(record, indent=1))  # last: it vouches for the rest
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. resumed then saved again)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)  # make the rename itself durable
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is not None and keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: str | Path) -> list[str]:
    """Remove the ``checkpoints/.tmp-step-*`` directories a killed run left (call it on one process,
    before any checkpoint is written again); returns their names."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.glob(".tmp-step-*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def damage(ckpt_dir: str | Path) -> str | None:
    """Why the checkpoint cannot be loaded as it stands (a file missing, truncated or unreadable),
    or None when it looks whole. Checked against the sizes ``state.json`` recorded (checkpoints
    written before that record: only that the files a load needs exist)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    recorded = state.get("files")
    if recorded is None:
        weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
        if not any((ckpt_dir / w).is_file() for w in weights):
            return "no model weights"
        return None
    for name, size in recorded.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


DAMAGE: tuple[tuple[type[BaseException], Callable[[BaseException], bool]], ...] = (
    (SafetensorError, lambda e: True),  # a cut or overwritten .safetensors: its header does not parse
    (EOFError, lambda e: True),  # torch.load of an empty file
    (pickle.UnpicklingError, lambda e: True),  # torch.load of bytes that are not a checkpoint
    (RuntimeError, lambda e: "PytorchStreamReader failed" in str(e)),  # a .pt cut short: no zip directory
    (OSError, lambda e: e.errno == errno.EINVAL and not e.filename),  # a .pt cut in half (torch's zip reader)
    (FileNotFoundError, lambda e: True),  # a file gone (checkpoints written before state.json kept sizes)
    (KeyError, lambda e: "filename '" in str(e) and "not found" in str(e)),  # a .pt overwritten with zeros
)
"""The errors that mean a checkpoint's files are damaged (found by cutting and overwriting files:
``tests/unit/test_errors_resume.py``), with a check of the error itself; only these make
:func:`load_latest` fall back to an older checkpoint."""


def is_damage(error: BaseException) -> bool:
    """True when ``error``, raised while loading a checkpoint, says its files are damaged (:data:`DAMAGE`)."""
    return any(isinstance(error, kind) and check(error) for kind, check in DAMAGE)


def load_latest(run_dir: str | Path, model, optimizer=None, scheduler=None,
                generators: dict[str, torch.Generator] | None = None, rank: int = 0, world_size: int = 1,
                say=print) -> tuple[Path, dict[str, Any]]:
    """Load the newest checkpoint of ``run_dir`` that is whole and loads; ``say(message)`` for each
    one skipped as damaged (which and why), and for its rename to ``.damaged-step-N`` once an older
    one has loaded (rank 0 renames). Returns (its directory, its state). An error that is not damage
    (:func:`is_damage`) goes on as it is, and so does a :class:`ResumeError` (a checkpoint that does
    not fit this run: another process count, FSDP or not)."""
    skipped: list[tuple[Path, str]] = []
    for ckpt_dir in reversed(checkpoint_dirs(run_dir)):
        reason = damage(ckpt_dir)
        if reason is None:
            try:
                state = load_checkpoint(ckpt_dir, model, optimizer, scheduler, generators,
                                        rank=rank, world_size=world_size)
            except Exception as e:
                if not is_damage(e):
                    raise
                reason = f"reading it failed: {type(e).__name__}: {str(e)[:200]}"
            else:
                if rank == 0:
                    for old, _ in skipped:
                        say(f"renamed the damaged checkpoint {old} to {set_aside(old).name} (kept for inspection; "
                            f"it is not loaded again)")
                return ckpt_dir, state
        skipped.append((ckpt_dir, reason))
        say(f"skipped checkpoint {ckpt_dir}: {reason}; trying the one before")
    raise no_checkpoint(run_dir, [f"{d.name} ({why})" for d, why in skipped])


def set_aside(ckpt_dir: Path) -> Path:
    """Rename a damaged ``step-N`` to ``.damaged-step-N`` beside it (``-2``, ``-3``... when taken):
    no longer a checkpoint (:func:`checkpoint_dirs`), so never loaded, pruned or overwritten."""
    for n in range(1, 10_000):
        target = ckpt_dir.with_name(f".damaged-{ckpt_dir.name}" + ("" if n == 1 else f"-{n}"))
        if not target.exists():
            os.rename(ckpt_dir, target)
            return target
    raise FileExistsError(f"{ckpt_dir}: no free .damaged-{ckpt_dir.name}-N name")  # pragma: no cover


def no_checkpoint(run_dir: str | Path, skipped: list[str] = ()) -> ResumeError:
    why = (f"every checkpoint it has is damaged (skipped: {', '.join(skipped)})" if skipped
           else "the run stopped before it saved one")
    return ResumeError(f"--resume {run_dir}: no complete checkpoint to resume from (checkpoints/step-N/ with its "
                       f"state.json); {why}: start it again instead")


def load_checkpoint(
    ckpt_dir: str | Path,
    model,
    optimizer=None,
    scheduler=None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; return the saved ``state`` dict. Every rank
    reads the same weights and optimizer state and its own RNG file; the checkpoint must have
    been written by as many processes as are reading it."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint (no state.json)")
    state = json.loads(state_file.read_text())
    saved_world = int(state.get("world_size", 1))
    if restore_rng and saved_world != world_size:
        raise ResumeError(f"{ckpt_dir} was written by {saved_world} process(es); resume it with the same number "
                           f"(now {world_size}) so every process gets its own RNG state back")
    from posttrain.runtime import distributed

    sharded_ckpt = (ckpt_dir / f"optimizer-rank{rank}.pt").is_file()
    if optimizer is not None and sharded_ckpt != (world_size > 1 and distributed.is_sharded(model)):
        raise ResumeError(f"{ckpt_dir} was written {'with' if sharded_ckpt else 'without'} FSDP sharding; resume it "
                           f"{'with' if sharded_ckpt else 'without'} it (--fsdp / an FSDP accelerate config)")
    load_weights(model, ckpt_dir)  # an FSDP-sharded model takes its shard (distributed.shard_layers)
    if optimizer is not None and sharded_ckpt:
        distributed.load_local_optimizer_state(
            optimizer, torch.load(ckpt_dir / f"optimizer-rank{rank}.pt", weights_only=False))
    elif optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=False))
    if restore_rng:
        name = "rng.pt" if saved_world == 1 else f"rng-rank{rank}.pt"
        set_rng_state(torch.load(ckpt_dir / name, weights_only=False), generators)
    return state
