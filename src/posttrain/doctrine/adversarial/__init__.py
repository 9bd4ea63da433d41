"""Adversarial evaluation suites (RL_DOCTRINE.md, Reward Hacking, Mitigations: "Adversarial
evaluation: Test on edge cases"). `sycophancy`: does the model agree with a false user claim?"""

from posttrain.doctrine.adversarial.sycophancy import probe_rows, run_sycophancy, verdict

SUITES = {"sycophancy": run_sycophancy}

__all__ = ["SUITES", "probe_rows", "run_sycophancy", "verdict"]
