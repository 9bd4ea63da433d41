"""Direct RLAIF in GRPO: `--reward 'judge(judge.yaml)'` with the judge behind real HTTP servers.

- llm-katan serves the embedded model (OpenAI API): a short GRPO run of the tiny policy, rewarded
  by the judge, completes, and the judge's requests reach the server.
- llm-katan's echo backend with --error-rate 0.3: the judge retries, training continues.
- echo with --rate-limit-after: every request fails, the judge's failure rate passes its threshold
  and JudgeFailureRate stops the run with a message naming the cause.
"""

import json
import sqlite3

import pytest

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.models import ensure_embedded
from posttrain.rlaif import JudgeFailureRate
from posttrain.rlaif.katan import KatanServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for the tiny policy: the judge server and other processes share 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grpo_config(tmp_path, tiny_dir, prompts, reward, name, steps=2, **kw):
    fields = dict(model=tiny_dir, data=prompts, reward=reward, max_steps=steps, group_size=2, prompts_per_step=2,
                  max_new_tokens=4, output_dir=str(tmp_path), name=name, checkpoint_every=0, lora=False, lr=1e-3,
                  beta=0.0, eval_at_start=False, log_every=100, seed=0)
    return GRPOConfig(**{**fields, **kw})


def judge_yaml(tmp_path, url, **fields):
    lines = {"backend": "openai", "model": "judge", "base_url": url, "max_tokens": 8, "timeout": 120,
             "concurrency": 4, **fields}
    path = tmp_path / "judge.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return path


def test_grpo_with_an_http_judge_of_the_embedded_model(tmp_path, tiny_dir, toy_prompts):
    with KatanServer(ensure_embedded(), backend="transformers", providers=("openai",), ready_timeout=240) as server:
        cache = tmp_path / "judge-cache.sqlite"
        cfg = judge_yaml(tmp_path, server.openai_url, cache=str(cache),
                         score_template='Rate the response from {min} to {max}.\n\nQuestion: {prompt}\n'
                                        'Response: {response}\n\nReply in the format "Rating: N".')
        res = train_grpo(grpo_config(tmp_path, tiny_dir, toy_prompts, f"judge({cfg})", "judged", samples_per_step=2))
        served = server.stats()["total"]
    history = res.history
    assert len(history) == 2
    # 2 steps x 2 prompts x 2 completions were judged (identical completions asked once)
    assert all("reward/judge/none" in m for m in history)
    unjudged = sum(m["reward/judge/none"] for m in history)
    assert 1 <= served <= 8
    replies = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert replies == served  # every reply was cached (a resumed run would not ask again)
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    judged = [r for s in samples for r in s["parts"]["judge"]]
    assert len(judged) == 8 and sum(r is None for r in judged) == unjudged
    assert all(r is None or 0.0 <= r <= 1.0 for r in judged)
    assert (res.run_dir / "final").is_dir()


def test_training_continues_through_judge_errors(tmp_path, tiny_dir, toy_prompts):
    with KatanServer(ensure_embedded(), backend="echo", providers=("openai",),
                     args=["--error-rate", "0.3", "--max-concurrent", "8"]) as server:
        # the echo judge repeats the template back: every answered request reads as a rating of 7
        cfg = judge_yaml(tmp_path, server.openai_url, cache=False, backoff_base=0.01, backoff_max=0.05,
                         max_retries=4, score_template="Rating: 7.\n{response}")
        res = train_grpo(grpo_config(tmp_path, tiny_dir, toy_prompts, f"format(pattern=[a-m].*),judge({cfg}):0.5",
                                     "flaky", steps=3, group_size=4, samples_per_step=2))
        served = server.stats()["total"]
    history = res.history
    assert len(history) == 3 and all("reward/mean" in m and "reward/judge/none" in m for m in history)
    assert (res.run_dir / "final").is_dir()
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    steps = {}
    for s in samples:  # every group of every step is in samples.jsonl (2 prompts per step)
        steps.setdefault(s["step"], []).append(s)
    asked = sum(len({(s["prompt"], c) for s in groups for c in s["completions"]}) for groups in steps.values())
    judged = [v for s in samples for v in s["parts"]["judge"]]
    assert len(judged) == 24
    # a 500 costs a retry, not a reward: almost every completion got the judge's 7 -> 6/9
    assert sum(v is None for v in judged) <= 2 and all(v is None or v == pytest.approx(6 / 9) for v in judged)
    assert served > asked  # 30% of attempts failed and were retried


def test_a_failing_judge_stops_the_run_with_a_clear_message(tmp_path, tiny_dir, toy_prompts):
    with KatanServer(ensure_embedded(), backend="echo", providers=("openai",),
                     args=["--rate-limit-after", "2"]) as server:
        cfg = judge_yaml(tmp_path, server.openai_url, cache=False, backoff_base=0.01, backoff_max=0.05,
                         max_retries=1, min_requests=8, max_failure_rate=0.5, score_template="{response}")
        with pytest.raises(JudgeFailureRate) as err:
            train_grpo(grpo_config(tmp_path, tiny_dir, toy_prompts, f"judge({cfg})", "stopped", steps=5,
                                   group_size=4))
    assert "429" in str(err.value) and "max_failure_rate" in str(err.value) and err.value.rate > 0.5
    assert not (tmp_path / "stopped" / "final").exists()  # stopped, not finished
    # ...but nothing done is lost: the last completed step is checkpointed, ready for --resume
    from posttrain.runtime.checkpoint import latest_checkpoint

    from posttrain.runtime.tracking import read_jsonl

    done = len(read_jsonl(tmp_path / "stopped" / "metrics.jsonl"))
    assert latest_checkpoint(tmp_path / "stopped").name == f"step-{done}"
