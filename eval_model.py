"""Talk to a trained model, run its fixed test prompts, or measure it.

    python eval_model.py --model_mode 1                       # auto-test: stream answers to the SFT prompts,
                                                              # then the demo held-out accuracy
    python eval_model.py --model_mode 1 --lora_name lora_medical
    python eval_model.py --model_mode 0                       # pretrain: continues raw text, no chat
    python eval_model.py --interactive --history_cnt 4        # chat on stdin (Ctrl-D ends)
    python eval_model.py --checkpoint out/full_sft --eval_data dataset/demo/sft.jsonl   # loss / perplexity
    python eval_model.py --model_mode 0 --heldout dataset/demo/heldout_sft.jsonl        # held-out accuracy

--model_mode picks the checkpoint folder under --save_dir (MiniMind's flag): 0 pretrain,
1 full_sft, 2 dpo, 3 reason; --checkpoint DIR loads any folder instead. --lora_name NAME loads
the adapter in <save_dir>/NAME onto it. Held-out questions are always asked in chat format,
even to a pretrained model (mode 0), which is why a pretrain-only model scores low there.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from minillm.checkpoint import load_checkpoint, load_config
from minillm.evaluation import demo_heldout_path, eval_loss, heldout_accuracy, read_heldout
from minillm.generate import generate
from minillm.lora import load_lora, read_lora_config
from minillm.reasoning import evaluate_reasoning

MODE_FOLDERS = {0: "pretrain", 1: "full_sft", 2: "dpo", 3: "reason"}

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
    p.add_argument("--interactive", type=int, nargs="?", const=1, default=0, help="chat on stdin until EOF")
    p.add_argument("--eval_data", default="", help="jsonl of any stage's format: print loss and perplexity on it")
    p.add_argument("--heldout", default="", help="heldout_*.jsonl: print the greedy-answer accuracy; default: the "
                                                 "demo set of this stage for demo checkpoints, 'none' = skip")
    p.add_argument("--max_seq_len", type=int, default=512, help="row length for --eval_data (default 512)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    return p


def load_model(args):
    folder = Path(args.checkpoint) if args.checkpoint else Path(args.save_dir) / MODE_FOLDERS[args.model_mode]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_checkpoint(folder, device=device)
    lora = args.lora_name if args.lora_name not in ("", "None", "none") else ""
    if lora:
        load_lora(model, Path(args.save_dir) / lora)
    model.eval()
    if device.startswith("cuda"):
        model.to(torch.bfloat16)
    return model, tok, folder, lora


def is_demo_run(folder, lora: str, save_dir) -> bool:
    """Trained on the demo data? (the stage's recorded data_path points into dataset/demo/)"""
    try:
        doc = read_lora_config(Path(save_dir) / lora) if lora else load_config(folder)[1]
    except (FileNotFoundError, ValueError):
        return False
    return "dataset/demo/" in str(doc.get("train", {}).get("data_path", ""))


def reply(model, tok, prompt, args, chat: bool) -> str:
    """Stream one reply to stdout; returns its text."""
    start, first, pieces = time.perf_counter(), None, []
    for piece in generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, chat=chat, stream=True):
        first = first or time.perf_counter()
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    text = "".join(pieces)
    if args.show_speed:
        n = len(tok.encode(text))
        elapsed = time.perf_counter() - (first or start)
        print(f"[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s decode, "
              f"{1000 * ((first or start) - start):.0f} ms to the first piece]")
    return text


def chat_turn(model, tok, history: list, user_text: str, args, chat: bool) -> str:
    if not chat:  # a pretrained model continues the text itself
        return reply(model, tok, user_text, args, chat=False)
    context = history[-args.history_cnt:] if args.history_cnt > 0 else []
    messages = context + [{"role": "user", "content": user_text}]
    answer = reply(model, tok, messages, args, chat=True)
    history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
    return answer


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok, folder, lora = load_model(args)
    chat = args.model_mode != 0 or bool(lora)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {folder}{' + LoRA ' + lora if lora else ''} ({n_params / 1e6:.2f}M parameters) on "
          f"{next(model.parameters()).device}; {'chat' if chat else 'raw text continuation'}")

    if args.interactive:
        history: list = []
        while True:
            print("user> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:  # EOF
                print()
                return
            if line.strip():
                print("assistant> ", end="", flush=True)
                chat_turn(model, tok, history, line.strip(), args, chat)

    if args.eval_data:
        s = eval_loss(model, tok, args.eval_data, max_seq_len=args.max_seq_len)
        print(f"eval {args.eval_data} ({s['format']}, {s['rows']} rows, {s['tokens']} target tokens): "
              f"loss {s['loss']:.4f} perplexity {s['perplexity']:.2f}")

    no_heldout = args.heldout.lower() == "none"
    heldout = "" if no_heldout else args.heldout
    if not args.eval_data and not heldout:  # auto-test: the fixed prompts, streamed
        history = []
        for prompt in LORA_PROMPTS.get(lora) or PROMPTS[args.model_mode]:
            print(f"\n{'prompt' if not chat else 'user'}> {prompt}\n{'model' if not chat else 'assistant'}> ",
                  end="", flush=True)
            chat_turn(model, tok, history, prompt, args, chat)
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
