"""Tool use at inference: a registry of Python functions with JSON schemas, the parser for the
model's `<tool_call>` blocks, and the loop that runs them.

The loop (MiniMind's scripts/eval_toolcall.py, local backend): ask the model -> parse every
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its reply -> run each call with a time
limit -> append the `tool` messages -> ask again, until a reply calls nothing or `max_rounds` rounds of
calls have run. A malformed call (bad JSON, no name, arguments that are not an object, an unclosed
tag), an unknown tool, a tool that raises or one that runs past the time limit becomes an error
result the model reads in its next turn: `{"error": "..."}`; the loop itself never raises for what
the model wrote.

    from minillm.tools import chat_with_tools, demo_tools
    registry = demo_tools(facts={"Dakaia": {"capital": "Tarsen"}})
    messages = chat_with_tools(model, tok, [{"role": "user", "content": "What is 36 * 7?"}], registry)

The chat template that shows the model its tools and renders the calls and results is the
tokenizer's (Tokenizer.render_chat(messages, tools=...)).
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minillm.errors import UserError
from minillm.tokenizer import to_json

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


# ---- the registry ---------------------------------------------------------------------------------
@dataclass
class Tool:
    """A Python function the model may call: fn(**arguments) -> anything JSON can write (or a str)."""
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]

    def schema(self) -> dict:
        """OpenAI's tool shape, as `tools` in a request or in render_chat."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolRegistry:
    """Tools by name. `run(call)` gives the text of the `tool` message, an error result included."""

    def __init__(self, tools=(), timeout: float = 5.0):
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        for t in tools:
            self.register(t)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        return tool

    def __contains__(self, name) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def select(self, names) -> "ToolRegistry":
        """The named tools only (a UserError naming the unknown ones and the known)."""
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in self.tools]
        if unknown:
            raise UserError(f"unknown tool{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the tools are: "
                            f"{', '.join(self.tools)}")
        return ToolRegistry([self.tools[n] for n in dict.fromkeys(names)], self.timeout)

    def run(self, call: "ToolCall") -> str:
        """The result of one call as the text of a `tool` message: the function's return value as JSON
        (a str as it is), or {"error": ...} for a malformed call, an unknown tool, a raise or a time-out."""
        if call.error:
            return error_result(call.error)
        tool = self.tools.get(call.name)
        if tool is None:
            return error_result(f"unknown tool {call.name!r}; the tools are: {', '.join(self.tools) or 'none'}")
        outcome = run_with_timeout(tool.fn, call.arguments, self.timeout)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, TimeoutError):
                return error_result(f"{call.name} took longer than {self.timeout:g} s")
            if isinstance(outcome, TypeError):  # most often arguments that do not fit the function
                return error_result(f"{call.name}: bad arguments ({outcome})")
            return error_result(f"{call.name} failed: {type(outcome).__name__}: {outcome}")
        if isinstance(outcome, str):
            return outcome
        try:
            return to_json(outcome)
        except (TypeError, ValueError):
            return to_json(str(outcome))


def error_result(message: str) -> str:
    return to_json({"error": message})


