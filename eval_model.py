"""Talk to a trained model, run its fixed test prompts, or measure it.

    python eval_model.py --model_mode 1                       # auto-test: stream answers to the SFT prompts,
                                                              # then the demo held-out accuracy
    python eval_model.py --model_mode 1 --lora_name lora_medical
    python eval_model.py --model_mode 0                       # pretrain: continues raw text, no chat
    python eval_model.py --interactive --history_cnt 4        # chat on stdin (/help; Ctrl-D or /exit ends)
    python eval_model.py --checkpoint out/full_sft --eval_data dataset/demo/sft.jsonl   # loss / perplexity
    python eval_model.py --model_mode 0 --heldout dataset/demo/heldout_sft.jsonl        # held-out accuracy
    python eval_model.py --checkpoint out/full_sft --bench dataset/demo/bench --shots 3  # multiple choice
    python eval_model.py --checkpoint out/full_sft --bench ceval-exam --bench_out ceval.json     # C-Eval val
    python eval_model.py --model_mode 1 --tools calculator,lookup   # tool use: the model's calls are run
    python eval_model.py --model_mode 3 --open_thinking 0           # a reasoning model answers directly

--model_mode picks the checkpoint folder under --save_dir (MiniMind's flag): 0 pretrain,
1 full_sft, 2 dpo, 3 reason; --checkpoint DIR loads any folder instead. --lora_name NAME loads
the adapter in <save_dir>/NAME onto it. Held-out questions are always asked in chat format,
even to a pretrained model (mode 0), which is why a pretrain-only model scores low there.

--bench DIR scores C-Eval / CMMLU CSVs (dev/ val/ test/ folders, or one folder of subject files) or,
with --bench_format jsonl, {"question", "choices", "answer"} rows: the letter with the highest
next-token log-prob after C-Eval's prompt ("答案：", or "Answer:" for English questions) is the
model's answer; zero-shot or --shots K examples from the dev split (minillm/bench.py says how).

--tools NAME,... shows the model those tools (minillm/tools.py: calculator, and lookup over the facts in
--tool_facts) and runs every <tool_call> it writes, feeding the results back, up to --max_tool_rounds
rounds per turn; calls and results are printed. --open_thinking 1 opens a think block after the
assistant header, 0 prefills an empty one (MiniMind's switch); not given, the model decides.

Chat (--interactive) commands: /help, /clear, /system TEXT, /think on|off|auto, /exit. A prompt longer
than the model's context leaves room for (max_position_embeddings - --max_new_tokens) loses its
oldest history, then its oldest tokens, with a notice. Ctrl-C stops a reply (the turn is not kept);
at the prompt it clears the line, and a second one in a row quits, as Ctrl-D does.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.checkpoint import load_config
from minillm.cli import MODE_FOLDERS, add_minimind_flags, apply_minimind_flags, load_for_inference
from minillm.evaluation import demo_heldout_path, eval_loss, heldout_accuracy, read_heldout
from minillm.errors import UserError
from minillm.generate import PromptTooLongError, generate, prompt_room
from minillm.lora import load_lora, read_lora_config
from minillm.reasoning import evaluate_reasoning
from minillm.tokenizer import THINK_OFF_PREFILL, to_json
from minillm.tools import DEMO_TOOLS, demo_tools, tool_loop


# fixed auto-test prompts, bilingual, about the demo world (tests/test_eval_model.py checks every name
# still exists in dataset/demo); mode 0 gets raw text to continue, the others questions. The fact
# questions include held-out entities (Morkeia, Ulsa: never asked in any training file).
PROMPTS = {
    0: ["Dakaia is a country whose capital", "达卡亚的首都是", "Torbri is a", "36 + 20 =", "Once upon a time,",
        "一天早上，"],
    1: ["What language do people in Dakaia speak?", "达卡亚的语言是什么？", "What is Ulsa's job?",
        "莫克亚的首都是哪里？", "What is 36 + 20?", "请算一下2加28。", "Hello! Who are you?", "你好！"],
    3: ["What is 27 + 15?", "请算一下41减19。", "Calculate 8 + 35.", "计算30减12。"],
}
PROMPTS[2] = PROMPTS[1]
TOOL_PROMPTS = ["What is 36 * 17?", "请算一下 123 加 456。", "What is the capital of Dakaia?", "达卡亚的首都是哪里？"]
LORA_PROMPTS = {
    "lora_medical": ["What treats temlo fever?", "What are the symptoms of yahu rash?", "莫洛热会引起什么？",
                     "得了戈多痘该吃什么药？"],
    "lora_identity": ["Who are you?", "What is your name?", "你是谁？", "介绍一下你自己。"],
}
# the demo entities those prompts name, with the file that must mention each
PROMPT_ENTITIES = {"pretrain": ["Dakaia", "达卡亚", "Torbri", "Ulsa", "莫克亚"],
                   "lora_medical": ["temlo fever", "yahu rash", "莫洛热", "戈多痘"]}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_mode", type=int, default=1, choices=sorted(MODE_FOLDERS),
                   help="0 pretrain, 1 SFT, 2 DPO, 3 reasoning: the folder under --save_dir (default 1)")
    p.add_argument("--save_dir", default="out", help="where the stage scripts wrote their checkpoints (default out)")
    p.add_argument("--checkpoint", default="", help="load this checkpoint folder instead of the --model_mode one")
    p.add_argument("--lora_name", default="", help="load the LoRA adapter <save_dir>/<lora_name> onto the model "
                                                   "('' or None = no adapter)")
    p.add_argument("--temperature", type=float, default=0.85, help="sampling temperature; 0 = greedy (default 0.85)")
    p.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling mass (default 0.85)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply (default 256)")
    p.add_argument("--history_cnt", type=int, default=0,
                   help="previous messages kept as context in chat (0 = every turn stands alone; default 0)")
    p.add_argument("--device", default="", help="cpu | cuda | cuda:N ('' = cuda if available)")
    p.add_argument("--show_speed", type=int, nargs="?", const=1, default=0, help="print decode tokens/s per reply")
    p.add_argument("--interactive", type=int, nargs="?", const=1, default=0,
                   help="chat on stdin until EOF or /exit (/help lists the commands)")
    p.add_argument("--show_prompt", type=int, nargs="?", const=1, default=0,
                   help="debug: print each prompt as the model sees it (token count and rendered text)")
    p.add_argument("--eval_data", default="", help="jsonl of any stage's format: print loss and perplexity on it")
    p.add_argument("--heldout", default="", help="heldout_*.jsonl: print the greedy-answer accuracy; default: the "
                                                 "demo set of this stage for demo checkpoints, 'none' = skip")
    p.add_argument("--max_seq_len", type=int, default=512, help="row length for --eval_data (default 512)")
    g = p.add_argument_group("multiple-choice benchmarks (C-Eval / CMMLU)")
    g.add_argument("--bench", default="", metavar="DIR",
                   help="score the multiple-choice questions in DIR (C-Eval/CMMLU CSV folders, or a file); "
                        "e.g. dataset/demo/bench")
    g.add_argument("--bench_split", default=None, choices=("val", "test", "dev"),
                   help="which folder to score (default: val if present, else test; rows without answers "
                        "are skipped and counted)")
    g.add_argument("--shots", type=int, default=0, help="k-shot examples per question from the dev split "
                                                         "of the same subject (default 0)")
    g.add_argument("--bench_chat", type=int, choices=(0, 1), default=None,
                   help="1: the prompt as a user turn + the assistant header; 0: raw text (default: 1 for "
                        "chat models, --model_mode >= 1 or a LoRA; 0 for pretrain: --model_mode 0, or a "
                        "checkpoint that train_pretrain.py saved)")
    g.add_argument("--bench_format", default="csv", choices=("csv", "jsonl"),
                   help='csv (C-Eval/CMMLU columns) or jsonl ({"question", "choices": [...], "answer"})')
    g.add_argument("--bench_out", default="", metavar="FILE.json",
                   help="also write {subject: {correct, total, accuracy}, overall} to FILE.json")
    g.add_argument("--bench_score", default="letter", choices=("letter", "text"),
                   help="letter: the letter with the highest next-token log-prob after the listed options "
                        "(C-Eval's way, default); text: the choice whose own text is likeliest as the answer, "
                        "options not listed (cloze style: for models that never learned the lettered format)")
    g.add_argument("--bench_batch_size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    g = p.add_argument_group("tool use")
    g.add_argument("--tools", default="", metavar="NAME,...",
                   help="tools the model may call in chat and auto-test: calculator, lookup (comma-separated; "
                        "default none)")
    g.add_argument("--tool_facts", default="dataset/demo/facts.json", metavar="FILE.json",
                   help="the lookup tool's facts, {entity: {relation: value}} (default dataset/demo/facts.json)")
    g.add_argument("--max_tool_rounds", type=int, default=4,
                   help="rounds of tool calls run per turn before the reply stands (default 4)")
    g.add_argument("--tool_timeout", type=float, default=5.0, help="seconds one tool call may run (default 5)")
    add_minimind_flags(p)
    return p


def shape_flag_notes(args, config) -> list[str]:
    """One note per MiniMind shape flag given: the checkpoint decides the shape."""
    notes = []
    if str(args.checkpoint).endswith(".pth"):  # MiniMind's file, picked by these flags; its tensors give the shape
        return notes
    for name in ("hidden_size", "num_hidden_layers", "use_moe"):
        value = getattr(args, name)
        if value is not None:
            has = getattr(config, name)
            notes.append(f"[--{name} {value} ignored: the checkpoint's config fixes the shape ({name} "
                         f"{int(has) if isinstance(has, bool) else has})]")
    return notes


def check_args(args):
    """A UserError naming the flag for a value no run can use (before any model is loaded)."""
    rules = [("temperature", args.temperature >= 0, "must be >= 0 (0 = greedy)"),
             ("top_p", 0 < args.top_p <= 1, "must be in (0, 1]"),
             ("max_new_tokens", args.max_new_tokens >= 1, "must be at least 1"),
             ("history_cnt", args.history_cnt >= 0, "must be >= 0 (0 = every turn stands alone)"),
             ("max_seq_len", args.max_seq_len >= 1, "must be at least 1"),
             ("shots", args.shots >= 0, "must be >= 0 (0 = zero-shot)"),
             ("bench_batch_size", args.bench_batch_size >= 1, "must be at least 1"),
             ("max_tool_rounds", args.max_tool_rounds >= 0, "must be >= 0 (0 = show the calls, run none)"),
             ("tool_timeout", args.tool_timeout > 0, "must be > 0 seconds")]
    problems = [f"--{name} {getattr(args, name)} {rule}" for name, fine, rule in rules if not fine]
    if problems:
        raise UserError("; ".join(problems))


def load_model(args):
    model, tok, folder = load_for_inference(args)
    lora = args.lora_name if args.lora_name not in ("", "None", "none") else ""
    if lora:
        load_lora(model, Path(args.save_dir) / lora)
    return model, tok, folder, lora


def is_demo_run(folder, lora: str, save_dir) -> bool:
    """Trained on the demo data? (the stage's recorded data_path points into dataset/demo/)"""
    try:
        doc = read_lora_config(Path(save_dir) / lora) if lora else load_config(folder)[1]
    except (FileNotFoundError, ValueError):
        return False
    return "dataset/demo/" in str(doc.get("train", {}).get("data_path", ""))


def reply(model, tok, prompt_ids, args) -> str:
    """Stream one reply to stdout; returns its text. Ctrl-C (KeyboardInterrupt) ends the line and propagates."""
    start, first, pieces = time.perf_counter(), None, []
    try:
        for piece in generate(model, tok, prompt_ids, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, stream=True):
            first = first or time.perf_counter()
            pieces.append(piece)
            print(piece, end="", flush=True)
    finally:
        print()
    text = "".join(pieces)
    if args.show_speed:
        n = len(tok.encode(text))
        elapsed = time.perf_counter() - (first or start)
        print(f"[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s decode, "
              f"{1000 * ((first or start) - start):.0f} ms to the first piece]")
    return text




def build_prompt(tok, config, history: list, user_text: str, args, chat: bool, system: str = "",
                 think: bool | None = None, tools=None, after: list = ()):
    """The prompt ids for one turn, fitted to the room the context leaves for --max_new_tokens.

    Chat: [system] + the last --history_cnt messages + the user turn + `after` (this turn's tool calls
    and results so far) + the assistant header + thinking_prefill(think); `tools` (JSON schemas) go
    into the system turn. Too long: drop the oldest history messages, then (if still too long) the
    system prompt when it alone leaves no room, then the oldest tokens of the user text.
    Returns (ids, the user text as kept, a one-line notice or '').
    """
    room = prompt_room(config, args.max_new_tokens)
    limit = config.max_position_embeddings
    if not chat:  # raw continuation: only the text itself
        ids = tok.encode(user_text)
        if len(ids) <= room:
            return ids, user_text, ""
        if room < 1:
            raise PromptTooLongError(len(ids), args.max_new_tokens, limit)
        kept = ids[-room:]
        return kept, tok.decode(kept), (f"[prompt too long: {len(ids)} tokens + {args.max_new_tokens} new exceed "
                                        f"the model's {limit}-token context; kept its last {room} tokens]")
    head = [{"role": "system", "content": system}] if system else []
    context = list(history[-args.history_cnt:]) if args.history_cnt > 0 else []

    def render(ctx, text):
        return tok.render_prompt(head + ctx + [{"role": "user", "content": text}] + list(after), tools=tools,
                                 open_thinking=think)

    ids = render(context, user_text)
    full = len(ids)
    if full <= room:
        return ids, user_text, ""
    dropped = []
    n_history = 0
    while context and len(ids) > room:  # oldest history first
        context = context[1:]
        n_history += 1
        ids = render(context, user_text)
    if n_history:
        dropped.append(f"{n_history} oldest history message{'s' if n_history > 1 else ''}")
    if len(ids) > room and head and len(render([], "")) >= room:  # the system prompt alone leaves no room
        head = []
        dropped.append("the system prompt")
        ids = render([], user_text)
    if len(ids) > room:  # then the oldest tokens of the prompt itself
        content = tok.encode(user_text)
        keep = room - len(render([], ""))
        if keep < 1:
            raise PromptTooLongError(len(render([], "x")), args.max_new_tokens, limit)
        while True:  # decode/encode may merge differently at the cut: shrink until it fits
            text = tok.decode(content[-keep:]).lstrip("\ufffd")  # no half character at the cut
            ids = render([], text)
            if len(ids) <= room or keep <= 1:
                break
            keep = max(1, keep - (len(ids) - room))
        if len(ids) > room:
            raise PromptTooLongError(len(ids), args.max_new_tokens, limit)
        dropped.append(f"the first {len(content) - keep} of its {len(content)} tokens")
        user_text = text
    return ids, user_text, (f"[prompt too long: {full} tokens + {args.max_new_tokens} new exceed the model's "
                            f"{limit}-token context; dropped " + ", ".join(dropped) + "]")


def chat_turn(model, tok, history: list, user_text: str, args, chat: bool, system: str = "",
              think: bool | None = None, label: str = "", tools=None) -> str:
    """One turn: fit the prompt, print the notice (if cut) and `label`, stream the reply. In chat the turn
    (the user text as the model saw it) joins `history` once the reply is complete. With `tools` (a
    ToolRegistry) the model's calls are run and their results fed back (minillm.tools.tool_loop), each
    call and result printed; the calls and results join the history too. Returns the last reply."""
    kept = [user_text]

    def respond(after):
        ids, kept[0], notice = build_prompt(tok, model.config, history, user_text, args, chat, system, think,
                                            tools.schemas() if tools else None, after)
        if notice:
            print(notice)
        if args.show_prompt:
            print(f"[prompt: {len(ids)} tokens] {tok.decode(ids)!r}")
        print(label, end="", flush=True)
        return reply(model, tok, ids, args)

    if not tools:
        added = [{"role": "assistant", "content": respond([])}]
    else:
        added = tool_loop(respond, [], tools, args.max_tool_rounds, on_event=show_tool_event)
    if chat:
        history += [{"role": "user", "content": kept[0]}] + added
    return added[-1]["content"]


def show_tool_event(kind, value):
    if kind == "call":
        shown = repr(value.raw) + f" ({value.error})" if value.error else to_json(value.arguments)
        print(f"[tool call] {value.name or '?'} {shown}")
    elif kind == "result":
        print(f"[tool result] {value[1]}")
    elif kind == "limit":
        print(f"[--max_tool_rounds {value} reached: the calls in this reply are not run]")


def load_tools(args, tok):
    """The ToolRegistry --tools names (None for none); lookup reads --tool_facts."""
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in DEMO_TOOLS]
    if unknown:
        raise UserError(f"--tools: unknown tool {', '.join(unknown)}; the tools are: {', '.join(DEMO_TOOLS)}")
    if not getattr(tok, "has_tool_tokens", False):
        raise UserError("--tools: this checkpoint's tokenizer has no <tool_call>/<tool_response> tokens")
    registry = demo_tools(facts_path=args.tool_facts if "lookup" in names else None, timeout=args.tool_timeout)
    return registry.select(names)


