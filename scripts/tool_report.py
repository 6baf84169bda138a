"""Score a chat model's tool use on held-out questions: answer accuracy, how often it calls, and the
share of well-formed calls.

    python scripts/tool_report.py --model out/full_sft_tools                      # heldout_tools.jsonl
    python scripts/tool_report.py --model out/full_sft_tools --heldout dataset/demo/heldout_reason.jsonl
    python scripts/tool_report.py --model out/full_sft_tools --offer none         # the same model, no tools

Each question runs through minillm.tools.chat_with_tools (greedy): the model's calls are parsed and run
against the demo's calculator and lookup (over --facts), their results go back, and the last reply is
scored: correct when it contains the row's "answer" (a number must stand on its own: 968 is not found
in 1968). A row's "tools" names the tool it needs (rows without one, like heldout_reason's, need the
calculator); --offer all shows the model both tools, so it must pick, needed shows only that one.

A call is well-formed when its JSON parses into {"name", "arguments": {...}}, the name is an offered
tool, every required argument is there, and no other argument is, all of them strings.

The schemas shown are the compact ones dataset/demo/sft_tools.jsonl trains with (--schemas compact; a
test checks they match the file); --schemas full shows minillm.tools' own, as eval_model.py --tools does.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.errors import UserError  # noqa: E402
from minillm.trainer import main_guard  # noqa: E402
from minillm.tools import CALCULATOR, Tool, ToolRegistry, load_facts, lookup_tool, parse_tool_calls  # noqa: E402

# What dataset/demo/sft_tools.jsonl offers (scripts/make_demo_data.py's COMPACT_TOOLS): name -> (description,
# parameters); the functions are minillm.tools' own.
COMPACT = {
    "calculator": ("Evaluate arithmetic.", {"type": "object", "properties": {"expression": {"type": "string"}},
                                            "required": ["expression"]}),
    "lookup": ("Facts about a named entity.", {"type": "object", "properties": {
        "entity": {"type": "string"}, "relation": {"type": "string"}}, "required": ["entity"]}),
}
SYSTEM = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}


def demo_registry(facts: dict, schemas: str = "compact") -> ToolRegistry:
    """calculator and lookup, with the compact schemas the demo trains with or minillm.tools' full ones."""
    full = [CALCULATOR, lookup_tool(facts)]
    if schemas == "full":
        return ToolRegistry(full)
    return ToolRegistry([Tool(t.name, *COMPACT[t.name], t.fn) for t in full])


def call_problem(call, registry: ToolRegistry) -> str:
    """Why a parsed call is not well-formed ("" when it is)."""
    if call.error:
        return call.error
    if call.name not in registry:
        return f"unknown tool {call.name!r}"
    schema = registry.tools[call.name].parameters
    known, required = schema.get("properties", {}), schema.get("required", [])
    missing = [k for k in required if k not in call.arguments]
    extra = [k for k in call.arguments if k not in known]
    if missing or extra:
        return f"arguments: missing {missing}, unknown {extra}"
    if not all(isinstance(v, str) for v in call.arguments.values()):
        return "arguments must be strings"
    return ""


def contains_answer(reply: str, answer: str) -> bool:
    """The answer in the reply: a number on its own (not inside a longer number), text without regard to case."""
    answer = answer.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", answer):
        return re.search(r"(?<![\d.])" + re.escape(answer) + r"(?![\d])", reply) is not None
    return answer.lower() in reply.lower()


def score_row(model, tok, row: dict, registry: ToolRegistry, offer: str, max_rounds: int, max_new_tokens: int):
    """-> {"correct", "calls": [(name, problem)], "reply"} for one held-out question."""
    from minillm.tools import chat_with_tools

    needed = row.get("tools") or ["calculator"]
    names = {"all": registry.names(), "needed": needed, "none": []}[offer]
    offered = registry.select(names) if names else ToolRegistry()
    events = []
    messages = [{"role": "system", "content": SYSTEM.get(row.get("lang", "en"), SYSTEM["en"])},
                {"role": "user", "content": row["question"]}]
    out = chat_with_tools(model, tok, messages, offered, max_rounds=max_rounds,
                          on_event=lambda kind, value: events.append(value) if kind == "call" else None,
                          max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
    final, _ = parse_tool_calls(out[-1]["content"])
    calls = [(c.name, call_problem(c, offered)) for c in events]
    return {"correct": contains_answer(final, str(row["answer"])), "calls": calls, "needed": needed[0],
            "reply": final}


def summarise(results: list[dict]) -> dict:
    calls = [c for r in results for c in r["calls"]]
    return {"n": len(results),
            "accuracy": sum(r["correct"] for r in results) / max(len(results), 1),
            "called": sum(bool(r["calls"]) for r in results) / max(len(results), 1),
            "right_tool": sum(bool(r["calls"]) and r["calls"][0][0] == r["needed"] for r in results) / max(len(results), 1),
            "calls": len(calls),
            "well_formed": sum(not problem for _, problem in calls) / len(calls) if calls else float("nan")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/full_sft_tools", help="checkpoint folder of a chat model")
    p.add_argument("--heldout", default="dataset/demo/heldout_tools.jsonl",
                   help='jsonl of {"question", "answer"[, "lang", "tools", "kind"]} rows')
    p.add_argument("--facts", default="dataset/demo/facts.json", help="the lookup tool's {entity: {relation: value}} file")
    p.add_argument("--offer", default="all", choices=["all", "needed", "none"],
                   help="tools shown: all (the model must pick), needed (the row's own), none (no tools)")
    p.add_argument("--schemas", default="compact", choices=["compact", "full"],
                   help="compact: the schemas sft_tools.jsonl trains with; full: minillm.tools' own")
    p.add_argument("--max_tool_rounds", type=int, default=2, help="rounds of calls before the last reply stands")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (0: all)")
    p.add_argument("--show", type=int, default=3, help="print this many wrong answers per kind")
    args = p.parse_args()

    from minillm.checkpoint import load_checkpoint
    from minillm.evaluation import read_heldout

    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such checkpoint folder; train one with train_full_sft.py "
                        f"--data_path dataset/demo/sft_tools.jsonl --save_weight full_sft_tools")
    model, tok = load_checkpoint(args.model, device="cpu")
    model.eval()
    registry = demo_registry(load_facts(args.facts), args.schemas)
    rows = read_heldout(args.heldout)
    rows = rows[: args.limit] if args.limit else rows
    by_kind = {}
    for row in rows:
        result = score_row(model, tok, row, registry, args.offer, args.max_tool_rounds, args.max_new_tokens)
        by_kind.setdefault(row.get("kind", "arithmetic"), []).append((row, result))
    print(f"{args.model} on {args.heldout} (tools offered: {args.offer}, {args.schemas} schemas, greedy)")
    for kind, pairs in by_kind.items():
        s = summarise([r for _, r in pairs])
        print(f"  {kind:<10} n={s['n']:<4} accuracy {s['accuracy']:.1%}  called a tool {s['called']:.1%}  "
              f"right tool first {s['right_tool']:.1%}  calls {s['calls']}, well-formed {s['well_formed']:.1%}")
        for row, r in [(row, r) for row, r in pairs if not r["correct"]][: args.show]:
            print(f"    x {row['question']} -> {r['reply'][:80]!r} (answer {row['answer']}; calls {r['calls']})")
    s = summarise([r for pairs in by_kind.values() for _, r in pairs])
    print(json.dumps({"all": s}, ensure_ascii=False))


if __name__ == "__main__":
    main_guard(main)
