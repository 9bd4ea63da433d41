"""Several processes: who this process is, and the few collectives the trainers need.

Modules (every public name is re-exported here: callers write
``from posttrain.runtime import distributed`` and ``distributed.all_sum(...)``):
    collectives    who this process is (setup, active, world_size, rank, is_main, local_rank), the
                   collectives (barrier, all_sum, all_true, gather, broadcast, gather_cat,
                   reduce_metrics), the batch split (shard, check_divisible) and the replicated
                   weights (sync_params, check_in_sync)
    ddp            the DDP holder (DataParallel, data_parallel, run, DDP_MARK) and sum_gradients,
                   which sums the gradients neither DDP nor FSDP reduces
    fsdp           FSDP2 sharding (use_fsdp, shard_layers, gathered, grad_sync, clip_grad_norm,
                   is_dtensor, is_sharded) and sharded state in checkpoints (full_state_dict,
                   local_state, local_optimizer_state, load_local_optimizer_state, copy_into)

Launch any trainer with ``accelerate launch --multi_gpu --num_processes N -m posttrain train ...``
or ``torchrun --nproc_per_node N -m posttrain train ...`` (more machines: ``--num_machines`` /
``--nnodes``). ``setup`` joins the process group through accelerate's ``PartialState``, which reads
the launcher's environment and picks NCCL on GPUs (one device per process) and gloo on CPU. With
no launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op, so a single process runs
exactly as before.

How training is spread (data parallel, replicated weights; ``collectives`` and ``ddp``):

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

FSDP (``fsdp``; opt-in: the ``fsdp`` config field / ``--fsdp``, or ``ACCELERATE_USE_FSDP=true`` as
set by ``accelerate launch --use_fsdp`` or an FSDP config file; only under several processes; every
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

from posttrain.runtime.distributed.collectives import (BUCKET_NUMEL, SHARDING_FLAGS, active, all_sum, all_true,
                                                       barrier, broadcast, check_divisible, check_in_sync, gather,
                                                       gather_cat, is_main, launched, local_rank, rank,
                                                       reduce_metrics, setup, shard, sync_params, world_size)
from posttrain.runtime.distributed.ddp import DDP_MARK, DataParallel, data_parallel, run, sum_gradients
from posttrain.runtime.distributed.fsdp import (FSDP_FLAG, clip_grad_norm, copy_into, decoder_layers, fsdp_modules,
                                                fsdp_requested, full_state_dict, gathered, grad_sync, is_dtensor,
                                                is_sharded, load_local_optimizer_state, local_optimizer_state,
                                                local_state, shard_layers, use_fsdp)

__all__ = [
    "BUCKET_NUMEL", "DDP_MARK", "DataParallel", "FSDP_FLAG", "SHARDING_FLAGS", "active", "all_sum", "all_true",
    "barrier", "broadcast", "check_divisible", "check_in_sync", "clip_grad_norm", "copy_into", "data_parallel",
    "decoder_layers", "fsdp_modules", "fsdp_requested", "full_state_dict", "gather", "gather_cat", "gathered",
    "grad_sync", "is_dtensor", "is_main", "is_sharded", "launched", "load_local_optimizer_state",
    "local_optimizer_state", "local_rank", "local_state", "rank", "reduce_metrics", "run", "setup", "shard",
    "shard_layers", "sum_gradients", "sync_params", "use_fsdp", "world_size",
]
