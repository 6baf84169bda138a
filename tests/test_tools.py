"""minillm.tools: the call parser on malformed calls, the registry's error results, the calculator, and
the loop driven by a scripted fake model (and once by a real tiny model through minillm.generate)."""
import json
import time

import pytest
import torch

from minillm.config import ModelConfig
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer
from minillm.tools import (CALCULATOR, Tool, ToolRegistry, calculate, chat_with_tools, demo_tools, lookup_tool,
                           parse_tool_calls, tool_loop)

TOK = Tokenizer.load()
FACTS = {"Dakaia": {"capital": "Tarsen", "language": "Oskese"}, "达卡亚": {"首都": "塔森"}}


def call_block(name, arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_parser_reads_every_call_and_the_text_around():
    text = "Let me check.\n" + call_block("calculator", {"expression": "2+3"}) + "\n" + \
        '<tool_call>{"name": "lookup", "arguments": "{\\"entity\\": \\"Dakaia\\"}"}</tool_call>'
    rest, calls = parse_tool_calls(text)
    assert rest == "Let me check."
    assert [(c.name, c.arguments, c.error, c.id) for c in calls] == [
        ("calculator", {"expression": "2+3"}, "", "call_0"),
        ("lookup", {"entity": "Dakaia"}, "", "call_1")]  # arguments as JSON text are read too
    assert parse_tool_calls("no calls here") == ("no calls here", [])


@pytest.mark.parametrize("body, reason", [
    ('{"name": "calculator", "arguments": {"expression": "2+3"}', "not valid JSON"),
    ("calculator(2+3)", "not valid JSON"),
    ('{"arguments": {}}', 'no "name"'),
    ('{"name": ""}', 'no "name"'),
    ('["calculator"]', 'no "name"'),
    ('{"name": "calculator", "arguments": [1, 2]}', "must be a JSON object"),
    ('{"name": "calculator", "arguments": "not json"}', "must be a JSON object"),
])
def test_malformed_calls_become_errors_not_exceptions(body, reason):
    rest, [call] = parse_tool_calls(f"before <tool_call>{body}</tool_call> after")
    assert rest == "before  after" and reason in call.error and call.raw == body
    result = json.loads(ToolRegistry([CALCULATOR]).run(call))
    assert reason in result["error"]


def test_an_unclosed_call_is_malformed_too():
    rest, calls = parse_tool_calls('Sure. <tool_call>{"name": "calculator", "argu')
    assert rest == "Sure." and len(calls) == 1 and "not closed" in calls[0].error


def test_registry_runs_tools_and_turns_every_failure_into_an_error_result():
    def slow(seconds):
        time.sleep(seconds)
        return "done"

    def broken():
        raise RuntimeError("disk on fire")

    registry = ToolRegistry([CALCULATOR, Tool("slow", "sleeps", {"type": "object"}, slow),
                             Tool("broken", "raises", {"type": "object"}, broken)], timeout=0.2)
    run = lambda text: json.loads(registry.run(parse_tool_calls(text)[1][0]))  # noqa: E731
    assert run(call_block("calculator", {"expression": "(2 + 3) * 4 ** 2"})) == {"result": 80}
    assert "unknown tool 'web'" in run(call_block("web", {}))["error"]
    assert "calculator: bad arguments" in run(call_block("calculator", {"expr": "1"}))["error"]
    assert "broken failed: RuntimeError: disk on fire" in run(call_block("broken", {}))["error"]
    start = time.perf_counter()
    assert "took longer than 0.2 s" in run(call_block("slow", {"seconds": 2}))["error"]
    assert time.perf_counter() - start < 1.5  # the loop does not wait for the tool
    assert registry.run(parse_tool_calls(call_block("slow", {"seconds": 0}))[1][0]) == "done"  # a str as it is
    with pytest.raises(UserError, match="unknown tool web; the tools are: calculator, slow, broken"):
        registry.select(["calculator", "web"])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(CALCULATOR)


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("6 / 3", 2), ("7 // 2", 3), ("-3 ** 2", -9),
    ("2 ^ 10", 1024), ("sqrt(144)", 12), ("36 × 17", 612), ("0.1 + 0.2", 0.3), ("round(2.567, 2)", 2.57),
])
def test_calculator_by_hand(expression, value):
    assert calculate(expression) == {"result": value}


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('ls')", "only numbers"), ("2 ** 10000", "too large"), ("9 ** 9 ** 9", "too large"),
    ("1 / 0", "division by zero"), ("", "non-empty"), ("2 +", "cannot read"), ("1" * 300, "longer than"),
    ("[1, 2]", "only numbers"), ("True + 1", "only numbers"), ("1e308 * 10", "no finite value"),
])
def test_calculator_refuses_what_is_not_small_arithmetic(expression, reason):
    with pytest.raises((ValueError, ZeroDivisionError), match=reason):
        calculate(expression)


