"""The data layer, first step of the pipeline (data and tasks -> sampling -> rewards -> the math
(objectives) -> algorithms -> commands); it imports no other posttrain package. This module loads and
validates dataset files and renders prompts and completions as text (``prompt_text``,
``encode_prompt``, ``as_text``); ``chat`` gives the text a completion adds after its prompt,
``tasks/`` the built-in tasks (arithmetic, countdown, humaneval, arithmetic preferences).

Load and validate datasets in TRL's formats.

Kinds:
- ``preference``: ``{"prompt", "chosen", "rejected"}``. Each is a string, or a conversational
  list of messages ``[{"role": ..., "content": ...}]``. As in TRL, conversational pairs may leave
  out ``prompt`` ("implicit prompt"): the messages ``chosen`` and ``rejected`` share become it.
- ``unpaired`` (KTO, TRL's unpaired preference format): ``{"prompt", "completion", "label"}``,
  ``label`` true (desirable) or false (undesirable); prompt and completion both strings or both
  message lists. ``kto`` reads either that or ``preference`` (each pair then gives one desirable
  and one undesirable example: ``algorithms/kto_data``), one format per file.
- ``sft`` (TRL's SFT formats): ``{"messages": [...]}`` (conversational, at least one assistant
  message), ``{"prompt", "completion"}`` (both strings or both message lists), or ``{"text"}``;
  extra columns are kept (``answer``, ...: the greedy evaluation's reward reads them); one format
  per file.
- ``prompt``: ``{"prompt", ...}`` with any extra columns (``answer``, ``tests``, ...), which are
  passed to reward functions.

Sources: ``.jsonl``, ``.json`` (a list of objects, or an object with one list of them),
``.parquet``, ``.csv``, a directory saved with ``datasets.Dataset.save_to_disk``, or the name of a
Hugging Face dataset already in the local cache (nothing is downloaded).

Every problem raises :class:`DataError` naming the file, the 1-based line (jsonl, csv) or row
(json, parquet, datasets) and the field.

Text files (.jsonl, .json, .csv) must be UTF-8 (a UTF-8 byte-order mark is accepted and dropped):
``read_utf8`` names the line and byte offset of the first invalid byte, and recognises a UTF-16 or
UTF-32 file (by its byte-order mark, or by the zero bytes of ASCII text without one) with the
``iconv`` command that converts it. A CSV cell may be of any size (the ``csv`` module's 128 KB
field limit is lifted while reading). A ``.jsonl`` file holding one JSON array (or one document
spread over several lines) is recognised and the fix is named: rename it to ``.json`` or write
one object per line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

from posttrain.errors import UserError

Kind = Literal["preference", "prompt", "unpaired", "kto", "sft"]
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_FIELDS: dict[str, tuple[str, ...]] = {"preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",),
                                       "unpaired": ("prompt", "completion", "label"),
                                       "kto": ("prompt", "completion", "label"),
                                       "sft": ("messages",), "sft_pc": ("prompt", "completion"), "sft_text": ("text",)}
SFT_FORMS = {"messages": "sft", "prompt": "sft_pc", "completion": "sft_pc", "text": "sft_text"}
"""An SFT row's format, by the first of these fields it has (TRL's order of precedence)."""
_FORM_NAMES = {"preference": "paired (prompt, chosen, rejected)", "unpaired": "unpaired (prompt, completion, label)",
               "sft": "conversational (messages)", "sft_pc": "prompt-completion", "sft_text": "language modelling (text)"}


class DataError(UserError, ValueError):
    """Invalid data. ``source``, ``line`` (1-based, or None) and ``field`` (or None) say where."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str, unit: str = "line"):
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = source + (f":{line}" if line is not None and unit == "line" else f", row {line}" if line is not None else "")
        super().__init__(f"{where}: " + (f"field '{field}': " if field else "") + problem)


RowCheck = Callable[[dict], Optional[tuple[str, str]]]
"""A column check: ``(field, problem)`` for a row the run could not use, else None (e.g. the code
reward's, for a ``tests`` column that is not valid Python: ``rewards.row_checks``)."""


