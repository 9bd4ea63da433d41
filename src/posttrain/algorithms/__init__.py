"""One readable loop per method: grpo.py (GRPO/Dr. GRPO/REINFORCE++/RLOO), dpo.py, reward_model.py, ppo.py; shared stages in common.py and rollout.py."""
