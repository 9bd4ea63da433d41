"""Tools for multi-turn environments: schemas, the `ToolBox` that runs a turn's calls, built-in tools.

A tool is a plain Python function with type hints and a Google-style docstring (an ``Args:`` line
per argument). Its JSON schema comes from ``transformers.utils.get_json_schema`` (`tool_schema`;
a function it cannot describe is a `ToolSpecError` naming the function, its file and line) and is
passed to the chat template as ``tools=[schema, ...]``.

The model calls tools in the Hermes / Qwen form ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`` (parsing, argument checks and the tools system prompt: `posttrain.envs.tool_calls`).
``ToolBox(tools).handle(assistant_text)`` returns None for a turn without a ``<tool_call>`` (a final
answer), else one ``{"role": "tool", "name": ..., "content": str}`` message per call, in order.
Nothing the model writes raises: a block that cannot be read, an unknown tool or arguments that do
not fit the schema give an ``"error: ..."`` message and count in ``stats.parse_failures``; a tool
that raises, times out, or returns text starting with ``"error:"`` counts in ``stats.tool_errors``.
A result longer than ``max_output_chars`` keeps its head and says ``...[truncated N chars]``.

The embedded model's chat template (SmolLM2-135M-Instruct, checked with transformers 5.25) knows
nothing of tools: it renders each message as ``<|im_start|>{role}\\n{content}<|im_end|>`` and
ignores ``tools=`` (the text is identical with and without it). So for that model the schemas go
into the system prompt with `tool_calls.with_tools_prompt` (the Hermes / Qwen2.5 block), which also
replaces the template's default system line; `tool_calls.template_renders_tools(tokenizer)` tells
which case a tokenizer is in. Tool results render as ``<|im_start|>tool\\n...<|im_end|>``, and an
assistant turn must stay plain text (the template has no ``tool_calls`` field): keep the model's
raw text, ``<tool_call>`` blocks included, as the assistant message.

Built-in tools (`TOOLS`, `get_tools`): ``calculator`` (exact arithmetic on an ``ast`` whitelist,
never ``eval``) and ``python`` (the program runs in `posttrain.rewards.sandbox`, never in this
process). Departures from the reference agents' loops (verifiers, Qwen-Agent): the time limit of a
plain Python tool is enforced by waiting for it in a worker thread, which cannot be killed: a tool
that ignores its limit keeps running in the background (the call is reported as timed out);
only the sandboxed ``python`` tool is really stopped at ``timeout_s``.
"""

from __future__ import annotations

import ast
import contextvars
import difflib
import inspect
import json
import math
import operator
import threading
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable

from posttrain.envs.tool_calls import BadCall, check_arguments, parse_tool_calls
from posttrain.errors import UserError

TOOL_GRACE_S = 2.0  # added to timeout_s when waiting for a tool: the sandbox's interpreter start-up
PYTHON_TIMEOUT_S = 5.0  # the python tool's limits when called outside a ToolBox
PYTHON_MEMORY_MB = 512
PYTHON_MAX_OUTPUT_BYTES = 1 << 16  # the sandbox stops a program that prints more
STDERR_TAIL_CHARS = 1500


class ToolSpecError(UserError, ValueError):
    """A tool the user gave cannot be offered to the model (no hints, no docstring, unknown name)."""


