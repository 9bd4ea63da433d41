"""Several processes: who this process is, and the few collectives the trainers need.

Launch any trainer with ``accelerate launch --multi_gpu --num_processes N -m posttrain train ...``
or ``torchrun --nproc_per_node N -m posttrain train ...`` (more machines: ``--num_machines`` /
``--nnodes``). ``setup`` joins the process group through accelerate's ``PartialState``, which reads
the launcher's environment and picks NCCL on GPUs (one device per process) and gloo on CPU. With
no launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op, so a single process runs
exactly as before.

How training is spread (data parallel, replicated weights):

- every process loads the same model and seeds the same RNGs, so the trainable weights start
  bit-identical (``sync_params`` also copies rank 0's, in case a load was not deterministic);
- each step's *global* batch is drawn identically everywhere and each rank keeps its contiguous
  ``shard``: GRPO/PPO prompts (so a prompt's whole group lives on one rank), DPO/reward-model pairs;
- each rank scales its loss by its share of the global reduction (tokens, sequences or pairs,
  summed across ranks with ``all_sum``), so the *sum* of the ranks' gradients is the gradient a
  single process gets from the whole batch; torch's ``DistributedDataParallel`` adds them up
  (``DataParallel``: a comm hook that all-reduces with SUM, not divided by the world size),
  before clipping and the optimizer step, which every rank then takes identically: the weights
  stay bit-identical.

The trainers call the model's trunk and heads directly (``grouped``, ``dpo_data``,
``value_head``), not its ``forward``, which DDP would not see; so DDP wraps a holder of the
trained modules (policy, reward/value head, a separate critic) whose forward runs a closure, and
each micro-batch's loss is computed inside it (``run``); the micro-batches before the last of a
step run under ``no_sync`` (gradients accumulate locally, one reduction per step). Every rank
runs every backward (a non-finite loss is backpropagated, then the step is dropped on all ranks).
The frozen reference (adapter disabled, or a frozen copy) and no-grad passes bypass DDP: never
trained or synchronised.

FSDP (opt-in: the ``fsdp`` config field / ``--fsdp``, or ``ACCELERATE_USE_FSDP=true`` as set by
``accelerate launch --use_fsdp`` or an FSDP config file; only under several processes; every
trainer): ``shard_layers`` applies torch's FSDP2 ``fully_shard`` to each decoder layer (with the
LoRA weights inside it, e.g. PPO's critic adapter too), not to the root, since the trainers call the
trunk and head directly. Embeddings, the final norm, the (tied) head and the scalar value / reward
heads stay replicated, their gradients summed by ``sum_gradients`` (which skips DTensors; no DDP
wrapper under FSDP). FSDP reduces the layers' gradients as a plain SUM (divide factor 1), once per
step (``grad_sync``: only the last micro-batch's backward reduces). ``clip_grad_norm`` takes the
global norm over shards and replicated tensors; the optimizer steps each rank's shards
(``local_optimizer_state``: one file per rank in a checkpoint, with a ``TrainState``'s extra sharded
tensors, e.g. PPO's critic, as local shards). A sharded layer gathers its weights in each forward,
so every rank must run the same number of forwards and backwards; where they do not (sampling until
EOS, evaluation, DPO's reference and held-out log-probs and the reward model's held-out scores over
each rank's share, the rollout copy's sync) the trainers run inside ``gathered``, which holds every
layer's full weights for the block. Checkpoints and ``final/`` hold full weights
(``full_state_dict``, written by rank 0); loading full weights into a sharded model keeps each
rank's shard. DeepSpeed configs get a warning and a data-parallel run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Sequence

import torch

BUCKET_NUMEL = 1 << 24
"""Gradient elements per all-reduce (16M floats = 64 MB in float32)."""
FSDP_FLAG = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch`` for FSDP configs (``--use_fsdp``, ``distributed_type: FSDP``): turns on
``shard_layers`` in the trainers that support it (as does the ``fsdp`` config field)."""
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
    sharding = [k for k in SHARDING_FLAGS if os.environ.get(k, "").lower() in ("1", "true")]
    if sharding and is_main():
        import warnings

        warnings.warn(f"{', '.join(sharding)}: posttrain does not apply DeepSpeed; every process holds the whole "
                      "model and trains data-parallel (FSDP is supported: README, Scaling out)", RuntimeWarning,
                      stacklevel=2)


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


def reduce_metrics(local: dict[str, float], sum_keys: Iterable[str] = ()) -> dict[str, float]:
    """Metrics of the whole step from each rank's: keys in ``sum_keys`` (already weighted by the
    rank's share of the global batch) are summed, every other number is averaged over the ranks
    that report it (equal shards: the global mean). Non-numbers are rank 0's."""
    if not active():
        return dict(local)
    sums = set(sum_keys)
    every = gather(local)
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for d in every for k in d):
        vals = [d[k] for d in every if k in d]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = every[0].get(k, vals[0])
        elif k in sums:
            out[k] = float(sum(vals))
        else:
            out[k] = float(sum(vals) / len(vals))
    return out


# ------------------------------------------------------------------------------------ parameters


def is_dtensor(p) -> bool:
    """True for a DTensor (an FSDP-sharded parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


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


# ------------------------------------------------------------------------------------ DDP

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


# ------------------------------------------------------------------------------------ FSDP


def fsdp_requested(flag: bool = False) -> bool:
    """True when sharding is asked for: the ``fsdp`` config field or an FSDP accelerate config
    (``ACCELERATE_USE_FSDP``). It only takes effect under several processes (``use_fsdp``)."""
    return bool(flag) or os.environ.get(FSDP_FLAG, "").lower() in ("1", "true")


def use_fsdp(flag: bool = False) -> bool:
    """True when this run shards: asked for, and several processes are running."""
    return fsdp_requested(flag) and active()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers (transformer blocks) of ``model``'s trunk, the units ``shard_layers`` wraps."""
    from posttrain.logprobs import split_model

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
