"""Every trainer runs the doctor: GRPO, PPO, DPO and the reward model log through `Run.log`, which
hands each step to `Doctor.watch` (a check at step 5, the no-signal rule's, then every 10 steps) and `Run.finish` to `Doctor.finish` (a last
check, then report.html). What the doctor logged live is what `posttrain doctor` finds afterwards."""

from __future__ import annotations

import json

import pytest

from posttrain.doctrine.doctor import Doctor, diagnose
from posttrain.runtime.tracking import read_jsonl

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light", "paper", "horse", "bread", "chair"]
STEPS = 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def seen(monkeypatch):
    """The step of every `Doctor.watch` call and of every check the doctor actually ran."""
    calls = {"watch": [], "check": []}
    watch, check = Doctor.watch, Doctor.check

    def spy_watch(self, run_dir, history, samples=None, force=False):
        calls["watch"].append(history[-1]["step"])
        return watch(self, run_dir, history, samples, force)

    def spy_check(self, history, samples=()):
        calls["check"].append(history[-1]["step"])
        return check(self, history, samples)

    monkeypatch.setattr(Doctor, "watch", spy_watch)
    monkeypatch.setattr(Doctor, "check", spy_check)
    return calls


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = [{"prompt": f"Say the word {w}.", "chosen": w, "rejected": f"No, here is {WORDS[i - 1]} instead."}
            for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(method: str, tmp_path, tiny_dir, peaked_dir, prefs, toy_prompts):
    common = dict(output_dir=str(tmp_path), name=method, max_steps=STEPS, checkpoint_every=0, log_every=100)
    if method == "dpo":
        from posttrain.algorithms.dpo import DPOConfig, train_dpo

        return train_dpo(DPOConfig(model=tiny_dir, data=prefs, lora=False, lr=3e-3, batch_size=4, eval_fraction=0.0,
                                   eval_at_start=False, **common))
    if method == "rm":
        from posttrain.algorithms.reward_model import RewardModelConfig, train_reward_model

        return train_reward_model(RewardModelConfig(model=tiny_dir, data=prefs, lr=3e-3, batch_size=4, lora_rank=8,
                                                    eval_fraction=0.25, **common))
    toy = dict(model=peaked_dir, data=toy_prompts, reward="format(pattern=[a-m].*)", prompts_per_step=2, group_size=4,
               max_new_tokens=2, lr=1e-2, lora=False, eval_at_start=False, **common)
    if method == "ppo":
        from posttrain.algorithms.ppo import PPOConfig, train_ppo

        return train_ppo(PPOConfig(value_lr=1e-3, ppo_epochs=1, kl_coef=0.02, **toy))
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo

    return train_grpo(GRPOConfig(beta=0.0, **toy))


@pytest.mark.parametrize("method", ["grpo", "ppo", "dpo", "rm"])
def test_trainer_calls_the_doctor_every_step_and_checks_at_5_and_every_10(method, seen, tmp_path, tiny_dir, peaked_dir, prefs,
                                                                  toy_prompts):
    res = _train(method, tmp_path, tiny_dir, peaked_dir, prefs, toy_prompts)
    history = res.history
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    # watch after each logged step, then finish's forced watch; checks at step 5 (no_signal_steps), 10 and the end
    assert seen["watch"] == list(range(1, STEPS + 1)) + [STEPS]
    assert seen["check"] == [5, 10, STEPS]
    assert (res.run_dir / "report.html").is_file()
    logged = read_jsonl(res.run_dir / "doctor.jsonl")
    replayed = diagnose(history, read_jsonl(res.run_dir / "samples.jsonl"), every=10)
    assert logged == [e.to_dict() for e in replayed]
    if method in ("dpo", "rm"):  # preference runs that learn: no rule may fire on their keys
        assert logged == [], logged