def load_rows(source: str | Path, kind: Kind = "prompt", split: str | None = None,
              checks: Sequence[RowCheck] = ()) -> list[dict[str, Any]]:
    """Read and validate every row of ``source``; return them as dicts (values as given, plus an
    implicit ``prompt`` where TRL would derive one). ``checks`` run on each row after its own
    validation; a problem raises ``DataError`` at that row's line."""
    if kind not in _FIELDS or kind.startswith("sft_"):
        raise ValueError(f"kind must be one of {sorted(_FIELDS)}, got {kind!r}")
    name = str(source)
    rows, unit = _read(Path(source).expanduser(), name, split)
    out = []
    for number, row in rows:
        row = validate_row(row, kind, name, number, unit)
        if out and row_form(row, kind) != row_form(out[0], kind):
            raise DataError(name, number, None, f"mixed formats: the first row is {_FORM_NAMES[row_form(out[0], kind)]}, "
                            f"this one is {_FORM_NAMES[row_form(row, kind)]}; use one format per file", unit)
        for check in checks:
            problem = check(row)
            if problem is not None:
                raise DataError(name, number, problem[0], problem[1], unit)
        out.append(row)
    if not out:
        raise DataError(name, None, None, "no rows")
    return out


def _read(path: Path, name: str, split: str | None) -> tuple[Iterable[tuple[int, Any]], str]:
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_datasets_dir(path, name, split), "row"
    if not path.exists():
        if suffix in (".jsonl", ".json", ".parquet", ".csv") or name.startswith((".", "/", "~")):
            raise DataError(name, None, None, "file not found")
        return _read_hub_cache(name, split), "row"
    if suffix == ".jsonl":
        return list(_read_jsonl(path, name)), "line"
    if suffix == ".json":
        return _read_json(path, name), "row"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(name, None, None, f"not a readable parquet file ({e}); a text file needs the "
                            ".jsonl, .json or .csv suffix") from None
        return list(enumerate(table.to_pylist(), start=1)), "row"
    if suffix == ".csv":
        return list(_read_csv(path, name)), "line"
    raise DataError(name, None, None, "unknown format: use .jsonl, .json, .parquet, .csv or a datasets directory")


