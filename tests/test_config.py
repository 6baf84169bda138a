import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from minillm.config import (TRAIN_GROUPS, ModelConfig, TrainConfig, build_parser, coerce, parse_set, resolve,
                            stage_group)

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


# -- typed values (coerce), --set, --help -------------------------------------------------------
def _write(tmp_path, text):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    return y


def test_set_gives_typed_model_values():
    m, _ = resolve(build_parser("t").parse_args(
        ["--set", "rms_norm_eps=1e-6", "--set", "qk_norm=yes", "--set", "num_hidden_layers=3.0"]))
    assert type(m.rms_norm_eps) is float and m.rms_norm_eps == 1e-6
    assert m.qk_norm is True and m.num_hidden_layers == 3 and type(m.num_hidden_layers) is int
    assert m.hidden_size == 256  # the demo preset underneath


def test_yaml_1_1_exponent_strings_become_floats(tmp_path):
    y = _write(tmp_path, "model:\n  rms_norm_eps: 1e-6\ntrain:\n  learning_rate: 5e-4\n  epochs: 2.0\n")
    m, t = resolve(build_parser("t").parse_args(["--config", str(y)]))
    assert type(m.rms_norm_eps) is float and m.rms_norm_eps == 1e-6
    assert type(t.learning_rate) is float and t.learning_rate == 5e-4
    assert type(t.epochs) is int and t.epochs == 2


def test_bad_values_name_the_field_and_the_source(tmp_path, capsys):
    with pytest.raises(ValueError,
                       match=r"--set num_hidden_layers=abc: num_hidden_layers expects an integer, got 'abc'"):
        resolve(argparse.Namespace(set=["num_hidden_layers=abc"]))
    with pytest.raises(SystemExit):  # at the command line argparse reports it before anything runs
        build_parser("t").parse_args(["--set", "num_hidden_layers=abc"])
    err = capsys.readouterr().err
    assert "--set" in err and "num_hidden_layers" in err and "'abc'" in err
    y = _write(tmp_path, "train:\n  epochs: two\n")
    with pytest.raises(ValueError, match=r"c\.yaml \[train\]: epochs expects an integer, got 'two'"):
        resolve(build_parser("t").parse_args(["--config", str(y)]))
    with pytest.raises(ValueError, match=r"ckpt/config\.yaml \[model\]: hidden_size expects an integer, got 2\.5"):
        ModelConfig.from_dict({"hidden_size": 2.5}, where="ckpt/config.yaml [model]")
    with pytest.raises(ValueError, match="--set noequals: expected FIELD=VALUE"):
        parse_set(["noequals"])
    with pytest.raises(SystemExit):
        build_parser("t").parse_args(["--epochs", "2.5"])


@pytest.mark.parametrize("cls,name,value,expected", [
    (ModelConfig, "rms_norm_eps", "1e-6", 1e-6), (ModelConfig, "rope_theta", 10000, 10000.0),
    (ModelConfig, "use_moe", "false", False), (ModelConfig, "use_moe", "1", True), (ModelConfig, "qk_norm", 0, False),
    (ModelConfig, "hidden_size", "64", 64), (ModelConfig, "hidden_size", 64.0, 64),
    (ModelConfig, "hidden_size", "1e3", 1000), (TrainConfig, "from_resume", True, 1),
    (TrainConfig, "save_weight", 7, "7"), (TrainConfig, "device", "cpu", "cpu"),
])
def test_coerce_accepts(cls, name, value, expected):
    out = coerce(cls, name, value, "here")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("cls,name,value", [
    (ModelConfig, "hidden_size", "abc"), (ModelConfig, "hidden_size", 2.5), (ModelConfig, "hidden_size", None),
    (ModelConfig, "use_moe", "maybe"), (ModelConfig, "use_moe", 2), (ModelConfig, "rms_norm_eps", "small"),
    (ModelConfig, "rope_theta", True), (ModelConfig, "rope_theta", "nan"), (ModelConfig, "kernel_backend", False),
])
def test_coerce_rejects(cls, name, value):
    with pytest.raises(ValueError, match=f"^here: {name} expects"):
        coerce(cls, name, value, "here")


