"""Direct RLAIF: an AI judge's rating as the reward (the doctrine's `direct_rlaif_reward`).

    --reward 'judge(judge.yaml)'                 the judge's score in [0, 1]
    --reward 'math,judge(judge.yaml):0.5'        combined with other rewards by weight
    --reward 'judge(judge.yaml,concurrency=4)'   spec options override fields of the YAML file
    --reward 'judge(backend=local)'              no file: the fields as options

The judge config format is in `posttrain.rlaif.config`. Where the judge exposes token probabilities
(the `local` backend; an OpenAI-compatible server that returns logprobs) and `scoring` is auto (the
default) or probability, the reward is the expected rating under the judge's distribution over the
rating tokens, mapped to [0, 1] (G-Eval; `posttrain.rlaif.probability`): continuous, so the samples
of a GRPO group differ in reward even when the judge's most likely rating is the same, and never
None for want of a parsable answer. Otherwise one sampled answer is parsed. The reward is None for
a sample the judge could not rate (request failed after its retries, or, parsing, no rating in the
reply): the trainer masks it out, `combine` leaves it out of the total.

Contract with trainers:
- `rewards.score_batch` finds the `batch` attribute and sends a whole step's completions at once
  (concurrent HTTP requests, or one batched local generation).
- `judge_metrics(reward_fn)` gives the judge counters to log each step: `judge/requests`,
  `judge/by_probability`, `judge/parsed`, `judge/unparsable`, `judge/failures`, `judge/cache_hits`, `judge/attempts`,
  `judge/retries` (cumulative), `judge/failure_rate` (recent window), `judge/seconds`. With
  several judges in one spec they are `judge/<part name>/...` (`judge`, `judge_2`).
- When the recent failure rate passes `max_failure_rate`, scoring raises
  `posttrain.rlaif.JudgeFailureRate` (its message says what failed and what to check): the
  trainer catches it, saves a checkpoint of the last completed step and stops with that message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from posttrain.rlaif.judges import Judge


class JudgeReward:
    """A reward function backed by a Judge; callable per sample, with a batch form and metrics."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.__name__ = "judge"

    def __call__(self, prompt: Any, completion: Any, **_row: Any) -> Optional[float]:
        return self.judge.score(prompt, completion)

    def batch(self, rows: Sequence[dict], completions: Sequence[Any], max_workers: int | None = None) -> list[Optional[float]]:
        """Score a whole batch (rows carry "prompt"); concurrency comes from the judge config,
        not `max_workers` (that bounds CPU worker processes, and a judge waits on the network)."""
        return self.judge.score_batch([r.get("prompt") for r in rows], list(completions))

    def metrics(self) -> dict[str, float]:
        return self.judge.metrics()

    def close(self) -> None:
        self.judge.close()

    def __repr__(self) -> str:
        return f"JudgeReward({self.judge!r})"


def make_judge_reward(arg: str | None = None, **options: Any) -> JudgeReward:
    """The registry's factory: `arg` is a judge YAML path (or None), `options` override its fields."""
    if arg is not None:
        return JudgeReward(Judge.from_config(str(arg), **options))
    if not options:
        raise ValueError("the judge reward needs a config: judge(judge.yaml), or fields such as judge(backend=local)")
    return JudgeReward(Judge.from_config(dict(options)))


def find_judges(reward_fn: Any) -> list[tuple[str, JudgeReward]]:
    """Every judge inside a reward (a Combined of parts, a registry Reward, or a JudgeReward)."""
    if isinstance(reward_fn, JudgeReward):
        return [("judge", reward_fn)]
    parts = getattr(reward_fn, "parts", None)
    if parts is not None:
        found = []
        for name, fn, *_ in parts:
            found += [(name, j) for _, j in find_judges(fn)]
        return found
    inner = getattr(reward_fn, "fn", None)
    if isinstance(inner, JudgeReward):
        return [(getattr(reward_fn, "name", "judge"), inner)]
    return []


def judge_metrics(reward_fn: Any) -> dict[str, float]:
    """The judge counters of every judge in `reward_fn` (empty when there is none)."""
    judges = find_judges(reward_fn)
    if len(judges) == 1:
        return judges[0][1].metrics()
    out: dict[str, float] = {}
    for name, j in judges:
        out.update(j.judge.metrics(prefix=f"judge/{name}/"))
    return out


__all__ = ["JudgeReward", "find_judges", "judge_metrics", "make_judge_reward"]