# ----------------------------------------------------------------------------- schemas
def _where(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__module__", None) or "?"


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool function (``{"type": "function", "function": {...}}``)."""
    from transformers.utils.chat_template_utils import (DocstringParsingException, TypeHintParsingException,
                                                        get_json_schema)

    if not callable(fn):
        raise ToolSpecError(f"a tool must be a Python function, got {type(fn).__name__} {fn!r}")
    name = getattr(fn, "__name__", repr(fn))
    if not name.isidentifier():
        raise ToolSpecError(f"tool {name} ({_where(fn)}): a tool needs a name the model can write; "
                            "define it with `def` instead of a lambda")
    try:
        return get_json_schema(fn)
    except (DocstringParsingException, TypeHintParsingException, NameError, TypeError, ValueError) as e:
        raise ToolSpecError(
            f"tool {name} ({_where(fn)}): {e} -- a tool needs a type hint on every argument and a "
            "Google-style docstring: a description, then 'Args:' with one 'name: description' line per argument"
        ) from e


# ----------------------------------------------------------------------------- the ToolBox
@dataclass
class ToolStats:
    """Counters of a ToolBox, summed over every `handle` call since it was made (or reset)."""

    calls: int = 0
    """<tool_call> blocks seen (well-formed or not)."""
    parse_failures: int = 0
    """Blocks not run: not JSON / not a call object, an unknown tool, arguments not fitting the schema."""
    tool_errors: int = 0
    """Calls run that raised, timed out, returned "error: ...", or went over max_calls_per_turn."""
    truncated: int = 0
    """Results cut to max_output_chars."""

    def metrics(self, prefix: str = "tools/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "(no output)"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to `max_chars` characters plus a note saying how many were dropped; and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    return f"{text[:max_chars]}\n...[truncated {len(text) - max_chars} chars]", True


_PYTHON_LIMITS: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar(
    "posttrain_python_limits", default=(PYTHON_TIMEOUT_S, PYTHON_MEMORY_MB))


class ToolBox:
    """The tools of an environment: their schemas, and `handle` to run the calls of an assistant turn."""

    def __init__(self, tools: list[Callable], timeout_s: float = 10.0, max_output_chars: int = 2000,
                 memory_mb: int = PYTHON_MEMORY_MB, max_calls_per_turn: int = 8):
        for flag, value in (("timeout_s", timeout_s), ("max_output_chars", max_output_chars),
                            ("memory_mb", memory_mb), ("max_calls_per_turn", max_calls_per_turn)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ToolSpecError(f"ToolBox: {flag} must be a positive number, got {value!r}")
        self.timeout_s, self.max_output_chars = float(timeout_s), int(max_output_chars)
        self.memory_mb, self.max_calls_per_turn = int(memory_mb), int(max_calls_per_turn)
        self._tools: dict[str, Callable] = {}
        self._schemas: dict[str, dict] = {}
        for fn in tools:
            schema = tool_schema(fn)
            name = schema["function"]["name"]
            if name in self._tools:
                raise ToolSpecError(f"two tools are named {name!r} ({_where(self._tools[name])} and {_where(fn)})")
            self._tools[name], self._schemas[name] = fn, schema
        self.stats = ToolStats()
        self._lock = threading.Lock()
        if python in self._tools.values():  # detect the sandbox's isolation now, not inside a call's time limit
            from posttrain.rewards.sandbox import isolation

            isolation()

    @property
    def schemas(self) -> list[dict]:
        """The tools' JSON schemas, for ``apply_chat_template(..., tools=...)`` or `tools_system_prompt`."""
        return [json.loads(json.dumps(s)) for s in self._schemas.values()]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def reset_stats(self) -> ToolStats:
        """Zero the counters; returns their values before."""
        with self._lock:
            old, self.stats = self.stats, ToolStats()
        return old

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + n)

    def handle(self, assistant_text: str) -> list[dict] | None:
        """None if the turn has no ``<tool_call>`` (a final answer), else one tool message per call."""
        calls = parse_tool_calls(assistant_text)
        if not calls:
            return None
        self._count(calls=len(calls))
        return [self._message(i, call) for i, call in enumerate(calls)]

    def _message(self, index: int, call) -> dict:
        if isinstance(call, BadCall):
            return self._error(call.name, call.error, "parse_failures")
        if call.name not in self._tools:
            close = difflib.get_close_matches(call.name, self._tools, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return self._error(call.name, f"unknown tool {call.name!r} (available: {', '.join(self._tools)}){hint}",
                               "parse_failures")
        if (problem := check_arguments(self._schemas[call.name], call.arguments)) is not None:
            return self._error(call.name, problem, "parse_failures")
        if index >= self.max_calls_per_turn:
            return self._error(call.name, f"more than {self.max_calls_per_turn} tool calls in one turn; "
                               "this one was not run", "tool_errors")
        ok, value = self._run(self._tools[call.name], call.arguments)
        if not ok:
            return self._error(call.name, value, "tool_errors")
        text, cut = truncate(_as_text(value), self.max_output_chars)
        self._count(truncated=int(cut), tool_errors=int(text.startswith("error:")))
        return {"role": "tool", "name": call.name, "content": text}

    def _error(self, name: str | None, problem: str, counter: str) -> dict:
        text, cut = truncate(f"error: {problem}", self.max_output_chars)
        self._count(**{counter: 1, "truncated": int(cut)})
        return {"role": "tool", "content": text} if name is None else {"role": "tool", "name": name, "content": text}

    def _run(self, fn: Callable, arguments: dict) -> tuple[bool, Any]:
        """(True, result) or (False, what went wrong): the tool runs in a daemon thread, waited for
        timeout_s + TOOL_GRACE_S; the python tool gets timeout_s and memory_mb for its sandbox."""
        box: dict[str, Any] = {}
        limits = (self.timeout_s, self.memory_mb)
        name = fn.__name__

        def target() -> None:
            _PYTHON_LIMITS.set(limits)
            try:
                box["value"] = fn(**arguments)
            except BaseException as e:  # noqa: BLE001 -- any failure of the tool is an observation
                box["error"] = f"{name} raised {type(e).__name__}: {e}"

        worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True,
                                  name=f"posttrain-tool-{name}")
        worker.start()
        worker.join(self.timeout_s + TOOL_GRACE_S)
        if worker.is_alive():
            return False, f"{name} timed out after {self.timeout_s:g} s"
        if "error" in box:
            return False, box["error"]
        return True, box.get("value")


