"""The generate and score stages, shared by GRPO, RLOO, REINFORCE++, PPO and `posttrain pairs`,
and the layout of what they produce (``ScoredBatch``: groups contiguous; ``micro_batches`` and
``group_rows`` index whole groups of it; ``review_samples`` picks groups for samples.jsonl).

``collect`` draws prompts from the stream, samples a group of completions per prompt (prompt
cache shared, ``generation.sample_groups``), decodes them and scores them with the reward
functions (plain Python, code rewards in worker processes). With ``--env`` the "reward" is an
episode runner (``episodes.EpisodeRunner``): a group is K episodes of the row, scored by the
environment. With ``dynamic_sampling`` (DAPO, Yu et
al. 2025) it keeps drawing prompts, for a bounded number of rounds, until the batch holds enough
groups whose rewards differ: a group whose rewards are all equal has zero advantage everywhere and
teaches nothing.

Under several processes ``n_prompts`` is the global count: every process draws the same rows
from its copy of the stream and keeps its ``distributed.shard`` of them, whole groups. Each
prompt's completions are drawn from a generator of its own, seeded from the run's sampling
generator and the prompt's place in the global draw, so a prompt gets the same completions
whichever process samples it, and N processes reproduce one process's run. With dynamic sampling
the processes agree on the number of rounds (the stream stays in step everywhere); each keeps its
own informative groups first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import torch

from posttrain.runtime import distributed
from posttrain import rewards as rw
from posttrain.data import encode_prompt
from posttrain.sampling.generation import Rollouts, SamplingConfig, concat_rollouts, sample_groups, select_groups
from posttrain.rewards.judge import judge_metrics
from posttrain.rlaif.judges import COUNTERS


@dataclasses.dataclass
class ScoredBatch:
    rows: list[dict[str, Any]]
    """One dataset row per prompt."""
    rollouts: Rollouts
    texts: list[str]
    """Decoded completions, P*G, grouped."""
    rewards_B: torch.Tensor
    """Total reward per completion; NaN where no reward function could judge it."""
    parts: dict[str, list[float | None]]
    """Each reward function's values (metrics reward/<name>)."""

    @property
    def group_size(self) -> int:
        return self.rollouts.group_size

    @property
    def valid_B(self) -> torch.Tensor:
        return ~torch.isnan(self.rewards_B)

    def rewards_PG(self, fill: str = "group-mean") -> torch.Tensor:
        """[P, G] rewards; an unjudged (NaN) reward takes its group's mean (0 if none judged), so
        it moves no baseline; its completion is masked out of the loss by the trainer."""
        r = self.rewards_B.view(-1, self.group_size)
        valid = ~torch.isnan(r)
        mean = torch.where(valid, r, torch.zeros_like(r)).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        return torch.where(valid, r, mean.expand_as(r))

    def group_std_P(self) -> torch.Tensor:
        return self.rewards_PG().std(dim=1, unbiased=False)


def micro_batches(n_prompts: int, size: int) -> list[torch.Tensor]:
    """Prompt indices of each micro-batch (``size`` prompts, 0 = all)."""
    size = size if size > 0 else n_prompts
    return [torch.arange(i, min(i + size, n_prompts)) for i in range(0, n_prompts, size)]


