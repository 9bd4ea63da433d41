"""Who this process is, and the collectives: the base of ``posttrain.runtime.distributed``.

``setup`` joins the process group a launcher describes; ``active``, ``world_size``, ``rank``,
``is_main`` and ``local_rank`` say who this process is; ``shard`` and ``check_divisible`` split a
global batch; ``all_sum``, ``all_true``, ``gather``, ``broadcast``, ``gather_cat`` and
``reduce_metrics`` combine values over the ranks; ``sync_params`` and ``check_in_sync`` make and
check replicated weights bit-identical. Under one process every function is a no-op (an
identity). The package docstring (``distributed/__init__.py``) explains the whole design.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Iterable, Sequence

import torch

BUCKET_NUMEL = 1 << 24
"""Gradient elements per all-reduce (16M floats = 64 MB in float32)."""
SHARDING_FLAGS = ("ACCELERATE_USE_DEEPSPEED",)
"""Set by ``accelerate launch`` for DeepSpeed configs, whose sharding is not applied."""


def _dist():
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> None:
    """Join the process group when launched with several processes (idempotent; no-op otherwise).
    ``device="cpu"`` forces gloo even on a GPU machine."""
    if not launched() or _dist().is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=str(device) == "cpu" or not torch.cuda.is_available())
    if not _dist().is_initialized():  # pragma: no cover - accelerate did not recognise the launcher
        raise RuntimeError("WORLD_SIZE > 1 but no process group could be set up from the launcher's environment")
    # leave the group before the interpreter exits: a gloo group still alive at exit aborted a rank
    # now and then ("terminate called without an active exception", exit -6) after a finished run
    atexit.register(_leave)
    sharding = [k for k in SHARDING_FLAGS if os.environ.get(k, "").lower() in ("1", "true")]
    if sharding and is_main():
        import warnings

        warnings.warn(f"{', '.join(sharding)}: posttrain does not apply DeepSpeed; every process holds the whole "
                      "model and trains data-parallel (FSDP is supported: README, Scaling out)", RuntimeWarning,
                      stacklevel=2)


def _leave() -> None:
    d = _dist()
    if d.is_available() and d.is_initialized():
        d.destroy_process_group()


def active() -> bool:
    d = _dist()
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if active():
        _dist().barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the process's GPU under NCCL, else the CPU."""
    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ data


def shard(n: int) -> slice:
    """This rank's contiguous part of ``n`` items (the first ``n % world`` ranks get one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def check_divisible(name: str, value: int) -> None:
    """Global batch sizes are split evenly: ``value`` must be a multiple of the process count."""
    w = world_size()
    if value % w:
        raise ValueError(f"{name}={value} is the global batch: it must be a multiple of the number of "
                         f"processes ({w}); each process takes {name}/{w}")


# ------------------------------------------------------------------------------------ collectives


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks (a new tensor on ``x``'s device; ``x`` itself when alone)."""
    if not active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    _dist().all_reduce(y)
    return y.to(x.device)


def all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (e.g. "every loss was finite")."""
    if not active():
        return bool(flag)
    return bool(all_sum(torch.tensor([0.0 if flag else 1.0]))[0] == 0)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors (any first dimension) concatenated in rank order, on every rank."""
    if not active():
        return x
    return torch.cat([t.to(x.device) for t in gather(x.detach().cpu())])


def reduce_metrics(local: dict[str, float], sum_keys: Iterable[str] = (),
                   max_keys: Iterable[str] = ()) -> dict[str, float]:
    """Metrics of the whole step from each rank's: keys in ``sum_keys`` (already weighted by the
    rank's share of the global batch) are summed, keys in ``max_keys`` take the largest rank's
    value, every other number is averaged over the ranks that report it (equal shards: the global
    mean). Non-numbers are rank 0's."""
    if not active():
        return dict(local)
    sums, maxes = set(sum_keys), set(max_keys)
    every = gather(local)
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for d in every for k in d):
        vals = [d[k] for d in every if k in d]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = every[0].get(k, vals[0])
        elif k in sums:
            out[k] = float(sum(vals))
        elif k in maxes:
            out[k] = float(max(vals))
        else:
            out[k] = float(sum(vals) / len(vals))
    return out


# ------------------------------------------------------------------------------------ parameters


def _buckets(params: Sequence[torch.Tensor], numel: int):
    """Runs of consecutive params of one dtype and device, about ``numel`` elements each."""
    run: list[torch.Tensor] = []
    size = 0
    for p in params:
        if run and (p.dtype != run[0].dtype or p.device != run[0].device or size + p.numel() > numel):
            yield run
            run, size = [], 0
        run.append(p)
        size += p.numel()
    if run:
        yield run


@torch.no_grad()
def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank (one broadcast per bucket)."""
    if not active():
        return
    dev = _comm_device()
    for bucket in _buckets(list(params), BUCKET_NUMEL):
        flat = torch.cat([p.detach().reshape(-1) for p in bucket]).to(dev)
        _dist().broadcast(flat, src=0)
        off = 0
        for p in bucket:
            p.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()


def is_dtensor(p) -> bool:
    """True for a DTensor (an FSDP-sharded parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


@torch.no_grad()
def check_in_sync(params: Iterable[torch.Tensor], what: str = "weights") -> None:
    """Raise on every rank if the ranks' ``params`` are not bit-identical (a cheap checksum: the
    float64 sum and sum of squares of every tensor, compared as gathered values)."""
    if not active():
        return
    params = [p for p in params if not is_dtensor(p)]  # FSDP shards differ by design
    sums = [(float(p.double().sum()), float((p.double() ** 2).sum())) for p in params]
    every = gather(sums)
    if any(s != every[0] for s in every[1:]):
        bad = next(i for i in range(len(sums)) if any(e[i] != every[0][i] for e in every[1:]))
        raise RuntimeError(f"the processes' {what} differ (tensor #{bad}): a rank trained on something the others "
                           "did not; this is a bug, please report it")
