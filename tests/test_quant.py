"""NF4 (QLoRA): the round trip within the format's bound per block, exact for values that are levels, zero
and constant blocks without NaN, the byte layout, ~4.5 / ~4.127 bits a weight, a quantised forward close to
the full-precision one, LoRA and DoRA on an NF4 base (merge into full precision, unmerge back to the same
blocks), and train_lora.py --quantize nf4: the loss falls and the adapter folder holds no base weights."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import train_lora
from minillm.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.errors import UserError
from minillm.lora import (ADAPTER_WEIGHTS, LoRALinear, apply_lora, load_lora, lora_disabled, merge_lora, read_lora_config,
                          unmerge_lora)
from minillm.model import MiniLLM
from minillm.quant import (NF4_LEVELS, NF4Linear, dequantize_absmax, dequantize_nf4, nf4_error_bound, quantize_model,
                           quantize_nf4)
from minillm.tokenizer import Tokenizer

CFG = ModelConfig.preset("debug", kernel_backend="torch")
LEVELS = torch.tensor(NF4_LEVELS)


def test_the_bound_is_half_the_widest_gap():
    assert nf4_error_bound() == pytest.approx((1.0 - 0.6961928009986877) / 2)  # between -1 and the next level


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 64), (33, 70)])  # the second needs a zero-padded last block
def test_round_trip_within_the_bound_per_block(shape, double_quant):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)  # rows of different scale
    w[3, 5] = 40.0  # an outlier: only its own block gets a large absmax
    state = quantize_nf4(w, 64, double_quant)
    back = dequantize_nf4(state, shape)
    assert back.shape == w.shape and back.dtype == torch.float32
    flat = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64)
    err = torch.nn.functional.pad((back - w).reshape(-1).abs(), (0, (-w.numel()) % 64)).view(-1, 64)
    absmax = flat.abs().amax(dim=1)
    bound = nf4_error_bound() * absmax
    if double_quant:  # plus how far the 8-bit absmax is from the true one (half an int8 step of its block)
        scale_error = (dequantize_absmax(state) - absmax).abs()
        assert (scale_error <= state["absmax_scale"].repeat_interleave(256)[:absmax.numel()] / 254 + 1e-6).all()
        bound = bound + scale_error
    assert (err.amax(dim=1) <= bound * (1 + 1e-6) + 1e-7).all()
    # and it is the nearest level: no other level of the block's scale is closer to any value
    if not double_quant:
        candidates = LEVELS.view(1, 1, -1) * absmax.view(-1, 1, 1)
        nearest = (flat.unsqueeze(-1) - candidates).abs().amin(-1)
        torch.testing.assert_close(err, nearest, rtol=0, atol=1e-6)


def test_values_that_are_levels_come_back_exactly():
    g = torch.Generator().manual_seed(1)
    scales = torch.rand(6, 1, generator=g) * 3 + 0.1
    idx = torch.randint(0, 16, (6, 64), generator=g)
    idx[:, 0] = torch.tensor([0, 15, 0, 15, 0, 15])  # a +-1 level in each block, so its absmax is the scale
    w = LEVELS[idx] * scales
    state = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(state, w.shape), w)
    unpacked = torch.stack([state["codes"] >> 4, state["codes"] & 15], -1).view(6, 64)
    assert torch.equal(unpacked.long(), idx)


def test_byte_layout_first_value_in_the_high_nibble():
    w = torch.zeros(64)
    w[:4] = torch.tensor([-1.0, 1.0, 0.0, 0.44070982933044434])  # levels 0, 15, 7, 12
    state = quantize_nf4(w)
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == 32
    assert state["codes"][:2].tolist() == [0x0F, 0x7C] and state["absmax"].tolist() == [1.0]


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_and_constant_blocks(double_quant):
    w = torch.cat([torch.zeros(64), torch.full((64,), 0.37), torch.full((64,), -2.5), torch.randn(64)])
    back = dequantize_nf4(quantize_nf4(w, 64, double_quant), w.shape)
    assert back.isfinite().all()
    assert torch.equal(back[:64], torch.zeros(64))  # absmax 0: no 0/0
    if not double_quant:
        assert torch.equal(back[64:192], w[64:192])  # constant blocks are level +-1 times themselves
    else:
        torch.testing.assert_close(back[64:192], w[64:192], rtol=0, atol=3.0 / 254)


def test_quantize_model_reports_bits_per_weight():
    torch.manual_seed(0)
    model = MiniLLM(CFG)
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and ".layers." in n)
    embed = model.model.embed_tokens.weight.clone()
    report = quantize_model(model)
    assert report["n_layers"] == 7 * CFG.num_hidden_layers and report["n_weights"] == linear_weights
    assert report["bytes_before"] == 4 * linear_weights
    assert report["bits_per_weight"] == pytest.approx(4.5)  # 4 + 32/64 (the debug shapes fill whole blocks)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.model.embed_tokens.weight, embed)
    torch.manual_seed(0)
    report = quantize_model(MiniLLM(CFG), double_quant=True)
    assert 4.12 < report["bits_per_weight"] < 4.14  # 4 + 8/64 + 32/(64*256) + the few padded int8 blocks


def test_quantised_forward_is_close_and_backward_reaches_the_input():
    torch.manual_seed(0)
    model = MiniLLM(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    quantize_model(model)
    out = model(ids)
    assert not torch.equal(out, ref)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel  # 4-bit weights: close, not equal
    assert torch.equal(out.argmax(-1), ref.argmax(-1)) or (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, CFG.hidden_size, requires_grad=True)
    y = layer(x)
    w = layer.dequantize().requires_grad_(False)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-6, atol=1e-6)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)


def test_compiles_without_graph_breaks():
    """The trainer compiles on CUDA: the dequant-matmul (a custom autograd Function) must trace as one graph."""
    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(128, 96), double_quant=True)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 128, requires_grad=True)
    compiled(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    want = q(x)
    want.square().sum().backward()
    torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)


def test_a_dtype_cast_keeps_the_scales_and_changes_the_compute_dtype():
    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(64, 32), double_quant=True)
    want = q.dequantize(torch.float32)
    q.to(torch.bfloat16)
    assert q.absmax_scale.dtype == torch.float32 and q.absmax_offset.dtype == torch.float32
    assert q.codes.dtype == torch.uint8 and q.dequantize().dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float32), want)
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_autocast_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = NF4Linear(linear)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nn.functional.linear(x, q.dequantize(), linear.bias), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_on_an_nf4_base_merge_in_full_precision_and_unmerge_to_the_same_blocks(use_dora):
    torch.manual_seed(0)
    model = MiniLLM(CFG)
    quantize_model(model, double_quant=True)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    quantized_ref = model(ids)
    params = apply_lora(model, rank=4, alpha=8, use_dora=use_dora)
    torch.testing.assert_close(model(ids), quantized_ref, rtol=1e-5, atol=1e-5)  # fresh: the NF4 model
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base, NF4Linear) and q.lora_A.dtype == torch.float32
    if use_dora:  # the magnitude starts at the norm of the dequantised weight
        torch.testing.assert_close(q.lora_magnitude_vector, q.base.dequantize().norm(dim=1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # as training would leave it (a zero B gives A no gradient)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    want = model(ids)
    with lora_disabled(model):  # the reference (DPO) is the NF4 base
        assert torch.equal(model(ids), quantized_ref)
    codes = q.base.codes.clone()
    merge_lora(model)
    assert type(q.base) is nn.Linear and q.base.weight.dtype == torch.float32
    torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    assert isinstance(q.base, NF4Linear) and torch.equal(q.base.codes, codes)
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(UserError, match="--quantize"):
        quantize_model(MiniLLM(CFG), "int3")
    with pytest.raises(UserError, match="block size"):
        quantize_nf4(torch.randn(10), block_size=7)
    model = MiniLLM(CFG)
    apply_lora(model)
    with pytest.raises(UserError, match="before adding LoRA"):
        quantize_model(model)


def test_train_lora_nf4_loss_falls_and_saves_only_the_adapter(tmp_path):
    tok = Tokenizer.load()
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "full_sft", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    data = tmp_path / "lora_test.jsonl"
    rows = [[{"role": "user", "content": f"What treats disease {i}?"},
             {"role": "assistant", "content": f"Disease {i} is treated with drug {i}."}] for i in range(8)]
    data.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    common = ["--init_from", str(base), "--data_path", str(data), "--save_dir", str(tmp_path / "out"),
              "--batch_size", "8", "--num_workers", "0", "--use_tensorboard", "0", "--lora_rank", "8",
              "--log_interval", "1", "--warmup_steps", "0", "--learning_rate", "1e-2", "--quantize", "nf4"]
    trainer = train_lora.main(common + ["--lora_name", "qlora", "--max_steps", "8", "--epochs", "20"])
    assert trainer.history[-1] < trainer.history[0] - 0.4, trainer.history  # ~7.7 -> ~6.9 on this busy CPU
    folder = tmp_path / "out" / "qlora"
    assert (folder / ADAPTER_WEIGHTS).is_file() and not (folder / WEIGHTS).exists()
    keys = load_file(folder / ADAPTER_WEIGHTS)
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)  # no codes, scales or base weights
    recorded = read_lora_config(folder)["lora"]
    assert recorded["quantize"] == {"type": "nf4", "block_size": 64, "double_quant": False}
    # loading it quantises a fresh full-precision base the same way: the trained model comes back
    ids = torch.randint(0, tok.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    want = trainer.model(ids)
    fresh, _ = load_checkpoint(base, kernel_backend="torch")
    load_lora(fresh, folder)
    assert isinstance(fresh.model.layers[0].self_attn.q_proj.base, NF4Linear)
    torch.testing.assert_close(fresh.eval()(ids), want, rtol=1e-5, atol=1e-5)

    # resuming needs the same base: on NF4 it continues, on a full-precision base it is refused by name
    resumed = train_lora.main(common + ["--lora_name", "qlora", "--max_steps", "9", "--epochs", "20",
                                        "--from_resume", "1"])
    assert resumed.step == 9 and len(resumed.history) == 1
    with pytest.raises(UserError, match="same --use_dora / --quantize"):
        train_lora.main([a for a in common if a not in ("--quantize", "nf4")]
                        + ["--lora_name", "qlora", "--max_steps", "10", "--epochs", "20", "--from_resume", "1"])

    # DoRA on a double-quantised NF4 base: the magnitude trains and is saved, the base is not
    trainer = train_lora.main(common + ["--lora_name", "qdora", "--max_steps", "2", "--use_dora", "1",
                                        "--double_quant", "1"])
    keys = load_file(tmp_path / "out" / "qdora" / ADAPTER_WEIGHTS)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert read_lora_config(tmp_path / "out" / "qdora")["lora"]["quantize"]["double_quant"] is True
    assert trainer.history[-1] < trainer.history[0]
    with pytest.raises(UserError, match="--quantize nf4"):
        train_lora.main([a for a in common if a not in ("--quantize", "nf4")] + ["--double_quant", "1"])
    with pytest.raises(UserError, match="--quant_kernel triton is for a quantised base"):
        train_lora.main([a for a in common if a not in ("--quantize", "nf4")] + ["--quant_kernel", "triton"])


def test_merged_export_of_a_qlora_adapter_is_the_trained_function(tmp_path):
    """export --merge of an adapter trained on NF4: dequantise, merge, keep full precision; transformers then
    computes what the quantised model with its adapter did (layers without an adapter dequantised too)."""
    transformers = pytest.importorskip("transformers")
    from minillm.export import export_adapter
    from minillm.lora import save_lora
    tok = Tokenizer.load()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch")
    base = save_checkpoint(tmp_path / "base", MiniLLM(cfg), tok)
    torch.manual_seed(0)
    model = MiniLLM(cfg)
    quantize_model(model)
    apply_lora(model, rank=4, alpha=8, targets="q_proj,v_proj", use_dora=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    save_lora(tmp_path / "qlora", model, {"base": str(base)})
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(ids)
        export_adapter(tmp_path / "qlora", tmp_path / "merged", merge=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
        plain, _ = load_checkpoint(base, kernel_backend="torch")
        assert (plain(ids) - want).abs().max() > 1e-3  # not the full-precision base's logits


TRITON_CHECK = """
import torch
from minillm.quant import NF4Linear
for dtype, double_quant in ((torch.float32, False), (torch.float16, True)):
    torch.manual_seed(0)
    q = NF4Linear(torch.nn.Linear(80, 48), double_quant=double_quant).to(dtype)  # 80: rows straddle blocks
    x = torch.randn(2, 3, 80, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = q(xa)
    q.kernel = "triton"
    yb = q(xb)
    q.kernel = "torch"
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)
print("ok")
"""


def test_triton_kernel_equals_the_torch_path_in_the_interpreter():
    """The fused dequant-matmul (forward and input gradient) on tiny fp32 / fp16 shapes, run by Triton's CPU
    interpreter (no GPU here; bf16 tl.dot is wrong in the interpreter, so it is not tried)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=str(Path(__file__).parent.parent))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
