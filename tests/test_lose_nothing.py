"""Nothing finished is lost: divergence never reaches a checkpoint, a second run neither replaces a
finished one nor writes beside a live one, an interrupt saves the step it finished, and a damaged
latest checkpoint falls back to an older one. The process tests wait for what the run has done (a
logged step), never for wall-clock time."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_pretrain
from minillm.checkpoint import load_trainer_state
from minillm.errors import TrainingDiverged
from minillm.runs import history_checkpoints
from minillm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "debug", "--max_seq_len", "32", "--batch_size", "4", "--log_interval", "1", "--num_workers", "0",
        "--use_tensorboard", "0", "--learning_rate", "3e-3", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pretrain(corpus, save_dir, *extra):
    return train_pretrain.main(TINY + ["--data_path", str(corpus), "--save_dir", str(save_dir), *extra])


def script(corpus, save_dir, *extra):
    return [sys.executable, str(ROOT / "train_pretrain.py"), *TINY, "--data_path", str(corpus),
            "--save_dir", str(save_dir), *extra]


def wait_for_line(proc, needle: str) -> list[str]:
    """Read the run's stdout until a line contains `needle` (what the run has done, not a clock)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"the run ended before printing {needle!r}:\n{''.join(seen)}\n{proc.stderr.read()}")


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- divergence ------------------------------------------------------------------------------------

def test_diverged_run_keeps_the_good_checkpoint_and_exits_non_zero(corpus, tmp_path):
    pretrain(corpus, tmp_path, "--max_steps", "2")
    good = files(tmp_path / "pretrain")
    # the same run continued at an absurd learning rate: the weights blow up, the loss turns inf / NaN
    r = subprocess.run(script(corpus, tmp_path, "--max_steps", "40", "--from_resume", "1", "--learning_rate", "1e30"),
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    assert "not finite" in r.stderr and "is kept" in r.stderr and "Traceback" not in r.stderr
    assert files(tmp_path / "pretrain") == good  # bit-identical: nothing was saved


def test_a_non_finite_step_is_skipped_on_the_device(corpus, tmp_path, monkeypatch):
    """--nan_policy skip: the poisoned step changes no weight and no optimizer state; training goes on."""
    original, calls, snapshot = train_pretrain.pretrain_loss, [], {}

    def poisoned(model, batch, totals):
        loss, metrics = original(model, batch, totals)
        calls.append(1)
        params = [p.detach().clone() for p in model.parameters()]
        if len(calls) == 2:  # step 2: every gradient becomes NaN
            snapshot["before"] = params
            return loss * float("nan"), metrics
        if len(calls) == 3:  # step 3 starts from exactly the weights step 2 started from
            snapshot["after"] = params
        return loss, metrics

    monkeypatch.setattr(train_pretrain, "pretrain_loss", poisoned)
    trainer = pretrain(corpus, tmp_path, "--max_steps", "4", "--nan_policy", "skip", "--optimizer", "adamw")
    assert trainer.step == 4 and len(calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(snapshot["before"], snapshot["after"]))
    assert int(trainer.bad_total) == 1
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3}  # four steps, one skipped

    # --nan_policy stop (the default) with --max_bad_steps 1: the run stops and saves nothing
    calls.clear()
    with pytest.raises(TrainingDiverged, match="step 2"):
        pretrain(corpus, tmp_path / "stop", "--max_steps", "4", "--max_bad_steps", "1")
    assert not (tmp_path / "stop" / "pretrain").exists()


def test_non_finite_weights_are_never_saved(corpus, tmp_path, monkeypatch):
    pretrain(corpus, tmp_path, "--max_steps", "2")
    good = files(tmp_path / "pretrain")
    original = Trainer.save

    def poison_then_save(self):
        with torch.no_grad():
            next(self.model.parameters())[0, 0] = float("inf")
        original(self)
    monkeypatch.setattr(Trainer, "save", poison_then_save)
    with pytest.raises(TrainingDiverged, match="NaN or inf"):
        pretrain(corpus, tmp_path, "--max_steps", "3", "--from_resume", "1")
    assert files(tmp_path / "pretrain") == good


# -- a second run ------------------------------------------------------------------------------------

