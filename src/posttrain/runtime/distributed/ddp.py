"""Data parallel training with torch's DDP over a trainer's trained modules, and the gradient sum
of the replicated parameters that neither DDP nor FSDP reduces.

``data_parallel`` builds a ``DataParallel`` (a holder of the trained modules whose forward runs a
closure, wrapped in ``DistributedDataParallel`` with a SUM comm hook) under several processes,
unless the modules are FSDP-sharded; ``run`` computes a micro-batch's loss through it.
``sum_gradients`` sums over ranks the gradients of the other trainable parameters (it skips those
marked ``DDP_MARK`` and FSDP's DTensors). See the package docstring (``distributed/__init__.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from posttrain.runtime.distributed.collectives import BUCKET_NUMEL, _buckets, _comm_device, _dist, active
from posttrain.runtime.distributed.fsdp import is_dtensor, is_sharded

DDP_MARK = "_posttrain_ddp"
"""Attribute set on the parameters a ``DataParallel`` reduces (``sum_gradients`` skips them)."""


class _Holder(torch.nn.Module):
    """Owns the trained modules (so DDP sees their parameters); its forward runs a closure."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _sum_hook(state, bucket):
    """DDP comm hook: all-reduce SUM, not divided by the world size (each rank's loss is already
    scaled by its share of the global batch, so the ranks' gradients add up to the batch's)."""
    fut = _dist().all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DataParallel:
    """torch's ``DistributedDataParallel`` over a trainer's trained modules.

    The trainers call a model's trunk and heads directly, not its ``forward``, so the modules are
    put in a holder whose forward runs a closure: ``dp.run(fn, sync)`` computes a micro-batch's
    loss inside DDP's forward, and DDP all-reduces the gradients (bucketed, overlapped with the
    backward) in the backward of the last micro-batch of a step (``sync=True``; the others run
    under ``no_sync`` and accumulate locally). Every rank must therefore run every backward: a
    non-finite loss is backpropagated like the others and the step dropped afterwards. The frozen
    reference and no-grad passes (sampling, old/reference log-probs, evaluation) bypass it."""

    def __init__(self, *modules: torch.nn.Module, find_unused: bool = False):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        self.holder = _Holder([m for m in modules if m is not None])
        # buffers (rotary tables) are the same everywhere: no sync in each forward; and no copy of
        # rank 0's whole model at the start (init_sync): the trained tensors were made identical
        # by sync_params, the frozen ones are loaded from the same files
        known = inspect.signature(DistributedDataParallel.__init__).parameters
        extra = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
        if "init_sync" in known:
            extra["init_sync"] = False
        self.ddp = DistributedDataParallel(
            self.holder, gradient_as_bucket_view=True, find_unused_parameters=find_unused, **extra,
            device_ids=[_comm_device().index] if _comm_device().type == "cuda" else None)
        self.ddp.register_comm_hook(None, _sum_hook)
        for p in self.holder.parameters():
            if p.requires_grad:
                setattr(p, DDP_MARK, True)

    def run(self, fn, *args, sync: bool = True):
        """``fn(*args)`` through DDP's forward; ``sync=False``: its backward accumulates locally."""
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            return self.ddp(fn, *args)


def data_parallel(*modules: torch.nn.Module | None, read: Sequence[torch.nn.Module] | None = None
                  ) -> "DataParallel | None":
    """A ``DataParallel`` over ``modules`` (None entries skipped) under several processes, unless
    they are FSDP-sharded (then FSDP reduces the layers and ``sum_gradients`` the replicated rest);
    None otherwise. ``read``: the modules the losses read (default: all of ``modules``); trainable
    parameters outside them (e.g. the untied LM head of a reward model, which reads the trunk)
    make DDP look for unused parameters after each forward."""
    modules = tuple(m for m in modules if m is not None)
    if not active() or any(is_sharded(m) for m in modules):
        return None
    used = {id(p) for m in (read or modules) for p in m.parameters()}
    unused = any(p.requires_grad and id(p) not in used for m in modules for p in m.parameters())
    return DataParallel(*modules, find_unused=unused)


def run(dp: "DataParallel | None", fn, *args, sync: bool = True):
    """``fn(*args)``, through ``dp`` when there is one."""
    return fn(*args) if dp is None else dp.run(fn, *args, sync=sync)


# ------------------------------------------------------------------------------------ replicated parameters


def sum_gradients(params: Iterable[torch.Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Replace each trainable parameter's gradient by its sum over ranks, in place.

    Call it once per optimizer step, after every backward of the step (gradient accumulation
    stays local) and before clipping. Parameters that FSDP (DTensors) or a ``DataParallel`` (DDP)
    already reduced in backward are skipped. A gradient that is None on some ranks counts as zeros there;
    one that is None on every rank stays None (AdamW then skips it, as in a single process)."""
    if not active():
        return
    # FSDP reduces its own (DTensors), DDP those of a DataParallel (in the last backward)
    params = [p for p in params if p.requires_grad and not is_dtensor(p) and not getattr(p, DDP_MARK, False)]
    if not params:
        return
    dev = _comm_device()
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=dev)
    _dist().all_reduce(present)
    for bucket in _buckets(params, bucket_numel):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]).to(dev)
        _dist().all_reduce(flat)
        off = 0
        for p in bucket:
            g = flat[off:off + p.numel()].view_as(p).to(p.device)
            off += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    for p, n in zip(params, present.tolist()):
        if n == 0:
            p.grad = None
