"""Two processes on CPU (gloo), launched for real with torchrun and with accelerate launch: GRPO,
DPO, the reward model and PPO end with bit-identical weights on both ranks, and with the weights
and losses of a single process trained on the same global batch with the same seed; a two-process
GRPO run killed with SIGKILL after a checkpoint and resumed under two processes logs what the
uninterrupted run did. The same under FSDP (decoder layers sharded over the two processes): GRPO
with LoRA and with full fine-tuning, DPO with activation checkpointing through accelerate's FSDP
switch, the reward model, PPO with its critic on a second LoRA adapter; layers really are sharded,
results match one process, and FSDP checkpoints resume (GRPO, reward model, PPO)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.dpo import DPOConfig, train_dpo
from posttrain.algorithms.sft import SFTConfig, train_sft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import golden  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
BIN = Path(sys.executable).parent
TIMING = ("time/", "tokens_per_s")
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, spec: dict, tmp: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp / f"spec-{spec['config']['name']}-{len(list(tmp.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port())]
    else:  # accelerate's multi-process launcher (torch elastic underneath); gloo because there is no GPU
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([*cmd, str(WORKER), str(path)], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_single(spec: dict, tmp: Path) -> Path:
    """The same worker in one process, with one thread like the launched ones (the thread count
    changes float rounding, which sampling can amplify into other tokens)."""
    path = tmp / f"spec-{spec['config']['name']}-single.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP")}
    proc = subprocess.run([sys.executable, str(WORKER), str(path)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(spec["config"]["output_dir"]) / spec["config"]["name"]


def history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "adapter_model.safetensors")


def assert_ranks_identical(run_dir: Path) -> None:
    """Both ranks hold the same trained tensors, whose gradients DDP reduced."""
    assert json.loads((run_dir / "info-rank0.json").read_text())["ddp"]
    r0 = torch.load(run_dir / "weights-rank0.pt")
    r1 = torch.load(run_dir / "weights-rank1.pt")
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, float((a[k] - b[k]).abs().max()))


def assert_same_losses(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> None:
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for k in keys:
            assert abs(a[k] - b[k]) < 1e-5, (a["step"], k, a[k], b[k])


# ------------------------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dist-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say a word like {w}."}) + "\n" for w in WORDS))
    return str(path)


def grpo_fields(model: str, data: str, out: Path, name: str) -> dict:
    # 4 prompts x 4 completions per step (2 prompts per process), LoRA with the adapter-disabled
    # reference (beta > 0), micro-batches of one prompt, a held-out quarter evaluated at the end.
    # Seed 1: the logits of a 2-prompt batch (a rank's) and of a 4-prompt one (one process) may round
    # differently; at seed 0 one uniform draw falls between the two roundings of a token boundary
    # (measured here: the final weights then differ by 4e-3); seeds 1 and 2 match.
    return dict(model=model, data=data, reward="format(pattern=[a-m].*)", max_steps=4, group_size=4,
                prompts_per_step=4, micro_batch_prompts=1, max_new_tokens=3, lr=1e-3, lora=True, beta=0.04,
                eval_fraction=0.25, eval_at_start=False, checkpoint_every=2, keep_last=5, log_every=100,
                device="cpu", output_dir=str(out), name=name, seed=1)


@pytest.fixture(scope="module")
def grpo_two(tmp_path_factory, peaked_dir, prompts) -> Path:
    """A 4-step GRPO run on two processes (torchrun), uninterrupted."""
    tmp = tmp_path_factory.mktemp("grpo-two")
    launch("torchrun", {"method": "grpo", "config": grpo_fields(peaked_dir, prompts, tmp, "two")}, tmp)
    return tmp / "two"


def test_grpo_two_processes_match_one(grpo_two, peaked_dir, prompts, tmp_path):
    one = run_single({"method": "grpo", "config": grpo_fields(peaked_dir, prompts, tmp_path, "one")}, tmp_path)
    assert_ranks_identical(grpo_two)
    assert_same_weights(final_weights(one), final_weights(grpo_two))
    h1, h2 = history(one), history(grpo_two)
    assert len(h2) == 4
    assert_same_losses(h1, h2, ("loss", "pg_loss", "kl", "entropy", "reward/mean", "reward/std", "grad_norm"))
    assert h2[-1]["kl"] > 0  # the adapter moved away from the reference
    e1 = [json.loads(x) for x in (one / "evals.jsonl").read_text().splitlines()]
    e2 = [json.loads(x) for x in (grpo_two / "evals.jsonl").read_text().splitlines()]
    assert [(e["step"], e["n"], e["accuracy"]) for e in e1] == [(e["step"], e["n"], e["accuracy"]) for e in e2]
    # only rank 0 wrote the run directory's files (one line per step, not two)
    assert len((grpo_two / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (grpo_two / "checkpoints" / "step-4").glob("rng*")) == [
        "rng-rank0.pt", "rng-rank1.pt"]
    golden.check("ddp-grpo-lora", grpo_two)
    golden.check("ddp-grpo-lora-single", one)


def test_grpo_sigkill_then_resume_on_two_processes(grpo_two, peaked_dir, prompts, tmp_path):
    spec = {"method": "grpo", "config": grpo_fields(peaked_dir, prompts, tmp_path, "killed"),
            "kill_after_checkpoint": 2}
    killed = launch("torchrun", spec, tmp_path, check=False)
    run_dir = tmp_path / "killed"
    assert killed.returncode != 0 and not (run_dir / "final").exists()
    assert len(history(run_dir)) == 2
    resume = {"method": "grpo", "config": {**spec["config"], "resume": str(run_dir)}}
    launch("torchrun", resume, tmp_path)
    straight, resumed = history(grpo_two), history(run_dir)
    assert straight == resumed
    assert_ranks_identical(run_dir)
    assert_same_weights(final_weights(grpo_two), final_weights(run_dir), atol=0)


def test_a_nonfinite_loss_on_one_process_skips_the_update_on_both(peaked_dir, prompts, tmp_path):
    # the reward is +inf on rank 1 only: its loss is NaN, rank 0's finite; optim.py's rule skips the
    # update on both ranks (they stay identical), counts it, and nothing is trained
    fields = {**grpo_fields(peaked_dir, prompts, tmp_path, "inf"), "reward": "inf_on_rank", "max_steps": 2,
              "checkpoint_every": 0, "eval_fraction": 0.0}
    launch("torchrun", {"method": "grpo", "config": fields, "inf_reward_on_rank": 1}, tmp_path)
    run_dir = tmp_path / "inf"
    assert_ranks_identical(run_dir)
    assert [m["nonfinite_steps"] for m in history(run_dir)] == [1, 1]
    lora_b = {k: v for k, v in final_weights(run_dir).items() if "lora_B" in k}
    assert lora_b and all(not v.any() for v in lora_b.values())  # still peft's zero initialisation


# ------------------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dist-pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Say the word {w}.", "chosen": w, "rejected": f"No, here is {WORDS[i - 1]} instead."}
            for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_two_processes_match_one(tiny_dir, pairs, tmp_path):
    # 4 pairs per step (2 per process, micro-batches of 1), 2 held-out pairs scored by both processes
    fields = dict(model=tiny_dir, data=pairs, lora=True, lr=1e-3, batch_size=4, micro_batch_size=1, max_steps=3,
                  eval_fraction=0.25, eval_at_start=True, checkpoint_every=0, log_every=100, device="cpu",
                  output_dir=str(tmp_path))
    launch("accelerate", {"method": "dpo", "config": {**fields, "name": "two"}}, tmp_path)
    one = train_dpo(DPOConfig(**fields, name="one"))
    two = tmp_path / "two"
    assert_ranks_identical(two)
    assert_same_weights(final_weights(one.run_dir), final_weights(two))
    assert_same_losses(history(one.run_dir), history(two), ("loss", "rewards/margin", "rewards/accuracy", "grad_norm"))
    evals = [json.loads(x) for x in (two / "evals.jsonl").read_text().splitlines()]
    assert [e["pairs"] for e in evals] == [2, 2] and evals[-1]["loss"] < evals[0]["loss"]
    ref_one = torch.load(one.run_dir / "reference_logps.pt")
    ref_two = torch.load(two / "reference_logps.pt")
    assert torch.equal(ref_one["index"], ref_two["index"])
    assert torch.allclose(ref_one["logps"], ref_two["logps"], atol=1e-5)
    golden.check("ddp-dpo-lora", two)


# ------------------------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dist-sft") / "sft.jsonl"
    rows = [{"prompt": f"Say the word {w}.", "completion": " ".join([w] * (i % 3 + 1))} for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_fields(model: str, data: str, out: Path) -> dict:
    # 4 examples per step (2 per process, micro-batches of 1, of unequal lengths: each weighted by its
    # share of the step's trained tokens), 2 held-out examples scored by both processes
    return dict(model=model, data=data, lora=True, lr=1e-3, batch_size=4, micro_batch_size=1, max_steps=4,
                eval_fraction=0.25, eval_at_start=True, checkpoint_every=2, keep_last=5, log_every=100, device="cpu",
                output_dir=str(out))


def test_sft_two_processes_match_one(tiny_dir, sft_rows, tmp_path):
    fields = sft_fields(tiny_dir, sft_rows, tmp_path)
    launch("accelerate", {"method": "sft", "config": {**fields, "name": "two"}}, tmp_path)
    one = train_sft(SFTConfig(**fields, name="one"))
    two = tmp_path / "two"
    assert_ranks_identical(two)
    assert_same_weights(final_weights(one.run_dir), final_weights(two))
    assert_same_losses(history(one.run_dir), history(two), ("loss", "grad_norm", "tokens", "target_tokens"))
    evals = [json.loads(x) for x in (two / "evals.jsonl").read_text().splitlines()]
    assert [e["n_examples"] for e in evals] == [2, 2] and evals[-1]["loss"] < evals[0]["loss"]


def test_sft_fsdp_matches_one_and_resumes(tiny_dir, sft_rows, tmp_path):
    fields = sft_fields(tiny_dir, sft_rows, tmp_path)
    launch("torchrun", {"method": "sft", "config": {**fields, "name": "two", "fsdp": True}, "resume_copy": 2}, tmp_path)
    two = tmp_path / "two"
    final = final_weights(two)
    assert assert_layers_sharded(two, final) == 28
    one = run_single({"method": "sft", "config": {**fields, "name": "one"}}, tmp_path)
    assert_same_weights(final_weights(one), final)
    assert_same_losses(history(one), history(two), ("loss", "grad_norm"))
    resumed = tmp_path / "two-resumed"
    assert_same_losses(history(two), history(resumed), ("loss", "grad_norm"))
    assert_same_weights(final, final_weights(resumed), atol=0)


# ------------------------------------------------------------------------------------------- FSDP


def assert_layers_sharded(run_dir: Path, final: dict[str, torch.Tensor], rename=None) -> int:
    """Each rank holds about half of every decoder-layer parameter, and the two ranks' shards of
    the trainable ones, put together, are the gathered weights saved in final/ (``rename``: a
    parameter's name -> its key in ``final``). Returns how many parameters were checked."""
    rename = rename or (lambda n: n.replace(".default.", "."))
    assert not json.loads((run_dir / "info-rank0.json").read_text())["ddp"]  # FSDP reduces, not DDP
    s0 = json.loads((run_dir / "shards-rank0.json").read_text())
    s1 = json.loads((run_dir / "shards-rank1.json").read_text())
    assert s0.keys() == s1.keys() and s0
    assert all(".layers." in n for n in s0)  # only decoder layers are sharded
    for n in s0:
        (l0, full), (l1, full1) = s0[n], s1[n]
        assert full == full1 and l0 + l1 == full and abs(l0 - full / 2) <= full / 8, (n, l0, l1, full)
    w0, w1 = torch.load(run_dir / "weights-rank0.pt"), torch.load(run_dir / "weights-rank1.pt")
    checked = 0
    for n in w0:
        if n in s0:
            assert rename(n) in final, rename(n)
            assert torch.equal(torch.cat([w0[n], w1[n]]), final[rename(n)]), n
            checked += 1
        elif n.split(".weights.", 1)[-1] in s0:  # a TrainState's copy of a sharded one (PPO's critic)
            assert torch.equal(w0[n], w0[n.split(".weights.", 1)[1]]) and torch.equal(w1[n], w1[n.split(".weights.", 1)[1]]), n
        else:  # replicated (embeddings, final norm, a value head): identical on both ranks
            assert torch.equal(w0[n], w1[n]), n
    assert checked
    return checked


def full_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def test_grpo_fsdp_lora_shards_matches_one_and_resumes(peaked_dir, prompts, tmp_path):
    # torchrun with the fsdp config field; 3 steps, checkpoints at 2 and 3
    fields = {**grpo_fields(peaked_dir, prompts, tmp_path, "fsdp"), "max_steps": 3, "seed": 1, "fsdp": True}
    launch("torchrun", {"method": "grpo", "config": fields}, tmp_path)
    two = tmp_path / "fsdp"
    final = final_weights(two)
    assert assert_layers_sharded(two, final) == 28  # 2 layers x 7 projections x (lora_A, lora_B)
    one = run_single({"method": "grpo", "config": {**fields, "name": "one", "fsdp": False}}, tmp_path)
    assert_same_weights(final_weights(one), final)
    h1, h2 = history(one), history(two)
    assert len(h2) == 3
    assert_same_losses(h1, h2, ("loss", "pg_loss", "kl", "entropy", "reward/mean", "grad_norm"))
    assert h2[-1]["kl"] > 0
    ckpt = two / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.glob("optimizer*")) == ["optimizer-rank0.pt", "optimizer-rank1.pt"]
    # killed after the step-2 checkpoint, resumed under FSDP: the uninterrupted run exactly
    spec = {"method": "grpo", "config": {**fields, "name": "killed"}, "kill_after_checkpoint": 2}
    killed = launch("torchrun", spec, tmp_path, check=False)
    run_dir = tmp_path / "killed"
    assert killed.returncode != 0 and not (run_dir / "final").exists() and len(history(run_dir)) == 2
    launch("torchrun", {"method": "grpo", "config": {**spec["config"], "resume": str(run_dir)}}, tmp_path)
    assert history(run_dir) == h2
    assert_same_weights(final, final_weights(run_dir), atol=0)
    golden.check("fsdp-grpo-lora", two)


