from pathlib import Path

import pytest

from minillm.config import ModelConfig, build_parser, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    model_cfg, train_cfg = resolve(build_parser("t").parse_args(["--config", str(path)]))
    assert model_cfg.hidden_size > 0 and train_cfg.batch_size > 0


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: minimind2-small\nmodel:\n  num_hidden_layers: 3\ntrain:\n  batch_size: 7\n  epochs: 5\n")
    args = build_parser("t", {"batch_size": 99, "max_seq_len": 64}).parse_args(
        ["--config", str(y), "--epochs", "2", "--use_moe", "1"])
    m, t = resolve(args, {"batch_size": 99, "max_seq_len": 64})
    assert (m.hidden_size, m.num_hidden_layers, m.use_moe) == (512, 3, True)  # preset, yaml, flag
    assert (t.batch_size, t.epochs, t.max_seq_len) == (7, 2, 64)  # yaml beats stage default, flag beats yaml


def test_fine_tuning_cannot_change_the_checkpoint_shape():
    base = ModelConfig.preset("debug")
    args = build_parser("t").parse_args(["--hidden_size", "128"])
    with pytest.raises(ValueError, match="cannot change the shape"):
        resolve(args, base_model=base)
    m, _ = resolve(build_parser("t").parse_args(["--kernel_backend", "torch"]), base_model=base)
    assert m.kernel_backend == "torch" and m.hidden_size == base.hidden_size


def test_bad_yaml_names_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        resolve(build_parser("t").parse_args(["--config", str(y)]))