def test_lookup_over_facts():
    lookup = lookup_tool(FACTS).fn
    assert lookup("dakaia ") == {"entity": "Dakaia", "capital": "Tarsen", "language": "Oskese"}
    assert lookup("Dakaia", "Capital") == {"entity": "Dakaia", "capital": "Tarsen"}
    assert lookup("达卡亚", "首都") == {"entity": "达卡亚", "首都": "塔森"}
    assert "no facts about 'Veloria'" in lookup("Veloria")["error"]
    assert "known: capital, language" in lookup("Dakaia", "river")["error"]
    assert demo_tools(FACTS).names() == ["calculator", "lookup"] and demo_tools().names() == ["calculator"]


def scripted_model(replies):
    """A fake model for tool_loop: answers from `replies` in order, recording each conversation it saw."""
    seen = []

    def respond(conversation):
        seen.append([dict(m) for m in conversation])
        return replies[len(seen) - 1]
    return respond, seen


def test_loop_runs_calls_until_a_plain_reply():
    respond, seen = scripted_model([
        "Let me compute.\n" + call_block("calculator", {"expression": "36 * 17"}) + "\n" +
        call_block("lookup", {"entity": "Dakaia", "relation": "capital"}),
        call_block("nope", {}) + "<tool_call>{bad json}</tool_call>",
        "36 * 17 = 612 and the capital is Tarsen."])
    events = []
    start = [{"role": "user", "content": "What is 36 * 17, and Dakaia's capital?"}]
    added = tool_loop(respond, start, demo_tools(FACTS), max_rounds=4, on_event=lambda *e: events.append(e))
    assert [m["role"] for m in added] == ["assistant", "tool", "tool", "assistant", "tool", "tool", "assistant"]
    assert added[0]["content"].startswith("Let me compute.\n<tool_call>")  # the reply as the model wrote it
    assert [json.loads(m["content"]) for m in added if m["role"] == "tool"] == [
        {"result": 612}, {"entity": "Dakaia", "capital": "Tarsen"},
        {"error": "unknown tool 'nope'; the tools are: calculator, lookup"},
        {"error": 'the tool call is not valid JSON (Expecting property name enclosed in double quotes); write '
                  '{"name": "...", "arguments": {...}}'}]
    assert added[1]["tool_call_id"] == "call_0_0" and added[2]["tool_call_id"] == "call_0_1"
    # each round saw everything before it, the start untouched
    assert seen[0] == start and seen[1] == start + added[:3] and seen[2] == start + added[:6]
    assert start == [{"role": "user", "content": "What is 36 * 17, and Dakaia's capital?"}]
    assert [kind for kind, _ in events] == ["call", "result"] * 4


def test_loop_stops_after_max_rounds_without_running_the_last_calls():
    respond, seen = scripted_model([call_block("calculator", {"expression": f"{i} + 1"}) for i in range(5)])
    events = []
    added = tool_loop(respond, [{"role": "user", "content": "count"}], demo_tools(), max_rounds=2,
                      on_event=lambda *e: events.append(e))
    assert len(seen) == 3 and [m["role"] for m in added] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert events[-1] == ("limit", 2) and sum(kind == "call" for kind, _ in events) == 2
    respond, seen = scripted_model([call_block("calculator", {"expression": "1"})])
    assert [m["role"] for m in tool_loop(respond, [{"role": "user", "content": "x"}], demo_tools(), 0)] == ["assistant"]


def test_chat_with_tools_prompts_the_model_with_the_schemas_and_the_results(monkeypatch):
    """Through minillm.generate with a real tiny model: each round's prompt is render_prompt of the
    conversation so far with the tools (checked by recording the ids the engine got)."""
    import importlib
    gen = importlib.import_module("minillm.generate")  # the module (minillm.generate is also the function)
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size, kernel_backend="torch")).eval()
    prompts, real = [], gen.generate_ids

    def recording(model, prompts_, params, *a, **k):
        prompts.append(list(prompts_[0]))
        return real(model, prompts_, params, *a, **k)

    monkeypatch.setattr(gen, "generate_ids", recording)
    registry = demo_tools(FACTS)
    messages = chat_with_tools(model, TOK, [{"role": "user", "content": "hi"}], registry, max_rounds=1,
                               max_new_tokens=4, temperature=0, open_thinking=False)
    assert prompts[0] == TOK.render_prompt([{"role": "user", "content": "hi"}], tools=registry.schemas(),
                                           open_thinking=False)
    assert TOK.decode(prompts[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert messages[0] == {"role": "user", "content": "hi"} and messages[1]["role"] == "assistant"
    assert len(prompts) == sum(m["role"] == "assistant" for m in messages)
