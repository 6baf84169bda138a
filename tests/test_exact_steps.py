"""One optimizer step is the same optimisation however its rows are split: 1 process x batch 8,
1 process x batch 2 x accumulation 4 and 2 processes (gloo) x batch 4 give the same losses and the
same weights, for SFT and for the tag-weighted reasoning loss on rows of very different lengths.

Both pieces are needed: the samplers put the same rows into each step whatever the split, and the
stage losses divide local sums by the step's total target count (all micro-batches, all ranks)
instead of averaging per-micro-batch means (which weighs a token in a short micro-batch more).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"one": ("8", "1", 1), "accumulated": ("2", "4", 1), "two_ranks": ("4", "1", 2)}  # batch, accum, ranks


def conversation(question, answer, think=None):
    reply = f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>" if think else answer
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    save_checkpoint(root / "base", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    rows = []
    for i in range(48):  # replies from 1 to ~150 tokens: micro-batches hold very different target counts
        words = " ".join(["the capital of Dakaia is Tago"] * (i % 12) ** 2)
        rows.append(conversation(f"question {i}?", f"answer {i}. {words}",
                                 think=f"step {i}: {words[: 5 * i]}" if i % 2 else f"{i} + {i} = {2 * i}"))
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root, data


def run_stage(script, root, data, name, batch, accum, ranks, port):
    flags = ["--init_from", str(root / "base"), "--data_path", str(data), "--save_dir", str(root / script / name),
             "--batch_size", batch, "--accumulation_steps", accum, "--max_steps", "3", "--log_interval", "1",
             "--learning_rate", "3e-3", "--warmup_steps", "0", "--max_seq_len", "192", "--device", "cpu",
             "--dtype", "float32", "--num_workers", "0", "--use_tensorboard", "0", "--use_compile", "0"]
    if script == "train_full_sft.py":
        flags += ["--system_prompt_prob", "0"]
    else:
        flags += ["--report_path", ""]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(ranks), "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*launcher, str(ROOT / script), *flags], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+/\d+ .*? loss ([0-9.]+)", r.stdout, re.M)]
    folder = root / script / name / ("full_sft" if script == "train_full_sft.py" else "reason")
    model, _ = load_checkpoint(folder, with_tokenizer=False)
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("script, port", [("train_full_sft.py", 29541), ("train_distill_reason.py", 29542)])
def test_step_is_the_same_however_it_is_split(setup, script, port):
    root, data = setup
    base, _ = load_checkpoint(root / "base", with_tokenizer=False)
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    results = {name: run_stage(script, root, data, name, *split, port) for name, split in SPLITS.items()}
    losses, weights = results.pop("one")
    change = (weights - start).norm()
    assert len(losses) == 3 and change > 0.1  # the steps really moved the weights
    for name, (other_losses, other_weights) in results.items():
        assert other_losses == pytest.approx(losses, rel=2e-4), name  # the log prints 4 decimals
        # relative difference of the weight change: was 6.5% (2 ranks) and 90% (accumulation) before
        assert (other_weights - weights).norm() / change < 1e-4, name
