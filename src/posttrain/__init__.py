"""posttrain: post-train language models with reinforcement learning.

DPO, GRPO (and REINFORCE++, RLOO), PPO with a reward model and a value model, and RLAIF,
following the doctrine in RL_DOCTRINE.md. posttrain never downloads weights or data from a hub at
run time: the Hugging Face libraries are put in offline mode on import (a user who wants a hub
download does it beforehand, e.g. with `huggingface-cli download`).
"""

import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
