"""Serve a checkpoint over OpenAI's chat completions API (MiniMind's scripts/serve_openai_api.py).

    python serve_openai_api.py                                  # the demo SFT model, out/full_sft, port 8998
    python serve_openai_api.py --load_from out/full_sft --lora_name lora_medical,lora_identity
    python serve_openai_api.py --weight full_sft --lora_weight lora_medical    # MiniMind's flags

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health, and the chat
page at / and /chat. Requests arriving together are decoded together (minillm/serve.py).
Tool use as OpenAI's API has it: a request's `tools` are shown to the model, the `<tool_call>` blocks
of its reply come back as `tool_calls` (finish_reason "tool_calls"), and the client runs them and
sends the results back as `tool` messages. Thinking: `open_thinking` (or chat_template_kwargs
open_thinking / enable_thinking) true opens a think block, false prefills an empty one; --open_thinking
sets the default for requests that say neither.
Needs the serve extra: pip install -e ".[serve]".
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from minillm.cli import MODE_FOLDERS, add_minimind_flags, apply_minimind_flags, load_for_inference
from minillm.errors import UserError



def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="checkpoint folder to serve (default <save_dir>/full_sft)")
    p.add_argument("--model_mode", type=int, default=1, choices=sorted(MODE_FOLDERS),
                   help="0 pretrain, 1 full_sft, 2 dpo, 3 reason: the folder under --save_dir (default 1)")
    p.add_argument("--save_dir", default="out", help="where the stage scripts wrote their checkpoints (default out)")
    p.add_argument("--lora_name", default="", help="LoRA adapters <save_dir>/NAME to serve beside the base model, "
                                                   "comma-separated; each is a model id of its own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998, MiniMind's)")
    p.add_argument("--device", default="", help="cpu | cuda | cuda:N ('' = cuda if available)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for requests that give none, so the same requests in the same order get the same "
                        "sampled replies (default: fresh randomness)")
    p.add_argument("--max_batch", type=int, default=32, help="most sequences decoded together per model (default 32)")
    p.add_argument("--max_tokens", type=int, default=512,
                   help="reply length when a request gives no max_tokens (default 512; capped by the context)")
    p.add_argument("--history_cnt", type=int, default=0, help=argparse.SUPPRESS)  # target of MiniMind's --historys
    p.add_argument("--max_seq_len", type=int, default=None, metavar="N",
                   help="(MiniMind) ignored: the checkpoint's max_position_embeddings is the context")
    add_minimind_flags(p)
    return p


def load_models(args) -> tuple[dict, object]:
    """{model id: model} (base first, then one per LoRA, each on its own copy of the base) and the tokenizer."""
    from minillm.lora import load_lora
    from minillm.serve import model_ids
    model, tok, folder = load_for_inference(args)
    loras = [n.strip() for n in args.lora_name.split(",") if n.strip() not in ("", "None", "none")]
    models = [model] + [load_lora(copy.deepcopy(model), Path(args.save_dir) / name) for name in loras]
    return dict(zip(model_ids(folder, loras), models)), tok


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_minimind_flags(args, argv)
    for name, fine in (("port", 0 <= args.port < 65536), ("max_batch", args.max_batch >= 1),
                       ("max_tokens", args.max_tokens >= 1)):
        if not fine:
            raise UserError(f"--{name} {getattr(args, name)} is out of range")
    try:
        import uvicorn
        from minillm.serve import create_app
    except ImportError as e:
        raise UserError(f"serving needs fastapi and uvicorn ({e}): pip install -e '.[serve]'") from None
    models, tok = load_models(args)
    thinking = None if args.open_thinking is None else bool(args.open_thinking)
    app = create_app(models, tok, max_batch=args.max_batch, default_max_tokens=args.max_tokens,
                     default_thinking=thinking, seed=args.seed)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:"
          f"{args.port}/)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    from minillm.trainer import main_guard
    main_guard(main)
