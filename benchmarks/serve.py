"""What batching buys the server: the same chat requests sent together vs one at a time.

    python benchmarks/serve.py                           # out/full_sft, else a demo-size random model
    python benchmarks/serve.py --checkpoint out/full_sft --concurrency 1 8 32 --max_tokens 64

Starts serve_openai_api.py as a subprocess on 127.0.0.1 (a free port), then for each concurrency C
sends C streamed requests at once, and the same C requests one after another. Prints decode
throughput (completion tokens / wall seconds, from each stream's usage) and the median
time-to-first-token (first chunk carrying text), and the ratio together / one at a time.
Every request is bounded (fixed max_tokens, greedy); a reply may end earlier at the stop token,
the same reply either way.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What language do people in Dakaia speak?", "What is 36 + 20?", "Hello! Who are you?",
             "Tell me about the river that runs through Santoa.", "请算一下2加28。", "你好！",
             "What is Ulsa's job?", "Name a colour and say why you like it."]


def demo_checkpoint(folder: Path) -> Path:
    """A demo-preset model (the size train_pretrain.py makes) with random weights and the shipped tokenizer."""
    import torch
    from minillm.checkpoint import save_checkpoint
    from minillm.config import ModelConfig
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer
    tok = Tokenizer.load()
    torch.manual_seed(0)
    # a wider init than training starts from, so the replies are varied text, not one repeated token
    cfg = ModelConfig.preset("demo", vocab_size=tok.vocab_size, initializer_range=0.25)
    return save_checkpoint(folder / "demo_random", MiniLLM(cfg), tok)


async def one(client, url, model, question, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise RuntimeError(doc["error"]["message"])
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
            for c in doc["choices"]:
                if first is None and (c["delta"].get("content") or c["delta"].get("reasoning_content")):
                    first = time.perf_counter() - start
    return tokens, first if first is not None else time.perf_counter() - start


async def run(url, model, questions, max_tokens, together: bool):
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        if together:
            results = await asyncio.gather(*(one(client, url, model, q, max_tokens) for q in questions))
        else:
            results = [await one(client, url, model, q, max_tokens) for q in questions]
        wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return tokens / wall, statistics.median(f for _, f in results), tokens, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="folder to serve (default out/full_sft, else a demo-size "
                                                    "random model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="repetitions per figure; the median is printed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.checkpoint) if args.checkpoint else ROOT / "out/full_sft"
    if not args.checkpoint and not folder.is_dir():
        folder = demo_checkpoint(Path(tmp.name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, str(ROOT / "serve_openai_api.py"), "--load_from", str(folder),
                               "--port", str(port), "--device", args.device, "--max_batch", str(max(args.concurrency))],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(600):
            try:
                model = httpx.get(url + "/v1/models", timeout=2).json()["data"][0]["id"]
                break
            except (httpx.HTTPError, KeyError):
                if server.poll() is not None:
                    sys.exit(f"the server exited with status {server.returncode}")
                time.sleep(0.1)
        else:
            sys.exit("the server did not start in 60 s")
        asyncio.run(run(url, model, QUESTIONS[:2], 8, True))  # warm-up
        import torch
        print(f"model {folder} ({model}), device {args.device}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, max_tokens {args.max_tokens}, greedy")
        print(f"{'streams':>7} | {'together tok/s':>14} | {'one-by-one tok/s':>16} | {'ratio':>5} | "
              f"{'TTFT together (median)':>22} | {'TTFT one-by-one':>15} | completion tokens")
        for c in args.concurrency:
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(c)]
            # each figure: the median over --rounds repetitions
            tog = [asyncio.run(run(url, model, questions, args.max_tokens, True)) for _ in range(args.rounds)]
            seq = [asyncio.run(run(url, model, questions, args.max_tokens, False)) for _ in range(args.rounds)]
            t_rate, s_rate = (statistics.median(r[0] for r in runs) for runs in (tog, seq))
            t_first, s_first = (statistics.median(r[1] for r in runs) for runs in (tog, seq))
            print(f"{c:>7} | {t_rate:>14.1f} | {s_rate:>16.1f} | {t_rate / s_rate:>5.2f} | "
                  f"{t_first * 1000:>19.0f} ms | {s_first * 1000:>12.0f} ms | {tog[0][2]} tokens", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
