"""Reading the user's jsonl: validation with `file:line` errors, and a parallel, order-preserving
map over a file's lines (the token cache and the chat datasets tokenize through it).

Formats (MiniMind's, so its public datasets drop in):
    pretrain   {"text": "..."}
    SFT        {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    DPO        {"chosen": [messages], "rejected": [messages]}
    reasoning  SFT format; the tokenizer renders an assistant `reasoning_content` field itself
               (MiniMind-3's form); an assistant turn may then have empty "content".
    tool use   MiniMind-3's (OpenAI-style): "tools" (a list of JSON schemas, or that list as a JSON
               string) on the system message or on the row, "tool_calls" on an assistant message (a
               list, or a JSON string of one, of {"name", "arguments"} or {"function": {...}}; its
               content may then be ""), and "role": "tool" messages holding a tool's result. The
               JSON strings are parsed in place when the row is checked; the tokenizer renders the rest.

What a line may be: UTF-8 (a BOM at the start of a line is dropped), LF or CRLF endings, blank
lines ignored; unknown fields, in a row or in a message, are ignored. A conversation may start with
an assistant turn, and a system message may stand anywhere: each turn is rendered where it is and
only assistant turns are trained on. Anything else wrong with a line is a DataError naming
`file:line`, the reason and what to do, or with skip_bad=True a counted skip (BadLineReport); a
file with no rows at all is an error either way.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from minillm.errors import UserError

SKIP_HINT = "fix the line, or pass --skip_bad_lines 1 to skip such lines and count them"
BOM = b"\xef\xbb\xbf"
EXAMPLES = {  # one good line per format, for the "no rows" error
    "pretrain": '{"text": "..."}',
    "sft": '{"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "dpo": '{"chosen": [...messages ending with an assistant turn], "rejected": [...]}',
}
ROLES = ("system", "user", "assistant", "tool")


class DataError(UserError):
    """A problem in the user's data, always phrased as `file:line: reason (what to do)`."""


class ToolUseRow(ValueError):
    """A row that uses tools where a reader cannot take them (RL prompt data, minillm.rl): a bad line there."""


TOOL_USE_WHY = "tool use is not supported in RL prompt data yet"


def _present(value) -> bool:
    return value not in (None, "", [], {})


def check_tool_use(obj: dict, fields: tuple[str, ...]) -> None:
    """Raises ToolUseRow naming where a row uses tools: "tools" on the row or a message, "tool_calls"
    on a message, or a message with role "tool"."""
    if _present(obj.get("tools")):
        raise ToolUseRow(f'has "tools"; {TOOL_USE_WHY}')
    for field in fields:
        messages = obj.get(field)
        for i, m in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(m, dict):
                continue
            for key in ("tools", "tool_calls"):
                if _present(m.get(key)):
                    raise ToolUseRow(f'"{field}"[{i}] has "{key}"; {TOOL_USE_WHY}')
            if m.get("role") == "tool":
                raise ToolUseRow(f'"{field}"[{i}] has role "tool"; {TOOL_USE_WHY}')