def test_unknown_fields_suggest_the_closest_name(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'rms_norm_eps'"):
        parse_set(["rms_norm_ep=1e-6"])
    with pytest.raises(ValueError, match="batch_size is a train setting.*use --batch_size 3"):
        parse_set(["batch_size=3"])
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 3})
    y = _write(tmp_path, "train:\n  batch_sise: 3\n")
    with pytest.raises(ValueError, match=r"c\.yaml \[train\]: unknown train config field 'batch_sise' "
                                         r"\(did you mean 'batch_size'\?\)"):
        resolve(build_parser("t").parse_args(["--config", str(y)]))
    y = _write(tmp_path, "train:\n  hidden_size: 3\n")
    with pytest.raises(ValueError, match="it is a model field"):
        resolve(build_parser("t").parse_args(["--config", str(y)]))


def test_set_and_flags_precedence_and_clash(tmp_path):
    y = _write(tmp_path, "model:\n  rms_norm_eps: 1e-4\n  num_hidden_layers: 6\n")
    m, _ = resolve(build_parser("t").parse_args(
        ["--config", str(y), "--set", "rms_norm_eps=1e-6", "--set", "rms_norm_eps=1e-7", "--num_hidden_layers", "2"]))
    assert (m.rms_norm_eps, m.num_hidden_layers) == (1e-7, 2)  # --set beats yaml, the last --set wins
    with pytest.raises(ValueError, match="disagree"):
        resolve(build_parser("t").parse_args(["--hidden_size", "128", "--set", "hidden_size=64"]))


def test_fine_tuning_refuses_shape_changes_from_set():
    base = ModelConfig.preset("debug")
    args = build_parser("t").parse_args(["--set", "num_hidden_layers=3"])
    with pytest.raises(ValueError,
                       match=r"cannot change the shape.*num_hidden_layers 2 -> 3 \(--set num_hidden_layers\)"):
        resolve(args, base_model=base)
    m, _ = resolve(build_parser("t").parse_args(["--set", "kernel_backend=torch", "--set", "rms_norm_eps=1e-5"]),
                   base_model=base)  # the backend may differ; a value equal to the checkpoint's is no change
    assert m.kernel_backend == "torch" and m.num_hidden_layers == base.num_hidden_layers


def _option_help(text: str, flag: str) -> str:
    """The help of one option, whitespace-normalised (argparse wraps lines)."""
    start = text.index(f"\n  {flag} ") + 1  # an option's own line: two spaces, then the flag
    end = text.find("\n  -", start)
    return " ".join(text[start:end if end > 0 else None].split())


def test_help_shows_the_defaults_that_apply_grouped():
    parser = build_parser("Stage X.\n\n    python train_x.py --flag   # kept as written\n", {"batch_size": 4})
    stage_group(parser, "stage x").add_argument("--beta", type=float, default=0.1, help="a stage flag")
    text = parser.format_help()
    assert "\n    python train_x.py --flag   # kept as written\n" in text
    assert _option_help(text, "--batch_size").endswith("(default: 4)")
    assert _option_help(text, "--hidden_size").endswith("(default: 256)")  # the demo preset's, not ModelConfig's 512
    assert _option_help(text, "--preset").endswith("(default: demo)")
    assert _option_help(text, "--epochs").endswith("(default: 1)")
    assert _option_help(text, "--beta").endswith("(default: 0.1)")
    assert "==SUPPRESS==" not in text
    titles = ["data", "model", "optimisation", "hardware", "checkpointing", "logging", "stage x"]
    where = [text.index(f"\n{t}:\n") for t in titles]
    assert where == sorted(where)
    # a stage that starts from a checkpoint says so instead of a preset's shape
    text = build_parser("t", {"init_from": "out/pretrain", "batch_size": 4}).format_help()
    assert _option_help(text, "--hidden_size").endswith("(default: from the --init_from checkpoint)")
    assert _option_help(text, "--init_from").endswith("(default: out/pretrain)")


def test_every_train_field_has_one_help_group():
    placed = [name for names in TRAIN_GROUPS.values() for name in names]
    assert sorted(placed) == sorted(f.name for f in fields(TrainConfig))
