"""Benchmark: multi-turn sampling that continues each episode from its KV cache, against re-filling
the whole conversation every turn (what a rollout that re-renders and re-tokenizes the chat does).

    python bench/multiturn_cache.py                      # guess_number, 4 prompts x 4 episodes, 6 turns
    python bench/multiturn_cache.py --env 'ta:TowerOfHanoi-v0' --turns 8 --rounds 3

The embedded model (float32, CPU) plays ``--env`` through ``algorithms.episodes.EpisodeRunner``;
both modes run the same rows with the same per-prompt generators, alternating, ``--rounds`` times
each, in this process (the model loaded once). Reported: wall seconds per batch, sampled (model)
tokens per second, and the tokens each mode ran through the model outside decoding (prompts,
environment deltas, re-fills). Greedy draws (``--temperature 0``, the default) make the two
modes' episodes identical up to float rounding, so they do the same decoding work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="guess_number(hi=100, max_turns=12)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=24, help="per turn")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import posttrain.sampling.turns as turns
    from posttrain.algorithms.episodes import EpisodeRunner
    from posttrain.envs import get_env
    from posttrain.models import load_model
    from posttrain.sampling.generation import SamplingConfig

    model, tok = load_model()
    model.eval()
    factory = get_env(args.env)
    rows = factory.rows("train", args.prompts, 0)
    runner = EpisodeRunner(factory, turns.TurnLimits(max_turns=args.turns, max_total_tokens=4096))
    cfg = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    results: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.rounds):
        for reuse in (True, False):
            runner.reuse_cache = reuse
            gens = [torch.Generator().manual_seed(i) for i in range(len(rows))]
            t0 = time.perf_counter()
            batch, metrics = runner.generate_and_score(model, tok, rows, args.group_size, cfg, prompt_generators=gens)
            seconds = time.perf_counter() - t0
            ep = runner.last
            results[reuse].append({"s": seconds, "model_tokens": sum(ep.model_tokens_B),
                                   "prefill": ep.prefill_tokens, "turns": metrics["episode/turns"],
                                   "reward": float(batch.rewards_B.mean())})
            print(f"  {'cache' if reuse else 'refill':6s}: {seconds:6.1f} s, {sum(ep.model_tokens_B)} sampled tokens, "
                  f"{ep.prefill_tokens} pre-filled, {metrics['episode/turns']:.1f} turns/episode, "
                  f"reward {float(batch.rewards_B.mean()):.2f}", flush=True)
    print(f"\n{args.env}: {args.prompts} prompts x {args.group_size} episodes, up to {args.turns} turns of "
          f"{args.max_new_tokens} tokens, temperature {args.temperature}, {args.threads} threads")
    print(f"{'mode':7s} {'s/batch':>8s} {'tokens/s':>9s} {'pre-filled':>10s}")
    rate = {}
    for reuse in (True, False):
        r = results[reuse]
        s = statistics.mean(x["s"] for x in r)
        rate[reuse] = statistics.mean(x["model_tokens"] / x["s"] for x in r)
        print(f"{'cache' if reuse else 'refill':7s} {s:8.1f} {rate[reuse]:9.1f} {statistics.mean(x['prefill'] for x in r):10.0f}")
    print(f"cache continuation: {rate[True] / rate[False]:.2f}x the re-filling tokens/s")


if __name__ == "__main__":
    main()