@dataclass
class BadLineReport:
    """Counts the lines skipped with skip_bad=True; `str(report)` is the line a script prints."""
    path: str
    count: int = 0
    first: str | None = None  # "file:line: reason" of the first skipped line

    def add(self, where: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = where

    def __bool__(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        if not self.count:
            return f"no bad lines in {self.path}"
        return f"skipped {self.count} bad lines in {self.path} (first: {self.first})"


def _type_name(t) -> str:
    return {str: "a string", list: "a list", dict: "an object", int: "an integer"}.get(t, t.__name__)


def _json_type(value) -> str:
    """What a parsed JSON value is, in JSON's words (null, a number, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _short(value, limit: int = 40) -> str:
    """repr of a value from the user's line, cut so a huge value never floods the error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(text: str, what: str) -> None:
    """Raises ValueError unless `text` is valid Unicode: JSON can spell an unpaired surrogate
    ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f'{what} holds an unpaired surrogate {_short(text[e.start])} at character {e.start} '
                         f'(a broken "\\uXXXX" escape); it is not valid Unicode text') from None


def _json_field(m: dict, key: str, at: str):
    """m[key] as a list: MiniMind's data writes "tools" and "tool_calls" as JSON strings; parsed in place."""
    value = m[key]
    if isinstance(value, str):
        try:
            value = m[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f'{at} "{key}" is a string that is not valid JSON; give a list (or its JSON text)') from None
    if not isinstance(value, list):
        raise ValueError(f'{at} "{key}" must be a list, got {_json_type(value)}')
    return value


def _check_tools(tools, at: str) -> None:
    for j, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ValueError(f'{at} "tools"[{j}] is {_json_type(t)}, not a JSON schema object')


def _check_tool_calls(calls, at: str) -> None:
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f'{at} "tool_calls"[{j}] needs a "name" (or a "function" holding one): '
                             f'{{"name": "...", "arguments": {{...}}}}')
        arguments = fn.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            raise ValueError(f'{at} "tool_calls"[{j}] "arguments" must be an object (or its JSON text), '
                             f'got {_json_type(arguments)}')


def _check_messages(messages: Any, field: str) -> None:
    """Raises ValueError(reason) unless `messages` is a list of {role, content} messages. Tool fields
    given as JSON strings are parsed in place."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{field}" must be a non-empty list of messages')
    for i, m in enumerate(messages):
        at = f'"{field}"[{i}]'
        if not isinstance(m, dict):
            raise ValueError(f'{at} is {_json_type(m)}, not a {{"role", "content"}} object')
        role, content = m.get("role"), m.get("content")
        if role is None and ("from" in m or "value" in m):
            raise ValueError(f'{at} has "from"/"value" but no "role" (ShareGPT style?); convert messages to '
                             f'{{"role": "system"|"user"|"assistant", "content": "..."}}')
        if not isinstance(role, str) or role not in ROLES:
            got = "no \"role\"" if role is None else f"role {_short(role)}"
            raise ValueError(f'{at} has {got}; expected one of {", ".join(ROLES)}')
        at = f"{at} ({role})"
        if "content" not in m:
            raise ValueError(f'{at} has no string "content"')
        if not isinstance(content, str):
            parts = (" (content parts are not supported: join the text into one string)"
                     if isinstance(content, list) else "")
            raise ValueError(f'{at} "content" must be a string, got {_json_type(content)}{parts}')
        _check_text(content, f'{at} "content"')
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f'{at} "reasoning_content" must be a string, got {_json_type(reasoning)}')
            if reasoning and role != "assistant":
                raise ValueError(f'{at} has "reasoning_content"; only assistant turns may carry reasoning')
            if reasoning and "<think>" in content:
                raise ValueError(f'{at} has both "reasoning_content" and a <think> block in "content"; '
                                 f'give the reasoning one way, not both')
            _check_text(reasoning, f'{at} "reasoning_content"')
        if _present(m.get("tools")):
            if role != "system":
                raise ValueError(f'{at} has "tools"; tools belong on the system message (or on the row)')
            _check_tools(_json_field(m, "tools", at), at)
        calls = None
        if _present(m.get("tool_calls")):
            if role != "assistant":
                raise ValueError(f'{at} has "tool_calls"; only assistant turns call tools')
            calls = _json_field(m, "tool_calls", at)
            _check_tool_calls(calls, at)
        if not content and not (role == "assistant" and (reasoning or calls)) and role != "tool":
            raise ValueError(f'{at} has empty "content"')


def conversation_tools(obj: dict, field: str) -> list | None:
    """The tools a checked row offers in `field`'s conversation: the row's "tools", else those on its
    system messages (MiniMind-3 puts them on the first), in order; None when it offers none."""
    if _present(obj.get("tools")):
        return obj["tools"]
    tools = [t for m in obj[field] if m["role"] == "system" and _present(m.get("tools")) for t in m["tools"]]
    return tools or None


def _check_row_tools(obj: dict) -> None:
    if _present(obj.get("tools")):
        _check_tools(_json_field(obj, "tools", "the row"), "the row")


def check_sft(obj: dict) -> None:
    _check_row_tools(obj)
    _check_messages(obj["conversations"], "conversations")
    if not any(m["role"] == "assistant" for m in obj["conversations"]):
        raise ValueError('"conversations" has no assistant turn (nothing to learn from)')


def check_dpo(obj: dict) -> None:
    _check_row_tools(obj)
    for field in ("chosen", "rejected"):
        _check_messages(obj[field], field)
        if obj[field][-1]["role"] != "assistant":
            raise ValueError(f'"{field}" must end with an assistant turn')


# name -> (required fields and types, structural check)
FORMATS: dict[str, tuple[dict[str, type], Callable[[dict], None]]] = {
    "pretrain": ({"text": str}, None),  # the field check is all a text row needs
    "sft": ({"conversations": list}, check_sft),
    "dpo": ({"chosen": list, "rejected": list}, check_dpo),
}


def is_blank(raw: bytes) -> bool:
    """A line with nothing but whitespace (and perhaps a BOM): ignored, not a row."""
    return not raw.removeprefix(BOM).strip()


def _decode(raw: bytes) -> str:
    """One line's bytes -> text: strict UTF-8, a leading BOM and the line ending dropped."""
    skip = len(BOM) if raw.startswith(BOM) else 0
    try:
        return raw[skip:].rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[skip + e.start]:02x} at byte {skip + e.start + 1} of the "
                         f"line); save the file as UTF-8") from None


