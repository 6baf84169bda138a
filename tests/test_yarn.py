"""YaRN: our RoPE tables and whole-model logits equal transformers' YaRN on the same config; imports and
exports carry it; MiniMind's --inference_rope_scaling switches it on."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the YaRN oracle (pip install -e .[dev])")

from minillm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from minillm.cli import use_yarn  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.errors import UserError  # noqa: E402
from minillm.export import export_model  # noqa: E402
from minillm.model import MiniLLM, rope_tables  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402

CASES = {  # (head_dim, theta, factor, original, attention_factor (0 = YaRN's), beta_fast, beta_slow)
    "paper": (64, 1e4, 4.0, 256, 0.0, 32.0, 1.0),
    "minimind": (96, 1e6, 16.0, 2048, 1.0, 32.0, 1.0),
    "odd_betas": (32, 5e5, 2.5, 512, 0.0, 16.0, 2.0),
}


def yarn_config(head_dim, theta, factor, original, attention, fast, slow, **extra):
    return ModelConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                       rope_theta=theta, rope_scaling="yarn", rope_factor=factor,
                       rope_original_max_position_embeddings=original, rope_attention_factor=attention,
                       rope_beta_fast=fast, rope_beta_slow=slow, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_rope_tables_equal_transformers_yarn(case):
    head_dim, theta, factor, original, attention, fast, slow = CASES[case]
    cfg = yarn_config(*CASES[case])
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
              "beta_fast": fast, "beta_slow": slow}
    if attention:
        params["attention_factor"] = attention
    hf_cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=original * int(factor), rope_parameters=params)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    length = 3 * original
    positions = torch.arange(length)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, length, 4 * head_dim), positions)
    cos, sin = rope_tables(head_dim, length, theta, cfg=cfg)
    torch.testing.assert_close(cos, hf_cos[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(sin, hf_sin[0], rtol=1e-5, atol=2e-5)
    plain_cos, _ = rope_tables(head_dim, length, theta)
    assert (cos - plain_cos).abs().max() > 1e-2  # YaRN really changed the tables


def test_exported_yarn_model_equals_transformers_beyond_the_original_context(tmp_path):
    tok = Tokenizer.load()
    torch.manual_seed(0)
    cfg = yarn_config(16, 1e4, 4.0, 32, 0.0, 32.0, 1.0, vocab_size=len(tok), num_hidden_layers=2,
                      max_position_embeddings=256, kernel_backend="torch")
    model = MiniLLM(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    reloaded, _ = load_checkpoint(tmp_path / "ckpt", with_tokenizer=False)
    assert reloaded.config.rope_scaling == "yarn" and reloaded.config.rope_factor == 4.0
    export_model(tmp_path / "ckpt", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert doc["rope_parameters"]["rope_type"] == "yarn" and doc["rope_parameters"]["factor"] == 4.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, len(tok), (1, 120), generator=torch.Generator().manual_seed(1))  # ~4x the original 32
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4
    # and the import of that transformers folder gives our YaRN config back
    from minillm.hf import config_from_hf
    back = config_from_hf(doc, "config.json")
    assert (back.rope_scaling, back.rope_factor, back.rope_original_max_position_embeddings) == ("yarn", 4.0, 32)


def test_inference_rope_scaling_switches_yarn_on_in_place():
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=512)).eval()
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        before = model(x)
    use_yarn(model, "4", trained=16)
    cfg = model.config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_position_embeddings) == ("yarn", 4.0, 16)
    fresh = MiniLLM(cfg)
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos[: model.rope_cos.shape[0]])
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-3
    use_yarn(model, True)  # MiniMind's fixed settings
    assert (cfg.rope_factor, cfg.rope_original_max_position_embeddings, cfg.rope_attention_factor) == (16.0, 2048, 1.0)
    with pytest.raises(UserError, match="give a factor"):
        use_yarn(model, "big")


def test_bad_yarn_settings_are_named():
    with pytest.raises(UserError, match="rope_factor=0.5 must be >= 1"):
        yarn_config(16, 1e4, 0.5, 32, 0.0, 32.0, 1.0)
    with pytest.raises(UserError, match="rope_beta_fast=1.0 must be > rope_beta_slow=2.0"):
        yarn_config(16, 1e4, 2.0, 32, 0.0, 1.0, 2.0)
    with pytest.raises(UserError, match="rope_scaling='ntk' must be none or yarn"):
        ModelConfig(rope_scaling="ntk")
