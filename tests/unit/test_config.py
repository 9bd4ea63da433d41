"""posttrain.runtime.config: defaults < YAML < flags; docstrings become help; errors name file, line, field."""

import argparse
import dataclasses
from typing import Literal, Optional

import pytest

from posttrain.runtime import config
from posttrain.runtime.config import ConfigError


@dataclasses.dataclass
class Base:
    model: str = "tiny"
    """Model spec."""
    seed: int = 0
    """Random seed."""


@dataclasses.dataclass
class Demo(Base):
    lr: float = 1e-6
    """Learning rate (full fine-tuning)."""
    lora: bool = True
    """Train a LoRA adapter."""
    reduce: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses are reduced."""
    clip_high: Optional[float] = None
    """Upper clip (None = symmetric)."""
    rewards: list[str] = dataclasses.field(default_factory=lambda: ["math"])
    """Reward functions."""


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    config.add_arguments(parser, Demo)
    args = vars(parser.parse_args(argv))
    return config.from_sources(Demo, args.pop("config"), args)


def test_field_docs_include_base_classes():
    docs = config.field_docs(Demo)
    assert docs["seed"] == "Random seed."
    assert docs["lr"] == "Learning rate (full fine-tuning)."


def test_defaults_then_yaml_then_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 3.0e-5\nseed: 7\nlora: false\n")
    assert parse([]) == Demo()
    c = parse(["--config", str(f)])
    assert (c.lr, c.seed, c.lora) == (3e-5, 7, False)
    c = parse(["--config", str(f), "--seed", "9", "--lora", "--rewards", "math,format"])
    assert (c.lr, c.seed, c.lora, c.rewards) == (3e-5, 9, True, ["math", "format"])


def test_optional_and_literal_flags():
    c = parse(["--clip-high", "0.28", "--reduce", "seq-mean-token-mean"])
    assert c.clip_high == 0.28 and c.reduce == "seq-mean-token-mean"
    assert parse(["--clip-high", "none"]).clip_high is None
    with pytest.raises(SystemExit):  # argparse rejects a value outside the Literal's choices
        parse(["--reduce", "bogus"])


def test_help_shows_docstring_and_default(capsys):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, Demo)
    parser.print_help()
    out = " ".join(capsys.readouterr().out.split())
    assert "Learning rate (full fine-tuning)." in out and "default: 1e-06" in out


def test_unknown_key_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1.0e-5\n\nmodle: x\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: field 'modle': unknown field for Demo \(did you mean model\?\)"):
        parse(["--config", str(f)])


def test_wrong_type_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 1\nlr: fast\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: field 'lr': expected a number, got 'fast'"):
        parse(["--config", str(f)])
    f.write_text("seed: 1.5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: field 'seed': expected an integer"):
        parse(["--config", str(f)])


def test_bad_flag_value_is_reported():
    with pytest.raises(ConfigError, match=r"command line: field 'seed': expected an integer, got 'x'"):
        parse(["--seed", "x"])


def test_invalid_yaml_and_missing_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: invalid YAML"):
        parse(["--config", str(f)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse(["--config", str(tmp_path / "none.yaml")])


def test_yaml_round_trip(tmp_path):
    c = Demo(lr=2e-5, rewards=["math", "format"], clip_high=0.3)
    config.save_yaml(c, tmp_path / "c.yaml")
    assert config.load_yaml(Demo, tmp_path / "c.yaml") == c
