"""API keys: read from the environment variable the config names, never stored on the config,
never in cache files, reprs, logs or error messages (servers do echo keys back in errors)."""

import dataclasses
import logging

import pytest
import yaml

from posttrain.runtime import config as cfgmod
from posttrain.rlaif import FunctionBackend, Judge, JudgeFailureRate, load_judge_config, redact
from posttrain.rlaif.backends import OpenAIBackend, remember_secret

SECRET = "sk-posttrain-unit-7f3a9c1e5b"


@pytest.fixture
def judge_file(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_UNIT_JUDGE_KEY", SECRET)
    path = tmp_path / "judge.yaml"
    path.write_text(f"backend: openai\nmodel: m\nbase_url: http://127.0.0.1:9/v1\n"
                    f"api_key_env: POSTTRAIN_UNIT_JUDGE_KEY\ncache: {tmp_path / 'cache.sqlite'}\n"
                    "min_requests: 2\nmax_failure_rate: 0.5\n")
    return path


def test_redact_replaces_registered_secrets():
    remember_secret("sk-abcdef-123456")
    assert redact("got 'sk-abcdef-123456', expected 'x'") == "got '***', expected 'x'"
    assert redact("nothing here") == "nothing here"
    remember_secret("none")  # placeholders are not secrets: "none" stays readable
    assert redact("none of it") == "none of it"


def test_the_key_is_read_from_env_and_never_stored(judge_file, tmp_path):
    cfg = load_judge_config(judge_file)
    assert cfg.api_key_env == "POSTTRAIN_UNIT_JUDGE_KEY" and cfg.api_key() == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(dataclasses.asdict(cfg))
    dumped = tmp_path / "saved.yaml"
    cfgmod.save_yaml(cfg, dumped)  # what a run directory would hold
    assert SECRET not in dumped.read_text()
    assert yaml.safe_load(dumped.read_text())["api_key_env"] == "POSTTRAIN_UNIT_JUDGE_KEY"
    backend = OpenAIBackend(cfg)
    assert backend._client.api_key == SECRET  # the SDK client has it: that is where it is used


def test_errors_logs_and_stop_message_are_redacted(judge_file, caplog):
    cfg = load_judge_config(judge_file)
    OpenAIBackend(cfg)  # loads (and registers) the key as a real judge would

    def echoing_server(messages):
        # what llm-katan --validate-keys (and some real gateways) answer to a wrong key
        raise PermissionError(f"invalid API key for openai: got '{SECRET}', expected 'other'")

    judge = Judge(cfg, FunctionBackend(cfg, echoing_server))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("posttrain.rlaif").warning("request failed: %s", f"key={SECRET}")
        assert judge.score("q", "r") is None
        with pytest.raises(JudgeFailureRate) as err:
            judge.score("q", "r2")
    assert SECRET not in caplog.text and "key=***" in caplog.text
    assert SECRET not in judge.last_error and "got '***'" in judge.last_error
    assert SECRET not in str(err.value) and "got '***'" in str(err.value)
    assert SECRET not in repr(judge)
    assert SECRET.encode() not in (judge_file.parent / "cache.sqlite").read_bytes()
