"""DoRA against PEFT's DoraLinearLayer on the same weights (outputs, gradients, dropout, merge), a fresh
DoRA adapter changing nothing, merge / unmerge restoring W, and save / load keeping the magnitude."""
import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from minillm.config import ModelConfig
from minillm.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, load_lora, merge_lora,
                          read_lora_config, save_lora, unmerge_lora)
from minillm.model import MiniLLM

CFG = ModelConfig.preset("debug", kernel_backend="torch")
TARGETS = ["q_proj", "down_proj"]


class Tiny(nn.Module):
    """Two projections, one with a bias (DoRA scales W x, not the bias)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 24, bias=True)
        self.down_proj = nn.Linear(24, 12, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x)))


def pair(dropout=0.0, rslora=False):
    """(PEFT's DoRA model, ours) over the same base weights, with the same trained-looking A, B and m."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=True,
                             use_rslora=rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = copy.deepcopy(base)
    apply_lora(ours, rank=4, alpha=8, dropout=dropout, targets=TARGETS, rslora=rslora, use_dora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in TARGETS:
            mine, peft_layer = getattr(ours, name), getattr(theirs.base_model.model, name)
            # the fresh magnitude is ||W|| per output row in both
            torch.testing.assert_close(mine.lora_magnitude_vector,
                                       peft_layer.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
            for p, value in (("lora_A", torch.randn(mine.lora_A.shape, generator=g) * 0.3),
                             ("lora_B", torch.randn(mine.lora_B.shape, generator=g) * 0.3)):
                getattr(mine, p).copy_(value)
                getattr(peft_layer, p)["default"].weight.copy_(value)
            m = mine.lora_magnitude_vector * (1 + 0.2 * torch.randn(mine.out_features, generator=g))
            mine.lora_magnitude_vector.copy_(m)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(m)
    return theirs, ours


def adapter_grads(model, peft_names: bool):
    grads = {}
    for name in TARGETS:
        layer = getattr(model.base_model.model if peft_names else model, name)
        if peft_names:
            tensors = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       layer.lora_magnitude_vector["default"].weight)
        else:
            tensors = (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
        for key, t in zip(("A", "B", "m"), tensors):
            grads[f"{name}.{key}"] = t.grad
    return grads


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_equal_peft(rslora):
    theirs, ours = pair(rslora=rslora)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_theirs, out_ours = theirs(xa), ours(xb)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    with theirs.disable_adapter():
        assert (out_ours - theirs(x)).abs().max() > 1e-2  # a real change from the base: DoRA is not off
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(3))
    (out_theirs * weights).sum().backward()
    (out_ours * weights).sum().backward()
    g_theirs, g_ours = adapter_grads(theirs, True), adapter_grads(ours, False)
    for key in g_theirs:
        assert g_ours[key] is not None and g_ours[key].abs().sum() > 0, key
        torch.testing.assert_close(g_ours[key], g_theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)


def test_the_norm_is_detached_as_in_the_paper():
    """With the norm detached, dL/dm = sum over the batch of (out_lora_free / norm) * upstream: check m's gradient
    against that hand formula on one layer (a non-detached norm would add a term)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5, bias=False), rank=2, alpha=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    w = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    norm = w.norm(dim=1)
    want = (x @ w.t() / norm).sum(0)  # d/dm of sum(m * (W' x) / n)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, want.detach(), rtol=1e-5, atol=1e-6)
    # and dL/dB: through the numerator only, scaled by m / n
    want_b = ((layer.lora_magnitude_vector / norm).view(1, -1) * torch.ones(3, 5)).t() @ (x @ layer.lora_A.t())
    torch.testing.assert_close(layer.lora_B.grad, (want_b * layer.scaling).detach(), rtol=1e-5, atol=1e-6)


def test_dropout_in_training_equals_peft():
    theirs, ours = pair(dropout=0.3)
    theirs.train(), ours.train()
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    out_theirs = theirs(x)
    torch.manual_seed(5)
    out_ours = ours(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    assert not torch.allclose(ours(x), out_ours)  # dropout is on: another seed, another output
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_merge_equals_peft_and_unmerge_restores():
    theirs, ours = pair()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    before = {name: getattr(ours, name).base.weight.clone() for name in TARGETS}
    want = ours(x)
    theirs.merge_adapter()
    merge_lora(ours)
    for name in TARGETS:
        torch.testing.assert_close(getattr(ours, name).base.weight,
                                   getattr(theirs.base_model.model, name).base_layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    unmerge_lora(ours)
    for name in TARGETS:
        torch.testing.assert_close(getattr(ours, name).base.weight, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)


def test_fresh_dora_changes_nothing_and_trains_the_magnitude():
    torch.manual_seed(0)
    model = MiniLLM(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    params = apply_lora(model, rank=4, alpha=8, use_dora=True)
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)  # m = ||W||, B = 0: W' = W
    n_wrapped = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert len(params) == 3 * n_wrapped
    model(ids, labels=ids).loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_magnitude_vector.grad.abs().sum() > 0 and q.lora_magnitude_vector.shape == (CFG.hidden_size,)


def test_save_load_keeps_the_magnitude(tmp_path):
    torch.manual_seed(0)
    model = MiniLLM(CFG)
    apply_lora(model, rank=4, alpha=8, targets="q_proj,up_proj", use_dora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.out_features, generator=g))
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    want = model(ids)
    save_lora(tmp_path / "dora", model)
    assert sorted(p.name for p in (tmp_path / "dora").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert read_lora_config(tmp_path / "dora")["lora"]["use_dora"] is True
    keys = set(load_file(tmp_path / "dora" / ADAPTER_WEIGHTS))
    assert {k.rsplit(".", 1)[1] for k in keys} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    torch.manual_seed(0)
    other = load_lora(MiniLLM(CFG), tmp_path / "dora")
    assert other.model.layers[1].mlp.up_proj.use_dora
    assert torch.equal(other(ids), want)
    # a merged DoRA model's state_dict is a plain model's
    merge_lora(other)
    plain = MiniLLM(CFG)
    plain.load_state_dict(other.state_dict())
    torch.testing.assert_close(plain(ids), want, rtol=1e-5, atol=1e-5)
