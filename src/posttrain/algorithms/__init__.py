"""The trainers, the last step of the pipeline (data and tasks -> sampling -> rewards -> the math
(objectives) -> algorithms -> commands). Each trainer module holds only its own step: what it
collects and how it computes its loss; the loop, the optimizer-step rule and the run are shared.

Modules:
    loop          the one training loop (evaluate, collect, update, schedule, log, checkpoint, resume)
    optim         the one optimizer-step rule (accumulation weights, DDP/FSDP reduction, clipping,
                  what a non-finite loss or gradient does)
    run           the run directory, checkpoints and exact resume, Ctrl-C, the doctor, final/
    common        the configs every trainer shares (TrainConfig, RolloutConfig) and the set-up
                  (seeding, model + LoRA, FSDP sharding, AdamW, schedule, prompt stream, rows)
    reference     the frozen reference of GRPO, PPO and DPO (adapter disabled, or a frozen copy)
    collect       generate + score: the sampling trainers' collect stage, and `posttrain pairs`'
    grpo          GRPO, Dr. GRPO, REINFORCE++, RLOO: collect -> advantages -> optimise
    ppo           PPO with a value model (ppo_parts: KL controller, critic, two-group AdamW)
    dpo           DPO, IPO, hinge, robust (dpo_data: tokenizing and packing preference pairs)
    reward_model  Bradley-Terry reward models
    evaluate      greedy accuracy on held-out rows
    pairs         the doctrine's pair-making recipe: sample N, score, best vs worst
"""
