"""Issue 14: a fault the user can fix ends in ONE line on stderr (`error: ...`: what was wrong, where,
what to do) and exit status 2, never a traceback. Each case drives the real script as a subprocess,
as a user runs it; the in-process checks beside them cover the config rules case by case."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import MiniLLM, ModelConfig, TrainConfig, save_checkpoint
from minillm.errors import UserError
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dataset" / "demo"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["--max_seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--num_workers", "0",
        "--use_tensorboard", "0", "--device", "cpu"]


def head(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Small data, a tiny checkpoint, a plain file and a folder, in one tmp folder."""
    w = tmp_path_factory.mktemp("clear_errors")
    head(DEMO / "pretrain.jsonl", w / "pre.jsonl", 40)
    head(DEMO / "sft.jsonl", w / "sft.jsonl", 20)
    tok = Tokenizer.load()
    save_checkpoint(w / "ckpt", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    (w / "a_file").write_text("not a folder\n")
    (w / "a_folder").mkdir()
    return w


def run(script: str, *args, cwd: Path):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=180)


def pretrain(w: Path, *args, preset: bool = True):
    """train_pretrain.py on the tiny data; later flags override earlier ones."""
    return run("train_pretrain.py", *(["--preset", "debug"] if preset else []), *TINY,
               "--data_path", w / "pre.jsonl", "--save_dir", w / "out", *args, cwd=w)


def assert_one_clear_line(r, *words) -> str:
    """Exit status 2, no traceback, exactly one `error: ` line, holding every one of `words`."""
    assert r.returncode == 2, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def checkpoint_copy(w: Path, name: str) -> Path:
    folder = w / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(w / "ckpt", folder)
    return folder


