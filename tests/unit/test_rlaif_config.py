"""Judge and principles config files: defaults, overrides, and errors that name file:line: field."""

import pytest

from posttrain.runtime.config import ConfigError
from posttrain.rlaif import Judge, JudgeConfig, load_judge_config, load_principles
from posttrain.rlaif.constitution import DEFAULT_PRINCIPLES


def write(tmp_path, text, name="judge.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_file_gets_defaults(tmp_path):
    cfg = load_judge_config(write(tmp_path, "backend: openai\nmodel: gpt-4o-mini\n"))
    assert cfg.model == "gpt-4o-mini" and cfg.position_swap and cfg.max_retries == 4 and cfg.temperature == 0.0
    assert "{response}" in cfg.score_template and "{a}" in cfg.compare_template
    assert cfg.identity == "openai:gpt-4o-mini"


def test_local_backend_defaults_to_the_embedded_model(tmp_path):
    cfg = load_judge_config(write(tmp_path, "backend: local\n"))
    assert cfg.model_spec == "smollm2-135m-instruct"


def test_overrides_win_and_relative_cache_is_next_to_the_file(tmp_path):
    cfg = load_judge_config(write(tmp_path, "backend: openai\nmodel: m\ncache: judge-cache.sqlite\nconcurrency: 2\n"),
                            {"concurrency": 5})
    assert cfg.concurrency == 5
    assert cfg.cache_path() == tmp_path / "judge-cache.sqlite"
    assert load_judge_config(write(tmp_path, "model: m\ncache: false\n")).cache_path() is None


@pytest.mark.parametrize("text, where, what", [
    ("backend: openai\nmodel: m\nmodle: x\n", ":3: field 'modle'", "unknown field"),
    ("model: m\nconcurrency: many\n", ":2: field 'concurrency'", "expected an integer"),
    ("backend: gemini\nmodel: m\n", ":1: field 'backend'", "not one of"),
    ("backend: anthropic\n", ": field 'model'", "required for backend 'anthropic'"),
    ("model: m\nscore_template: 'Rate {respnse}'\n", ":2: field 'score_template'", "unknown placeholder {respnse}"),
    ("model: m\ncompare_template: 'Which is better: {a}?'\n", ":2: field 'compare_template'", "placeholder {b}"),
    ("model: m\nscore_min: 5\nscore_max: 5\n", ":3: field 'score_max'", "greater than score_min"),
    ("model: m\nmax_failure_rate: 1.5\n", ":2: field 'max_failure_rate'", "(0, 1]"),
    ("model: m\napi_key_env: sk-live-123\n", ":2: field 'api_key_env'", "NAME of an environment variable"),
    ("model: [unclosed\n", ".yaml:2", "invalid YAML"),
])
def test_errors_name_file_line_and_field(tmp_path, text, where, what):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_judge_config(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and where in msg and what in msg


def test_an_api_key_in_the_file_is_refused_without_echoing_it(tmp_path):
    path = write(tmp_path, "model: m\napi_key: sk-live-SECRET-999\n")
    with pytest.raises(ConfigError) as err:
        load_judge_config(path)
    assert ":2: field 'api_key'" in str(err.value) and "api_key_env" in str(err.value)
    assert "sk-live-SECRET-999" not in str(err.value)


def test_a_named_but_unset_key_variable_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_TEST_UNSET_KEY", raising=False)
    cfg = load_judge_config(write(tmp_path, "model: m\napi_key_env: POSTTRAIN_TEST_UNSET_KEY\ncache: false\n"))
    with pytest.raises(ConfigError, match="POSTTRAIN_TEST_UNSET_KEY .* is not set"):
        Judge(cfg)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_judge_config(tmp_path / "nope.yaml")


def test_config_from_mapping_is_checked():
    with pytest.raises(ConfigError, match="field 'model'"):
        Judge.from_config({"backend": "openai"})
    assert isinstance(Judge.from_config({"backend": "openai", "model": "m", "cache": False}).config, JudgeConfig)


# ------------------------------------------------------------------ principles


def test_principles_list_of_strings_and_mappings(tmp_path):
    path = write(tmp_path, "- Is this polite?\n- name: brevity\n  critique: Is this too long?\n"
                           "  revision: Make it shorter.\n", "principles.yaml")
    principles, templates = load_principles(path)
    assert [p.name for p in principles] == ["principle_1", "brevity"]
    assert principles[0].critique == "Is this polite?" and "Is this polite?" in principles[0].revision
    assert principles[1].revision == "Make it shorter." and templates == {}


def test_principles_mapping_with_templates(tmp_path):
    path = write(tmp_path, "principles:\n  - Is this kind?\ncritique_template: 'C {response} {critique_request}'\n",
                 "principles.yaml")
    principles, templates = load_principles(path)
    assert len(principles) == 1 and templates == {"critique_template": "C {response} {critique_request}"}


@pytest.mark.parametrize("text, where", [
    ("principles:\n  - Is this kind?\n  - name: x\n", ":3: field 'principles[1]'.critique"),
    ("principles:\n  - Is this kind?\n  - 42\n", ":3: field 'principles[1]'"),
    ("principles: []\n", ":1: field 'principles'"),
    ("rules:\n  - x\n", ":1: field 'rules'"),
    ("principles:\n  - x\nrevision_template: 'no placeholders'\n", "field 'revision_template'"),
])
def test_principles_errors(tmp_path, text, where):
    path = write(tmp_path, text, "principles.yaml")
    with pytest.raises(ConfigError) as err:
        load_principles(path)
    assert str(err.value).startswith(str(path)) and where in str(err.value)


def test_default_principles_are_the_doctrines_three():
    assert [p.critique for p in DEFAULT_PRINCIPLES] == [
        "Is this response helpful and harmless?", "Does this encourage violence?", "Is this factually accurate?"]


def test_shipped_examples_load():
    from importlib.resources import files

    pkg = files("posttrain.rlaif")
    principles, templates = load_principles(pkg / "principles.yaml")
    assert principles == DEFAULT_PRINCIPLES and templates == {}
    cfg = load_judge_config(pkg / "judge.example.yaml")
    assert (cfg.backend, cfg.model, cfg.api_key_env) == ("openai", "gpt-4o-mini", "OPENAI_API_KEY")
    assert cfg.cache == "auto" and cfg.max_failure_rate == 0.5