# byte-order mark -> (encoding, its iconv name); UTF-32 first: its LE mark starts with UTF-16's
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _wide_encoding(data: bytes) -> str | None:
    """"UTF-16"/"UTF-32" for a file in that encoding (its byte-order mark, or without one the zero
    bytes ASCII text has in every 2nd or 4th byte), else None."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    head = data[:4096]
    if len(head) >= 4 and head.count(0) * 4 >= len(head):  # UTF-8 text has no zero bytes at all
        return "UTF-32" if head[1:3] == b"\0\0" or head[:2] == b"\0\0" else "UTF-16"
    return None


def read_utf8(path: str | Path, name: str | None = None) -> str:
    """The text of a UTF-8 file (a leading UTF-8 byte-order mark dropped). A file in another
    encoding raises :class:`DataError` naming ``name`` (default: the path), the 1-based line and
    byte offset of the first invalid byte, and the ``iconv`` command that converts it."""
    name = str(path) if name is None else name
    data = Path(path).read_bytes()
    wide = _wide_encoding(data)
    if wide:
        raise DataError(name, None, None, f"this file is {wide}, but posttrain reads UTF-8 text files: convert it "
                        f"with iconv -f {wide} -t UTF-8 {name} > converted{Path(name).suffix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, start) + 1
        raise DataError(name, line, None, f"not valid UTF-8: byte 0x{data[start]:02x} at byte offset {start}; "
                        "the file must be UTF-8: convert it, e.g. with iconv -f LATIN1 -t UTF-8 (naming its real "
                        "encoding)") from None


_FIX = "rename the file to .json or write one object per line"
_ARRAY = "this looks like a JSON array: " + _FIX
_DOCUMENT = "this looks like one JSON document over several lines, not JSON Lines (one object per line): " + _FIX
_JSON_TYPES = {list: "a JSON array [...]", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def _read_jsonl(path: Path, name: str):
    text = read_utf8(path, name)
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = _ARRAY if line.lstrip().startswith("[") else _DOCUMENT if _is_one_document(text) else None
            raise DataError(name, number, None, f"invalid JSON: {e.msg} (column {e.colno})"
                            + (f"; {hint}" if hint else "")) from None
        if not isinstance(value, dict):
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            raise DataError(name, number, None, f"expected an object {{...}} on each line, got {kind}"
                            + (f": {_ARRAY}" if isinstance(value, list) else f" ({line.strip()[:40]})"))
        rows.append((number, value))
    if not rows:
        raise DataError(name, None, None, "no rows: the file is empty" if not text else
                        "no rows: the file holds only blank lines")
    return rows


def _is_one_document(text: str) -> bool:
    """True when the whole text is one JSON object or array (a .json file named .jsonl)."""
    if text.lstrip()[:1] not in ("[", "{"):
        return False
    try:
        return isinstance(json.loads(text), (list, dict))
    except json.JSONDecodeError:
        return False


def _read_json(path: Path, name: str):
    try:
        data = json.loads(read_utf8(path, name))
    except json.JSONDecodeError as e:
        raise DataError(name, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(name, None, None, "a .json file must hold a list of rows (or an object with one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(name, None, None, "a .json file must hold a list of rows")
    return list(enumerate(data, start=1))


_CSV_LIMIT_CAP = 2**31 - 1  # csv.field_size_limit takes a C long: 32 bits on Windows


def _read_csv(path: Path, name: str):
    """Rows of a CSV file with a header; a cell may be as large as the file (the ``csv`` module's
    default 128 KB field limit is raised while reading, then restored)."""
    text = read_utf8(path, name)
    old = csv.field_size_limit()
    csv.field_size_limit(min(max(old, len(text) + 1), _CSV_LIMIT_CAP))
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(name, start, None, f"malformed CSV in the row starting on this line: {e} "
                                "(a cell with a quote must be quoted whole, its quotes doubled)") from None
            if None in row:
                raise DataError(name, reader.line_num, None, f"{len(row) - 1 + len(row[None])} cells but the header "
                                f"has {len(reader.fieldnames)} columns: quote a cell that holds a comma")
            rows.append((reader.line_num, {k: _maybe_json(v) for k, v in row.items()}))
    finally:
        csv.field_size_limit(old)
    return rows


def _maybe_json(value: str | None):
    """A CSV cell holding a JSON message list (a conversational prompt/chosen/rejected) is decoded;
    any other text, "[1, 2, 3]" included, stays the string it is."""
    if value and value.lstrip()[:1] == "[":
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if decoded and isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m for m in decoded):
            return decoded
    return value


def _read_datasets_dir(path: Path, name: str, split: str | None):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(name, None, None, f"a directory must be a dataset saved with save_to_disk ({e}); "
                        "for a data file in it, pass the file's path") from None
    return enumerate(_pick_split(ds, name, split), start=1)


def _read_hub_cache(name: str, split: str | None):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise DataError(
            name, None, None,
            f"not a local file or directory, and not in the local Hugging Face cache ({type(e).__name__}). "
            "posttrain never downloads data at run time: download it first or pass a local path",
        ) from None
    return enumerate(ds, start=1)


def _pick_split(ds, name: str, split: str | None):
    if hasattr(ds, "keys"):  # DatasetDict
        wanted = split or ("train" if "train" in ds else next(iter(ds.keys())))
        if wanted not in ds:
            raise DataError(name, None, None, f"no split {wanted!r}; splits: {', '.join(ds.keys())}")
        return ds[wanted]
    return ds


def validate_row(row: Any, kind: Kind, source: str = "<rows>", number: int | None = None, unit: str = "line") -> dict:
    """Check one row of ``kind``; return it (with an implicit prompt filled in)."""

    def fail(field: str | None, problem: str):
        raise DataError(source, number, field, problem, unit)

    if not isinstance(row, dict):
        fields = "messages; or prompt, completion; or text" if kind == "sft" else ", ".join(_FIELDS[kind])
        fail(None, f"expected an object with fields {fields}, got {type(row).__name__}")
    row = dict(row)
    kind = row_form(row, kind)
    if kind is None:
        fail(None, "not one of TRL's SFT formats: expected the field 'messages', or 'prompt' and 'completion', "
             "or 'text'")
    if kind == "preference" and "prompt" not in row and _is_messages(row.get("chosen")) and _is_messages(row.get("rejected")):
        row = _implicit_prompt(row, fail)
    for field in _FIELDS[kind]:
        if field not in row or row[field] is None:
            fail(field, "missing")
        if field == "label":
            if not isinstance(row[field], bool):
                fail(field, f"expected true (desirable) or false (undesirable), got {row[field]!r}")
            continue
        check_text(row[field], field, fail)
    if kind in ("unpaired", "sft_pc") and isinstance(row["prompt"], str) != isinstance(row["completion"], str):
        fail("completion", "mixed formats: 'prompt' and 'completion' must both be strings or both message lists")
    if kind == "preference" and row["chosen"] == row["rejected"]:
        fail("rejected", "identical to 'chosen': a pair must differ")
    if kind == "sft" and isinstance(row["messages"], str):
        fail("messages", "wrong type: expected a list of messages, got a string")
    if kind == "sft" and not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
        fail("messages", "no assistant message with text: nothing to train on")
    if kind == "sft_text" and not isinstance(row["text"], str):
        fail("text", f"wrong type: expected a string, got {type(row['text']).__name__}")
    return row


def row_form(row: dict, kind: Kind) -> str | None:
    """The format a row of ``kind`` is in: KTO reads unpaired rows or pairs (a row with 'chosen' or
    'rejected' is one), SFT one of its three forms (``SFT_FORMS``); other kinds are themselves."""
    if kind == "kto":
        return "preference" if "chosen" in row or "rejected" in row else "unpaired"
    if kind == "sft":
        return next((SFT_FORMS[f] for f in SFT_FORMS if f in row), None)
    return kind


def check_text(value: Any, field: str, fail) -> None:
    """A field is a non-empty string or a non-empty list of well-formed messages."""
    if isinstance(value, str):
        if not value.strip():
            fail(field, "empty text")
        return
    if not isinstance(value, list):
        fail(field, f"wrong type: expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        fail(field, "empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            fail(f"{field}[{i}]", f"wrong type: expected a message object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            fail(f"{field}[{i}].role", f"unknown role {role!r} (expected one of {', '.join(sorted(ROLES))})")
        content = msg.get("content")
        if not isinstance(content, str):
            fail(f"{field}[{i}].content", f"wrong type: expected a string, got {type(content).__name__}")
        if not content.strip() and role != "system":
            fail(f"{field}[{i}].content", "empty text")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _implicit_prompt(row: dict, fail) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        fail("prompt", "missing, and 'chosen' and 'rejected' share no leading messages to take it from")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def is_conversational(value: Any) -> bool:
    """True for a list of messages (TRL's conversational format)."""
    return _is_messages(value) and bool(value) and "role" in value[0]


def as_text(x: Any) -> str:
    """A completion as text: strings as they are; TRL conversational message lists
    (`[{"role": "assistant", "content": ...}]`) joined by their contents; None as ""."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return as_text(x.get("content"))
    if isinstance(x, (list, tuple)):
        return "\n".join(as_text(m) for m in x)
    return str(x)


def prompt_text(tokenizer, prompt: Any, chat_template: bool = True) -> str:
    """The text a model is given for ``prompt``: conversational prompts go through the chat
    template (with the generation prompt); a plain string is wrapped as one user message when
    ``chat_template`` and the tokenizer has a template, else used as is (TRL's "standard" format)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if is_conversational(prompt):
        if not has_template:
            raise ValueError("conversational prompt, but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if chat_template and has_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: Any, chat_template: bool = True) -> list[int]:
    """Token ids of :func:`prompt_text` (special tokens come from the template, not added twice)."""
    text = prompt_text(tokenizer, prompt, chat_template)
    templated = is_conversational(prompt) or (chat_template and bool(getattr(tokenizer, "chat_template", None)))
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]
