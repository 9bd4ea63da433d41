"""The judge as reward beyond GRPO, through a real HTTP server (llm-katan's echo backend, which
returns the request's text, so the judge's "reply" is the score template filled in):

- PPO with `--reward judge:CONFIG` (plus a format reward, by weight), the server failing 30% of
  requests: the judge retries, training completes, the judge counters are logged.
"""

import json

import pytest

from posttrain.algorithms.ppo import PPOConfig, train_ppo
from posttrain.models import ensure_embedded
from posttrain.rlaif.katan import KatanServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def judge_yaml(tmp_path, url, **fields):
    lines = {"backend": "openai", "model": "judge", "base_url": url, "max_tokens": 64, "timeout": 60,
             "concurrency": 4, "cache": False, "backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 4, **fields}
    path = tmp_path / "judge.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return path


def test_ppo_with_a_flaky_http_judge(tmp_path, tiny_dir, toy_prompts):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server shares the 2 cores
    try:
        with KatanServer(ensure_embedded(), backend="echo", providers=("openai",),
                         args=["--error-rate", "0.3", "--max-concurrent", "8"]) as server:
            # the echo judge repeats the template back: every answered request reads as a rating of 7
            # 10 retries: a request is lost only if 11 attempts in a row fail (0.3^11 ~ 2e-6; with
            # 4 retries, 0.3^5 per request made about one run in 17 lose one of its 24)
            cfg = judge_yaml(tmp_path, server.openai_url, score_template="Rating: 7.\n{response}", max_retries=10)
            res = train_ppo(PPOConfig(model=tiny_dir, data=toy_prompts, reward=f"format(pattern=[a-m].*),judge:{cfg}:0.5",
                                      max_steps=3, prompts_per_step=2, group_size=4, max_new_tokens=4, lora=False,
                                      lr=1e-3, ppo_epochs=1, output_dir=str(tmp_path), name="ppo-judge",
                                      checkpoint_every=0, eval_at_start=False, log_every=100, samples_per_step=2))
            served = server.stats()["total"]
    finally:
        torch.set_num_threads(threads)
    assert len(res.history) == 3
    for m in res.history:
        assert "reward/judge" in m and "judge/requests" in m and m["judge/failures"] == 0
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    judged = [v for s in samples for v in s["parts"]["judge"]]
    assert len(judged) == 24 and all(v == pytest.approx(6 / 9) for v in judged)
    last = res.history[-1]  # the counters are cumulative
    assert served == last["judge/attempts"] and last["judge/retries"] > 0  # 30% of attempts failed, were retried
    assert (res.run_dir / "final" / "value").is_dir()