def test_grpo_fsdp_full_finetuning_matches_one(peaked_dir, prompts, tmp_path):
    # full fine-tuning: the frozen reference copy is sharded like the policy; embeddings, norm
    # and the tied head stay replicated (summed by sum_gradients), in their own optimizer group
    fields = {**grpo_fields(peaked_dir, prompts, tmp_path, "fsdp"), "lora": False, "lr": 1e-4, "max_steps": 2,
              "checkpoint_every": 0, "eval_fraction": 0.0, "fsdp": True}
    launch("torchrun", {"method": "grpo", "config": fields}, tmp_path)
    two = tmp_path / "fsdp"
    final = full_weights(two)
    assert assert_layers_sharded(two, final) == 2 * 9  # 7 projections + 2 norms per layer
    one = run_single({"method": "grpo", "config": {**fields, "name": "one", "fsdp": False}}, tmp_path)
    assert_same_weights(full_weights(one), final)
    h1, h2 = history(one), history(two)
    assert_same_losses(h1, h2, ("loss", "kl", "reward/mean", "grad_norm"))
    assert h2[-1]["kl"] > 0
    golden.check("fsdp-grpo-full", two)


def test_dpo_fsdp_via_accelerate_matches_one(tiny_dir, pairs, tmp_path):
    # accelerate launch with ACCELERATE_USE_FSDP=true (what an FSDP accelerate config sets), and
    # activation checkpointing of every layer (recomputed in backward inside FSDP's hooks); the
    # single process runs without it: recomputing changes no number
    fields = dict(model=tiny_dir, data=pairs, lora=True, lr=1e-3, batch_size=4, micro_batch_size=1, max_steps=3,
                  eval_fraction=0.25, eval_at_start=True, checkpoint_every=0, log_every=100, device="cpu",
                  output_dir=str(tmp_path))
    launch("accelerate", {"method": "dpo", "config": {**fields, "name": "two", "activation_checkpointing": 1}},
           tmp_path, env={"ACCELERATE_USE_FSDP": "true"})
    two = tmp_path / "two"
    info = json.loads((two / "info-rank0.json").read_text())
    layers = [n for n in info["activation_checkpointing"] if "DecoderLayer" in n]
    assert layers == ["FSDPLlamaDecoderLayer"] * 2, info  # both decoder layers: sharded and checkpointed
    final = final_weights(two)
    assert assert_layers_sharded(two, final) == 28
    one = run_single({"method": "dpo", "config": {**fields, "name": "one"}}, tmp_path)
    assert_same_weights(final_weights(one), final)
    assert_same_losses(history(one), history(two), ("loss", "rewards/margin", "rewards/accuracy", "grad_norm"))
    evals = [json.loads(x) for x in (two / "evals.jsonl").read_text().splitlines()]
    assert [e["pairs"] for e in evals] == [2, 2] and evals[-1]["loss"] < evals[0]["loss"]
    golden.check("fsdp-dpo-lora", two)


