"""The demo's tool-use data (dataset/demo/sft_tools.jsonl, heldout_tools.jsonl, facts.json) and
scripts/tool_report.py's scoring: reproducible, no held-out leak, tool results that are exactly what
minillm.tools returns, and the loss on calls and replies only."""
import json
import re
from pathlib import Path

import pytest
from conftest import load_script

from minillm.tokenizer import Tokenizer
from minillm.tools import ToolCall, calculate, lookup_tool, parse_tool_calls

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"
MAX_SEQ_LEN = 1100  # the README's tool SFT command trains with --max_seq_len 1100
OTHER_FILES = ["pretrain", "sft", "lora_medical", "lora_identity", "dpo", "r1", "rlaif",
               "heldout_sft", "heldout_medical", "heldout_identity", "heldout_dpo", "heldout_reason"]


def read(name):
    with open(DEMO / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gen():
    return load_script("make_demo_data")


@pytest.fixture(scope="module")
def facts():
    return json.loads((DEMO / "facts.json").read_text(encoding="utf-8"))


def texts(rows):
    out = []
    for row in rows:
        if "text" in row:
            out.append(row["text"])
        for field in ("conversations", "chosen", "rejected"):
            if isinstance(row.get(field), str):  # heldout_dpo's replies are plain text
                out.append(row[field])
        for m in [m for f in ("conversations", "chosen", "rejected") if isinstance(row.get(f), list) for m in row[f]]:
            out.append(m.get("content", "") + m.get("reasoning_content", ""))
            out += [json.dumps(c["arguments"], ensure_ascii=False) for c in m.get("tool_calls", [])]
        if "question" in row:
            out.append(row["question"])
    return "\n".join(out)


def test_tool_files_are_reproduced_byte_for_byte(gen):
    built = gen.tool_files()
    assert sorted(built) == ["facts.json", "heldout_tools.jsonl", "sft_tools.jsonl"]
    for rel, text in built.items():
        assert text.encode("utf-8") == (DEMO / rel).read_bytes(), \
            f"{rel} differs: rerun `python scripts/make_demo_data.py` and commit the result"


def test_facts_are_the_worlds(gen, facts):
    world = gen.make_world()
    tool_world = gen.make_tool_world(world, __import__("random").Random(gen.SEED + 12))
    for kind, key in (("country", "countries"), ("person", "people"), ("animal", "animals")):
        for e in world[key] + tool_world[key]:
            for i, lang in enumerate(("en", "zh")):
                assert facts[e[lang]] == {rel: e[rel][i] for rel in gen.WORLD_RELATIONS[kind]}
    n_entities = sum(len(world[k]) + len(tool_world[k]) for k in ("countries", "people", "animals"))
    assert len(facts) == 2 * n_entities  # names are unique across languages and entities


def heldout_lookup_names(facts):
    """Entity names asked about by heldout_tools' lookup questions (the key of facts.json they use)."""
    names = set()
    for row in read("heldout_tools"):
        if row["kind"] == "lookup":
            hits = [name for name in facts if name in row["question"] and facts[name]]
            assert hits, row
            names.update(hits)
    return names


def test_heldout_lookup_entities_are_in_no_other_file(facts):
    names = heldout_lookup_names(facts)
    assert len(names) >= 10
    training = texts(read("sft_tools")) + texts([r for name in OTHER_FILES for r in read(name)])
    for name in names:
        assert name not in training, f"held-out entity {name} appears in a training or other held-out file"
    for row in read("heldout_tools"):  # the answer is what lookup returns for that entity
        if row["kind"] == "lookup":
            (name,) = [n for n in names if n in row["question"]]
            assert row["answer"] in facts[name].values()


def test_heldout_arithmetic_appears_in_no_training_row():
    heldout = [r for r in read("heldout_tools") if r["kind"] == "arithmetic"]
    assert len(heldout) >= 60 and len({r["question"] for r in heldout}) == len(heldout)
    trained = {c["arguments"]["expression"] for row in read("sft_tools") for m in row["conversations"]
               for c in m.get("tool_calls", []) if c["name"] == "calculator"}
    training = texts(read("sft_tools"))
    numbers = re.compile(r"\d+")
    for row in heldout:
        assert row["question"] not in training
        asked = numbers.findall(row["question"])
        for expression in trained:  # the same numbers in the same order is the same problem
            assert numbers.findall(expression) != asked or len(asked) < 2, (row, expression)
        assert int(row["answer"]) == calculate(_expression(row["question"]))["result"]


def _expression(question):
    """The expression a held-out arithmetic question asks: written in it as a call would pass it."""
    m = re.search(r"\d+ [-+*] \d+( [-+*] \d+)?", question)
    assert m, f"no expression in {question!r}"
    return m.group(0)


def test_tool_results_are_what_the_tools_return(facts):
    lookup = lookup_tool(facts).fn
    n_calls = {"calculator": 0, "lookup": 0}
    for row in read("sft_tools"):
        messages = row["conversations"]
        for i, m in enumerate(messages):
            for call in m.get("tool_calls", []):
                n_calls[call["name"]] += 1
                result = messages[i + 1]["content"]
                expected = calculate(**call["arguments"]) if call["name"] == "calculator" else lookup(**call["arguments"])
                assert json.loads(result) == expected
                reply = messages[i + 2]
                assert reply["role"] == "assistant" and not reply.get("tool_calls")
                if "result" in expected:
                    assert str(expected["result"]) in reply["content"]
                elif "error" not in expected:
                    assert expected[call["arguments"]["relation"]] in reply["content"]
    assert n_calls["calculator"] >= 200 and n_calls["lookup"] >= 200


def test_calls_copy_the_question_and_replies_repeat_the_result():
    """What the demo teaches is copying: each call's expression or name is written in the question
    that asks for it, and the reply after a result repeats the result's value as the tool wrote it."""
    n_rows_with_several = 0
    for row in read("sft_tools"):
        messages = row["conversations"]
        n_rows_with_several += sum(bool(m.get("tool_calls")) for m in messages) > 1
        for i, m in enumerate(messages):
            for call in m.get("tool_calls", []):
                question = messages[i - 1]
                assert question["role"] == "user"
                copied = call["arguments"]["expression" if call["name"] == "calculator" else "entity"]
                assert copied in question["content"], (question, call)
                result = json.loads(messages[i + 1]["content"])
                value = result.get("result", result.get(call["arguments"].get("relation")))
                if value is not None:
                    assert str(value) in messages[i + 2]["content"]
    assert n_rows_with_several >= 300  # one tool header read for several calls


def test_every_tool_row_loads_with_the_loss_on_calls_and_replies_only(tmp_path):
    from minillm.data.chat import SFTDataset

    tok = Tokenizer.load()
    ds = SFTDataset(DEMO / "sft_tools.jsonl", tok, max_seq_len=MAX_SEQ_LEN, num_workers=0)
    rows = read("sft_tools")
    assert len(ds) == len(rows) and ds.n_no_target == 0
    for row, item in zip(rows, (ds[i] for i in range(len(ds)))):
        ids, mask = list(item["ids"]), list(item["loss_mask"])
        assert len(ids) <= MAX_SEQ_LEN + 1  # no row is cut at the README's --max_seq_len
        learned = tok.decode([t for t, keep in zip(ids, mask) if keep])
        hidden = tok.decode([t for t, keep in zip(ids, mask) if not keep])
        calls = [c for m in row["conversations"] for c in m.get("tool_calls", [])]
        assert learned.count("<tool_call>") == len(calls)
        for m in row["conversations"]:
            if m["role"] == "assistant" and m["content"]:
                assert m["content"] in learned
            if m["role"] == "tool":
                assert m["content"] in hidden and m["content"] not in learned
        assert "<tool_response>" not in learned and "Evaluate arithmetic" not in learned


def test_report_offers_the_schemas_the_data_trains_with(facts):
    report = load_script("tool_report")
    compact = {s["function"]["name"]: s for s in report.demo_registry(facts).schemas()}
    seen = {json.dumps(t, sort_keys=False) for row in read("sft_tools") for m in row["conversations"]
            for t in m.get("tools", [])}
    assert seen == {json.dumps(s) for s in compact.values()}


def test_report_scores_calls_and_answers(facts):
    report = load_script("tool_report")
    registry = report.demo_registry(facts)
    _, calls = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>'
                                '<tool_call>{"name": "lookup", "arguments": {"entity": 5}}</tool_call>'
                                '<tool_call>{"name": "lookup", "arguments": {"relation": "capital"}}</tool_call>'
                                '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
                                '<tool_call>{"name": "calculator", "arguments": {"expression": "1", "x": "2"}}</tool_call>'
                                '<tool_call>{"name": "calculator", "arguments": {"expression": "1"</tool_call>')
    problems = [report.call_problem(c, registry) for c in calls]
    assert problems[0] == "" and all(problems[1:]), problems
    assert report.call_problem(ToolCall(name="lookup", arguments={"entity": "x", "relation": "capital"}), registry) == ""
    assert report.contains_answer("12 * 80 + 8 = 968.", "968")
    assert not report.contains_answer("The answer is 1968.", "968") and not report.contains_answer("9680", "968")
    assert report.contains_answer("The capital of Kaloia is TARSEN.", "Tarsen")
    s = report.summarise([{"correct": True, "calls": [("calculator", "")], "needed": "calculator"},
                          {"correct": False, "calls": [("lookup", ""), ("lookup", "bad")], "needed": "calculator"},
                          {"correct": False, "calls": [], "needed": "lookup"}])
    assert (s["accuracy"], s["called"], s["right_tool"], s["calls"], s["well_formed"]) == (1 / 3, 2 / 3, 1 / 3, 3, 2 / 3)
