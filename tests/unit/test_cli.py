"""The `posttrain` CLI: verbs are discovered, `info` reports, `train` maps YAML + flags to a config."""

import subprocess
import sys
import textwrap

import pytest

from posttrain import cli
from posttrain.commands import train


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for verb in ("info", "generate", "train"):
        assert verb in out


def test_info_reports_versions_and_embedded_model():
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "info"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    for key in ("posttrain", "torch", "transformers", "peft", "device", "embedded model", "cached copy"):
        assert key in out
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in out.replace("\n", "").replace(" ", "")


@pytest.fixture
def fake_method(tmp_path, monkeypatch):
    """A method registered like the real ones, whose train function records the config it got."""
    (tmp_path / "fake_trainer.py").write_text(textwrap.dedent('''
        import dataclasses, json
        from typing import Optional

        @dataclasses.dataclass
        class FakeConfig:
            """A fake method for testing the CLI."""
            out: str = "out.json"
            """Where the config is recorded."""
            lr: float = 1e-6
            """Learning rate."""
            steps: int = 10
            """Steps."""
            resume: Optional[str] = None
            """Run to resume."""

        def train_fake(config):
            with open(config.out, "w") as f:
                json.dump(dataclasses.asdict(config), f)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_trainer

    monkeypatch.setitem(train.METHODS, "fake", (fake_trainer.FakeConfig, fake_trainer.train_fake))
    return tmp_path


def test_train_applies_yaml_then_flags(fake_method):
    import json

    out = fake_method / "seen.json"
    cfg = fake_method / "run.yaml"
    cfg.write_text(f"out: {out}\nlr: 5.0e-5\nsteps: 3\n")
    assert cli.main(["train", "fake", "--config", str(cfg), "--steps", "7"]) == 0
    assert json.loads(out.read_text()) == {"out": str(out), "lr": 5e-5, "steps": 7, "resume": None}


def test_train_resume_uses_the_runs_config(fake_method):
    import json

    run = fake_method / "runs" / "r1"
    run.mkdir(parents=True)
    out = fake_method / "seen.json"
    (run / "config.yaml").write_text(f"out: {out}\nlr: 2.0e-5\nsteps: 4\nresume: null\n")
    (run / "checkpoints" / "step-1").mkdir(parents=True)  # a run to resume has a complete checkpoint
    (run / "checkpoints" / "step-1" / "state.json").write_text('{"step": 1}')
    assert cli.main(["train", "fake", "--resume", str(run)]) == 0
    assert json.loads(out.read_text()) == {"out": str(out), "lr": 2e-5, "steps": 4, "resume": str(run)}


def test_train_reports_config_errors_with_file_and_line(fake_method, capsys):
    cfg = fake_method / "run.yaml"
    cfg.write_text("lr: 1.0e-5\nstepz: 3\n")
    assert cli.main(["train", "fake", "--config", str(cfg)]) == 2
    assert f"{cfg}:2: field 'stepz': unknown field" in capsys.readouterr().err


def test_train_auto_walks_the_decision_tree(tmp_path, capsys):
    import json

    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    assert cli.main(["train", "auto", "--data", str(math), "--set", "max_steps=3", "--dry-run", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "method: grpo" in out and "'reward': 'math'" in out and "'max_steps': 3" in out
    assert "verifiable" in out.lower()  # the branch taken is printed with its reason
