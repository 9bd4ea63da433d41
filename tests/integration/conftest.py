"""Fixtures shared by the integration tests on the real embedded model."""

import pytest

from posttrain.cli import main


@pytest.fixture(scope="session")
def arithmetic_pairs(tmp_path_factory):
    """`posttrain pairs` on the arithmetic task with the math reward (the doctrine's DPO data recipe):
    made once per session (a few minutes of sampling) for the DPO test and the SimPO/ORPO/KTO tests.
    Temperature 0.7 (as in the demo): more prompts have both a right and a wrong sample than at 1.0
    (float32 sampling, 96 prompts: 36 pairs at 0.7, 21 at 1.0)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    code = main(["pairs", "--task", "arithmetic", "--task-size", "96", "--n", "8", "--max-new-tokens", "32",
                 "--temperature", "0.7", "--batch-prompts", "16", "--out", str(path)])
    assert code == 0
    return path
