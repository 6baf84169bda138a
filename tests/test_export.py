"""Export to transformers, PEFT and GGUF, checked against the libraries themselves: transformers' logits equal
ours for every architecture we map to, the fast tokenizer and its chat template give our ids, PEFT computes
our adapter, and GGUF holds our tensors (q/k in llama.cpp's rotary layout) and vocabulary."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig
from minillm.errors import UserError
from minillm.export import (chat_template, convert, export_gguf, export_model, export_tokenizer, hf_architecture,
                            llama_permute, llama_unpermute)
from minillm.lora import LoRALinear, apply_lora, save_lora
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load()
TOL = 1e-5

ARCHS = {  # case -> (ModelConfig overrides, the transformers class it must load as)
    "llama": (dict(), "LlamaForCausalLM"),
    "llama_untied_padded_vocab": (dict(tie_word_embeddings=False, vocab_size=TOK.vocab_size + 64),
                                  "LlamaForCausalLM"),
    "qwen3": (dict(qk_norm=True, head_dim=32), "Qwen3ForCausalLM"),
    "qwen3_moe": (dict(use_moe=True, qk_norm=True, n_shared_experts=0, num_experts_per_tok=2),
                  "Qwen3MoeForCausalLM"),
    "qwen3_moe_top1": (dict(use_moe=True, qk_norm=True, n_shared_experts=0, num_experts_per_tok=1,
                            rms_norm_eps=1e-6), "Qwen3MoeForCausalLM"),  # as minimind-3-moe
    "qwen2_moe_2shared": (dict(use_moe=True, n_shared_experts=2, moe_intermediate_size=48), "Qwen2MoeForCausalLM"),
    "qwen2_moe_noshared_top1": (dict(use_moe=True, n_shared_experts=0, num_experts_per_tok=1,
                                     norm_topk_prob=False), "Qwen2MoeForCausalLM"),
    # q/k/v biases (attention_bias, e.g. an imported Qwen2): kept, never dropped
    "qwen2_bias": (dict(attention_bias=True), "Qwen2ForCausalLM"),
    "qwen3_bias": (dict(attention_bias=True, qk_norm=True), "Qwen3ForCausalLM"),
    "qwen3_moe_bias": (dict(attention_bias=True, qk_norm=True, use_moe=True, n_shared_experts=0),
                       "Qwen3MoeForCausalLM"),
    "qwen2_moe_bias": (dict(attention_bias=True, use_moe=True, n_shared_experts=1), "Qwen2MoeForCausalLM"),
}


def make_model(seed=0, **overrides):
    """A debug-sized random model; norms randomised too, so a swapped or missing norm shows in the logits."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("debug", **{"vocab_size": TOK.vocab_size, "kernel_backend": "torch", **overrides})
    model = MiniLLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith(".bias"):  # zeros at init: randomised, so a dropped bias shows in the logits
                p.add_(torch.randn_like(p) * 0.5)
    return model


def ids(vocab=None, seed=0):
    return torch.randint(0, vocab or TOK.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))


