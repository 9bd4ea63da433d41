"""Bad config values as a person meets them (issue 16): every field checked for its domain where the
dataclasses declare it (``posttrain.runtime.config``), cross-field rules, messages naming the flag or
the YAML file and line, prompts longer than the model's context refused by row, and no run directory
left behind by a setup that fails."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from posttrain.algorithms import inputs
from posttrain.algorithms.dpo import DPOConfig
from posttrain.algorithms.grpo import GRPOConfig
from posttrain.algorithms.ppo import PPOConfig
from posttrain.algorithms.reward_model import RewardModelConfig
from posttrain.data import DataError
from posttrain.runtime import config
from posttrain.runtime.config import ConfigError, Range

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

CONFIGS = {GRPOConfig: {"task": "arithmetic"}, PPOConfig: {"task": "arithmetic"},
           DPOConfig: {"data": "pairs.jsonl"}, RewardModelConfig: {"task": "arithmetic"}}
"""Each method's config with the least it needs to be valid."""


def numeric_fields(cls):
    """(name, number type, Domain) of every int or float field (optional ones included)."""
    doms = config.domains(cls)
    return [(f.name, doms[f.name].number, doms[f.name]) for f in dataclasses.fields(cls) if doms[f.name].number]


@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda c: c.__name__)
def test_every_numeric_field_has_a_domain_and_refuses_nan(cls):
    base = CONFIGS[cls]
    cls(**base)  # the defaults are valid
    fields = numeric_fields(cls)
    assert len(fields) > 15
    for name, number, domain in fields:
        if number is int:  # floats are at least finite; every int field declares its range
            assert domain.constraints, f"{cls.__name__}.{name} declares no domain"
        else:
            for bad in (math.nan, math.inf, -math.inf):
                with pytest.raises(ConfigError) as e:
                    cls(**base, **{name: bad})
                assert e.value.fields == (name,) and "finite" in str(e.value)
        for c in domain.constraints:  # just outside each declared bound is refused, naming the field
            if isinstance(c, Range) and c.low is not None:
                below = c.low if c.low_open else c.low - 1
                with pytest.raises(ConfigError) as e:
                    cls(**base, **{name: number(below)})
                assert e.value.fields[0] == name and f"got {number(below)!r}" in str(e.value)


