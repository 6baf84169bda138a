"""Import (issue 15): transformers folders (Llama, Qwen2, Qwen3, Qwen3-MoE), MiniMind's own
checkpoints and HF tokenizer.json files load as minillm models with the logits transformers computes;
unsupported features are refused by name; an imported model fine-tunes and evaluates."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from minillm import hf  # noqa: E402
from minillm.checkpoint import load_checkpoint, load_config, save_checkpoint  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.errors import UserError  # noqa: E402
from minillm.model import MiniLLM  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def build_tokenizer(folder: Path, template: str | None = CHATML):
    """A byte-level BPE tokenizer.json with the ChatML specials and a tokenizer_config.json."""
    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["hello world, the capital of Dakaia is Tago.", "What is 36 + 20? 36 + 20 = 56.", "你好，世界"] * 20
    tk.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tk


def save_hf(folder: Path, config_cls, model_cls, seed=0, **kw):
    torch.manual_seed(seed)
    config = config_cls(**{**SMALL, **kw})
    model = model_cls(config).float().eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm placement shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    return model


def max_diff(hf_model, folder):
    ours, _ = load_checkpoint(folder, kernel_backend="torch", with_tokenizer=False)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours.eval()(ids) - hf_model(ids).logits).abs().max().item(), ours


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama-untied-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12, tie_word_embeddings=True)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "qwen3-moe-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(name, tmp_path):
    conf, cls, kw = ARCHS[name]
    hf_model = save_hf(tmp_path, getattr(transformers, conf), getattr(transformers, cls), **kw)
    diff, ours = max_diff(hf_model, tmp_path)
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5
    if name == "qwen2":
        assert ours.config.attention_bias and ours.model.layers[0].self_attn.q_proj.bias is not None
    if name.startswith("qwen3-moe"):
        assert ours.config.use_moe and ours.config.n_shared_experts == 0


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf_model = save_hf(tmp_path / "sharded", transformers.Qwen3Config, transformers.Qwen3ForCausalLM)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert max_diff(hf_model, tmp_path / "sharded")[0] <= 1e-5
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "sharded" / "config.json").read_bytes())
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert max_diff(hf_model, tmp_path / "bin")[0] <= 1e-5


def test_fused_moe_experts_split_per_expert(tmp_path):
    """transformers 5 keeps a Qwen3-MoE layer's experts as two 3D tensors in memory (gate_up_proj,
    down_proj); a state dict saved from it loads split per expert."""
    hf_model = save_hf(tmp_path, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    state = hf_model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert max_diff(hf_model, tmp_path)[0] <= 1e-5


REFUSED = {
    "rope_parameters.rope_type": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "factor": 4.0,
                                                                       "rope_theta": 1e4, "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 64})),
    "use_sliding_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "mlp_bias": ("LlamaConfig", dict(mlp_bias=True)),
    "attention_bias": ("LlamaConfig", dict(attention_bias=True)),
    "hidden_act": ("LlamaConfig", dict(hidden_act="gelu")),
    "decoder_sparse_step": ("Qwen3MoeConfig", dict(decoder_sparse_step=2, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16)),
    "shared_expert_intermediate_size": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=24)),
}


@pytest.mark.parametrize("feature", list(REFUSED))
def test_unsupported_features_are_refused_by_name(feature, tmp_path):
    conf, kw = REFUSED[feature]
    config = getattr(transformers, conf)(**{**SMALL, **kw})
    config.architectures = [conf.replace("Config", "ForCausalLM")]
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(UserError, match=feature):
        load_checkpoint(tmp_path)


def test_qwen2_moe_imports_exactly_when_its_shared_expert_gate_is_zero(tmp_path):
    """Qwen2-MoE gates its shared expert by sigmoid(shared_expert_gate(x)): a zero gate (minillm's own
    export writes one) is a constant 0.5, and the expert splits into ungated minillm shared experts."""
    kw = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    hf_model = save_hf(tmp_path / "gated", transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, **kw)
    with pytest.raises(UserError, match="shared_expert_gate.weight is not zero"):
        load_checkpoint(tmp_path / "gated", with_tokenizer=False)
    for layer in hf_model.model.layers:
        torch.nn.init.zeros_(layer.mlp.shared_expert_gate.weight)
    hf_model.save_pretrained(tmp_path / "zero")
    diff, ours = max_diff(hf_model, tmp_path / "zero")
    print(f"qwen2-moe (zero shared gate): max |logit diff| {diff:.2e}")
    assert diff <= 1e-5 and ours.config.n_shared_experts == 2 and ours.config.attention_bias


def test_old_style_rope_scaling_and_other_architectures_refused():
    d = {"architectures": ["LlamaForCausalLM"], **SMALL, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(UserError, match="rope_scaling.rope_type"):
        hf.config_from_hf(d, "c")
    with pytest.raises(UserError, match="MistralForCausalLM is not supported.*Qwen3ForCausalLM"):
        hf.config_from_hf({**d, "architectures": ["MistralForCausalLM"]}, "c")
    with pytest.raises(UserError, match="v1"):
        hf.config_from_minimind({}, "m", ["tok_embeddings.weight"])
    cfg = hf.config_from_hf({**SMALL, "architectures": ["Qwen2ForCausalLM"], "rope_theta": 5e5}, "c")
    assert cfg.rope_theta == 5e5 and cfg.attention_bias and not cfg.tie_word_embeddings


def test_unexpected_or_missing_tensors_are_named(tmp_path):
    hf_model = save_hf(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    del state["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"o_proj\.bias.*layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(tmp_path, with_tokenizer=False)


def test_hf_tokenizer_api_chatml_mask_and_save_roundtrip(tmp_path):
    build_tokenizer(tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    assert isinstance(tok, hf.HFTokenizer)
    assert tok.id_to_piece(tok.im_start_id) == "<|im_start|>" and tok.id_to_piece(tok.eos_id) == "<|endoftext|>"
    assert [tok.id_to_piece(i) for i in tok.think_tag_ids] == ["<think>", "</think>"]
    assert tok.stop_ids == [tok.im_end_id, tok.eos_id]
    text = "hello 你好 <|im_end|> world"
    assert tok.decode(tok.encode(text)) == text and tok.encode("<|im_end|>") == [tok.im_end_id]
    assert tok.decode(tok.encode(text), skip_special=True) == "hello 你好  world"
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]
    ids, mask = tok.render_chat(msgs)
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.decode(ids) == ref.apply_chat_template(msgs, chat_template=CHATML, tokenize=False)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("hello world") + [tok.im_end_id]
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert again.fingerprint == tok.fingerprint and again.render_chat(msgs) == (ids, mask)


def test_non_chatml_template_refuses_chat_but_encodes(tmp_path):
    build_tokenizer(tmp_path, template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.encode("hello")
    with pytest.raises(UserError, match="not ChatML; minillm renders ChatML"):
        tok.render_prompt("hi")


def test_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    build_tokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="pip install tokenizers"):
        Tokenizer.load(tmp_path)


def test_training_path_never_imports_transformers():
    code = ("import sys, minillm, minillm.hf, minillm.trainer, minillm.checkpoint; "
            "bad = [m for m in ('transformers', 'peft', 'tokenizers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def write_sft(path):
    rows = [{"conversations": [{"role": "user", "content": "What is 36 + 20?"},
                               {"role": "assistant", "content": "36 + 20 = 56."}]},
            {"conversations": [{"role": "user", "content": "hello"},
                               {"role": "assistant", "content": "hello world, the capital of Dakaia is Tago."}]}] * 4
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_from_an_hf_folder_then_eval(tmp_path):
    folder = tmp_path / "qwen3"
    save_hf(folder, transformers.Qwen3Config, transformers.Qwen3ForCausalLM, tie_word_embeddings=True)
    build_tokenizer(folder)
    r = subprocess.run([sys.executable, str(ROOT / "train_full_sft.py"), "--init_from", str(folder),
                        "--data_path", str(write_sft(tmp_path / "sft.jsonl")), "--save_dir", str(tmp_path / "out"),
                        "--max_steps", "2", "--batch_size", "2", "--max_seq_len", "64", "--device", "cpu",
                        "--num_workers", "0", "--log_interval", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    saved = tmp_path / "out" / "full_sft"
    assert (saved / "tokenizer.json").is_file() and (saved / "tokenizer_config.json").is_file()
    model, tok = load_checkpoint(saved)
    assert isinstance(tok, hf.HFTokenizer) and model.config.qk_norm and model.config.vocab_size == VOCAB
    assert load_config(saved)[0] == model.config
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--checkpoint", str(saved), "--device", "cpu",
                        "--max_new_tokens", "4", "--heldout", "none", "--temperature", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


# ---- MiniMind ----------------------------------------------------------------------------------
def minimind_state(cfg: ModelConfig, seed=0):
    """A MiniMind-layout state dict (its model/model_minimind.py names, with the tied lm_head
    stored as torch's state_dict does), random weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    names = MiniLLM(cfg).state_dict()
    state = {k: torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("norm.weight") else 0.0)
             for k, v in names.items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return {k: v.half() for k, v in state.items()}  # MiniMind saves .half()


def minimind_reference(state, cfg: ModelConfig, ids, current: bool):
    """MiniMind's forward written out from its model_minimind.py (fp32, no cache)."""
    s = {k: v.float() for k, v in state.items()}
    eps = cfg.rms_norm_eps

    def norm(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))

    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)

    def ffn(p, x):
        return torch.nn.functional.linear(torch.nn.functional.silu(x @ s[p + "gate_proj.weight"].T)
                                          * (x @ s[p + "up_proj.weight"].T), s[p + "down_proj.weight"])

    B, T = ids.shape
    d, H, KV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    f = torch.outer(torch.arange(T).float(), freqs)
    cos, sin = torch.cat([f.cos(), f.cos()], -1)[:, None], torch.cat([f.sin(), f.sin()], -1)[:, None]
    h = s["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, s[p + "input_layernorm.weight"])
        q = (x @ s[p + "self_attn.q_proj.weight"].T).view(B, T, H, d)
        k = (x @ s[p + "self_attn.k_proj.weight"].T).view(B, T, KV, d)
        v = (x @ s[p + "self_attn.v_proj.weight"].T).view(B, T, KV, d)
        if current:
            q, k = norm(q, s[p + "self_attn.q_norm.weight"]), norm(k, s[p + "self_attn.k_norm.weight"])
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), is_causal=True)
        h = h + a.transpose(1, 2).reshape(B, T, -1) @ s[p + "self_attn.o_proj.weight"].T
        x = norm(h, s[p + "post_attention_layernorm.weight"])
        if not cfg.use_moe:
            h = h + ffn(p + "mlp.", x)
            continue
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.softmax(flat @ s[p + "mlp.gate.weight"].T, -1)
        w, idx = scores.topk(cfg.num_experts_per_tok, -1, sorted=False)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(flat)
        for e in range(cfg.n_routed_experts):
            m = idx == e
            rows = m.any(-1).nonzero().flatten()
            if len(rows):
                y.index_add_(0, rows, ffn(f"{p}mlp.experts.{e}.", flat[rows]) * w[m].view(-1, 1))
        for e in range(cfg.n_shared_experts):
            y = y + ffn(f"{p}mlp.shared_experts.{e}.", flat)
        h = h + y.view_as(h)
    return norm(h, s["model.norm.weight"]) @ s["lm_head.weight"].T