# ------------------------------------------------------------------------------------------- reward model


def rm_fields(model: str, data: str, out: Path) -> dict:
    # 5 training pairs, 4 per step (2 per process); 3 held out, scored one per batch, so rank 0
    # runs two evaluation forwards and rank 1 one (under FSDP: inside `gathered`). lr 1e-3 (as
    # ppo_fields explains): at 3e-3 one rounding of a 2-pair against a 4-pair batch moved a LoRA
    # weight by 1.8e-5 on an AVX512 machine, past the 1e-5 this compares at
    return dict(model=model, data=data, lora=True, lr=1e-3, batch_size=4, max_steps=3, eval_fraction=0.375,
                eval_batch_size=1, checkpoint_every=2, keep_last=5, log_every=100, device="cpu", output_dir=str(out))


def rm_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**final_weights(run_dir), **{f"head.{k}": v for k, v in
                                         load_file(run_dir / "final" / "value_head.safetensors").items()}}


def evals_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "evals.jsonl").read_text().splitlines()]


def assert_same_evals(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [e["step"] for e in a] == [e["step"] for e in b] and a
    for x, y in zip(a, b):
        for k in keys:
            assert abs(x[k] - y[k]) < 1e-5, (x["step"], k, x[k], y[k])


@pytest.fixture(scope="module")
def rm_one(tiny_dir, pairs, tmp_path_factory) -> Path:
    """The reward model trained by one process (in this one, one thread)."""
    from posttrain.algorithms.reward_model import RewardModelConfig, train_reward_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fields = rm_fields(tiny_dir, pairs, tmp_path_factory.mktemp("rm-one"))
        return train_reward_model(RewardModelConfig(**fields, name="one")).run_dir
    finally:
        torch.set_num_threads(n)


RM_LOSSES = ("loss", "bt_loss", "rewards/margin", "rewards/accuracy", "rewards/chosen", "grad_norm")
RM_EVALS = ("accuracy", "margin", "loss", "score/mean", "score/std")


def test_reward_model_two_processes_match_one(rm_one, tiny_dir, pairs, tmp_path):
    launch("torchrun", {"method": "rm", "config": {**rm_fields(tiny_dir, pairs, tmp_path), "name": "two"}}, tmp_path)
    two = tmp_path / "two"
    assert_ranks_identical(two)  # the adapter and the head
    assert "head.linear.weight" in torch.load(two / "weights-rank0.pt")
    assert_same_weights(rm_weights(rm_one), rm_weights(two))
    assert_same_losses(history(rm_one), history(two), RM_LOSSES)
    assert_same_evals(evals_of(rm_one), evals_of(two), RM_EVALS)
    assert [e["n"] for e in evals_of(two)] == [3, 3]
    golden.check("ddp-rm-lora", two)


def test_reward_model_fsdp_matches_one_and_resumes(rm_one, tiny_dir, pairs, tmp_path):
    # accelerate's FSDP switch; then resumed from a copy of its step-2 checkpoint (dist_worker)
    fields = rm_fields(tiny_dir, pairs, tmp_path)
    launch("accelerate", {"method": "rm", "config": {**fields, "name": "two"}, "resume_copy": 2}, tmp_path,
           env={"ACCELERATE_USE_FSDP": "true"})
    two = tmp_path / "two"
    final = rm_weights(two)
    assert assert_layers_sharded(two, final_weights(two)) == 28  # the head is not sharded: equal on both ranks
    assert_same_weights(rm_weights(rm_one), final)
    assert_same_losses(history(rm_one), history(two), RM_LOSSES)
    assert_same_evals(evals_of(rm_one), evals_of(two), RM_EVALS)
    ckpt = two / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.glob("optimizer*")) == ["optimizer-rank0.pt", "optimizer-rank1.pt"]
    # resumed from the step-2 checkpoint: step 3 again, exactly
    again = tmp_path / "two-resumed"
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert history(again) == history(two)
    assert_same_weights(final, rm_weights(again), atol=0)
    golden.check("fsdp-rm-lora", two)


