"""The runtime: what every run stands on, apart from the pipeline (data and tasks -> sampling ->
rewards -> the math (objectives) -> algorithms -> commands): configs, run directories, checkpoints,
memory and processes. It imports only ``posttrain.models`` (FSDP finds the decoder layers to shard);
any other package may import it.

Modules:
    config         dataclass configs <- YAML files <- command-line flags, each field documented
    checkpoint     atomic checkpoints (weights, optimizer, RNG, data position) and exact resume
    tracking       run directories: config.yaml, metrics.jsonl, samples.jsonl, TensorBoard, progress
    cpu_allocator  keep freed memory in the process on CPU, no page faults per step (``--cpu-memory``)
    distributed/   several processes: ranks and collectives, DDP, FSDP2 sharding (torchrun, accelerate)
"""
