"""Shared fixtures. Unit tests use tiny random models; integration tests the real embedded model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny():
    """A fresh tiny random Llama (2 layers, hidden 64) and the embedded tokenizer."""
    from posttrain.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct (float32, CPU), loaded once per test session. Tests must not
    modify it in place (wrap it with LoRA on a copy, or restore it)."""
    from posttrain.models import load_model

    return load_model()


@pytest.fixture
def python_exe() -> str:
    return sys.executable
