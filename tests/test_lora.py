"""Hand-written LoRA: a fresh adapter changes nothing, only adapters learn, merge/unmerge and
save/load are exact, the reference (adapters off) is the base, and train_lora.py saves only the adapter."""
import json
import math

import pytest
import torch

import train_lora
from minillm.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, load_lora, lora_disabled,
                          lora_state_dict, merge_lora, save_lora, unmerge_lora)
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

CFG = ModelConfig.preset("debug", kernel_backend="torch")


def base_model(seed=0):
    torch.manual_seed(seed)
    return MiniLLM(CFG)


def trained_adapter(model, seed=1):
    """Give the adapters non-zero B, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_leaves_logits_unchanged_and_targets_every_projection(ids):
    model = base_model()
    ref = model(ids)
    params = apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(ids), ref)  # B starts at zero
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * CFG.num_hidden_layers  # attention and MLP projections, not only square ones
    assert len(params) == 2 * len(wrapped)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (4, CFG.hidden_size) and q.lora_B.shape == (CFG.hidden_size, 4)
    bound = 1 / math.sqrt(CFG.hidden_size)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert q.lora_A.abs().max() <= bound and q.lora_A.std() > bound / 4 and q.lora_B.eq(0).all()


def test_only_adapter_parameters_get_gradients(ids):
    model = base_model()
    params = apply_lora(model, rank=4, alpha=8)
    trained_adapter(model)
    model(ids, labels=ids).loss.backward()
    ids_of_params = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in ids_of_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_scaling_and_rslora():
    m = base_model()
    apply_lora(m, rank=4, alpha=16)
    assert m.model.layers[0].self_attn.q_proj.scaling == 4.0
    m = base_model()
    apply_lora(m, rank=4, alpha=16, rslora=True)
    assert m.model.layers[0].self_attn.q_proj.scaling == 8.0  # alpha / sqrt(r)


def test_merge_equals_adapter_and_unmerge_restores(ids):
    plain = base_model()
    plain_keys = list(plain.state_dict())
    base_w = plain.model.layers[1].mlp.down_proj.weight.clone()
    model = base_model()
    apply_lora(model, rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
    trained_adapter(model)
    with_adapter = model(ids)
    assert not torch.allclose(with_adapter, plain(ids))
    merge_lora(model)
    torch.testing.assert_close(model(ids), with_adapter, rtol=1e-5, atol=1e-5)
    # a merged model's state_dict is a plain model's: loads into MiniLLM and exports as Llama names
    assert list(model.state_dict()) == plain_keys
    fresh = MiniLLM(CFG)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids), with_adapter, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, base_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), with_adapter, rtol=1e-5, atol=1e-5)
    with lora_disabled(model):
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-6)
    assert model.model.layers[1].mlp.down_proj.enabled  # back on after the block


def test_lora_disabled_is_the_base_model(ids):
    model = base_model()
    ref = model(ids)
    apply_lora(model)
    trained_adapter(model)
    with lora_disabled(model):
        assert torch.equal(model(ids), ref)
    assert not torch.equal(model(ids), ref)


def test_save_load_round_trip(tmp_path, ids):
    model = base_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "up_proj"), rslora=True)
    trained_adapter(model)
    want = model(ids)
    save_lora(tmp_path / "adapter", model, {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert set(lora_state_dict(model)) == {f"model.layers.{i}.{m}.{p}" for i in range(CFG.num_hidden_layers)
                                           for m in ("self_attn.q_proj", "mlp.up_proj") for p in ("lora_A", "lora_B")}
    other = load_lora(base_model(), tmp_path / "adapter")  # same base, adapters applied from the config
    assert torch.equal(other(ids), want)
    q = other.model.layers[0].self_attn.q_proj
    assert (q.r, q.alpha, q.rslora) == (4, 8, True)

    wider = MiniLLM(ModelConfig.preset("debug", kernel_backend="torch", hidden_size=128))
    with pytest.raises(ValueError, match="another shape"):
        load_lora(wider, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_lora(base_model(), tmp_path / "missing")


def test_no_matching_module_is_a_clear_error():
    with pytest.raises(ValueError, match="no nn.Linear module matches.*q_proj"):
        apply_lora(base_model(), targets=("qkv",))


def test_train_lora_saves_only_the_adapter_and_resumes(tmp_path):
    tok = Tokenizer.load()
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "full_sft", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    data = tmp_path / "lora_test.jsonl"
    rows = [[{"role": "user", "content": f"What treats disease {i}?"},
             {"role": "assistant", "content": f"Disease {i} is treated with drug {i}."}] for i in range(16)]
    data.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    common = ["--init_from", str(base), "--data_path", str(data), "--save_dir", str(tmp_path / "out"),
              "--lora_name", "lora_test", "--batch_size", "4", "--num_workers", "0", "--use_tensorboard", "0",
              "--lora_rank", "4", "--log_interval", "1"]
    trainer = train_lora.main(common + ["--max_steps", "2"])
    folder = tmp_path / "out" / "lora_test"
    assert (folder / ADAPTER_WEIGHTS).is_file() and not (folder / WEIGHTS).exists()
    # the base did not move: only adapters were in the optimizer
    before, _ = load_checkpoint(base)
    for name, p in before.named_parameters():
        assert torch.equal(trainer.model.get_parameter(name.replace("_proj.weight", "_proj.base.weight")), p), name
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}

    resumed = train_lora.main(common + ["--max_steps", "3", "--from_resume", "1"])
    assert resumed.step == 3 and len(resumed.history) == 1  # continued from step 2