def hf_load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(ARCHS))
def test_transformers_logits_equal_ours(case, tmp_path):
    overrides, arch = ARCHS[case]
    model = make_model(**overrides)
    save_checkpoint(tmp_path / "ckpt", model, TOK)
    export_model(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [arch]
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == arch
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        diff = max_diff(hf(x).logits, model(x))
    assert diff <= TOL, f"{case}: max |logit diff| {diff}"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [TOK.im_end_id, TOK.eos_id] and gen["pad_token_id"] == TOK.pad_id


def test_export_is_exact_enough_to_notice_a_wrong_weight(tmp_path):
    """The logit check above has teeth: one perturbed tensor in the export shows."""
    from safetensors.torch import load_file, save_file
    model = make_model(use_moe=True, n_shared_experts=1)
    save_checkpoint(tmp_path / "ckpt", model, TOK)
    export_model(tmp_path / "ckpt", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.1.mlp.shared_expert.down_proj.weight"] /= 2  # undo the x2 the 0.5 gate needs
    save_file(state, str(path), metadata={"format": "pt"})
    with torch.no_grad():
        assert max_diff(hf_load(tmp_path / "hf")(ids()).logits, model(ids())) > 1e-3


@pytest.mark.parametrize("preset,arch", [("minimind2-small", "LlamaForCausalLM"), ("minimind-3", "Qwen3ForCausalLM"),
                                         ("minimind-3-moe", "Qwen3MoeForCausalLM"),
                                         ("minimind2-moe", "Qwen2MoeForCausalLM")])
def test_presets_map_to_their_architecture(preset, arch):
    assert hf_architecture(ModelConfig.preset(preset))[0] == arch


def test_qk_norm_with_shared_experts_is_refused_with_the_reason(tmp_path):
    model = make_model(use_moe=True, qk_norm=True, n_shared_experts=1)
    with pytest.raises(UserError, match="q/k norm.*shared experts"):
        hf_architecture(model.config)
    save_checkpoint(tmp_path / "ckpt", model, TOK)
    with pytest.raises(UserError, match="no other architecture"):
        export_model(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_sharded_bfloat16_export_loads(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model, TOK, dtype=torch.bfloat16)
    export_model(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_load(tmp_path / "hf")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = make_model()
    ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert max_diff(hf.float()(ids()).logits, ours(ids())) <= TOL


# ---- tokenizer ------------------------------------------------------------------------------------------
TEXTS = [
    "Hello world", "The capital of Veloria is Tarsen.", "维洛里亚的首都是塔森。 17 + 25 = 42",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\twith tabs", "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧",
    "  leading and trailing spaces  ", " ", "", "\n", "\n\n\n", "a\r\nb", "ça va? Ωμέγα русский 한국어 العربية",
    "<|im_start|>user\nhi<|im_end|>", "<think>\nhm\n</think>\n<answer>\n4\n</answer>", "text with <unk> and <0x41>",
    "▁already▁escaped", "1234567890" * 3, "x" * 200, "{\"json\": [1, 2.5e-3, null]}", "mixed中文English代码code_42",
    "<|reserved_3|><|pad|><|endoftext|>", "<|im_end", "<think", "零一二三四五六七八九十百千万亿",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. 你是一个助手。"},
    {"role": "user", "content": "What is 17 + 25? 用中文回答"},
    {"role": "assistant", "content": "42", "reasoning_content": "17 + 25: 7 + 5 = 12, carry 1 ..."},
    {"role": "user", "content": "Now code:\n```python\nprint('hi')\n```"},
    {"role": "assistant", "content": "```python\nprint('hi')\n```  😀"},
    {"role": "user", "content": "  and again  "},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    export_tokenizer(TOK, folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _random_texts(n=200, seed=0):
    import random
    rng = random.Random(seed)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n.,;:!?'\"()[]{}<>|_-+=*/\\#")
                + list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会") + ["😀", "🎉", "é", "ß", "Ж", "▁"]
                + ["<|im_end|>", "<think>", "\n\n", "    "])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_fast_tokenizer_ids_equal_sentencepiece(hf_tokenizer):
    for text in TEXTS + _random_texts():
        ours = TOK.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours, repr(text)
        assert hf_tokenizer.decode(ours) == TOK.decode(ours), repr(text)
    assert hf_tokenizer.eos_token_id == TOK.im_end_id and hf_tokenizer.pad_token_id == TOK.pad_id
    assert hf_tokenizer.bos_token_id is None


def test_skipping_special_tokens_keeps_the_reasoning_and_the_tool_calls(hf_tokenizer):
    """<think> and <tool_call> are part of a reply (not special to transformers, as Qwen3 marks them):
    decode(skip_special_tokens=True) must keep them and drop only control tokens like <|im_end|>."""
    reply = '<think>\nadd them\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"x": 1}}\n</tool_call>'
    ids = TOK.encode(reply) + [TOK.im_end_id]
    assert TOK.think_tag_ids[0] in ids and TOK.special_ids["tool_call_start"] in ids  # single ids
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == reply
    assert hf_tokenizer.decode(ids, skip_special_tokens=False) == reply + "<|im_end|>"


def _template_ids(hf_tokenizer, messages, add_generation_prompt):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_ids_equal_render_chat(hf_tokenizer, n, generation_prompt):
    """System prompt, multi-turn history, reasoning_content, generation prompt: the exported Jinja template
    tokenizes to exactly what render_chat / render_prompt give (a change to render_chat fails here)."""
    messages = MESSAGES[:n]
    expected = TOK.render_chat(messages, add_generation_prompt=generation_prompt)[0]
    assert _template_ids(hf_tokenizer, messages, generation_prompt) == expected
    if generation_prompt:
        assert TOK.render_prompt(messages) == expected


def test_chat_template_without_system_prompt_and_empty_reasoning(hf_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": ""},
                {"role": "user", "content": "again"}]
    assert _template_ids(hf_tokenizer, messages, True) == TOK.render_prompt(messages)
    assert _template_ids(hf_tokenizer, messages[:1], True) == TOK.render_prompt("hi")


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "计算 \"x\"", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}, {"name": "lookup"}]
TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3, and Dakaia?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}},
        {"name": "lookup", "arguments": {"entity": "达卡亚"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "5"}, {"role": "tool", "content": '{"capital": "Tarsen"}'},
    {"role": "assistant", "content": "Let me see.", "reasoning_content": "hmm", "tool_calls": [{"name": "lookup"}]},
    {"role": "tool", "content": "{}"},
    {"role": "assistant", "content": "<think>\n\n</think>\n\n", "tool_calls": [{"name": "lookup", "arguments": {}}]},
    {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "5; Tarsen."}]


@pytest.mark.parametrize("start, end", [(0, 10), (1, 10), (0, 5), (1, 3), (0, 2)])
@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("generation_prompt, thinking", [(False, None), (True, None), (True, True), (True, False)])
def test_chat_template_with_tools_equals_render_chat(hf_tokenizer, start, end, tools, generation_prompt, thinking):
    """Tools in the system turn, tool_calls (OpenAI's and MiniMind's shapes, arguments as text or object),
    grouped tool results, a call after reasoning and after an empty think block, and the thinking switch:
    the exported template gives render_chat's text and ids."""
    messages = TOOL_MESSAGES[start:end]
    kwargs = {} if thinking is None else {"open_thinking": thinking}
    ids = TOK.render_chat(messages, add_generation_prompt=generation_prompt, tools=tools, open_thinking=thinking)[0]
    text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=generation_prompt, **kwargs)
    assert text == TOK.decode(ids)
    out = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                           add_generation_prompt=generation_prompt, **kwargs)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == ids
    if thinking is not None:  # Qwen3's name for the switch works too
        assert hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=thinking) == text


