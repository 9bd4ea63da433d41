"""The non-finite rule of ``algorithms/optim.py``, once per trainer: a step whose loss is not finite
is skipped (no weight moves), counted in ``nonfinite_steps``, its data is consumed and the
learning-rate schedule advances as if it had been taken. Each trainer meets a real non-finite
loss: GRPO and PPO an infinite reward, DPO a beta that overflows float32, the reward model a pair
whose required margin overflows float32."""

import json

import pytest
import torch

from posttrain import rewards as rw
from posttrain.commands.train import resolve
from posttrain.models import load_model

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light"]
BASE_LR = 1e-3
WARMUP = 4  # the logged lr (after the step's advance) is BASE_LR * (step + 1) / WARMUP


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    prompts, pairs, margins = tmp / "prompts.jsonl", tmp / "pairs.jsonl", tmp / "margins.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say a word like {w}."}) + "\n" for w in WORDS))
    rows = [{"prompt": f"Say the word {w}.", "chosen": w, "rejected": f"No, {WORDS[i - 1]}."} for i, w in enumerate(WORDS)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a required score gap of 1e39: a finite number in the file (an infinite one is refused as bad data), over
    # float32's range once a tensor, so -logsigmoid(r_c - r_r - m) is +inf, as DPO's beta=1e39 overflows
    margins.write_text("".join(json.dumps({**r, "margin": 1e39}) + "\n" for r in rows))
    return {"prompts": str(prompts), "pairs": str(pairs), "margins": str(margins)}


@pytest.fixture(autouse=True, scope="module")
def infinite_reward():
    rw.register("always_inf_nf", replace=True)(lambda prompt, completion, **_: float("inf"))
    yield
    rw.unregister("always_inf_nf")


def config_of(method: str, files: dict, model: str, out) -> dict:
    common = dict(model=model, output_dir=str(out), name=method, max_steps=2, checkpoint_every=1, keep_last=5,
                  lora=False, lr=BASE_LR, warmup_steps=WARMUP, eval_at_start=False, log_every=100, device="cpu")
    sampling = dict(data=files["prompts"], reward="always_inf_nf", group_size=2, prompts_per_step=2,
                    max_new_tokens=2, rollout_dtype="float32")
    return {
        "grpo": dict(common, **sampling, beta=0.0),
        "ppo": dict(common, **sampling, value_model="separate", ppo_epochs=1),
        "dpo": dict(common, data=files["pairs"], beta=1e39, batch_size=2, eval_fraction=0.0),
        "rm": dict(common, data=files["margins"], batch_size=2, eval_fraction=0.0),
    }[method]


@pytest.mark.parametrize("method", ["grpo", "ppo", "dpo", "rm"])
def test_a_nonfinite_step_is_skipped_counted_and_consumes_its_data(method, files, tmp_path, peaked_dir, tiny_dir):
    model_dir = peaked_dir if method in ("grpo", "ppo") else tiny_dir
    cls, train = resolve(method)
    res = train(cls(**config_of(method, files, model_dir, tmp_path)))
    history = res.history
    assert [m["nonfinite_steps"] for m in history] == [1, 1]
    # the schedule advanced once per step, as if the updates had been taken
    assert [m["lr"] for m in history] == pytest.approx([BASE_LR * 2 / WARMUP, BASE_LR * 3 / WARMUP])
    # the data position moved on by one batch per step (2 prompts or pairs)
    positions = [json.loads((res.run_dir / "checkpoints" / f"step-{s}" / "state.json").read_text())["stream"]["pos"]
                 for s in (1, 2)]
    assert positions == [2, 4]
    # nothing was trained on: the final weights are the initial ones
    init, _ = load_model(model_dir)
    final, _ = load_model(str(res.run_dir / "final"))
    for (n, a), (_, b) in zip(init.named_parameters(), final.named_parameters()):
        assert torch.equal(a, b), (method, n)