def test_cross_field_rules_name_their_fields(monkeypatch):
    cases = [
        (GRPOConfig, {"task": "arithmetic", "group_size": 1}, "group_size", "baseline"),
        (GRPOConfig, {"task": "arithmetic", "min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens", "<= max_new"),
        (GRPOConfig, {}, "data", "--data FILE or --task NAME"),
        (GRPOConfig, {"task": "arithmetic", "data": "x.jsonl"}, "task", "only one of"),
        (PPOConfig, {"task": "arithmetic", "prompts_per_step": 2, "minibatches": 4}, "minibatches", "whole prompts"),
        (DPOConfig, {"task": "arithmetic"}, "data", "preference pairs"),
        (DPOConfig, {"data": "p.jsonl", "loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing", "hinge"),
        (DPOConfig, {"data": "p.jsonl", "max_length": 64}, "max_prompt_length", "< max_length"),
        (RewardModelConfig, {"task": "countdown"}, "task", "no preference pairs"),
    ]
    for cls, kwargs, field, fragment in cases:
        with pytest.raises(ConfigError) as e:
            cls(**kwargs)
        assert e.value.fields[0] == field and fragment in str(e.value), (cls.__name__, kwargs, str(e.value))
    # global batches split over the processes torchrun / accelerate announce in WORLD_SIZE
    monkeypatch.setenv("WORLD_SIZE", "3")
    for cls, field in ((GRPOConfig, "prompts_per_step"), (DPOConfig, "batch_size"), (RewardModelConfig, "batch_size")):
        with pytest.raises(ConfigError, match="WORLD_SIZE=3"):
            cls(**CONFIGS[cls])
        cls(**CONFIGS[cls], **{field: 6})


def test_messages_name_the_flag_or_the_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("task: arithmetic\nmax_new_tokens: 16\ntop_p: 1.5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: field 'top_p': must be in \(0, 1\], got 1\.5$"):
        config.from_sources(GRPOConfig, f, {})
    # a flag's value: the flag is what is named
    f.write_text("task: arithmetic\nmax_new_tokens: 16\n")
    with pytest.raises(ConfigError, match=r"^command line: field 'max_new_tokens': must be > 0, got 0 "
                                          r"\(flag --max-new-tokens\)$"):
        config.from_sources(GRPOConfig, f, {"max_new_tokens": "0"})
    # a cross-field rule is reported against where its first field came from
    with pytest.raises(ConfigError, match=r"^command line: field 'min_new_tokens': min_new_tokens \(17\) must be "
                                          r"<= max_new_tokens \(16\) \(flag --min-new-tokens\)$"):
        config.from_sources(GRPOConfig, f, {"min_new_tokens": "17"})
    # a file with no data yet is checked field by field; the flag completes it
    f.write_text("group_size: 4\n")
    assert config.from_sources(GRPOConfig, f, {"task": "arithmetic"}).group_size == 4
    f.write_bytes("group_size: 4\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"run\.yaml: this file is UTF-16, .* iconv -f UTF-16 -t UTF-8"):
        config.from_sources(GRPOConfig, f, {})


def test_prompt_longer_than_the_context_names_its_row(tiny_dir, tmp_path):
    from posttrain.models import load_model

    model, tok = load_model(tiny_dir)
    n_ctx = inputs.context_length(model)
    assert n_ctx == model.config.max_position_embeddings
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Say {w}."} for w in "abcdefgh"]
    rows[5] = {"prompt": "word " * n_ctx}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fraction in (0.0, 0.5):  # row 6 of the file, whether it is trained on or held out
        cfg = GRPOConfig(model=tiny_dir, data=str(data), reward="length", eval_fraction=fraction, max_new_tokens=8)
        with pytest.raises(DataError, match=rf"prompts\.jsonl, row 6: field 'prompt': the prompt is \d+ tokens.*"
                                            rf"context of {n_ctx} tokens: shorten the prompt"):
            inputs.check_context(model, tok, inputs.load_rows_for(cfg, "prompt"), cfg.completion_budgets(), True)
    fits = inputs.load_rows_for(dataclasses.replace(cfg, data=None, task="arithmetic"), "prompt")
    inputs.check_context(model, tok, fits, cfg.completion_budgets(), True)
    with pytest.raises(ConfigError, match=f"--max-new-tokens {n_ctx} fills the model's context"):
        inputs.check_context(model, tok, fits, {"train": ("max_new_tokens", n_ctx)}, True)
    with pytest.raises(ConfigError, match=f"--max-length {n_ctx + 1} is over the model's context of {n_ctx}"):
        inputs.check_max_length(model, DPOConfig(data="p.jsonl", max_length=n_ctx + 1))


# ------------------------------------------------------------------------------------- through the CLI


def assert_nothing_left(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"left behind: {terminal.snapshot(out)}"


def test_bad_flags_and_config_values_through_the_cli(tiny_dir, toy_prompts, tmp_path):
    out = tmp_path / "runs"
    base = ["train", "grpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", "length", "--output-dir", out]
    cases = [
        (["--beta", "nan"], ["--beta", "finite"]),
        (["--lr", "-1"], ["--lr", "must be >= 0"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "must be > 0"]),
        (["--prompts-per-step", "0"], ["--prompts-per-step", "must be > 0"]),
        (["--temperature", "0"], ["--temperature", "no differences to learn from"]),
        (["--group-size", "1"], ["--group-size", "must be >= 2 for GRPO"]),
    ]
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("max_new_tokens: 16\ntop_p: 0\n")
    cases.append((["--config", yaml_file], [f"{yaml_file}:2: field 'top_p'", "must be in (0, 1]"]))
    for flags, fragments in cases:
        terminal.assert_user_error(terminal.posttrain(*base, *flags, cwd=tmp_path), *fragments)
        assert_nothing_left(out)


def test_a_prompt_longer_than_the_context_through_the_cli(tiny_dir, tmp_path):
    """The model loads, the rows are checked against its context, and the run directory is never made."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi."}) + "\n" + json.dumps({"prompt": "word " * 4000}) + "\n")
    out = tmp_path / "runs"
    proc = terminal.posttrain("train", "grpo", "--model", tiny_dir, "--data", data, "--reward", "length",
                              "--output-dir", out, "--max-new-tokens", "8", "--group-size", "2",
                              "--prompts-per-step", "2", cwd=tmp_path)
    terminal.assert_user_error(proc, f"{data}, row 2: field 'prompt'", "context of 2048 tokens",
                               "shorten the prompt")
    assert_nothing_left(out)


def test_policy_loss_and_rollout_correction_refusals_through_the_cli(tiny_dir, toy_prompts, tmp_path):
    # issue 17: the new flags' domains, the cross-field rules and the flags that would do nothing
    out = tmp_path / "runs"
    base = ["train", "grpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", "length", "--output-dir", out]
    cases = [
        (["--rollout-correction-cap", "0"], ["--rollout-correction-cap", "must be > 0"]),
        (["--rollout-correction", "token_mask", "--rollout-correction-low", "1.5"],
         ["--rollout-correction-low", "must be in (0, 1)"]),
        (["--rollout-correction", "seq_mask", "--rollout-correction-high", "0.9"],
         ["--rollout-correction-high", "must be > 1"]),
        (["--rollout-correction", "none", "--rollout-correction-cap", "3"],
         ["--rollout-correction-cap", "applies only with --rollout-correction tis or seq_tis"]),
        (["--rollout-correction-low", "0.8"], ["--rollout-correction-low", "applies only with --rollout-correction "
                                                "token_mask or seq_mask"]),
        (["--clip-ratio-c", "1"], ["--clip-ratio-c", "must be > 1"]),
        (["--policy-loss", "cispo", "--clip-ratio-c", "3"], ["--clip-ratio-c", "dual-clip bounds the PPO clip loss"]),
        (["--policy-loss", "gspo", "--advantage", "reinforce_pp"], ["--policy-loss", "use --policy-loss gspo_token"]),
        (["--policy-loss", "nope"], ["--policy-loss", "gspo"]),
    ]
    for flags, fragments in cases:
        terminal.assert_user_error(terminal.posttrain(*base, *flags, cwd=tmp_path), *fragments)
        assert_nothing_left(out)