def run_with_timeout(fn, arguments: dict, timeout: float):
    """fn(**arguments) on a daemon thread: its value, the exception it raised, or a TimeoutError when it
    runs past `timeout` seconds. A thread cannot be stopped, so one that overruns is left to finish on
    its own: tools must not hold the interpreter lock for long (the calculator caps its powers so)."""
    box = {}

    def target():
        try:
            box["value"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 - reported to the model, never raised
            box["value"] = e

    thread = threading.Thread(target=target, name="minillm-tool", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return TimeoutError(f"took longer than {timeout:g} s")
    return box["value"]


# ---- parsing the model's calls ----------------------------------------------------------------------
@dataclass
class ToolCall:
    """One `<tool_call>` block of a reply: name and arguments, or the reason it cannot run."""
    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: str = ""
    raw: str = ""   # the text between the tags
    id: str = ""

    def openai(self) -> dict:
        """OpenAI's shape of a call (arguments as JSON text), as the server returns it."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": to_json(self.arguments)}}


def parse_call(raw: str) -> ToolCall:
    """The JSON between <tool_call> tags -> a ToolCall (with `error` set when it is malformed)."""
    call = ToolCall(raw=raw)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        call.error = f"the tool call is not valid JSON ({getattr(e, 'msg', 'nested too deeply')}); write " \
                     f'{{"name": "...", "arguments": {{...}}}}'
        return call
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        call.error = 'the tool call has no "name"; write {"name": "...", "arguments": {...}}'
        return call
    call.name = doc["name"]
    arguments = doc.get("arguments", {})
    if isinstance(arguments, str):  # arguments written as JSON text, as OpenAI sends them
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        call.error = f'the "arguments" of {call.name} must be a JSON object, got {type(arguments).__name__}'
        return call
    call.arguments = arguments
    return call


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[ToolCall]]:
    """(the text without its call blocks, every call in order). An opening tag never closed (the reply
    stopped inside it) is a malformed call too. Ids are id_prefix + 0, 1, ..."""
    calls = []

    def take(match):
        calls.append(parse_call(match.group(1).strip()))
        return ""

    rest = _CALL.sub(take, text)
    if CALL_OPEN in rest:
        rest, _, tail = rest.partition(CALL_OPEN)
        calls.append(ToolCall(error="the tool call was not closed with </tool_call>", raw=tail.strip()))
    for i, call in enumerate(calls):
        call.id = f"{id_prefix}{i}"
    return rest.strip(), calls


# ---- the loop ---------------------------------------------------------------------------------------
def tool_loop(respond: Callable[[list[dict]], str], messages: list[dict], registry: ToolRegistry,
              max_rounds: int = 4, on_event: Callable[[str, Any], None] | None = None) -> list[dict]:
    """Runs the conversation to a reply that calls no tool; -> the messages it added.

    respond(messages) -> the assistant's text for the conversation so far (the tools are the caller's
    to render: Tokenizer.render_prompt(messages, tools=registry.schemas())). Each reply joins the
    conversation as written (calls included), each call's result as a `tool` message. After `max_rounds`
    rounds of calls the last reply stands even if it calls more (their calls are not run).
    on_event(kind, value): ("call", ToolCall), ("result", (ToolCall, text)), ("limit", max_rounds).
    """
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    conversation, added = list(messages), []
    emit = on_event or (lambda kind, value: None)
    for round_ in range(max_rounds + 1):
        text = respond(conversation)
        reply = {"role": "assistant", "content": text}
        conversation.append(reply)
        added.append(reply)
        _, calls = parse_tool_calls(text, id_prefix=f"call_{round_}_")
        if not calls:
            break
        if round_ == max_rounds:
            emit("limit", max_rounds)
            break
        for call in calls:
            emit("call", call)
            result = registry.run(call)
            emit("result", (call, result))
            message = {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
            conversation.append(message)
            added.append(message)
    return added


def chat_with_tools(model, tokenizer, messages: list[dict], registry: ToolRegistry, max_rounds: int = 4,
                    open_thinking: bool | None = None, on_event=None, **sampling) -> list[dict]:
    """tool_loop with the model answering through minillm.generate; -> messages + what the loop added.
    `sampling`: generate's keywords (max_new_tokens, temperature, top_p, ...). A reply joins the
    conversation without the think prefill the prompt gave it, as MiniMind's eval_toolcall.py keeps it."""
    from minillm.generate import generate

    def respond(conversation):
        return generate(model, tokenizer, conversation, tools=registry.schemas(), open_thinking=open_thinking,
                        **sampling)

    return list(messages) + tool_loop(respond, messages, registry, max_rounds, on_event)


# ---- the demo tools ---------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round}
MAX_EXPRESSION = 200


def calculate(expression: str):
    """Arithmetic on numbers: + - * / // % ** (small powers only), parentheses, sqrt/abs/round. Written
    with an AST walk, never eval: the model's text runs no code."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("give the expression as a non-empty string, e.g. \"36 * 7\"")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace("−", "-")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("that power is too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords and len(node.args) in (1, 2):
            return _FUNCTIONS[node.func.id](*[value(a) for a in node.args])
        raise ValueError(f"only numbers, + - * / // % **, parentheses and {', '.join(_FUNCTIONS)} are allowed "
                         f"in {expression!r}")

    result = value(tree.body)
    if isinstance(result, float):
        if not math.isfinite(result):
            raise ValueError(f"{expression!r} has no finite value")
        result = int(result) if result.is_integer() and abs(result) < 2 ** 53 else round(result, 10)
    return {"result": result}


CALCULATOR = Tool("calculator", "Evaluate an arithmetic expression (+, -, *, /, **, parentheses, sqrt).",
                  {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "the expression, e.g. 36 * 7"}},
                   "required": ["expression"]}, calculate)


def lookup_tool(facts: dict[str, dict[str, str]]) -> Tool:
    """A `lookup` tool over {entity: {relation: value}}: an entity's facts, or one relation's value.
    Names match without regard to case or surrounding spaces."""
    if not isinstance(facts, dict) or not all(isinstance(v, dict) for v in facts.values()):
        raise UserError("lookup facts must be a JSON object of {entity: {relation: value}}")
    index = {k.strip().casefold(): (k, v) for k, v in facts.items()}

    def lookup(entity: str, relation: str = ""):
        found = index.get(str(entity).strip().casefold())
        if found is None:
            return {"error": f"no facts about {entity!r}"}
        name, known = found
        if not relation:
            return {"entity": name, **known}
        rel = {k.casefold(): k for k in known}.get(str(relation).strip().casefold())
        if rel is None:
            return {"error": f"no {relation!r} known for {name}; known: {', '.join(known)}"}
        return {"entity": name, rel: known[rel]}

    return Tool("lookup", "Look up facts about a named entity (a country, person, animal) of the world.",
                {"type": "object", "properties": {
                    "entity": {"type": "string", "description": "the name, e.g. Dakaia"},
                    "relation": {"type": "string", "description": "one fact, e.g. capital; empty: all of them"}},
                 "required": ["entity"]}, lookup)


def load_facts(path) -> dict:
    """The lookup tool's facts from a JSON file of {entity: {relation: value}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"lookup facts not found: {path}; pass --tool_facts FILE (a JSON object of "
                        f"{{entity: {{relation: value}}}}) or make the demo one with `python scripts/make_demo_data.py`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file of facts ({e})") from None


DEMO_TOOLS = ("calculator", "lookup")


def demo_tools(facts: dict | None = None, facts_path=None, timeout: float = 5.0) -> ToolRegistry:
    """The demo's registry: the calculator, and lookup over `facts` (or the file `facts_path`) when given."""
    tools = [CALCULATOR]
    if facts is None and facts_path is not None:
        facts = load_facts(facts_path)
    if facts is not None:
        tools.append(lookup_tool(facts))
    return ToolRegistry(tools, timeout)
