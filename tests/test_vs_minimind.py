"""benchmarks/vs_minimind.py: the timing read off MiniMind's log lines and the paired ratios in its table."""
import importlib.util
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("vs_minimind", ROOT / "benchmarks" / "vs_minimind.py")
vs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vs)


def test_minimind_tokens_per_second_come_from_its_log_lines_between_step_w_and_w_plus_s(tmp_path):
    """A stand-in train_pretrain.py that logs MiniMind's line every 10 steps, 0.05 s apart after a slow
    start: the rate is read between the step-10 and step-30 lines, not from the start of the process."""
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / "train_pretrain.py").write_text(textwrap.dedent("""
        import sys, time
        assert "--max_seq_len" in sys.argv and sys.argv[sys.argv.index("--hidden_size") + 1] == "512"
        time.sleep(0.5)  # start-up and warm-up: outside the timed window
        for step in range(10, 1000, 10):
            print(f"Epoch:[1/1]({step}/1000), loss: 5.0000, logits_loss: 5.0000, aux_loss: 0.0000, lr: 0.0005")
            time.sleep(0.05)
    """))
    args = SimpleNamespace(minimind_dir=str(tmp_path), batch_size=8, seq_len=256, hidden_size=512,
                           num_hidden_layers=8, warmup=10, steps=20)
    tok_s = vs.minimind_run(args, str(tmp_path / "data.jsonl"))
    expected = 20 * 8 * 256 / 0.10  # two 0.05 s gaps between the step-10 and step-30 lines
    assert expected * 0.6 < tok_s < expected * 1.05


def test_a_minimind_run_that_dies_early_is_an_error_naming_the_step(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "train_pretrain.py").write_text("print('Traceback: no datasets module')\n")
    args = SimpleNamespace(minimind_dir=str(tmp_path), batch_size=8, seq_len=256, hidden_size=512,
                           num_hidden_layers=8, warmup=10, steps=20)
    with pytest.raises(SystemExit, match="stopped before step 30:\nTraceback: no datasets module"):
        vs.minimind_run(args, "data.jsonl")


def test_ratios_are_paired_per_round_and_scaled_by_what_a_position_carries():
    results = {"minimind": [100.0, 200.0, 100.0], "float32": [110.0, 200.0, 130.0]}
    per_position = {"minimind": (0.25, 1.0), "ours": (1.0, 4.0)}
    rows = vs.table(results, per_position)
    # per round 1.10, 1.00, 1.30 -> median 1.10 (the ratio of medians would say 1.30)
    mm, ours = rows[2].split(" | "), rows[3].split(" | ")
    assert mm[4:] == ["100", "1.00x", "25", "1.00x", "100", "1.00x |"]
    assert ours[4:] == ["130", "1.10x", "130", "4.40x", "520", "4.40x |"]
