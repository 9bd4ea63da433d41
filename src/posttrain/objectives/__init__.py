"""The math of training: log-probs, values, advantages and losses, as tensor functions.

The step between the rewards and the trainers in the pipeline (data and tasks -> sampling ->
rewards -> the math (objectives) -> algorithms -> commands): it turns rollouts and their rewards
into a differentiable loss. It never scores or samples itself; it imports the runtime (gradients
and statistics summed across processes), models (the trunk/head split) and sampling (the
``Rollouts`` it reads). ``advantages`` and ``losses`` are importable with torch alone.

Modules:
    logprobs     completion log-probs from the trunk and output head in chunks, no [B, T, V] logits
    grouped      the shared-prompt training forward: each prompt run once per group of completions
    value_head   a scalar head on the trunk: the reward model's score and PPO's value function
    advantages   GRPO, Dr. GRPO, REINFORCE++, RLOO and GAE advantage estimators
    losses/      clipped policy, KL, value, DPO and Bradley-Terry losses, and their reductions
"""
