"""Tools for multi-turn environments: schemas from docstrings, <tool_call> parsing, the ToolBox's
observations and counters, the calculator's whitelist and the sandboxed python tool (real sandbox)."""

from __future__ import annotations

import json
import time

import pytest

from posttrain.envs.tool_calls import (BadCall, ToolCall, check_arguments, parse_tool_calls, template_renders_tools,
                                       tools_system_prompt, with_tools_prompt)
from posttrain.envs.tools import (TOOL_GRACE_S, TOOLS, ToolBox, ToolSpecError, calculator, get_tools, python,
                                  tool_schema)
from posttrain.errors import UserError


def call(name: str, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


# ----------------------------------------------------------------------------- schemas
def test_builtin_tool_schemas_carry_names_types_and_docstring_descriptions():
    calc = tool_schema(calculator)["function"]
    assert calc["name"] == "calculator"
    assert calc["description"].startswith("Evaluate an arithmetic expression")
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"
    assert "parentheses" in calc["parameters"]["properties"]["expression"]["description"]
    assert calc["parameters"]["required"] == ["expression"]
    py = tool_schema(python)["function"]
    assert py["name"] == "python" and py["description"].startswith("Run a Python program")
    assert py["parameters"]["properties"]["code"]["type"] == "string"
    assert py["parameters"]["required"] == ["code"]


def test_toolbox_schemas_list_each_tool_with_its_parameter_types():
    box = ToolBox([calculator, add])
    by_name = {s["function"]["name"]: s for s in box.schemas}
    assert list(by_name) == ["calculator", "add"] == box.names
    props = by_name["add"]["function"]["parameters"]
    assert props["properties"]["a"] == {"type": "integer", "description": "The first number."}
    assert props["required"] == ["a"]  # b has a default
    box.schemas[0]["function"]["name"] = "changed"  # a copy: the box keeps its own
    assert box.schemas[0]["function"]["name"] == "calculator"


def test_a_tool_without_docstring_or_hints_is_a_user_error_naming_it():
    def no_doc(x: int) -> int:
        return x

    def no_hint(x):
        """Does things.

        Args:
            x: A thing.
        """

    def no_args_section(x: int) -> int:
        """Does things."""

    for fn, words in ((no_doc, "no docstring"), (no_hint, "type hint"), (no_args_section, "'x'")):
        with pytest.raises(ToolSpecError) as err:
            ToolBox([fn])
        assert fn.__name__ in str(err.value) and words in str(err.value)
        assert "test_tools.py:" in str(err.value)  # the file and line of the function
        assert isinstance(err.value, UserError)
    with pytest.raises(ToolSpecError, match="lambda"):
        tool_schema(lambda x: x)
    with pytest.raises(ToolSpecError, match="two tools are named 'calculator'"):
        ToolBox([calculator, calculator])


def test_unknown_builtin_tool_name_suggests_the_close_one():
    assert get_tools(["calculator", "python"]) == [calculator, python] == get_tools("calculator, python")
    with pytest.raises(ToolSpecError, match="unknown tool 'calculater'.*did you mean 'calculator'"):
        get_tools(["calculater"])
    assert set(TOOLS) == {"calculator", "python"}


# ----------------------------------------------------------------------------- parsing
def test_parse_reads_one_or_several_calls_and_arguments_given_as_a_string():
    text = ("Let me compute.\n" + call("calculator", {"expression": "2+3"})
            + "\nand\n<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1, \\\"b\\\": 2}\"}</tool_call>")
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "2+3"}), ToolCall("add", {"a": 1, "b": 2})]
    fenced = '<tool_call>\n```json\n{"name": "add", "parameters": {"a": 1}}\n```\n</tool_call>'
    assert parse_tool_calls(fenced) == [ToolCall("add", {"a": 1})]
    unclosed = '<tool_call>{"name": "add", "arguments": {"a": 1}}\n<tool_call>{"name": "add", "arguments": {"a": 2}}'
    assert parse_tool_calls(unclosed) == [ToolCall("add", {"a": 1}), ToolCall("add", {"a": 2})]
    assert parse_tool_calls("The answer is 5. </tool_call>") == []


def test_the_json_forms_of_llama_and_mistral_templates_are_calls_and_answers_are_not():
    """Llama 3.1-3.3 (the turn is one JSON call with "parameters", maybe after <|python_tag|>) and
    Mistral ([TOOL_CALLS] and a JSON list, with call ids): read as calls; the markers are optional
    (special tokens, dropped in decoding); a turn that is not such JSON is a final answer."""
    llama = '{"name": "calculator", "parameters": {"expression": "2+3"}}'
    assert parse_tool_calls(llama) == parse_tool_calls("<|python_tag|>" + llama) == \
        [ToolCall("calculator", {"expression": "2+3"})]
    mistral = '[{"name": "add", "arguments": {"a": 1}, "id": "a1b2c3d4e"}, {"name": "add", "arguments": {"a": 2}}]'
    assert parse_tool_calls("[TOOL_CALLS] " + mistral) == parse_tool_calls(mistral) == \
        [ToolCall("add", {"a": 1}), ToolCall("add", {"a": 2})]
    for answer in ("Answer: 5", '{"answer": 5}', "[1, 2, 3]", '{"name": "Ada"}', "{not json"):
        assert parse_tool_calls(answer) == [], answer
    for broken in ('[TOOL_CALLS] [{"name": "add", "arguments": ', "<|python_tag|>print(1)", '[TOOL_CALLS] {"x": 1}'):
        [bad] = parse_tool_calls(broken)
        assert isinstance(bad, BadCall) and "tool call" in bad.error, broken
    box = ToolBox([add])
    assert box.handle(llama.replace("calculator", "add").replace('"expression": "2+3"', '"a": 2, "b": 3')) == \
        [{"role": "tool", "name": "add", "content": "5"}]