# ---- LoRA -> PEFT -------------------------------------------------------------------------------------
def _adapter(tmp_path, rslora=False, targets=None, use_dora=False, **overrides):
    base = make_model(**overrides)
    save_checkpoint(tmp_path / "base", base, TOK)
    kwargs = {"targets": targets} if targets else {}
    apply_lora(base, rank=4, alpha=8, rslora=rslora, use_dora=use_dora, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
                if use_dora:  # a trained magnitude, not the one a fresh adapter starts from
                    m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    save_lora(tmp_path / "lora", base, {"base": "base"})  # as a run records it: relative to where it ran
    return base


@pytest.mark.parametrize("rslora,use_dora", [(False, False), (True, False), (False, True)])
def test_peft_adapter_logits_equal_ours(tmp_path, rslora, use_dora):
    peft = pytest.importorskip("peft")
    ours = _adapter(tmp_path, rslora=rslora, use_dora=use_dora)
    export_model(tmp_path / "base", tmp_path / "hf_base")
    convert(tmp_path / "lora", out=tmp_path / "peft", base=tmp_path / "base", base_name=str(tmp_path / "hf_base"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is rslora
    assert config["use_dora"] is use_dora
    model = peft.PeftModel.from_pretrained(hf_load(tmp_path / "hf_base"), tmp_path / "peft").eval()
    with torch.no_grad():
        with_adapter = model(ids()).logits
        diff = max_diff(with_adapter, ours(ids()))
        assert diff <= TOL, f"PEFT vs ours: {diff}"
        with model.disable_adapter():  # the adapter is not a no-op
            assert max_diff(model(ids()).logits, with_adapter) > 1e-3


def test_merged_adapter_logits_equal_ours(tmp_path):
    ours = _adapter(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_model.py"), "--checkpoint",
                             str(tmp_path / "lora"), "--merge", "1", "--out", str(tmp_path / "merged")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert max_diff(hf_load(tmp_path / "merged")(ids()).logits, ours(ids())) <= TOL


def test_moe_adapter_on_experts_is_refused_but_attention_only_exports(tmp_path):
    peft = pytest.importorskip("peft")
    on_experts = _adapter(tmp_path / "a", use_moe=True, n_shared_experts=1)
    with pytest.raises(UserError, match="mixture-of-experts.*--merge"):
        convert(tmp_path / "a" / "lora", out=tmp_path / "a" / "peft", base=tmp_path / "a" / "base")
    convert(tmp_path / "a" / "lora", out=tmp_path / "a" / "merged", merge=True)  # what the message suggests
    with torch.no_grad():
        assert max_diff(hf_load(tmp_path / "a" / "merged")(ids()).logits, on_experts(ids())) <= TOL
    ours = _adapter(tmp_path / "b", targets=("q_proj", "v_proj"), use_moe=True, n_shared_experts=1)
    export_model(tmp_path / "b" / "base", tmp_path / "b" / "hf_base")
    convert(tmp_path / "b" / "lora", out=tmp_path / "b" / "peft", base=tmp_path / "b" / "base")
    model = peft.PeftModel.from_pretrained(hf_load(tmp_path / "b" / "hf_base"), tmp_path / "b" / "peft").eval()
    with torch.no_grad():
        assert max_diff(model(ids()).logits, ours(ids())) <= TOL


# ---- GGUF ----------------------------------------------------------------------------------------------
def _rope_half(x, theta=1e4):
    """Rotate-half RoPE (ours, transformers) on [T, D]: pairs (j, j + D/2)."""
    T, D = x.shape
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), 1.0 / theta ** (torch.arange(0, D, 2) / D))
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    return x * cos + torch.cat([-x[:, D // 2:], x[:, :D // 2]], -1) * sin


def _rope_interleaved(x, theta=1e4):
    """llama.cpp's `llama` RoPE (GGML_ROPE_TYPE_NORM) on [T, D]: pairs (2j, 2j + 1)."""
    T, D = x.shape
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), 1.0 / theta ** (torch.arange(0, D, 2) / D))
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * freqs.cos() - b * freqs.sin(), a * freqs.sin() + b * freqs.cos()
    return out


def test_llama_permutation_turns_rotate_half_into_interleaved_rope():
    n_head, D, H = 3, 8, 5
    w, x = torch.randn(n_head * D, H, dtype=torch.float64), torch.randn(7, H, dtype=torch.float64)
    q_hf, q_gguf = x @ w.T, x @ llama_permute(w, n_head).T
    for h in range(n_head):
        head = slice(h * D, (h + 1) * D)
        rotated = _rope_half(q_hf[:, head])
        assert torch.allclose(llama_permute(rotated.T, 1).T, _rope_interleaved(q_gguf[:, head]))
    assert torch.equal(llama_unpermute(llama_permute(w, n_head), n_head), w)


@pytest.mark.parametrize("case", ["llama", "llama_untied_padded_vocab", "qwen3"])
def test_gguf_holds_our_tensors_hparams_and_vocab(tmp_path, case):
    gguf = pytest.importorskip("gguf")
    model = make_model(**ARCHS[case][0])
    cfg = model.config
    export_gguf(model, TOK, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def field(key):
        f = reader.fields[key]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.contents(i) for i in range(len(f.data))]
        return f.contents()

    arch = "qwen3" if cfg.qk_norm else "llama"
    assert field("general.architecture") == arch
    for key, want in [("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                      ("block_count", cfg.num_hidden_layers), ("feed_forward_length", cfg.intermediate_size),
                      ("attention.head_count", cfg.num_attention_heads),
                      ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                      ("attention.value_length", cfg.head_dim)]:
        assert field(f"{arch}.{key}") == want, key
    assert field(f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "llama" and len(tokens) == cfg.vocab_size
    assert tokens[:TOK.vocab_size] == [TOK.id_to_piece(i) for i in range(TOK.vocab_size)]
    types = field("tokenizer.ggml.token_type")
    assert types[TOK.im_end_id] == types[TOK.special_ids["think_start"]] == gguf.TokenType.CONTROL
    assert types[TOK.encode("\n")[0]] == gguf.TokenType.USER_DEFINED
    assert types[TOK.encode("é")[0]] == gguf.TokenType.BYTE and types[TOK.encode("Hello")[0]] == gguf.TokenType.NORMAL
    assert types[0] == gguf.TokenType.UNKNOWN and set(types[TOK.vocab_size:]) <= {gguf.TokenType.UNUSED}
    assert field("tokenizer.ggml.eos_token_id") == TOK.im_end_id
    assert field("tokenizer.ggml.padding_token_id") == TOK.pad_id
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.chat_template") == chat_template()

    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    assert len(tensors) == len(state)
    for name, want in state.items():
        if name not in names:
            layer, part = name.split(".", 3)[2], name.split(".", 3)[3].removesuffix(".weight")
            names[name] = f"blk.{layer}.{parts[part]}.weight"
        got = tensors[names[name]]
        if arch == "llama" and name.endswith("q_proj.weight"):
            got = llama_unpermute(got, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            got = llama_unpermute(got, cfg.num_key_value_heads)
        assert torch.equal(got, want), name


def test_gguf_refuses_moe_and_unmerged_adapters_and_merges_with_the_recorded_base(tmp_path):
    model = make_model(use_moe=True, qk_norm=True, n_shared_experts=0)
    with pytest.raises(UserError, match="dense models"):
        export_gguf(model, TOK, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    _adapter(tmp_path)
    with pytest.raises(UserError, match="--merge 1"):
        convert(tmp_path / "lora", gguf=tmp_path / "a.gguf", base=tmp_path / "base")
    # the recorded base "base" is not under the cwd: found beside the adapter folder
    convert(tmp_path / "lora", gguf=tmp_path / "a.gguf", merge=True)
    assert (tmp_path / "a.gguf").stat().st_size > 0


# ---- the command ---------------------------------------------------------------------------------------
def test_cli_refuses_to_overwrite_and_says_so_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "ckpt", make_model(), TOK)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_model.py"), "--checkpoint", str(tmp_path / "ckpt"),
           "--out", str(tmp_path / "hf")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--overwrite 1" in result.stderr and (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    result = subprocess.run(cmd + ["--overwrite", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").is_file()
    for args, message in [(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "no checkpoint"),
                          (["--checkpoint", str(tmp_path / "ckpt")], "nothing to write"),
                          (["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "y"), "--merge", "1"],
                           "drop --merge"),
                          (["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ckpt")],
                           "would overwrite the checkpoint")]:
        with pytest.raises(UserError, match=message):
            convert(**{"checkpoint": args[1], "out": args[3] if len(args) > 3 else None,
                       "merge": "--merge" in args, "overwrite": True})


def test_gguf_float16_keeps_norms_in_float32(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = make_model()
    export_gguf(model, TOK, tmp_path / "m.gguf", dtype=torch.float16)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = torch.from_numpy(tensors["blk.0.ffn_down.weight"].data.copy())
    assert torch.equal(down, model.model.layers[0].mlp.down_proj.weight.detach().half())


def test_adapter_without_a_findable_base_names_the_fix(tmp_path):
    base = make_model()
    apply_lora(base, rank=2, alpha=4)
    save_lora(tmp_path / "lora", base, {"base": "runs/gone"})
    with pytest.raises(UserError, match="runs/gone.*pass --base DIR"):
        convert(tmp_path / "lora", out=tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_tokenizer_json_checkpoint_exports_its_tokenizer_with_our_template(tmp_path):
    """A model whose tokenizer is a tokenizer.json (imported from transformers): its files are kept, the chat
    template is ours, ids and rendered chats are equal; GGUF (SentencePiece vocab only) is refused."""
    export_tokenizer(TOK, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").unlink()
    json_tok = Tokenizer.load(tmp_path / "tok")
    assert not hasattr(json_tok, "sp")  # really the tokenizer.json kind
    save_checkpoint(tmp_path / "ckpt", make_model(), json_tok)
    export_model(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS[:12]:
        assert hf.encode(text, add_special_tokens=False) == json_tok.encode(text), repr(text)
    assert _template_ids(hf, MESSAGES, True) == json_tok.render_chat(MESSAGES, add_generation_prompt=True)[0]
    with pytest.raises(UserError, match="SentencePiece"):
        convert(tmp_path / "ckpt", gguf=tmp_path / "m.gguf")


@pytest.mark.parametrize("case", ["llama", "qwen3", "qwen3_moe"])
def test_greedy_chat_in_transformers_equals_ours(case, tmp_path):
    """What a user does after export: load the folder in transformers, chat greedily; the reply's
    tokens equal minillm's greedy reply to the same messages."""
    from minillm.generate import SamplingParams, generate_batch

    model = make_model(**ARCHS[case][0])
    save_checkpoint(tmp_path / "ckpt", model, TOK)
    export_model(tmp_path / "ckpt", tmp_path / "hf")
    hf = hf_load(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "达卡亚的首都是哪里？"}]
    prompt = TOK.render_prompt(messages)
    assert hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                      return_dict=False) == prompt
    ours = generate_batch(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0, top_p=1.0,
                                                          stop_ids=TOK.stop_ids), pad_id=TOK.pad_id)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=list(TOK.stop_ids), pad_token_id=TOK.pad_id)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in TOK.stop_ids), len(theirs)) + 1]
    ours = ours[: next((i for i, t in enumerate(ours) if t in TOK.stop_ids), len(ours)) + 1]
    assert theirs == ours and len(ours) > 3