def parse_line(raw: bytes, required: dict[str, type], check: Callable[[dict], None] | None = None) -> dict:
    """Parses one jsonl line; raises ValueError(reason) when it is bad."""
    text = _decode(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            hint = "; the line ends early: truncated?"
        elif e.msg == "Extra data" and "\r" in text:
            hint = "; lines separated by a bare CR? save the file with LF or CRLF line endings"
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno}{hint})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply to read)") from None
    except ValueError as e:  # e.g. an integer with more digits than Python will convert
        raise ValueError(f"invalid JSON ({str(e).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
    for field, ftype in required.items():
        if field not in obj:
            raise ValueError(f'missing field "{field}"')
        if not isinstance(obj[field], ftype):
            raise ValueError(f'field "{field}" must be {_type_name(ftype)}, got {_json_type(obj[field])}')
        if ftype in (str, list) and len(obj[field]) == 0:
            raise ValueError(f'field "{field}" is empty')
        if ftype is str:
            _check_text(obj[field], f'field "{field}"')
    if check is not None:
        check(obj)
    return obj


def _bad_line(path, lineno: int, reason: str, skip_bad: bool, report: BadLineReport | None) -> None:
    where = f"{path}:{lineno}: {reason}"
    if not skip_bad:
        raise DataError(f"{where} ({SKIP_HINT})")
    if report is not None:
        report.add(where)


def check_exists(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        open(path, "rb").close()
    except PermissionError:
        raise DataError(f"{path}: cannot read the file (permission denied); check its permissions") from None
    return path


def read_jsonl(path, required: dict[str, type] | None = None, skip_bad: bool = False,
               check: Callable[[dict], None] | None = None,
               report: BadLineReport | None = None) -> Iterator[tuple[int, dict]]:
    """Streams `(line_number, obj)` from a jsonl file, one line in memory at a time.

    `required` maps field -> type; `check` adds format-specific structure (see FORMATS). A bad
    line raises DataError("file:line: reason (hint)"); with skip_bad=True it is skipped and
    counted in `report`. Blank lines are ignored; line numbers are 1-based.
    """
    path = check_exists(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if is_blank(raw):
                continue
            try:
                obj = parse_line(raw, required or {}, check)
            except ValueError as e:
                _bad_line(path, lineno, str(e), skip_bad, report)
                continue
            yield lineno, obj


# ----------------------------------------------------------------------------------------------
# Chunked, order-preserving parallel map over the lines of a jsonl file.
# Workers parse, validate and tokenize; the parent only reads raw bytes and writes results, so
# neither side ever holds the whole file. Pool.imap would read the whole input eagerly (its
# feeder thread drains the iterator), so we keep a bounded window of apply_async results instead.

_CHUNK_BYTES = 1 << 20
_worker_state: dict = {}


def _tokenizer_payload(tokenizer) -> tuple:
    """What a worker needs to rebuild the tokenizer: its file if it has one, else a pickle."""
    path = getattr(tokenizer, "path", None)
    if path is not None and Path(path).is_file() and hasattr(type(tokenizer), "load"):
        return ("load", type(tokenizer), str(path))
    return ("pickle", pickle.dumps(tokenizer))


def _init_worker(payload, job) -> None:
    kind = payload[0]
    tok = payload[1].load(payload[2]) if kind == "load" else pickle.loads(payload[1])
    _worker_state.update(tokenizer=tok, job=job)


def _run_chunk(chunk):
    return _worker_state["job"](_worker_state["tokenizer"], chunk)


def _read_chunks(path: Path) -> Iterator[list[tuple[int, bytes]]]:
    chunk, size = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if is_blank(raw):
                continue
            chunk.append((lineno, raw))
            size += len(raw)
            if size >= _CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _default_workers(path: Path) -> int:
    if path.stat().st_size < 4 * _CHUNK_BYTES:
        return 0  # process start-up costs more than it saves
    return min(os.cpu_count() or 1, 16)


def map_chunks(path: Path, tokenizer, job, num_workers: int | None, desc: str) -> Iterator:
    """Yields `(job(tokenizer, chunk), chunk_bytes)` for each chunk of lines, in file order."""
    from tqdm import tqdm

    if num_workers is None:
        num_workers = _default_workers(path)
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
               disable=None, leave=False)
    chunks = _read_chunks(path)
    try:
        if num_workers <= 1:
            for chunk in chunks:
                yield job(tokenizer, chunk)
                bar.update(sum(len(raw) for _, raw in chunk))
            return
        # fork is cheap and workers touch no torch state; elsewhere the platform default is used
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(num_workers, _init_worker, (_tokenizer_payload(tokenizer), job)) as pool:
            pending = deque()
            for chunk in chunks:
                pending.append((pool.apply_async(_run_chunk, (chunk,)), sum(len(r) for _, r in chunk)))
                if len(pending) >= 2 * num_workers:
                    result, n = pending.popleft()
                    yield result.get()
                    bar.update(n)
            while pending:
                result, n = pending.popleft()
                yield result.get()
                bar.update(n)
    finally:
        bar.close()


def collect_bad(path, bad: list[tuple[int, str]], skip_bad: bool, report: BadLineReport) -> None:
    for lineno, reason in bad:
        _bad_line(path, lineno, reason, skip_bad, report)


def no_rows_error(path, fmt: str, n_lines: int, report: BadLineReport, why: str = "") -> DataError:
    """The error for a file that gave no row to train on: empty, or every line bad or unusable."""
    if n_lines == 0:
        return DataError(f"{path}: no rows: the file is empty or holds only blank lines; give one JSON object "
                         f"per line, like {EXAMPLES[fmt]}")
    return DataError(f"{path}: no usable rows in {n_lines} lines ({report}{why}); fix the data or point "
                     f"--data_path at the right file")


def in_worker() -> bool:
    """True inside one of map_chunks' worker processes (each should then use one thread)."""
    return bool(_worker_state)