def test_malformed_blocks_become_bad_calls_with_a_reason():
    cases = {
        "<tool_call>{'name': 'add'}</tool_call>": "not valid JSON",
        "<tool_call></tool_call>": "empty",
        "<tool_call>[1, 2]</tool_call>": "got array",
        '<tool_call>{"arguments": {}}</tool_call>': '"name"',
        '<tool_call>{"name": "add", "arguments": [1]}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>': "string that is not valid JSON",
        '<tool_call>{"name": "add", "arguments": {}, "id": 3}</tool_call>': "unexpected keys",
    }
    for text, words in cases.items():
        [bad] = parse_tool_calls(text)
        assert isinstance(bad, BadCall) and words in bad.error, (text, bad)


def test_arguments_are_checked_against_the_schema():
    schema = tool_schema(add)
    assert check_arguments(schema, {"a": 1}) is None
    assert "missing required argument(s): a" in check_arguments(schema, {"b": 1})
    assert "unknown argument(s): c" in check_arguments(schema, {"a": 1, "c": 2})
    assert "'a' must be integer, got string" in check_arguments(schema, {"a": "1"})
    assert "got boolean" in check_arguments(schema, {"a": True})
    assert "got number" in check_arguments(schema, {"a": 1.5})
    nested = {"function": {"name": "f", "parameters": {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "number"}}, "mode": {"type": "string", "enum": ["a", "b"]}}}}}
    assert check_arguments(nested, {"xs": [1, 2.5], "mode": "a"}) is None
    assert "'xs'[1] must be number" in check_arguments(nested, {"xs": [1, "2"]})
    assert "must be one of" in check_arguments(nested, {"mode": "c"})


# ----------------------------------------------------------------------------- the ToolBox
def test_text_without_a_tool_call_is_a_final_answer():
    box = ToolBox([calculator])
    assert box.handle("The answer is 42.") is None
    assert box.stats.calls == 0


def test_handle_runs_each_call_and_returns_tool_messages_in_order():
    box = ToolBox([calculator, add])
    out = box.handle(call("calculator", {"expression": "6*7"}) + call("add", {"a": 2, "b": 3}))
    assert out == [{"role": "tool", "name": "calculator", "content": "42"},
                   {"role": "tool", "name": "add", "content": "5"}]


def test_bad_calls_give_error_observations_and_count_as_parse_failures():
    box = ToolBox([calculator])
    out = box.handle("<tool_call>{not json}</tool_call>" + call("calculater", {"expression": "1"})
                     + call("calculator", {"expression": 3}) + call("calculator", {}))
    contents = [m["content"] for m in out]
    assert all(c.startswith("error: ") for c in contents)
    assert "not valid JSON" in contents[0] and "name" not in out[0]
    assert "unknown tool 'calculater'" in contents[1] and "did you mean 'calculator'" in contents[1]
    assert "must be string, got integer 3" in contents[2]
    assert "missing required argument(s): expression" in contents[3]
    assert (box.stats.calls, box.stats.parse_failures, box.stats.tool_errors) == (4, 4, 0)


def test_a_tool_that_raises_or_hangs_is_an_error_observation_and_a_tool_error():
    def boom(x: int) -> str:
        """Fails.

        Args:
            x: Anything.
        """
        raise RuntimeError(f"broken on {x}")

    def slow(x: int) -> str:
        """Sleeps.

        Args:
            x: Seconds.
        """
        time.sleep(x)
        return "done"

    box = ToolBox([boom, slow], timeout_s=0.2)
    [raised] = box.handle(call("boom", {"x": 7}))
    assert raised == {"role": "tool", "name": "boom", "content": "error: boom raised RuntimeError: broken on 7"}
    start = time.monotonic()
    [hung] = box.handle(call("slow", {"x": 5}))
    assert time.monotonic() - start < 0.2 + TOOL_GRACE_S + 1.0
    assert hung["content"] == "error: slow timed out after 0.2 s"
    assert box.stats.tool_errors == 2 and box.stats.parse_failures == 0


def test_long_results_are_truncated_and_say_so():
    def big(n: int) -> str:
        """Returns n characters.

        Args:
            n: How many.
        """
        return "x" * n

    box = ToolBox([big], max_output_chars=100)
    [short] = box.handle(call("big", {"n": 100}))
    assert short["content"] == "x" * 100
    [long] = box.handle(call("big", {"n": 1000}))
    assert long["content"] == "x" * 100 + "\n...[truncated 900 chars]"
    assert box.stats.truncated == 1


