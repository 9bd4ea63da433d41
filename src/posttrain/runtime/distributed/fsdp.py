"""FSDP2 sharding of the decoder layers, and the shard-state I/O of checkpoints.

``use_fsdp`` says whether this run shards; ``shard_layers`` applies torch's ``fully_shard`` to
each decoder layer of a model's trunk (found by ``posttrain.models.split``); ``gathered`` holds
the full weights for a block whose forwards differ between ranks; ``grad_sync`` turns the
layers' gradient reduction on for the last micro-batch of a step; ``clip_grad_norm`` clips over
sharded and replicated gradients. ``is_dtensor`` / ``is_sharded`` recognise sharded tensors and
models; ``full_state_dict``, ``local_state``, ``local_optimizer_state``,
``load_local_optimizer_state`` and ``copy_into`` write and read sharded state (full weights, or
one file per rank). See the package docstring (``distributed/__init__.py``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch

from posttrain.runtime.distributed.collectives import _comm_device, active, all_sum, is_dtensor, world_size

FSDP_FLAG = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch`` for FSDP configs (``--use_fsdp``, ``distributed_type: FSDP``): turns on
``shard_layers`` in the trainers that support it (as does the ``fsdp`` config field)."""


def fsdp_requested(flag: bool = False) -> bool:
    """True when sharding is asked for: the ``fsdp`` config field or an FSDP accelerate config
    (``ACCELERATE_USE_FSDP``). It only takes effect under several processes (``use_fsdp``)."""
    return bool(flag) or os.environ.get(FSDP_FLAG, "").lower() in ("1", "true")


def use_fsdp(flag: bool = False) -> bool:
    """True when this run shards: asked for, and several processes are running."""
    return fsdp_requested(flag) and active()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers (transformer blocks) of ``model``'s trunk, the units ``shard_layers`` wraps."""
    from posttrain.models.split import split_model

    split = split_model(model)
    if isinstance(split, str):
        raise ValueError(f"FSDP: cannot shard {type(model).__name__}: {split}")
    trunk = split[0]
    for name in ("layers", "h", "blocks"):
        layers = getattr(trunk, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"FSDP: found no decoder layers (a ModuleList named layers/h/blocks) in {type(trunk).__name__}")


def shard_layers(model) -> torch.nn.Module:
    """Shard every decoder layer of ``model`` over the processes with torch's FSDP2
    (``fully_shard``, in place; LoRA weights inside the layers are sharded with them). The
    embeddings, the final norm and the (tied) output head stay replicated: the trainers call the
    trunk and the head directly, and their gradients are summed by ``sum_gradients`` as before.
    FSDP's gradient reduction is set to a plain SUM (each rank's loss is already scaled by its
    share of the global batch). No-op under one process."""
    if not active():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_comm_device().type, (world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # SUM collectives (gloo has no PREMUL_SUM), divide by 1
    model.register_load_state_dict_pre_hook(_distribute_full_tensors)
    return model


def _distribute_full_tensors(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a sharded model: full tensors (from a checkpoint) for sharded
    parameters become this rank's shard (every rank reads the same file: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in module.named_parameters():
        key = prefix + name
        value = state_dict.get(key)
        if is_dtensor(p) and isinstance(value, torch.Tensor) and not is_dtensor(value):
            state_dict[key] = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def fsdp_modules(model) -> list[torch.nn.Module]:
    if model is None:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    """True when ``model`` has FSDP-sharded parameters."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(model):
    """Inside: every sharded layer of ``model`` holds its full weights (one all-gather each, on
    entry), and forwards communicate nothing, so the ranks may run different numbers of forwards
    (sampling until EOS, evaluation, reference log-probs on their own shares). Every rank must
    enter. Changes made to the gathered weights are not kept. A no-op for an unsharded model."""
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def grad_sync(model, enabled: bool) -> None:
    """FSDP: reduce(-scatter) gradients in the coming backward or not (then they accumulate
    unsharded on each rank, as in a single process, and the next synced backward reduces their
    sum). Trainers sync only the last micro-batch of a step. A no-op for an unsharded model."""
    for m in fsdp_modules(model):
        m.set_requires_gradient_sync(enabled, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with sharded tensors gathered into full ones (every rank must call;
    every rank gets the full dict)."""
    return {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in model.state_dict().items()}


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a mix of sharded (DTensor) and replicated
    gradients, the replicated ones already summed over ranks, with torch's arithmetic: the L2 norm
    of the per-tensor norms (a sharded tensor's norm from its shards' squared norms, summed over
    ranks), then every gradient times min(1, max_norm / (norm + 1e-6)). ``max_norm`` <= 0 only measures."""
    if not params:
        return torch.tensor(0.0)
    local = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for p in params]
    sharded = torch.tensor([is_dtensor(p.grad) for p in params])
    norms = torch.stack([torch.linalg.vector_norm(g.detach()).float().cpu() for g in local])
    sq = torch.where(sharded, norms ** 2, torch.zeros_like(norms))
    norms = torch.where(sharded, all_sum(sq).sqrt(), norms)
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in local:
            g.mul_(coef.to(g.device, g.dtype))
    return total


def local_state(obj: Any) -> Any:
    """``obj`` (a state dict, nested dicts/lists/tuples) with every DTensor replaced by a copy of
    this rank's local shard: what a rank writes to its own checkpoint file."""
    if is_dtensor(obj):
        return obj.to_local().clone()
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local_state(v) for v in obj)
    return obj


def local_optimizer_state(optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded state as this rank's local tensors (saved per rank).
    ``optimizer`` may be a ``value_head.TrainState``: the extra modules' sharded weights (a value
    adapter, a separate value model) are saved as local shards too."""
    return local_state(optimizer.state_dict())


def load_local_optimizer_state(optimizer, sd: dict[str, Any]) -> None:
    """Inverse of ``local_optimizer_state``: load (a ``TrainState`` loads its modules' local shards
    into their sharded parameters), then wrap the optimizer state of sharded parameters back into
    DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    inner = getattr(optimizer, "optimizer", optimizer)  # a TrainState holds the torch optimizer
    for p, st in inner.state.items():
        if not is_dtensor(p):
            continue
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.to_local().shape and v.dim():
                st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())


@torch.no_grad()
def copy_into(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.copy_(value)``, where for a sharded ``p`` a plain ``value`` is this rank's local shard
    (as ``local_state`` saved it)."""
    if is_dtensor(p) and not is_dtensor(value):
        local = p.to_local()
        if local.shape != value.shape:
            raise RuntimeError(f"a saved shard of shape {tuple(value.shape)} does not fit this rank's shard "
                               f"{tuple(local.shape)} (resumed with another number of processes?)")
        local.copy_(value)
    else:
        p.copy_(value)
