"""The shared loop: resume equals an uninterrupted run, DDP equals one process, loss falls,
checkpoints are atomic."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import crash_after_save

import train_pretrain
from minillm.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.model import MiniLLM
from minillm.trainer import cpu_has_bf16, lr_at, training_dtype

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "debug", "--vocab_size", "6400", "--max_seq_len", "32", "--batch_size", "4",
        "--log_interval", "1", "--num_workers", "0", "--use_tensorboard", "0", "--learning_rate", "3e-3",
        "--optimizer", "adamw"]  # these tests check the loop with AdamW; Muon has its own in test_optimizer.py


def run_pretrain(corpus, save_dir, *extra):
    return train_pretrain.main(TINY + ["--data_path", str(corpus), "--save_dir", str(save_dir), *extra])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_resume_equals_uninterrupted_run(corpus, tmp_path, monkeypatch):
    n = 4
    whole = run_pretrain(corpus, tmp_path / "a", "--max_steps", str(2 * n), "--save_interval", str(n))

    crash_after_save(monkeypatch, n, lambda: run_pretrain(corpus, tmp_path / "b", "--max_steps", str(2 * n), "--save_interval", str(n)))
    resumed = run_pretrain(corpus, tmp_path / "b", "--max_steps", str(2 * n), "--save_interval", str(n),
                           "--from_resume", "1")
    assert resumed.history == whole.history[n:]  # exact on CPU
    a, _ = load_checkpoint(tmp_path / "a" / "pretrain", with_tokenizer=False)
    b, _ = load_checkpoint(tmp_path / "b" / "pretrain", with_tokenizer=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_short_pretraining_run_learns(corpus, tmp_path):
    trainer = run_pretrain(corpus, tmp_path, "--max_steps", "40", "--hidden_size", "128")
    first, last = trainer.history[0], sum(trainer.history[-5:]) / 5
    assert last < first - 2.5, trainer.history  # from ~ln(6400)=8.8 to well under 6.3
    ckpt = resolve_checkpoint(tmp_path / "pretrain")
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer.model",
                                                "trainer_state.pt"}


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+ .*? loss ([0-9.]+)", stdout, re.M)]


def test_two_process_torchrun_matches_one_process(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = [*TINY[:TINY.index("--batch_size")], *TINY[TINY.index("--batch_size") + 2:],
              "--data_path", str(corpus), "--max_steps", "4", "--accumulation_steps", "2", "--device", "cpu",
                  # fp32: bf16 autocast rounds each rank's partial weight gradient, which is not what this checks
                  "--dtype", "float32"]
    one = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), *common, "--batch_size", "4",
                          "--save_dir", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", str(ROOT / "train_pretrain.py"), *common, "--batch_size", "2",
                          "--save_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = _losses(one.stdout), _losses(two.stdout)
    assert len(l1) == 4 and len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-4)
    a, _ = load_checkpoint(tmp_path / "one" / "pretrain", with_tokenizer=False)
    b, _ = load_checkpoint(tmp_path / "two" / "pretrain", with_tokenizer=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_checkpoint_round_trip_and_crash_safety(tmp_path, monkeypatch):
    from minillm.tokenizer import Tokenizer
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=6400))
    tok = Tokenizer.load()
    folder = save_checkpoint(tmp_path / "ck", model, tok)
    loaded, tok2 = load_checkpoint(folder)
    x = torch.randint(0, 6400, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert tok2.fingerprint == tok.fingerprint
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    # a crash while writing the second checkpoint leaves the first one loadable
    import minillm.checkpoint as ck

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", MiniLLM(ModelConfig.preset("debug", vocab_size=6400)), tok)
    again, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_checkpoint_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_bad_flags_give_one_clear_line(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), *TINY, "--data_path", str(bad),
                        "--save_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), "--preset", "nope"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), *TINY, "--data_path", str(corpus),
                        "--save_dir", str(tmp_path), "--compile_mode", "fast"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--compile_mode 'fast'" in r.stderr and "reduce-overhead" in r.stderr
    assert "Traceback" not in r.stderr


def test_precision_choice_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training_dtype("auto", gpu) is torch.bfloat16
    assert training_dtype("auto", cpu) is None  # fp32 on CPU unless asked: see training_dtype's docstring
    assert training_dtype("bfloat16", gpu) is torch.bfloat16
    assert training_dtype("float16", gpu) is torch.float16
    assert training_dtype("float32", gpu) is None
    assert training_dtype("float16", cpu) is None  # no fp16 matmul on CPUs: fp32
    assert training_dtype("bfloat16", cpu) is (torch.bfloat16 if cpu_has_bf16() else None)
    with pytest.raises(ValueError, match="--dtype 'bf16'"):
        training_dtype("bf16", cpu)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_cpu_training_runs_matmuls_in_bf16_and_the_loss_in_fp32(corpus, tmp_path, monkeypatch, capsys):
    """--dtype bfloat16 on a bf16-capable CPU: projections run in bf16 inside the step and the loss
    the trainer backpropagates is fp32; the default (auto) is fp32 on CPU."""
    seen = {}
    original = MiniLLM.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            seen["loss"] = out.loss.dtype
            seen["proj"] = self.lm_head(torch.zeros(1, self.config.hidden_size)).dtype
        return out
    monkeypatch.setattr(MiniLLM, "forward", spy)
    run_pretrain(corpus, tmp_path / "bf16", "--max_steps", "1", "--dtype", "bfloat16")
    assert seen == {"loss": torch.float32, "proj": torch.bfloat16}
    assert "(bfloat16 autocast)" in capsys.readouterr().out
    run_pretrain(corpus, tmp_path / "default", "--max_steps", "1")
    assert seen == {"loss": torch.float32, "proj": torch.float32}
    assert "(float32)" in capsys.readouterr().out


def test_benchmark_times_the_real_loop_and_writes_nothing(corpus, tmp_path, capsys):
    trainer = run_pretrain(corpus, tmp_path, "--benchmark", "3", "--benchmark_warmup", "2")
    result = trainer.benchmark_result
    assert result["steps"] == 3 and result["warmup_steps"] == 2 and result["tokens_per_s"] > 0
    # the timed steps' tokens: 3 steps x batch 4 x 32 targets (+1 input each row: n_tokens counts inputs)
    assert result["tokens_per_s"] * result["seconds"] == pytest.approx(3 * 4 * 32, rel=0.05)
    assert trainer.step == 5 and not tmp_path.joinpath("pretrain").exists()
    out = capsys.readouterr().out
    assert "benchmark: " in out and "done: checkpoint" not in out


def test_benchmark_longer_than_the_data_is_one_clear_error(corpus, tmp_path):
    from minillm.errors import UserError
    with pytest.raises(UserError, match="--benchmark_warmup 5000"):
        run_pretrain(corpus, tmp_path, "--benchmark", "3", "--benchmark_warmup", "5000")


def test_dropout_runs_resume_exactly(corpus, tmp_path, monkeypatch):
    """A stage that draws random numbers in its steps (dropout) resumes onto the same stream: starting the
    data loader draws nothing from the global RNG."""
    n = 3
    extra = ("--max_steps", str(2 * n), "--save_interval", str(n), "--set", "dropout=0.2")
    whole = run_pretrain(corpus, tmp_path / "a", *extra)

    crash_after_save(monkeypatch, n, lambda: run_pretrain(corpus, tmp_path / "b", *extra))
    resumed = run_pretrain(corpus, tmp_path / "b", *extra, "--from_resume", "1")
    assert resumed.history == whole.history[n:]