def test_counters_add_up_over_turns_and_reset():
    box = ToolBox([calculator], max_calls_per_turn=2)
    box.handle(call("calculator", {"expression": "1+1"}))
    box.handle(call("calculator", {"expression": "1/0"}) + "<tool_call>oops</tool_call>")
    out = box.handle(call("calculator", {"expression": "1"}) * 3)  # the third is over the per-turn cap
    assert [m["content"] for m in out][:2] == ["1", "1"] and "more than 2 tool calls" in out[2]["content"]
    box.handle("no call here")
    assert box.stats.metrics() == {"tools/calls": 6.0, "tools/parse_failures": 1.0, "tools/tool_errors": 2.0,
                                   "tools/truncated": 0.0}
    assert box.reset_stats().calls == 6 and box.stats.calls == 0


def test_toolbox_limits_must_be_positive():
    with pytest.raises(ToolSpecError, match="timeout_s must be a positive number"):
        ToolBox([calculator], timeout_s=0)


# ----------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("10 // 3", "3"), ("10 % 3", "1"),
    ("-3 ** 2", "-9"), ("(-3) ** 2", "9"), ("2 ** 10", "1024"), ("0.1 + 0.2", "0.3"), ("1 / 3", "0.3333333333333333"),
    ("4821 * 937", "4517277"), ("2 ** -2", "0.25"), ("2 ** 0.5", "1.4142135623730951"), ("--5", "5"),
    ("1.0001 ** 365", repr(1.0001**365)), ("2 ** 1000", str(2**1000)),
])
def test_calculator_computes_exact_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, words", [
    ("__import__('os').system('echo hi')", "function calls are not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("x + 1", "names are not allowed"),
    ("(lambda: 1)()", "not allowed"),
    ("lambda: 1", "lambda is not allowed"),
    ("'a' * 3", "'a' is not a number"),
    ("2 ** 100000", "too large"),
    ("2 ** 1001", "exponent 1001 is too large"),
    ("9 ** 9 ** 9", "too large"),
    ("10 ** 900 * 10 ** 900", "more than 1000 digits"),
    ("2 ** 0.5 * 1e308 * 10", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("2 ^ 3", "use **"),
    ("1,000 + 1", "thousands separators"),
    ("1 +", "not an arithmetic expression"),
    ("-" * 400 + "1", "nested more than 300 levels"),
    ("1" * 2000, "longer than"),
])
def test_calculator_refuses_everything_but_arithmetic_with_an_error_string(expression, words):
    out = calculator(expression)
    assert out.startswith("error: ") and words in out, out


# ----------------------------------------------------------------------------- python (real sandbox)
def test_python_tool_runs_code_in_the_sandbox():
    assert python("print(2 + 3)") == "5"
    failed = python("print('before')\nraise ValueError('boom')")
    assert failed.startswith("error: the program failed (exit status 1)")
    assert "ValueError: boom" in failed and "before" in failed


def test_python_tool_stops_an_infinite_loop_at_the_toolbox_timeout():
    box = ToolBox([python], timeout_s=1.0)
    start = time.monotonic()
    [out] = box.handle(call("python", {"code": "while True:\n    pass"}))
    assert time.monotonic() - start < 1.0 + TOOL_GRACE_S
    assert out["content"].startswith("error: the program timed out after 1 s")
    assert box.stats.tool_errors == 1


def test_python_tool_output_is_truncated():
    box = ToolBox([python], max_output_chars=200)
    [out] = box.handle(call("python", {"code": "print('y' * 5000)"}))
    assert out["content"] == "y" * 200 + "\n...[truncated 4800 chars]"
    [flood] = box.handle(call("python", {"code": "while True:\n    print('z' * 1000)"}))
    assert flood["content"].startswith("error: the program printed more than 65536 bytes and was stopped")
    assert box.stats.truncated == 2 and box.stats.tool_errors == 1


# ----------------------------------------------------------------------------- the tools prompt
def test_tools_system_prompt_lists_the_schemas_and_the_call_format():
    schemas = ToolBox([calculator]).schemas
    prompt = tools_system_prompt(schemas)
    assert json.dumps(schemas[0]) in prompt and "<tools>" in prompt and "</tools>" in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    msgs = with_tools_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], schemas)
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and msgs[1] == {"role": "user", "content": "Hi"}
    assert with_tools_prompt([{"role": "user", "content": "Hi"}], schemas)[0] == {"role": "system", "content": prompt}


def test_embedded_template_ignores_tools_so_the_prompt_carries_them():
    from posttrain.models import load_tokenizer

    tok = load_tokenizer()
    assert template_renders_tools(tok) is False
    box = ToolBox([calculator])
    msgs = with_tools_prompt([{"role": "user", "content": "What is 6*7?"}], box.schemas)
    reply = call("calculator", {"expression": "6*7"})
    msgs += [{"role": "assistant", "content": reply}, *box.handle(reply)]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert '"name": "calculator"' in text and "<|im_start|>tool\n42<|im_end|>" in text
    assert "named SmolLM" not in text  # our system message replaced the template's default one