def group_rows(mb_P: torch.Tensor, group_size: int) -> torch.Tensor:
    """The completion rows of the prompts ``mb_P`` (groups are contiguous)."""
    return (mb_P[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)


def micro_groups(n_prompts: int, group_size: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt indices, completion rows) of each micro-batch of ``size`` whole groups (0 = all)."""
    return [(mb, group_rows(mb, group_size)) for mb in micro_batches(n_prompts, size)]


def score(rows_B: list[dict], texts: list[str], reward_fn) -> tuple[torch.Tensor, dict[str, list]]:
    prompts = [r["prompt"] for r in rows_B]
    totals, parts = rw.score_batch(reward_fn, prompts, texts, rows_B)
    return torch.tensor([math.nan if t is None else float(t) for t in totals], dtype=torch.float32), parts


def generate_and_score(policy, tokenizer, rows, group_size, sampling: SamplingConfig, reward_fn,
                       generator: torch.Generator | None, chat_template: bool = True,
                       prompt_generators: list[torch.Generator] | None = None) -> ScoredBatch:
    ids = [encode_prompt(tokenizer, r["prompt"], chat_template) for r in rows]
    rollouts = sample_groups(policy, tokenizer, ids, group_size, sampling, generator, prompt_generators)
    texts = rollouts.texts(tokenizer)
    # each completion's sampled token ids go to the reward functions as the column `completion_ids`
    # (TRL's name), so length-based rewards count tokens, not words
    ids_B = [ids[:int(n)] for ids, n in zip(rollouts.completion_ids_BC.tolist(), rollouts.lengths_B.tolist())]
    rows_B = [{**rows[i // group_size], "completion_ids": ids} for i, ids in enumerate(ids_B)]
    rewards_B, parts = score(rows_B, texts, reward_fn)
    return ScoredBatch(list(rows), rollouts, texts, rewards_B, parts)


def _take(batch: ScoredBatch, idx: list[int]) -> ScoredBatch:
    G = batch.group_size
    b = [p * G + g for p in idx for g in range(G)]
    return ScoredBatch([batch.rows[i] for i in idx], select_groups(batch.rollouts, idx),
                       [batch.texts[i] for i in b], batch.rewards_B[b],
                       {k: [v[i] for i in b] for k, v in batch.parts.items()})


def _join(batches: list[ScoredBatch], pad_id: int) -> ScoredBatch:
    if len(batches) == 1:
        return batches[0]
    return ScoredBatch(
        [r for b in batches for r in b.rows],
        concat_rollouts([b.rollouts for b in batches], pad_id),
        [t for b in batches for t in b.texts],
        torch.cat([b.rewards_B for b in batches]),
        {k: [v for b in batches for v in b.parts[k]] for k in batches[0].parts},
    )


def prompt_generators(generator: torch.Generator, part: slice, device) -> list[torch.Generator]:
    """Generators for the prompts ``part`` of one global draw: one number is drawn from
    ``generator`` (on every process alike), prompt i's generator is seeded from it and i."""
    base = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return [torch.Generator(device=device).manual_seed((base + 1_000_003 * i) % 2 ** 63)
            for i in range(part.start, part.stop)]


ROUND_SUMS = ("env/",)
"""Episode metrics that are counts (the guard's ``env/errors/*``, ``env/calls``): summed over the
sampling rounds of a step; the others (``episode/*``, means over episodes) are averaged, weighted by
each round's prompts."""


def merge_rounds(rounds: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The episode metrics of a step from those of its sampling rounds ``(metrics, prompts)``: every
    episode sampled counts, kept or dropped by dynamic sampling (the policy's own rates, not the
    selected batch's)."""
    out: dict[str, float] = {}
    n_total = sum(n for m, n in rounds) or 1
    for key in {k for m, _ in rounds for k in m}:
        seen = [(m[key], n) for m, n in rounds if key in m]
        if key.startswith(ROUND_SUMS):
            out[key] = sum(v for v, _ in seen)
        else:
            out[key] = sum(v * n for v, n in seen) / (sum(n for _, n in seen) or n_total)
    return out


def collect(policy, tokenizer, stream, n_prompts: int, group_size: int, sampling: SamplingConfig, reward_fn,
            generator: torch.Generator | None, chat_template: bool = True, dynamic_sampling: bool = False,
            max_rounds: int = 3, rollout=None) -> tuple[ScoredBatch, dict[str, float]]:
    """Sample and score this process's share of ``n_prompts`` groups (all of them in a single
    process); returns the batch and metrics (``frac_zero_std`` of the groups sampled, ``time/gen``,
    ``time/score``, ``sampling/rounds``). ``generator`` None samples from torch's global RNG.
    ``rollout`` (a ``rollout_model.RolloutModel``) samples from its copy of the policy, synced first."""
    t_gen = t_score = 0.0
    episode_rounds: list[tuple[dict[str, float], int]] = []
    informative: list[ScoredBatch] = []
    flat: list[ScoredBatch] = []
    n_inf = zero = total = rounds = 0
    mine = distributed.shard(n_prompts)
    n_mine = mine.stop - mine.start
    device = next(policy.parameters()).device
    sampler = policy
    if rollout is not None:
        rollout.sync()
        sampler = rollout.model
    while True:
        rounds += 1
        rows = stream.take(n_prompts)[mine]
        gens = prompt_generators(generator, mine, device) if generator is not None else None
        t0 = time.perf_counter()
        play = getattr(reward_fn, "generate_and_score", None)  # --env: the episode runner plays episodes
        with distributed.gathered(sampler if sampler is policy else None):  # FSDP: ranks stop at different lengths
            if play is not None:
                batch, episode_metrics = play(sampler, tokenizer, rows, group_size, sampling, None, gens)
                episode_rounds.append((episode_metrics, len(rows)))
            else:
                batch = generate_and_score(sampler, tokenizer, rows, group_size, sampling, reward_fn, None,
                                           chat_template, gens)
        t_gen += batch.rollouts.seconds
        t_score += time.perf_counter() - t0 - batch.rollouts.seconds
        std = batch.group_std_P()
        zero += int((std == 0).sum())
        total += len(rows)
        if not dynamic_sampling:
            result = batch
            break
        good = [i for i in range(len(rows)) if std[i] > 0]
        bad = [i for i in range(len(rows)) if std[i] == 0]
        if good:
            informative.append(_take(batch, good))
            n_inf += len(good)
        if bad:
            flat.append(_take(batch, bad))
        if distributed.all_true(n_inf >= n_mine or rounds >= max_rounds):
            pool = _join(informative + flat, tokenizer.pad_token_id)
            result = _take(pool, list(range(n_mine)))  # informative groups first
            break
    metrics = {"frac_zero_std": zero / max(1, total), "time/gen": t_gen, "time/score": t_score,
               **merge_rounds(episode_rounds)}
    if dynamic_sampling:
        metrics["sampling/rounds"] = rounds
    return result, metrics


def collect_timed(timer, policy, *args, **kwargs) -> tuple[ScoredBatch, dict[str, float]]:
    """The trainers' collect phase: ``collect(policy, *args, **kwargs)`` with the policy in eval
    mode, its ``time/gen`` and ``time/score`` moved into the step's ``timer`` (``loop.StepTimer``)."""
    policy.eval()
    batch, cmetrics = collect(policy, *args, **kwargs)
    for k in ("time/gen", "time/score"):
        timer.add(k[5:], cmetrics.pop(k))
    return batch, cmetrics


def step_metrics(batch: ScoredBatch, reward_fn, collect_metrics: dict[str, float]) -> dict[str, float]:
    """A step's reward metrics over every process's completions (``reward/mean``, ``reward/std``,
    ``reward/<fn>``...), with the judges' counters summed and ``collect``'s metrics averaged over processes."""
    local = ([None if v != v else float(v) for v in batch.rewards_B.tolist()], batch.parts)
    every = distributed.gather(local)
    totals = [v for t, _ in every for v in t]
    parts = {k: [v for _, p in every for v in p[k]] for k in batch.parts}
    judged = judge_metrics(reward_fn)
    counters = [k for k in judged if k.rsplit("/", 1)[-1] in COUNTERS]  # each rank's own requests: summed
    return {**rw.reward_metrics(totals, parts),
            **distributed.reduce_metrics({**judged, **collect_metrics}, sum_keys=counters)}


def tokens_of(batch: ScoredBatch) -> float:
    """Completion tokens of the step, over every process."""
    return float(distributed.all_sum(batch.rollouts.completion_mask_BC.sum().double()))


def review_samples(batch: ScoredBatch, n_groups: int, advantages_B: torch.Tensor | None = None) -> list[dict]:
    """The first ``n_groups`` groups of a batch for ``samples.jsonl`` (human review): the prompt, its
    completions, their rewards (None where unjudged), each reward function's part, and each
    completion's advantage when given (the review page's group view shows them)."""
    out = []
    G = batch.group_size
    for p in range(min(n_groups, len(batch.rows))):
        rec = {
            "prompt": rw.as_text(batch.rows[p]["prompt"]) if "prompt" in batch.rows[p] else json.dumps(batch.rows[p]),
            "completions": batch.texts[p * G:(p + 1) * G],
            "rewards": [None if v != v else float(v) for v in batch.rewards_B[p * G:(p + 1) * G].tolist()],
            "parts": {k: v[p * G:(p + 1) * G] for k, v in batch.parts.items()},
        }
        if advantages_B is not None:
            rec["advantages"] = [float(v) for v in advantages_B[p * G:(p + 1) * G].tolist()]
        out.append(rec)
    return out


def sequence_advantages(adv: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    """One advantage per completion: ``adv_B`` itself, or the mean of ``adv_BC`` over its loss tokens."""
    if adv.dim() == 1:
        return adv
    mask_BC = mask_BC.to(adv.dtype)
    return (adv * mask_BC).sum(1) / mask_BC.sum(1).clamp(min=1)