MINIMIND = {  # what the loader must infer from the tensors alone (MiniMind's defaults otherwise)
    "current": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=12,
                     intermediate_size=96, qk_norm=True, rms_norm_eps=1e-6), True),
    "current-moe": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=8, intermediate_size=96, qk_norm=True, rms_norm_eps=1e-6, use_moe=True,
                         n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                         moe_intermediate_size=96), True),
    "v2": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=192, rms_norm_eps=1e-5), False),
    "v2-moe": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=192, rms_norm_eps=1e-5, use_moe=True, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1), False),
}


@pytest.mark.parametrize("name", list(MINIMIND))
def test_minimind_pth_loads_with_minimind_logits(name, tmp_path):
    fields, current = MINIMIND[name]
    cfg = ModelConfig(vocab_size=VOCAB, rope_theta=1e6, kernel_backend="torch", **fields)
    state = minimind_state(cfg)
    path = tmp_path / "out" / f"full_sft_{cfg.hidden_size}{'_moe' if cfg.use_moe else ''}.pth"
    path.parent.mkdir()
    torch.save(state, path)
    if name == "v2-moe":  # a config.json beside it (MiniMind's fields) where the defaults do not fit
        (path.parent / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 8,
                                                             "use_moe": True, "n_routed_experts": 4}))
    model, tok = load_checkpoint(path, kernel_backend="torch")
    assert {k: getattr(model.config, k) for k in fields} == fields
    with pytest.raises(UserError, match="--tokenizer_path"):
        tok.encode("x")
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model.eval()(ids) - minimind_reference(state, cfg, ids, current)).abs().max().item()
    print(f"minimind {name}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    if name == "current":  # fine-tunes from the .pth with MiniMind's tokenizer.json given on the side
        build_tokenizer(tmp_path / "tok")
        r = subprocess.run([sys.executable, str(ROOT / "train_full_sft.py"), "--init_from", str(path),
                            "--tokenizer_path", str(tmp_path / "tok" / "tokenizer.json"),
                            "--data_path", str(write_sft(tmp_path / "sft.jsonl")), "--save_dir", str(tmp_path / "o"),
                            "--max_steps", "1", "--batch_size", "2", "--max_seq_len", "64", "--device", "cpu",
                            "--num_workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert isinstance(load_checkpoint(tmp_path / "o" / "full_sft")[1], hf.HFTokenizer)
    save_checkpoint(tmp_path / "ours", model)  # an ordinary minillm checkpoint from here on
    again, _ = load_checkpoint(tmp_path / "ours", with_tokenizer=False, kernel_backend="torch")
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_minimind_transformers_folder(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, kernel_backend="torch", **MINIMIND["current"][0])
    state = minimind_state(cfg, seed=3)
    from safetensors.torch import save_file
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 12,
        "intermediate_size": 96, "vocab_size": VOCAB, "rope_theta": 1e6, "rope_scaling": None,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_moe": False, "hidden_act": "silu"}))
    build_tokenizer(tmp_path)
    model, tok = load_checkpoint(tmp_path, kernel_backend="torch")
    assert isinstance(tok, hf.HFTokenizer) and model.config.qk_norm
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model.eval()(ids) - minimind_reference(state, cfg, ids, True)).abs().max().item() <= 1e-4
    doc = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**doc, "inference_rope_scaling": True}))
    cfg = load_config(tmp_path)[0]  # MiniMind's switch: its fixed YaRN settings
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_position_embeddings,
            cfg.rope_attention_factor) == ("yarn", 16.0, 2048, 1.0)


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True), dict(qk_norm=True, use_moe=True, n_shared_experts=0),
                                dict(use_moe=True, n_shared_experts=2)],
                         ids=["llama", "qwen3", "qwen3-moe", "qwen2-moe"])