# ------------------------------------------------------------------------------------------- PPO


def ppo_fields(model: str, data: str, out: Path, name: str) -> dict:
    # 4 prompts x 2 completions per step (2 prompts per process), LoRA policy with the critic on a
    # second adapter of the same sharded layers, the reference = adapters disabled (kl_coef > 0);
    # one minibatch (the union of the processes' is then one process's), 2 epochs; a held-out
    # quarter evaluated at the end (gathered); checkpoints at steps 1 and 2. Seed 1 as for GRPO.
    # lr 1e-3: Adam's first steps move a weight by ~lr whatever its gradient's size, so a float
    # rounding of a tiny gradient (a 2-prompt batch against a 4-prompt one) shows as ~lr/300 in
    # the weights (measured: 3e-5 at 1e-2, 3e-6 at 1e-3, data-parallel and FSDP alike).
    return dict(model=model, data=data, reward="format(pattern=[a-m].*)", max_steps=2, group_size=2,
                prompts_per_step=4, max_new_tokens=3, lr=1e-3, value_lr=1e-3, lora=True, value_model="adapter",
                kl_coef=0.1, ppo_epochs=2, minibatches=1, eval_fraction=0.25, eval_at_start=False,
                checkpoint_every=1, keep_last=5, log_every=100, device="cpu", output_dir=str(out), name=name, seed=1)


