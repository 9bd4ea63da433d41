"""Shared fixtures. Unit tests use tiny random models; integration tests the real embedded model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 workers (pytest -n 2) on a 2-core machine: one thread each, for this process
    # and the subprocesses it starts (several threads per worker would contend for the cores).
    # Each worker gets its own temp dir (sticky, world-writable like /tmp, for the sandbox's
    # users), so a test that checks what the sandbox leaves in the temp dir sees only its own.
    import tempfile

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    worker_tmp = Path(tempfile.gettempdir()) / f"posttrain-tests-{os.environ['PYTEST_XDIST_WORKER']}"
    worker_tmp.mkdir(exist_ok=True)
    worker_tmp.chmod(0o1777)
    os.environ["TMPDIR"] = str(worker_tmp)
    tempfile.tempdir = None  # re-read TMPDIR
elif "OMP_NUM_THREADS" not in os.environ:  # an explicit setting (e.g. 1 on a shared machine) wins
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
def one_thread():
    """One intra-op thread for the test: tiny-model ops gain nothing from a second thread on a shared
    2-core machine, only contention (use with ``pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny random model saved as a local HF directory (a model spec trainers accept)."""
    from posttrain.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_model(seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_prompts(tmp_path_factory) -> str:
    """A prompt file for toy-reward learning tests."""
    import json

    path = tmp_path_factory.mktemp("toy") / "prompts.jsonl"
    words = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light"]
    path.write_text("".join(json.dumps({"prompt": f"Say a word like {w}."}) + "\n" for w in words))
    return str(path)


@pytest.fixture(scope="session")
def peaked_dir(tmp_path_factory) -> str:
    """A tiny random model with larger initial weights (initializer_range 0.2): its next-token
    distributions are peaked, as a trained model's are, so a toy reward has variance within a
    group and a policy-gradient method can move it in a few dozen steps."""
    from posttrain.models import tiny_model

    path = tmp_path_factory.mktemp("peaked-model")
    model, tok = tiny_model(seed=0, initializer_range=0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def scripted_episodes():
    """``make(policy, tok, group_size)``: multi-turn episodes (``sampling.turns.Episodes``) of two prompts,
    seeded, whose scripted environment answers each turn with three fixed token ids until the episode
    holds 40 ids: the rollouts with holes in their loss mask that the no-gradient tests perturb."""
    def make(policy, tok, group_size: int):
        from posttrain.data import encode_prompt
        from posttrain.sampling.generation import SamplingConfig
        from posttrain.sampling.turns import TurnLimits, sample_episodes

        prompts = [encode_prompt(tok, "Say a word like apple."), encode_prompt(tok, "Name a fruit.")]
        respond = lambda b, ids, cut: None if len(ids) > 40 else [40 + b, 41, 42]  # noqa: E731
        return sample_episodes(policy, tok, prompts, group_size, SamplingConfig(temperature=1.0, max_new_tokens=16),
                               respond, TurnLimits(max_turns=3, max_total_tokens=200),
                               prompt_generators=[torch.Generator().manual_seed(i) for i in range(2)])

    return make


@pytest.fixture(scope="session")
def stoppable_dir(tmp_path_factory) -> str:
    """The peaked tiny model, with the EOS output row turned toward the typical final hidden state,
    so completions end at varied lengths (about half of 12 tokens) instead of always running to
    the limit: what a length-paying reward needs in order to be gamed."""
    from posttrain.data import encode_prompt
    from posttrain.models import tiny_model

    path = tmp_path_factory.mktemp("stoppable-model")
    model, tok = tiny_model(seed=0, initializer_range=0.2)
    ids = torch.tensor([encode_prompt(tok, "Say a word like apple.")])
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0].mean(0)
        w = model.lm_head.weight
        w[tok.eos_token_id] = 2.0 * h / h.norm() * w.norm(dim=1).mean()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TIMING_KEYS = ("time/", "tokens_per_s")


def run_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without the timing fields (they differ between identical runs)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


@pytest.fixture
def kill_and_resume():
    """``run(command, method, out, env)``: ``command(name)`` is the argv of a training run named
    ``name`` under ``out``. Runs "straight" to the end; starts "killed", SIGKILLs it as soon as its
    step-``ckpt_step`` checkpoint exists (asserting it had not finished), resumes it with
    ``posttrain train METHOD --resume``; returns both runs' metrics without timings."""
    import signal
    import subprocess
    import time

    def run(command, method: str, out: Path, env: dict, ckpt_step: int = 2, total_steps: int = 6):
        subprocess.run(command("straight"), check=True, timeout=600, env=env, capture_output=True)
        proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt = out / "killed" / "checkpoints" / f"step-{ckpt_step}" / "state.json"
        deadline = time.time() + 600
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), f"the run never wrote its step-{ckpt_step} checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert len(run_metrics(out / "killed")) < total_steps, "the run finished before it could be killed"
        subprocess.run([sys.executable, "-m", "posttrain.cli", "train", method, "--resume", str(out / "killed")],
                       check=True, timeout=600, env=env, capture_output=True)
        return run_metrics(out / "straight"), run_metrics(out / "killed")

    return run
