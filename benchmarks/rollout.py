"""What batched KV-cache rollouts buy the RL stages: generated tokens per second of minillm.rl.sample_rollouts
(every prompt's num_generations completions in one left-padded batch) against producing the same number
of completions one prompt at a time (its num_generations rows batched) and one completion at a time.

    python benchmarks/rollout.py                                  # out/full_sft, else a demo-size random model
    python benchmarks/rollout.py --prompts 1 8 32 --num_generations 4 --max_new_tokens 48 --threads 2

No stop ids: every row generates exactly --max_new_tokens tokens in every mode, so each mode does the same
work (sampled at temperature 0.8, top_p 1, like train_grpo.py's rollouts). Prompts are demo questions
rendered with the chat template. Prints a markdown table (median of --rounds) and the command.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from minillm.generate import SamplingParams  # noqa: E402
from minillm.rl import sample_rollouts  # noqa: E402

QUESTIONS = ["What language do people in Dakaia speak?", "What is 36 + 19?", "Which city is the capital of Morkeia?",
             "What does Tasen do for a living?", "请算一下2加28。", "萨胡吃什么？", "What color is a sahu?",
             "Please compute 7 + 24.", "赞克来自哪里？", "Calculate 47 - 34."]


def load_model(checkpoint: str, device: str):
    from minillm.checkpoint import load_checkpoint
    from minillm.config import ModelConfig
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer
    path = Path(checkpoint or ROOT / "out/full_sft")
    if path.is_dir():
        model, tok = load_checkpoint(path)
        return model.to(device).eval(), tok, str(path)
    if checkpoint:
        raise SystemExit(f"no checkpoint at {checkpoint}")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("demo", vocab_size=tok.vocab_size))
    return model.to(device).eval(), tok, "demo preset, random weights"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="model folder (default out/full_sft, else a demo-size random model)")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32], help="prompts per rollout batch")
    p.add_argument("--num_generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per completion")
    p.add_argument("--rounds", type=int, default=3, help="repetitions per figure; the median is printed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name = load_model(args.checkpoint, args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=1.0, stop_ids=())
    G = args.num_generations

    def batched(prompts):
        sample_rollouts(model, prompts, G, params, tok.pad_id, torch.Generator(args.device).manual_seed(0))

    def per_prompt(prompts):
        for prompt in prompts:
            sample_rollouts(model, [prompt], G, params, tok.pad_id, torch.Generator(args.device).manual_seed(0))

    def per_completion(prompts):
        for prompt in prompts:
            for _ in range(G):
                sample_rollouts(model, [prompt], 1, params, tok.pad_id, torch.Generator(args.device).manual_seed(0))

    print(f"model: {name} ({model.num_params() / 1e6:.2f}M parameters), device {args.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {G} generations x {args.max_new_tokens} tokens "
          f"per prompt, median of {args.rounds}\n")
    print("| prompts | completions | batched tok/s | per prompt tok/s | per completion tok/s | batched / per completion |")
    print("|---:|---:|---:|---:|---:|---:|")
    batched([tok.render_prompt(QUESTIONS[0])])  # warm-up
    for n in args.prompts:
        prompts = [tok.render_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
        tokens = n * G * args.max_new_tokens
        rates = []
        for mode in (batched, per_prompt, per_completion):
            rates.append(tokens / statistics.median(timed(lambda: mode(prompts)) for _ in range(args.rounds)))
        print(f"| {n} | {n * G} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[2]:,.0f} | {rates[0] / rates[2]:.1f}x |")
    print(f"\n`python benchmarks/rollout.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))


if __name__ == "__main__":
    main()
