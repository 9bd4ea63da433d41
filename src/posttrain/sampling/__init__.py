"""The sampling engine: K completions per prompt from the policy, fast on a CPU.

Second step of the pipeline (data and tasks -> sampling -> rewards -> the math (objectives) ->
algorithms -> commands): prompts in, ``Rollouts`` out (prompt and completion ids, masks, the
sampled tokens' log-probs), which the rewards score and the trainers learn from. Local AI judges
(posttrain.rlaif) and the sycophancy probe (posttrain.doctrine.adversarial) sample with it too. It
imports only the runtime (the rollout copy is synced across processes), models and data.

Modules:
    generation     group sampling: each prompt's KV cache computed once, shared by its K samples
    kv_cache       a decoding KV cache written in place instead of re-concatenated every token
    skinny_linear  few-row float32 linears for decoding on a CPU (LoRA folded in)
    rollout_model  the bfloat16 copy of the policy that samples, synced before each generation
"""