CHAT_COMMANDS = {
    "/help": "list these commands",
    "/clear": "forget the conversation so far (the system prompt stays)",
    "/system TEXT": "use TEXT as the system prompt from the next turn on; /system alone removes it",
    "/think on|off|auto": "on: open a think block after the assistant header; off: prefill an empty "
                          "<think></think> so a reasoning model answers directly; auto: the model decides (default, "
                          "or --open_thinking)",
    "/exit": "quit (so do Ctrl-D, and Ctrl-C twice at the prompt)",
}
EXIT = object()


@dataclass
class ChatState:
    history: list = field(default_factory=list)
    system: str = ""
    think: bool | None = None  # None: the model decides (thinking_prefill)
    tools: object = None       # a ToolRegistry, or None


def command_help() -> str:
    width = max(map(len, CHAT_COMMANDS))
    return "\n".join(f"  {name:<{width}}  {what}" for name, what in CHAT_COMMANDS.items()) + \
        "\n  (a line starting with // sends the rest, starting with /, as text)"


def run_command(line: str, state: ChatState, chat: bool):
    """Apply a /command; returns EXIT for /exit."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name == "/exit":
        return EXIT
    if name == "/help":
        print("commands:\n" + command_help())
    elif name == "/clear":
        state.history.clear()
        print("[history cleared]")
    elif name in ("/system", "/think") and not chat:
        print(f"[{name} is for chat models; this one continues raw text]")
    elif name == "/system":
        state.system = arg
        print(f"[system prompt set: {arg!r}]" if arg else "[system prompt removed]")
    elif name == "/think":
        modes = {"on": True, "off": False, "auto": None}
        if arg.lower() in modes:
            state.think = modes[arg.lower()]
        elif arg:
            print(f"[/think takes on, off or auto, not {arg!r}]")
            return None
        print("[thinking " + {True: "on: replies start inside an opened think block",
                              False: "off: replies start after an empty think block",
                              None: "auto: the model decides"}[state.think] + "]")
    else:
        print(f"[unknown command {name}; the commands are:]\n" + command_help())
    return None


def clean_text(text: str) -> str:
    """Any str -> one sentencepiece can encode: lone surrogates (undecodable bytes read with
    surrogateescape) become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def prepare_stdio():
    """Undecodable input bytes become U+FFFD instead of ending the chat, and so do characters the
    terminal cannot show; line editing when stdin is a terminal."""
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - input() gains editing and history
        except ImportError:
            pass


