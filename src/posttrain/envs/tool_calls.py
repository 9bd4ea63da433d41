"""Tool calls in the model's text: the Hermes / Qwen form, its argument checks, and the tools prompt.

The model asks for a tool by writing, anywhere in its turn, one or several blocks

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2 + 3"}}
    </tool_call>

(the form of NousResearch's Hermes function-calling format, which Qwen2.5 / Qwen3 and SmolLM3
templates also use). `parse_tool_calls(text)` finds them; a text without any ``<tool_call>`` tag
is a final answer (an empty list). Where it departs from the strict format, on purpose:
  - ``"arguments"`` may also be a JSON *string* holding the object (OpenAI's wire form, which
    models imitate), and ``"parameters"`` is read as ``"arguments"`` (Llama 3's JSON form);
    a missing ``"arguments"`` means no arguments;
  - a block may be wrapped in a Markdown code fence, and the last block may lack its closing
    ``</tool_call>`` (generation stopped on it); a block also ends where the next ``<tool_call>``
    starts, so one unclosed block does not swallow the next;
  - nothing else is repaired: single quotes, trailing text or comments inside a block make it
    a `BadCall` with a message that says what is wrong, never an exception.

The forms of templates that define their own (read when the turn has no ``<tool_call>`` tag): a turn
that *is* the call, a JSON object ``{"name": ..., "parameters"|"arguments": {...}}`` (Llama 3.1-3.3's
JSON tool calling, optionally after ``<|python_tag|>``) or a JSON list of them (Mistral's
``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]``). The markers are special tokens that the
episode runner's decoding drops, so they are optional here; after a marker the text must be such a
call (else a `BadCall`), without one a turn that does not parse as one is a final answer. The table
``CALL_FORMS`` lists the forms.

`check_arguments(schema, arguments)` checks a call's arguments against the tool's JSON schema
(as `transformers.utils.get_json_schema` writes it): missing required, unknown extra and
wrong-typed arguments (``integer`` accepts no ``true`` and no ``3.0``; ``number`` accepts ints),
``enum``, ``nullable``, ``anyOf``, array ``items`` / ``prefixItems``, object
``additionalProperties``. It returns an error message for the model, or None.

`tools_system_prompt(schemas)` is the Hermes / Qwen2.5 system-prompt block that lists the tools
and the call format; `with_tools_prompt(messages, schemas)` puts it into a conversation's system
message. Use them when the chat template ignores ``tools=`` (`template_renders_tools` tells):
the embedded model's (SmolLM2-135M-Instruct) does, see `posttrain.envs.tools`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
_FENCE_RE = re.compile(r"\A```[A-Za-z]*\s*\n?(.*?)\n?\s*```\Z", re.DOTALL)
_ARGUMENT_KEYS = ("arguments", "parameters")  # first present wins; "parameters": Llama 3's JSON form


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadCall:
    """A ``<tool_call>`` block that could not be read: why (for the model), and the name if one was."""

    error: str
    name: str | None = None


CALL_FORMS = {
    "hermes": "<tool_call>{json}</tool_call> blocks anywhere in the turn (Hermes, Qwen2.5/3, SmolLM3)",
    "json": 'the whole turn one JSON call, "parameters" or "arguments" (Llama 3.1-3.3; after <|python_tag|>)',
    "json_list": "the whole turn a JSON list of calls (Mistral; after [TOOL_CALLS])",
}
"""The call forms read, in the order tried (module docstring)."""
_TURN_MARKERS = ("[TOOL_CALLS]", "<|python_tag|>")


def has_tool_call(text: str) -> bool:
    """Whether the turn holds a tool call in any of the `CALL_FORMS`."""
    return bool(parse_tool_calls(text))


def parse_tool_calls(text: str) -> list[ToolCall | BadCall]:
    """Every call of the turn, in order, read as a `ToolCall` or a `BadCall`: its ``<tool_call>``
    blocks, else the turn itself as a JSON call or list of calls (`CALL_FORMS`); [] for an answer."""
    if "<tool_call>" in text:
        return [_parse_block(m.group(1)) for m in TOOL_CALL_RE.finditer(text)]
    return _whole_turn_calls(text)


def _whole_turn_calls(text: str) -> list[ToolCall | BadCall]:
    body, marked = text.strip(), False
    for marker in _TURN_MARKERS:
        if body.startswith(marker):
            body, marked = body[len(marker):].strip(), True
    fenced = _FENCE_RE.match(body)
    body = fenced.group(1).strip() if fenced else body
    shape = 'a JSON call {"name": ..., "parameters": {...}} or a list of them'
    if not body.startswith(("{", "[")):
        return [BadCall(f"after the tool call marker: expected {shape}")] if marked else []
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        bad = BadCall(f"the tool call is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        return [bad] if marked else []
    items = obj if isinstance(obj, list) else [obj]
    if items and all(isinstance(i, dict) and "name" in i and any(k in i for k in _ARGUMENT_KEYS) for i in items):
        return [_parse_object({k: v for k, v in i.items() if k != "id"}) for i in items]  # Mistral's call ids
    return [BadCall(f"after the tool call marker: expected {shape}")] if marked else []


def _parse_block(block: str) -> ToolCall | BadCall:
    body = block.strip()
    fenced = _FENCE_RE.match(body)
    body = fenced.group(1).strip() if fenced else body
    if not body:
        return BadCall('empty <tool_call> block: expected {"name": ..., "arguments": {...}}')
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return BadCall(f"the <tool_call> block is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    return _parse_object(obj)


def _parse_object(obj: Any) -> ToolCall | BadCall:
    if not isinstance(obj, dict):
        return BadCall(f'the <tool_call> block must be a JSON object {{"name": ..., "arguments": {{...}}}}, '
                       f"got {_json_type(obj)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return BadCall('the <tool_call> object needs a "name" string')
    key = next((k for k in _ARGUMENT_KEYS if k in obj), None)
    extra = sorted(set(obj) - {"name", key})
    if extra:
        return BadCall(f"unexpected keys in the <tool_call> object: {', '.join(extra)} "
                       '(expected only "name" and "arguments")', name)
    arguments = obj.get(key) if key else {}
    if isinstance(arguments, str):  # OpenAI's wire form: the arguments object serialised as a string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return BadCall(f'"arguments" is a string that is not valid JSON ({e.msg})', name)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return BadCall(f'"arguments" must be a JSON object, got {_json_type(arguments)}', name)
    return ToolCall(name, arguments)


# ----------------------------------------------------------------------------- argument checks
_JSON_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_PY_TO_JSON = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}


def _json_type(value: Any) -> str:
    return _PY_TO_JSON.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(value: Any, schema: dict, where: str) -> str | None:
    """An error message if `value` does not match the (sub)schema, else None."""
    if value is None and schema.get("nullable"):
        return None
    if "anyOf" in schema:
        if all(_check_value(value, sub, where) for sub in schema["anyOf"]):
            return f"{where} {_show(value)} matches none of the allowed forms"
        return None
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    known = [k for k in kinds if k in _JSON_TYPE_CHECKS]
    if known and not any(_JSON_TYPE_CHECKS[k](value) for k in known):
        return f"{where} must be {' or '.join(known)}, got {_json_type(value)} {_show(value)}"
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        return f"{where} must be one of {_show(schema['enum'])}, got {_show(value)}"
    if isinstance(value, list):
        items = schema.get("prefixItems")
        if items is not None:
            if len(value) != len(items):
                return f"{where} must have {len(items)} items, got {len(value)}"
            pairs = list(zip(value, items))
        else:
            pairs = [(v, schema["items"]) for v in value] if "items" in schema else []
        for i, (item, sub) in enumerate(pairs):
            if (err := _check_value(item, sub, f"{where}[{i}]")) is not None:
                return err
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            if (err := _check_value(item, schema["additionalProperties"], f"{where}[{key!r}]")) is not None:
                return err
    return None


def check_arguments(schema: dict, arguments: dict[str, Any]) -> str | None:
    """An error message (for the model) if `arguments` do not fit the tool's schema, else None.

    `schema` is what `get_json_schema` returns (``{"type": "function", "function": {...}}``) or
    its ``"function"`` part.
    """
    function = schema.get("function", schema)
    name = function.get("name", "?")
    params = function.get("parameters") or {}
    properties = params.get("properties") or {}
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"{name}: missing required argument(s): {', '.join(missing)}"
    extra = sorted(set(arguments) - set(properties))
    if extra:
        allowed = ", ".join(properties) or "none"
        return f"{name}: unknown argument(s): {', '.join(extra)} (allowed: {allowed})"
    for key, value in arguments.items():
        if (err := _check_value(value, properties[key], f"argument {key!r}")) is not None:
            return f"{name}: {err}"
    return None


# ----------------------------------------------------------------------------- the tools prompt
_PROMPT_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_PROMPT_TAIL = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_system_prompt(schemas: list[dict], system: str | None = None) -> str:
    """The Hermes / Qwen2.5 tools block (one schema per line inside ``<tools>``), after `system` if given."""
    lines = "".join("\n" + json.dumps(s, ensure_ascii=False) for s in schemas)
    block = f"{_PROMPT_HEAD}{lines}\n{_PROMPT_TAIL}"
    return f"{system}\n\n{block}" if system else block


def with_tools_prompt(messages: list[dict], schemas: list[dict]) -> list[dict]:
    """A copy of `messages` whose system message (added first if there is none) ends with the tools block."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = tools_system_prompt(schemas, out[0].get("content") or None)
    else:
        out.insert(0, {"role": "system", "content": tools_system_prompt(schemas)})
    return out


_PROBE_SCHEMA = {"type": "function", "function": {
    "name": "posttrain_probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {}}}}


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows a ``tools=`` list to the model (renders a probe
    conversation with and without one and compares the text)."""
    messages = [{"role": "user", "content": "Hi"}]
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_tools = tokenizer.apply_chat_template(messages, tools=[_PROBE_SCHEMA], tokenize=False,
                                               add_generation_prompt=True)
    return with_tools != plain and "posttrain_probe_tool" in with_tools