def test_a_new_run_never_replaces_a_finished_one_without_a_flag(corpus, tmp_path):
    pretrain(corpus, tmp_path, "--max_steps", "2")
    finished = files(tmp_path / "pretrain")
    r = subprocess.run(script(corpus, tmp_path, "--max_steps", "1"), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for choice in ("--from_resume 1", "--overwrite 1", "--save_dir", str(tmp_path / "pretrain")):
        assert choice in r.stderr
    assert files(tmp_path / "pretrain") == finished
    trainer = pretrain(corpus, tmp_path, "--max_steps", "1", "--overwrite", "1")
    assert load_trainer_state(tmp_path / "pretrain")["step"] == 1 and trainer.step == 1


def test_a_second_run_into_a_live_folder_stops_naming_the_first(corpus, tmp_path):
    first = subprocess.Popen(script(corpus, tmp_path, "--max_steps", "100000", "--epochs", "1000"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_line(first, "step 1/")
        second = subprocess.run(script(corpus, tmp_path, "--max_steps", "1", "--from_resume", "1"),
                                capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # the lock died with the killed process: a new run may start at once
    pretrain(corpus, tmp_path, "--max_steps", "1", "--overwrite", "1")


# -- interrupts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_saves_the_step_it_finished(corpus, tmp_path, signum):
    proc = subprocess.Popen(script(corpus, tmp_path, "--max_steps", "100000", "--epochs", "1000", "--save_interval", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_line(proc, "step 3/")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "--from_resume 1" in err
    saved = load_trainer_state(tmp_path / "pretrain")["step"]
    logged = [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("step ")]
    assert saved >= 3 and saved == logged[-1]  # the last step it logged is the one it saved
    resumed = pretrain(corpus, tmp_path, "--max_steps", str(saved + 2), "--from_resume", "1",
                       "--save_interval", "0")
    assert resumed.step == saved + 2


def signal_one_rank(corpus, tmp_path, port: int, signum: int, *flags) -> subprocess.Popen:
    """A 2-rank torchrun pretraining; once it has logged step 3, `signum` goes to rank 1's process only.
    Returns the finished launcher (communicate() already called: .out / .err hold its output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *script(corpus, tmp_path, "--max_steps", "100000", "--epochs", "1000", "--batch_size", "2", *flags)[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        seen = wait_for_line(proc, "step 3/")
        workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "train_pretrain.py"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(max(workers, key=int)), signum)  # the younger worker: rank 1
        out, proc.err = proc.communicate(timeout=120)  # bounded: nobody hangs
        proc.out = "".join(seen) + out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc


def test_under_torchrun_every_rank_stops_at_the_same_step(corpus, tmp_path):
    """SIGTERM to one worker only: both ranks agree on the step, save it, and stop."""
    proc = signal_one_rank(corpus, tmp_path, 29551, signal.SIGTERM, "--save_interval", "0")
    saved = load_trainer_state(tmp_path / "pretrain")
    logged = [int(line.split()[1].split("/")[0]) for line in proc.out.splitlines() if line.startswith("step ")]
    assert saved["world_size"] == 2 and saved["step"] == logged[-1] >= 3, (proc.out[-1500:], proc.err[-3000:])
    assert "interrupted by signal 15" in proc.err


# -- damaged checkpoints ----------------------------------------------------------------------------

def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(corpus, tmp_path, capsys):
    pretrain(corpus, tmp_path, "--max_steps", "3", "--save_interval", "1", "--keep_last", "2")
    kept = history_checkpoints(tmp_path / "pretrain")
    assert [p.name for p in kept] == ["step_00000003", "step_00000002"]
    # a truncated latest (the newest history entry shares its files: hard links)
    weights = tmp_path / "pretrain" / "model.safetensors"
    os.truncate(weights, 100)
    # and the leftovers of a killed save
    (tmp_path / "pretrain.tmp4242").mkdir()
    (tmp_path / "pretrain.tmp4242" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    resumed = pretrain(corpus, tmp_path, "--max_steps", "4", "--save_interval", "1", "--keep_last", "2",
                       "--from_resume", "1")
    out = capsys.readouterr().out
    assert "could not resume from" in out and "falling back to" in out and "step_00000002" in out
    assert "resumed from" in out and resumed.step == 4
    assert not (tmp_path / "pretrain.tmp4242").exists() and "removed" in out


def test_resume_refuses_what_would_change_the_run(corpus, tmp_path):
    pretrain(corpus, tmp_path, "--max_steps", "2")
    other = corpus.with_name("other.jsonl")
    other.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    for flags, words in ((["--data_path", str(other)], "--data_path"), (["--hidden_size", "128"], "hidden_size 64 -> 128")):
        r = subprocess.run(script(corpus, tmp_path, "--max_steps", "3", "--from_resume", "1", *flags),
                           capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 2 and "cannot resume" in r.stderr and words in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    # a changed learning rate is safe: resumed, with a warning naming it
    resumed = pretrain(corpus, tmp_path, "--max_steps", "3", "--from_resume", "1", "--learning_rate", "1e-3")
    assert resumed.step == 3


def test_a_rank_that_dies_ends_the_others_with_a_clear_line(corpus, tmp_path):
    proc = signal_one_rank(corpus, tmp_path, 29552, signal.SIGKILL, "--save_interval", "2")  # dies without a word
    assert proc.returncode != 0
    assert "another process of this run stopped" in proc.err and "--from_resume 1" in proc.err, proc.err[-3000:]
    assert load_trainer_state(tmp_path / "pretrain")["step"] >= 2  # the last save is intact and loads
