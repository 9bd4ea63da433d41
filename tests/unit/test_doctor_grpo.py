"""The doctor watches a real GRPO run: a reward that pays for length is caught as length hacking,
and the run ends with report.html."""

import json

from posttrain import rewards as rw
from posttrain.algorithms.grpo import GRPOConfig, train_grpo


def test_length_paying_reward_triggers_length_hacking(tmp_path, stoppable_dir, toy_prompts):
    rw.register("chars", replace=True)(lambda prompt, completion, **_: float(len(completion)))
    try:
        res = train_grpo(GRPOConfig(model=stoppable_dir, data=toy_prompts, reward="chars", max_steps=20, group_size=8,
                                    prompts_per_step=4, max_new_tokens=24, output_dir=str(tmp_path), name="len",
                                    checkpoint_every=0, lr=1e-3, lora=False, beta=0.0, eval_at_start=False,
                                    log_every=100))
    finally:
        rw.unregister("chars")
    lengths = [m["len/mean"] for m in res.history]
    events = [json.loads(line) for line in (res.run_dir / "doctor.jsonl").read_text().splitlines()]
    assert "length_hacking" in {e["rule"] for e in events}, (lengths, events)
    assert (res.run_dir / "report.html").is_file()