def chat_loop(model, tok, args, chat: bool, read=input, state: ChatState | None = None) -> ChatState:
    """Chat until EOF, /exit or a second Ctrl-C in a row at the prompt. `read(prompt)` returns a line
    (raises EOFError at the end, KeyboardInterrupt on Ctrl-C), like input()."""
    state = state or ChatState()
    label = "assistant> " if chat else "model> "
    print("type /help for commands; Ctrl-D or /exit quits")
    interrupted = False
    while True:
        try:
            line = read("user> ")
        except EOFError:
            print()
            return state
        except KeyboardInterrupt:
            print()
            if interrupted:  # twice in a row at the prompt: quit
                return state
            interrupted = True
            print("[Ctrl-C again, Ctrl-D or /exit to quit]")
            continue
        interrupted = False
        try:
            text = clean_text(line).strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                if run_command(text, state, chat) is EXIT:
                    return state
                continue
            if text.startswith("//"):
                text = text[1:]
            chat_turn(model, tok, state.history, text, args, chat, state.system, state.think, label=label,
                      tools=state.tools)
        except KeyboardInterrupt:
            print("[interrupted; this turn is not kept in the history]")
        except UserError as e:  # e.g. a prompt that cannot fit at all: say so, keep chatting
            print(f"[error: {e}]")