# ----------------------------------------------------------------------------- calculator
MAX_DIGITS = 1000
MAX_BITS = int(MAX_DIGITS * math.log2(10))
MAX_EXPONENT = 1000
MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 300  # nesting of operations: deeper is refused before Python's recursion limit
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_REFUSED = {
    ast.Name: "names are not allowed", ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed", ast.Lambda: "lambda is not allowed",
    ast.Subscript: "indexing is not allowed", ast.Compare: "comparisons are not allowed",
    ast.BitXor: "^ is not a power here: use **", ast.Tuple: "write numbers without thousands separators",
}


class _CalcError(Exception):
    pass


def _fit(x: Fraction | float) -> Fraction | float:
    """`x` if it is small enough; a non-integer too long to keep exact becomes a float."""
    if isinstance(x, complex):
        raise _CalcError("the result is not a real number")
    if isinstance(x, float):
        if not math.isfinite(x):
            raise _CalcError("the result is too large")
        return x
    if x.numerator.bit_length() <= MAX_BITS and x.denominator.bit_length() <= MAX_BITS:
        return x
    if x.denominator == 1:
        raise _CalcError(f"the result has more than {MAX_DIGITS} digits")
    try:
        return _fit(float(x))
    except OverflowError:
        raise _CalcError("the result is too large") from None


def _power(base: Fraction | float, exp: Fraction | float) -> Fraction | float:
    if isinstance(exp, Fraction) and exp.denominator == 1:
        e = exp.numerator
        if abs(e) > MAX_EXPONENT and abs(base) not in (0, 1):
            raise _CalcError(f"exponent {e} is too large (the limit is {MAX_EXPONENT})")
        if isinstance(base, Fraction):
            if base == 0 and e < 0:
                raise ZeroDivisionError
            if base == 0 or abs(base) == 1:
                return base**e
            bits = abs(e) * max(math.log2(abs(base.numerator)), math.log2(base.denominator))
            if bits <= MAX_BITS:
                return base**e
            if base.denominator == 1 and e > 0:
                raise _CalcError(f"the result would have more than {MAX_DIGITS} digits")
    if base < 0 and not (isinstance(exp, Fraction) and exp.denominator == 1):
        raise _CalcError("a negative number to a fractional power is not a real number")
    try:
        return float(base) ** float(exp)
    except OverflowError:
        raise _CalcError("the result is too large") from None