def ppo_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's adapter, the critic's adapter and its head, from final/."""
    from safetensors.torch import load_file

    value = run_dir / "final" / "value"
    return {**final_weights(run_dir), **{f"value.{k}": v for k, v in load_file(value / "adapter_model.safetensors").items()},
            **{f"head.{k}": v for k, v in load_file(value / "value_head.safetensors").items()}}


PPO_LOSSES = ("loss", "pg_loss", "value_loss", "kl", "entropy", "reward/mean", "value/mean", "returns/mean",
              "grad_norm", "value_grad_norm")


def train_ppo_here(fields: dict) -> Path:
    """PPO in this process, with one thread as the launched processes."""
    from posttrain.algorithms.ppo import PPOConfig, train_ppo

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_ppo(PPOConfig(**fields)).run_dir
    finally:
        torch.set_num_threads(n)


def test_ppo_two_processes_full_finetuning_separate_critic_matches_one(peaked_dir, prompts, tmp_path):
    # accelerate launch, data-parallel; full fine-tuning: a separate critic model and a frozen
    # reference copy, every weight trained (lr 1e-4: see ppo_fields)
    fields = {**ppo_fields(peaked_dir, prompts, tmp_path, "two"), "lora": False, "value_model": "separate",
              "lr": 1e-4, "value_lr": 1e-4, "eval_fraction": 0.0, "checkpoint_every": 0}
    launch("accelerate", {"method": "ppo", "config": fields}, tmp_path)
    two = tmp_path / "two"
    one = train_ppo_here({**fields, "name": "one"})
    assert_ranks_identical(two)  # the policy and, as value.weights.* / value.head.*, the critic
    assert any(k.startswith("value.weights.") for k in torch.load(two / "weights-rank0.pt"))
    files = ("model.safetensors", "value/model.safetensors", "value/value_head.safetensors")
    from safetensors.torch import load_file

    for f in files:
        assert_same_weights(load_file(one / "final" / f), load_file(two / "final" / f))
    h2 = history(two)
    assert_same_losses(history(one), h2, PPO_LOSSES)
    assert h2[-1]["kl"] > 0 and h2[-1]["value_grad_norm"] > 0
    golden.check("ddp-ppo-full", two)


def test_ppo_fsdp_lora_with_adapter_critic_matches_one_and_resumes(peaked_dir, prompts, tmp_path):
    # then resumed from a copy of its step-1 checkpoint, by the same processes (dist_worker)
    fields = {**ppo_fields(peaked_dir, prompts, tmp_path, "fsdp"), "fsdp": True}
    launch("torchrun", {"method": "ppo", "config": fields, "resume_copy": 1}, tmp_path)
    two = tmp_path / "fsdp"
    final = ppo_weights(two)
    # both adapters' LoRA weights are sharded: 2 layers x 7 projections x (lora_A, lora_B) x 2 adapters
    critic = lambda n: "value." + n.replace(".value.", ".") if ".value." in n else n.replace(".default.", ".")
    assert assert_layers_sharded(two, final, critic) == 56
    one = train_ppo_here({**fields, "name": "one", "fsdp": False})
    assert_same_weights(ppo_weights(one), final)
    h1, h2 = history(one), history(two)
    assert len(h2) == 2
    assert_same_losses(h1, h2, PPO_LOSSES)
    assert h2[-1]["kl"] > 0 and h2[-1]["value_grad_norm"] > 0
    assert_same_evals(evals_of(one), evals_of(two), ("accuracy", "n"))
    # the critic's adapter tensors are in each rank's optimizer file as that rank's shards
    ckpt = two / "checkpoints" / "step-1"
    states = [torch.load(ckpt / f"optimizer-rank{r}.pt", weights_only=False) for r in (0, 1)]
    w0, w1 = (s["value"]["weights"] for s in states)
    name = next(n for n in w0 if "lora_A" in n)
    assert w0[name].shape[0] + w1[name].shape[0] == final[f"value.{name}".replace(".value.", ".")].shape[0]
    # resumed from the step-1 checkpoint: step 2 again, exactly
    again = tmp_path / "fsdp-resumed"
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert history(again) == h2
    assert_same_weights(final, ppo_weights(again), atol=0)
    golden.check("fsdp-ppo-lora", two)


def test_fsdp_is_asked_for_by_the_flag_or_accelerate_and_needs_several_processes(monkeypatch):
    from posttrain.runtime import distributed

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(distributed.fsdp, "active", lambda: True)
    assert distributed.use_fsdp(True) and not distributed.use_fsdp(False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.use_fsdp(False)
    monkeypatch.setattr(distributed.fsdp, "active", lambda: False)  # one process: nothing to shard
    assert distributed.fsdp_requested(False) and not distributed.use_fsdp(True)


# ------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_shares_of_parts_add_up_to_the_whole_reduction(mode):
    from posttrain.objectives import losses

    # 3 sequences on "rank 0" (one with no valid token), 2 on "rank 1", of different widths
    x0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m0 = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    x1, m1 = torch.tensor([[5.0, 6.0], [7.0, 8.0]]), torch.tensor([[1, 1], [1, 0]])
    pad = torch.nn.functional.pad
    whole_x, whole_m = torch.cat([x0, pad(x1, (0, 1))]), torch.cat([m0, pad(m1, (0, 1))])
    counts = losses.reduction_counts(m0) + losses.reduction_counts(m1)  # what all_sum gives
    assert counts.tolist() == [7.0, 4.0, 5.0]  # valid tokens, sequences with one, sequences
    total = sum(losses.reduction_share(mode, m, counts) * float(losses.reduce(x, m, mode, max_len=3))
                for x, m in ((x0, m0), (x1, m1)))
    assert abs(total - float(losses.reduce(whole_x, whole_m, mode, max_len=3))) < 1e-6


def test_step_metrics_reduce_by_sum_max_or_mean_over_processes(tmp_path):
    """``reduce_metrics`` on two real processes: a share-weighted key is summed, ``mismatch/ratio_max``
    (``common.MISMATCH_MAX``) takes the largest rank's value, the rest is the mean over ranks."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "import json, sys\n"
        "from posttrain.runtime import distributed\n"
        "from posttrain.algorithms.common import MISMATCH_MAX\n"
        "distributed.setup('cpu')\n"
        "r = distributed.rank()\n"
        "out = distributed.reduce_metrics({'loss': 0.25 * (r + 1), 'mismatch/ratio_max': [1.5, 1.1][r],\n"
        "                                  'mismatch/kl': [1e-3, 3e-3][r]}, sum_keys=['loss'], max_keys=MISMATCH_MAX)\n"
        "if r == 0:\n"
        "    open(sys.argv[1], 'w').write(json.dumps(out))\n")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == pytest.approx({"loss": 0.75, "mismatch/ratio_max": 1.5, "mismatch/kl": 2e-3})


def test_single_process_helpers_are_identities():
    from posttrain.runtime import distributed

    assert distributed.world_size() == 1 and distributed.is_main() and distributed.shard(5) == slice(0, 5)
    x = torch.arange(3.0)
    assert distributed.all_sum(x) is x and distributed.gather_cat(x) is x and distributed.all_true(True)
    assert distributed.reduce_metrics({"loss": 0.5}, sum_keys=["loss"]) == {"loss": 0.5}
    distributed.check_divisible("prompts_per_step", 3)  # any size divides among one process