def test_round_trip_through_minillm_export(kw, tmp_path):
    """export_model (minillm.export) then import: the same logits and the same tokens, rendered chats too."""
    export = pytest.importorskip("minillm.export")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch", **kw)).eval()
    save_checkpoint(tmp_path / "ours", model, tok)
    export.export_model(tmp_path / "ours", tmp_path / "hf")
    back, tok2 = load_checkpoint(tmp_path / "hf", kernel_backend="torch")
    ids = torch.randint(0, tok.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(ids), back.eval()(ids))
    msgs = [{"role": "user", "content": "Hello 你好"}, {"role": "assistant", "content": "达卡亚人说达卡亚语。"}]
    assert isinstance(tok2, hf.HFTokenizer) and tok2.render_chat(msgs) == tok.render_chat(msgs)


def test_foreign_sentencepiece_model_is_an_error_only_when_used(tmp_path):
    import io
    import sentencepiece as spm
    save_hf(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "the capital of Dakaia is Tago"] * 50),
                                   model_writer=buf, vocab_size=40, model_type="bpe")
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    model, tok = load_checkpoint(tmp_path)  # the weights load; the tokenizer is refused on first use
    with pytest.raises(UserError, match="tokenizer.json.*--tokenizer_path"):
        tok.encode("hello")