def _evaluate(node: ast.AST, depth: int = 0) -> Fraction | float:
    if depth > MAX_DEPTH:
        raise _CalcError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, depth + 1)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise _CalcError("the number is too large")
        return _fit(Fraction(node.value) if isinstance(node.value, int) else Fraction(repr(node.value)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _fit(_power(left, right))
        return _fit(_BINARY[type(node.op)](left, right))
    what = node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node
    reason = _REFUSED.get(type(what), f"{type(what).__name__} is not allowed")
    if isinstance(node, ast.Constant):
        reason = f"{node.value!r} is not a number"
    raise _CalcError(f"{reason} (only numbers, + - * / // % **, unary minus and parentheses)")


def _format_number(x: Fraction | float) -> str:
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        x = float(x)
    return repr(x)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: The expression, with numbers, + - * / // % ** and parentheses, e.g. "(12 + 3) * 4.5".
    """
    if not isinstance(expression, str):
        return f"error: the expression must be a string, got {type(expression).__name__}"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"error: not an arithmetic expression ({getattr(e, 'msg', None) or e})"
    try:
        return _format_number(_evaluate(tree))
    except ZeroDivisionError:
        return "error: division by zero"
    except _CalcError as e:
        return f"error: {e}"
    except (OverflowError, RecursionError, MemoryError):
        return "error: the expression is too large to evaluate"


# ----------------------------------------------------------------------------- python
_STATUS = {
    "error": "error: the program failed (exit status {rc})",
    "timeout": "error: the program timed out after {timeout_s:g} s",
    "memory": "error: the program ran out of memory (limit {memory_mb} MB)",
    "killed": "error: the program was killed (exit status {rc})",
}


def format_run(result, timeout_s: float, memory_mb: int) -> str:
    """A sandbox result as the model sees it: stdout if it ran fine, else a status line, the tail of
    stderr and stdout."""
    stdout = result.stdout.rstrip("\n")
    if result.status == "ok":
        return stdout if stdout else "(no output)"
    head = _STATUS.get(result.status, "error: the program ended with status {status}").format(
        rc=result.returncode, timeout_s=timeout_s, memory_mb=memory_mb, status=result.status)
    if result.truncated:
        head = f"error: the program printed more than {PYTHON_MAX_OUTPUT_BYTES} bytes and was stopped"
    parts = [head]
    stderr = result.stderr.rstrip()
    if stderr:
        tail = stderr[-STDERR_TAIL_CHARS:]
        parts.append(f"--- stderr{' (end)' if len(tail) < len(stderr) else ''} ---\n{tail}")
    if stdout:
        parts.append(f"--- stdout ---\n{stdout}")
    return "\n".join(parts)


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    The program runs in a fresh sandboxed interpreter: standard library only, no network, a time limit.
    Print the values you want to see.

    Args:
        code: The complete Python program, e.g. "print(sum(range(10)))".
    """
    from posttrain.rewards.sandbox import run

    if not isinstance(code, str):
        return f"error: the code must be a string, got {type(code).__name__}"
    timeout_s, memory_mb = _PYTHON_LIMITS.get()
    result = run(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=PYTHON_MAX_OUTPUT_BYTES)
    return format_run(result, timeout_s, memory_mb)


# ----------------------------------------------------------------------------- registry
TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator, "python": python}


def get_tools(names: list[str] | str) -> list[Callable[..., str]]:
    """The built-in tools by name (a list, or one comma-separated string)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        if name not in TOOLS:
            close = difflib.get_close_matches(name, TOOLS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ToolSpecError(f"unknown tool {name!r} (built-in tools: {', '.join(TOOLS)}){hint}")
        out.append(TOOLS[name])
    return out


__all__ = ["MAX_DIGITS", "TOOLS", "ToolBox", "ToolSpecError", "ToolStats", "calculator", "format_run",
           "get_tools", "python", "tool_schema", "truncate"]