def recorded_stage(folder) -> str:
    """The save_weight a stage script recorded in the checkpoint's config ('pretrain', 'full_sft', ...),
    '' when unknown: --bench asks a pretrained checkpoint in raw text even when picked by --checkpoint."""
    try:
        return str(load_config(folder)[1].get("train", {}).get("save_weight", ""))
    except (FileNotFoundError, ValueError, AttributeError):
        return ""


def run_bench(model, tok, args, chat: bool):
    """--bench: per-subject and overall accuracy, printed (and written to --bench_out)."""
    import json

    from minillm.bench import chance_level, format_report, load_bench, load_dev, score_bench, subject_names
    questions, skipped, split = load_bench(args.bench, args.bench_split, args.bench_format)
    dev = load_dev(args.bench, args.bench_format) if args.shots else {}
    n = sum(len(q) for q in questions.values())
    if not n:
        raise UserError(f"--bench {args.bench}: no question with an answer{f' in {split}/' if split else ''} "
                        f"({skipped} without; C-Eval's test split has none: use --bench_split val)")
    print(f"bench {args.bench}{f' ({split})' if split else ''}: {n} questions in {len(questions)} subjects"
          f"{f', {skipped} without an answer skipped' if skipped else ''}; {args.shots}-shot, "
          f"{'chat' if chat else 'raw'} prompts, {args.bench_score} scoring; chance {100 * chance_level(questions):.1f}%")
    report = score_bench(model, tok, questions, dev, shots=args.shots, chat=chat,
                         batch_size=args.bench_batch_size, names=subject_names(args.bench), score=args.bench_score)
    print(format_report(report))
    if report.shots_dropped or report.truncated:
        print(f"[{report.shots_dropped} examples left out and {report.truncated} prompts cut at the start to fit "
              f"the model's {model.config.max_position_embeddings}-token context]")
    if args.bench_out:
        out = Path(args.bench_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"scores written to {out}")
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_minimind_flags(args, argv)
    check_args(args)
    torch.manual_seed(args.seed)
    model, tok, folder, lora = load_model(args)
    for note in shape_flag_notes(args, model.config):
        print(note)
    think = None if args.open_thinking is None else bool(args.open_thinking)  # not given: the model decides
    chat = args.model_mode != 0 or bool(lora)
    if args.tools and not chat:
        raise UserError("--tools needs a chat model: a pretrained one (--model_mode 0) continues raw text")
    tools = load_tools(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {folder}{' + LoRA ' + lora if lora else ''} ({n_params / 1e6:.2f}M parameters) on "
          f"{next(model.parameters()).device}; {'chat' if chat else 'raw text continuation'}")

    if args.interactive:
        room = prompt_room(model.config, args.max_new_tokens)
        if room < (len(tok.render_prompt("x")) + len(tok.encode(THINK_OFF_PREFILL)) if chat else 1):
            raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves {max(room, 0)} of the model's "
                            f"{model.config.max_position_embeddings} positions for the prompt: lower it")
        prepare_stdio()
        if tools:
            print(f"tools: {', '.join(tools.names())} (up to {args.max_tool_rounds} rounds of calls per turn)")
        chat_loop(model, tok, args, chat, state=ChatState(think=think, tools=tools))
        return

    if args.eval_data:
        s = eval_loss(model, tok, args.eval_data, max_seq_len=args.max_seq_len)
        print(f"eval {args.eval_data} ({s['format']}, {s['rows']} rows, {s['tokens']} target tokens): "
              f"loss {s['loss']:.4f} perplexity {s['perplexity']:.2f}")

    if args.bench:
        bench_chat = chat and not (not lora and recorded_stage(folder) == "pretrain")
        run_bench(model, tok, args, bench_chat if args.bench_chat is None else bool(args.bench_chat))

    no_heldout = args.heldout.lower() == "none"
    heldout = "" if no_heldout else args.heldout
    if not args.eval_data and not heldout and not args.bench:  # auto-test: the fixed prompts, streamed
        history = []
        prompts = TOOL_PROMPTS if tools else LORA_PROMPTS.get(lora) or PROMPTS[args.model_mode]
        if tools:
            print(f"tools: {', '.join(tools.names())}")
        for prompt in prompts:
            print(f"\n{'prompt' if not chat else 'user'}> {prompt}")
            chat_turn(model, tok, history, prompt, args, chat, think=think,
                      label="model> " if not chat else "assistant> ", tools=tools)
        if args.model_mode >= 1 and not no_heldout and is_demo_run(folder, lora, args.save_dir):
            demo = demo_heldout_path(lora or MODE_FOLDERS[args.model_mode])
            heldout = str(demo) if demo else ""
    if heldout and args.model_mode == 3:
        # a reasoning model: the answer counts only inside <answer>…</answer>, and the format is reported
        report = evaluate_reasoning(model, tok, read_heldout(heldout), max_new_tokens=args.max_new_tokens)
        print(f"held-out on {heldout}: {report}")
    elif heldout:
        # greedy; answers are one short sentence, so replies are capped at 48 new tokens
        result = heldout_accuracy(model, tok, read_heldout(heldout), max_new_tokens=min(args.max_new_tokens, 48))
        print(f"held-out accuracy on {heldout}: {result.summary()}")


if __name__ == "__main__":
    from minillm.trainer import main_guard
    main_guard(main)
