"""Real runs are not demo runs: held-out evaluation from the user's data (logged to TensorBoard beside
the training loss), no demo set leaking into a run on other data, and the vocabulary from the tokenizer."""
from pathlib import Path

import pytest
import torch

import train_dpo
import train_full_sft
import train_pretrain
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.evaluation import eval_loss
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--num_workers", "0", "--device", "cpu", "--use_compile", "0", "--log_interval", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    save_checkpoint(root / "base", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    lines = (ROOT / "dataset/demo/sft.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    (root / "held.jsonl").write_text("\n".join(lines[40:52]) + "\n", encoding="utf-8")
    pairs = (ROOT / "dataset/demo/dpo.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return root


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def test_eval_data_path_logs_the_heldout_loss_beside_the_training_loss(base):
    out = base / "out_eval"
    trainer = train_full_sft.main(["--init_from", str(base / "base"), "--data_path", str(base / "train.jsonl"),
                                   "--eval_data_path", str(base / "held.jsonl"), "--eval_interval", "2",
                                   "--save_dir", str(out), "--batch_size", "4", "--max_steps", "3", *QUIET])
    # every 2 steps and at the end
    assert [step for step, _ in trainer.eval_history] == [2, 3]
    # the held-out loss is the token mean over the held-out file's assistant targets, with the final weights
    model, tok = load_checkpoint(out / "full_sft")
    direct = eval_loss(model, tok, base / "held.jsonl", max_seq_len=256)
    assert trainer.eval_history[-1][1] == pytest.approx(direct["loss"], rel=1e-4)
    logged = scalars(out / "logs" / "full_sft", "eval/loss")
    assert logged == pytest.approx(dict(trainer.eval_history), rel=1e-6)
    assert set(scalars(out / "logs" / "full_sft", "train/loss")) == {1, 2, 3}


def test_eval_split_holds_rows_out_of_training(base, capsys):
    trainer = train_full_sft.main(["--init_from", str(base / "base"), "--data_path", str(base / "train.jsonl"),
                                   "--eval_split", "0.25", "--save_dir", str(base / "out_split"), "--batch_size", "4",
                                   "--max_steps", "2", "--use_tensorboard", "0", *QUIET])
    assert len(trainer.dataset) == 30 and trainer.eval_history  # 40 rows: 10 held out, evaluated at the end
    assert "10 held-out rows" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not both"):
        train_full_sft.main(["--init_from", str(base / "base"), "--data_path", str(base / "train.jsonl"),
                             "--eval_split", "0.25", "--eval_data_path", str(base / "held.jsonl"),
                             "--save_dir", str(base / "out_both"), *QUIET])


def test_own_data_gets_no_demo_heldout_set(base, capsys):
    """With the user's --data_path, the DPO stage scores nothing of the demo (it did before)."""
    common = ["--init_from", str(base / "base"), "--save_dir", str(base / "out_dpo"), "--batch_size", "4",
              "--max_steps", "1", "--use_tensorboard", "0", *QUIET]
    own = train_dpo.main(common + ["--data_path", str(base / "pairs.jsonl"), "--save_weight", "own"])
    assert not hasattr(own, "heldout_margins") and not own.eval_history
    assert "heldout" not in capsys.readouterr().out
    demo = train_dpo.main(common + ["--save_weight", "demo"])  # the demo data: the demo's held-out pairs
    assert demo.heldout_margins[0].shape == (64,)


def test_vocabulary_size_comes_from_the_tokenizer(tmp_path):
    corpus = tmp_path / "pre.jsonl"
    lines = (ROOT / "dataset/demo/pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--preset", "debug", "--data_path", str(corpus), "--max_seq_len", "32", "--batch_size", "4",
              "--max_steps", "1", "--use_tensorboard", "0", *QUIET]
    tok = Tokenizer.load()
    # the debug preset says 512, the shipped tokenizer has 2048 pieces: the tokenizer decides
    trainer = train_pretrain.main(common + ["--save_dir", str(tmp_path / "a")])
    assert trainer.model.config.vocab_size == tok.vocab_size == 2048
    # --vocab_size may pad it (e.g. to a multiple of 64) ...
    trainer = train_pretrain.main(common + ["--save_dir", str(tmp_path / "b"), "--vocab_size", "2112"])
    assert trainer.model.config.vocab_size == 2112
    # ... but never cut it
    with pytest.raises(ValueError, match="tokenizer has 2048 ids but --vocab_size 1000"):
        train_pretrain.main(common + ["--save_dir", str(tmp_path / "c"), "--vocab_size", "1000"])


def test_stage_help_is_grouped_and_shows_the_stage_defaults(capsys):
    with pytest.raises(SystemExit):
        train_dpo.main(["--help"])
    text = capsys.readouterr().out
    order = [text.index(f"\n{title}:") for title in ("data", "model", "optimisation", "checkpointing",
                                                     "evaluation", "DPO")]
    assert order == sorted(order)
    # the stage's own defaults, not the base config's (TrainConfig says 1e-3 and 16)
    def entry(flag):
        return text.split(f"\n  {flag} ")[1].split("\n  --")[0]
    assert "(default: 2e-05)" in entry("--learning_rate") and "Default: 0.1, or 2.0 for simpo" in entry("--beta")
    assert "(default: from the --init_from checkpoint)" in entry("--hidden_size")