# 1. a corrupt or truncated model.safetensors ------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated, as --init_from", "garbage, in eval_model.py --checkpoint"])
def test_corrupt_weights_name_the_file(work, how):
    folder = checkpoint_copy(work, "corrupt")
    weights = folder / "model.safetensors"
    if how.startswith("truncated"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        r = pretrain(work, "--init_from", folder, preset=False)
    else:
        weights.write_bytes(b"this is not a safetensors file\n" * 40)
        r = run("eval_model.py", "--checkpoint", folder, "--device", "cpu", "--heldout", "none",
                "--eval_data", work / "sft.jsonl", cwd=work)
    assert_one_clear_line(r, str(weights), "truncated or corrupt")


# 2. tensor shapes that do not fit the checkpoint's config.yaml ---------------------------------------
def test_weights_that_do_not_fit_their_config(work):
    folder = checkpoint_copy(work, "edited")
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 128", 1))
    r = pretrain(work, "--init_from", folder, preset=False)
    assert_one_clear_line(r, str(folder / "model.safetensors"), "does not fit", "[2048, 64]", str(config))


# 3. --device cuda without CUDA ------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(work):
    assert_one_clear_line(pretrain(work, "--device", "cuda"), "--device cuda", "CUDA is not available",
                          "--device cpu")


# 4. impossible training values ------------------------------------------------------------------------
BAD_TRAIN_VALUES = {"batch_size": 0, "max_seq_len": 0, "accumulation_steps": 0, "learning_rate": -1.0,
                    "warmup_steps": -5, "grad_clip": -1.0, "save_interval": -1, "max_steps": -1,
                    "log_interval": 0, "beta2": 1.0, "min_lr_ratio": 2.0, "eval_split": 1.0,
                    "dtype": "bf16", "compile_mode": "fast", "use_compile": 2, "num_workers": -1}


def test_impossible_train_values_are_all_named_in_one_line(work):
    flags = ["--batch_size", "0", "--max_seq_len", "0", "--accumulation_steps", "0", "--learning_rate", "-1",
             "--warmup_steps", "-5", "--grad_clip", "-1", "--save_interval", "-1"]
    assert_one_clear_line(pretrain(work, *flags), "--batch_size 0", "--max_seq_len 0", "--accumulation_steps 0",
                          "--learning_rate -1.0", "--warmup_steps -5", "--grad_clip -1.0", "--save_interval -1")


@pytest.mark.parametrize("field, value", BAD_TRAIN_VALUES.items())
def test_train_config_refuses(field, value):
    with pytest.raises(UserError, match=f"--{field} "):
        TrainConfig(**{field: value})


def test_train_config_keeps_the_edge_values():
    TrainConfig(warmup_steps=-1, grad_clip=0.0, save_interval=0, learning_rate=0.0, max_steps=0, eval_split=0.0)


# 5. --epochs 0 ----------------------------------------------------------------------------------------
def test_zero_epochs_is_refused_not_done(work):
    r = pretrain(work, "--epochs", "0", "--save_dir", work / "out_epochs")
    assert_one_clear_line(r, "--epochs 0", "at least 1")
    assert not (work / "out_epochs").exists()


# 6. a folder where a file is expected, and the reverse -------------------------------------------------
@pytest.mark.parametrize("flag, target, words", [
    ("--data_path", "a_folder", ["--data_path", "a_folder", "is a folder, not a file"]),
    ("--tokenizer_path", "a_folder", ["--tokenizer_path", "a_folder", "without tokenizer.model"]),
    ("--init_from", "a_file", ["--init_from", "a_file", "is a file, not a checkpoint folder"]),
    ("--save_dir", "a_file", ["--save_dir", "a_file", "is a file, not a folder"]),
])
def test_wrong_kind_of_path(work, flag, target, words):
    r = pretrain(work, flag, work / target, preset=flag != "--init_from")
    assert_one_clear_line(r, *words)


# 7. model shapes that cannot work -----------------------------------------------------------------------
def test_hidden_size_not_divisible_by_the_heads(work):
    r = pretrain(work, "--hidden_size", "100", "--num_attention_heads", "8")
    assert_one_clear_line(r, "hidden_size=100", "num_attention_heads=8", "--hidden_size 100", "head_dim")


@pytest.mark.parametrize("overrides, words", [
    (dict(hidden_size=100, num_attention_heads=8), "hidden_size=100 is not a multiple of num_attention_heads=8"),
    (dict(hidden_size=100, num_attention_heads=4), "head_dim=25 must be even"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(num_attention_heads=0), "num_attention_heads=0 must be positive"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 must be positive"),
    (dict(head_dim=-2), "head_dim=-2 must be positive"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0 must be positive"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(use_moe=True, n_routed_experts=0), "n_routed_experts=0"),
])
def test_model_config_refuses(overrides, words):
    with pytest.raises(UserError, match="invalid model config") as err:
        ModelConfig.preset("debug", **overrides)
    assert words in str(err.value)


def test_an_explicit_head_dim_needs_no_divisible_hidden_size():
    assert ModelConfig.preset("debug", hidden_size=100, num_attention_heads=8, head_dim=16).head_dim == 16


# 8. a LoRA target that matches no layer --------------------------------------------------------------
def test_lora_target_matching_nothing(work):
    r = run("train_lora.py", "--init_from", work / "ckpt", "--data_path", work / "sft.jsonl", *TINY,
            "--save_dir", work / "out", "--lora_targets", "q_proj,nope", cwd=work)
    assert_one_clear_line(r, "--lora_targets", "'nope'", "q_proj")


# 9. train_tokenizer.py on too little text or too small a vocabulary ---------------------------------
@pytest.mark.parametrize("corpus, vocab, words", [
    ("", 0, ["no text to train on"]),
    ('{"text": "hi"}\n', 0, ["--vocab_size 6400", "use more text"]),
    (None, 100, ["--vocab_size 100 is too small", "byte-fallback"]),
])
def test_tokenizer_on_too_little(work, tmp_path, corpus, vocab, words):
    data = work / "pre.jsonl" if corpus is None else tmp_path / "corpus.jsonl"
    if corpus is not None:
        data.write_text(corpus, encoding="utf-8")
    r = run("train_tokenizer.py", "--data_path", data, "--out", tmp_path / "tok" / "tokenizer.model",
            *(["--vocab_size", vocab] if vocab else []), cwd=tmp_path)
    assert_one_clear_line(r, *words)
    assert not (tmp_path / "tok").exists()


# the same for files the library reads on the way ------------------------------------------------------
def test_a_corrupt_tokenizer_or_resume_state_names_the_file(work, tmp_path):
    from minillm.checkpoint import load_trainer_state
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes((work / "ckpt" / "tokenizer.model").read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot be read as a SentencePiece model") as err:
        Tokenizer.load(tmp_path)
    assert str(bad) in str(err.value)
    folder = checkpoint_copy(work, "resumable")
    (folder / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="trainer_state.pt cannot be read.*--from_resume"):
        load_trainer_state(folder)


# max_seq_len past the model's context (its RoPE range) ------------------------------------------------
def test_max_seq_len_longer_than_the_context(work):
    r = pretrain(work, "--max_seq_len", "2048", "--save_dir", work / "ctx")  # debug's context is 1024
    assert_one_clear_line(r, "--max_seq_len 2048", "max_position_embeddings 1024")


def test_tokenizer_larger_than_the_vocabulary(work):
    r = pretrain(work, "--vocab_size", "1000", "--save_dir", work / "vocab")  # the shipped tokenizer has 2048
    assert_one_clear_line(r, "tokenizer has 2048 ids", "--vocab_size 1000")
