"""Export minillm checkpoints to the formats other tools load: transformers, PEFT, GGUF.

    export_model("out/full_sft", "hf_model")                 # config.json + model.safetensors + tokenizer files
    export_adapter("out/lora_medical", "peft_adapter")       # adapter_config.json + adapter_model.safetensors
    export_adapter("out/lora_medical", "merged", merge=True) # the base with the adapter folded in
    export_gguf(model, tokenizer, "model.gguf")              # llama.cpp

Architectures (our weight names already follow Llama/Qwen, so most tensors copy over unchanged):
- dense, no q/k norm          -> LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases, attention_bias)
- dense, q/k norm             -> Qwen3ForCausalLM (with q/k/v biases: its attention_bias, o_proj bias zero)
- MoE, q/k norm, no shared    -> Qwen3MoeForCausalLM
- MoE, no q/k norm            -> Qwen2MoeForCausalLM. Its one shared expert is gated by
  sigmoid(shared_expert_gate(x)); ours are ungated. A zero gate gives sigmoid(0) = 0.5 and the
  shared down_proj is written x2, which is exact in floating point. Our n shared experts are
  concatenated into that one (gate/up rows stacked, down columns side by side); with none, the
  shared expert is one zero row (it adds exactly 0). q/k/v biases, which Qwen2-MoE has, are zeros.
- MoE, q/k norm and shared experts: no transformers architecture has both; refused.

transformers, tokenizers, safetensors and gguf are imported inside the functions that need them,
never on the training path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from minillm.errors import NotFound, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


# ---- config.json ------------------------------------------------------------------------------------
def hf_architecture(cfg) -> tuple[str, str]:
    """(architecture class, model_type) of the transformers model that computes what `cfg` does."""
    if not cfg.use_moe:
        if cfg.qk_norm:
            return "Qwen3ForCausalLM", "qwen3"
        return ("Qwen2ForCausalLM", "qwen2") if cfg.attention_bias else ("LlamaForCausalLM", "llama")
    if cfg.qk_norm and cfg.n_shared_experts > 0:
        raise UserError(f"cannot export a mixture of experts with both q/k norm (qk_norm) and shared experts "
                        f"(n_shared_experts={cfg.n_shared_experts}) to transformers: Qwen3-MoE has q/k norm but no "
                        f"shared experts, Qwen2-MoE has shared experts but no q/k norm, and no other architecture "
                        f"matches; train with qk_norm false or n_shared_experts 0 to export")
    return ("Qwen3MoeForCausalLM", "qwen3_moe") if cfg.qk_norm else ("Qwen2MoeForCausalLM", "qwen2_moe")


def hf_config(cfg, tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json: every key the chosen transformers class reads, rope written both ways (transformers 5
    reads rope_parameters, older versions rope_theta)."""
    arch, model_type = hf_architecture(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    doc = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        **_yarn_config(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": tokenizer.eos_id if tokenizer is not None else None,
        "eos_token_id": (tokenizer.im_end_id if tokenizer.im_end_id is not None else tokenizer.eos_id)
        if tokenizer is not None else None,
        "pad_token_id": tokenizer.pad_id if tokenizer is not None else None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if model_type == "llama":
        doc.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        doc.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
    if model_type in ("qwen3", "qwen3_moe"):  # its attention_bias covers o_proj too: written as zeros
        doc.update(attention_bias=bool(cfg.attention_bias))
    if cfg.use_moe:
        doc.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.aux_loss_coef,
                   output_router_logits=False)
    if model_type == "qwen2_moe":
        doc.update(qkv_bias=True, shared_expert_intermediate_size=_shared_width(cfg))
    return doc


def _yarn_config(cfg) -> dict:
    """transformers' YaRN entry (rope_parameters in v5, rope_scaling before) when the model uses YaRN."""
    if cfg.rope_scaling != "yarn":
        return {}
    from minillm.model import yarn_frequencies
    import torch
    factor = yarn_frequencies(torch.ones(cfg.head_dim // 2), cfg.head_dim, cfg.rope_theta, cfg)[1]
    yarn = {"rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow, "attention_factor": factor}
    return {"rope_parameters": {**yarn, "rope_theta": cfg.rope_theta}, "rope_scaling": dict(yarn)}


def _shared_width(cfg) -> int:
    return cfg.n_shared_experts * cfg.moe_intermediate_size if cfg.n_shared_experts else 1


def generation_config(tokenizer) -> dict:
    stops = [i for i in dict.fromkeys((tokenizer.im_end_id, tokenizer.eos_id)) if i is not None]
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": stops, "pad_token_id": tokenizer.pad_id,
            "do_sample": True, "temperature": 0.85, "top_p": 0.85}


# ---- weights --------------------------------------------------------------------------------------
def hf_state_dict(state: dict, cfg) -> dict:
    """Our tensor names/values -> the transformers checkpoint's (the hub layout, one tensor per expert,
    which transformers 5 fuses itself on load). `state` is ours without lm_head when tied."""
    _, model_type = hf_architecture(cfg)
    out = {}
    for name, t in state.items():
        if ".mlp.shared_experts." in name:
            continue  # qwen2_moe: concatenated below
        out[name] = t
    if model_type in ("qwen3", "qwen3_moe") and cfg.attention_bias:  # Qwen3's bias flag adds an o_proj bias
        for i in range(cfg.num_hidden_layers):
            o = state[f"model.layers.{i}.self_attn.o_proj.weight"]
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(o.shape[0], dtype=o.dtype)
    if model_type != "qwen2_moe":
        return out
    H, width = cfg.hidden_size, _shared_width(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ref = state[p + "self_attn.q_proj.weight"]
        for proj in ("q_proj", "k_proj", "v_proj"):  # Qwen2-MoE always has them: ours, or zeros
            if p + f"self_attn.{proj}.bias" not in out:
                out[p + f"self_attn.{proj}.bias"] = torch.zeros(state[p + f"self_attn.{proj}.weight"].shape[0],
                                                                dtype=ref.dtype)
        s = p + "mlp.shared_experts."
        if cfg.n_shared_experts:
            n = cfg.n_shared_experts
            gate = torch.cat([state[f"{s}{m}.gate_proj.weight"] for m in range(n)], dim=0)
            up = torch.cat([state[f"{s}{m}.up_proj.weight"] for m in range(n)], dim=0)
            down = torch.cat([state[f"{s}{m}.down_proj.weight"] for m in range(n)], dim=1) * 2  # x2: exact
        else:  # a one-row expert that adds exactly zero
            gate, up = torch.zeros(width, H, dtype=ref.dtype), torch.zeros(width, H, dtype=ref.dtype)
            down = torch.zeros(H, width, dtype=ref.dtype)
        out[p + "mlp.shared_expert.gate_proj.weight"] = gate
        out[p + "mlp.shared_expert.up_proj.weight"] = up
        out[p + "mlp.shared_expert.down_proj.weight"] = down
        out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, H, dtype=ref.dtype)  # sigmoid(0) = 0.5
    return out


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--max_shard_size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "KI": 1, "MI": 2, "GI": 3, "TI": 4}[unit]
    base = 1024 if unit.endswith("I") else 1000
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise UserError(f"--max_shard_size {text!r} must be positive")
    return size


def save_hf_weights(state: dict, folder: Path, max_shard_size="5GB") -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the
    tensors add up to more than max_shard_size (a tensor larger than that gets a shard of its own)."""
    from safetensors.torch import save_file
    limit = parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / HF_WEIGHTS), metadata={"format": "pt"})
        return [HF_WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        names.append(file)
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")
    return names + [HF_INDEX]


# ---- tokenizer --------------------------------------------------------------------------------------
def _sp_proto(tokenizer):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer._proto)
    return proto


def hf_fast_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that encodes exactly as our SentencePiece model does.

    SentencePiece BPE (as train_tokenizer.py trains it: identity normalisation, no dummy prefix, byte
    fallback) runs on the whole text with spaces escaped to '▁', merging at each step the adjacent pair
    whose concatenation is the best-scored normal piece; user-defined pieces (our specials and '\\n')
    are cut out first and never merged. Here: the same vocabulary, merges ranked by that score, the
    user-defined pieces as added tokens, and a normaliser that only escapes spaces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from minillm.tokenizer import SPECIAL_TOKENS
    proto = _sp_proto(tokenizer)
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    unsupported = [what for what, bad in (
        ("a BPE model", ts.model_type != 2), ("no NFKC-style normalisation rule", bool(ns.precompiled_charsmap)),
        ("add_dummy_prefix off", ns.add_dummy_prefix), ("remove_extra_whitespaces off", ns.remove_extra_whitespaces),
        ("escape_whitespaces on", not ns.escape_whitespaces), ("byte_fallback on", not ts.byte_fallback),
        ("treat_whitespace_as_suffix off", ts.treat_whitespace_as_suffix)) if bad]
    if unsupported:
        raise UserError(f"cannot export this tokenizer to tokenizer.json: the export needs {', '.join(unsupported)} "
                        f"(as train_tokenizer.py makes it); retrain the tokenizer with train_tokenizer.py")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    fast = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=ts.unk_piece, fuse_unk=True,
                                byte_fallback=True, dropout=None))
    fast.normalizer = normalizers.Replace(" ", "▁")
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = set(SPECIAL_TOKENS.values()) - MARKUP_TAGS
    added = [AddedToken(p.piece, special=(p.type == 3 or p.piece in specials) and p.piece not in MARKUP_TAGS,
                        normalized=False)
             for p in proto.pieces if p.type in (3, 4)]
    fast.add_tokens(added)  # ids stay the model's: each piece is already in the vocabulary
    return fast


def _jinja_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template() -> str:
    """Tokenizer.render_chat in Jinja, character for character: ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n`
    per message), an assistant's reasoning_content wrapped as render_reasoning wraps it, `tools` in the system turn,
    an assistant's `tool_calls` as <tool_call> blocks, consecutive `tool` messages as one user turn of
    <tool_response> blocks, and for add_generation_prompt `<|im_start|>assistant\\n` plus thinking_prefill of
    `open_thinking` (or Qwen3's `enable_thinking`) when one is given."""
    from minillm.tokenizer import (THINK_OFF_PREFILL, THINK_ON_PREFILL, TOOLS_FOOTER, TOOLS_HEADER, render_reasoning,
                                   render_tool_calls)
    r_mark, a_mark = "\x00REASONING\x00", "\x00ANSWER\x00"
    wrapped = render_reasoning(r_mark, a_mark)
    if wrapped.count(r_mark) != 1 or wrapped.count(a_mark) != 1 or wrapped.index(r_mark) > wrapped.index(a_mark):
        raise RuntimeError("render_reasoning changed shape: update minillm.export.chat_template")
    if render_tool_calls([{"name": "N", "arguments": "A"}] * 2, True) != \
            '\n<tool_call>\n{"name": "N", "arguments": A}\n</tool_call>' * 2:
        raise RuntimeError("render_tool_calls changed shape: update minillm.export.chat_template")
    before, rest = wrapped.split(r_mark)
    middle, after = rest.split(a_mark)
    lit = _jinja_literal
    return (
        "{%- if tools -%}"
        "{{- '<|im_start|>system\\n' -}}"
        "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
        f"{{{{- {lit(TOOLS_HEADER)} -}}}}"
        "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        f"{{{{- {lit(TOOLS_FOOTER)} + '<|im_end|>\\n' -}}}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] if message['content'] is string else '' -%}"
        "{%- if tools and loop.first and message['role'] == 'system' -%}"
        "{%- elif message['role'] == 'tool' -%}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
        "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' and message.reasoning_content is defined "
        "and message.reasoning_content -%}"
        f"{{{{- {lit(before)} + message.reasoning_content + {lit(middle)} + content + {lit(after)} -}}}}"
        "{%- else -%}{{- content -}}{%- endif -%}"
        "{%- if message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls -%}"
        "{%- set reply = content.split('</think>')[-1].lstrip('\\n') -%}"
        "{%- for tool_call in message.tool_calls -%}"
        "{%- if not loop.first or reply -%}{{- '\\n' -}}{%- endif -%}"
        "{%- if tool_call.function is defined and tool_call.function -%}{%- set tool_call = tool_call.function -%}"
        "{%- endif -%}"
        "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' -}}"
        "{%- if tool_call.arguments is not defined -%}{{- '{}' -}}"
        "{%- elif tool_call.arguments is string -%}{{- tool_call.arguments -}}"
        "{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}"
        "{{- '}\\n</tool_call>' -}}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if open_thinking is defined and open_thinking is not none -%}{%- set think = open_thinking -%}"
        "{%- elif enable_thinking is defined and enable_thinking is not none -%}{%- set think = enable_thinking -%}"
        "{%- endif -%}"
        "{%- if think is defined -%}"
        f"{{{{- {lit(THINK_ON_PREFILL)} if think else {lit(THINK_OFF_PREFILL)} -}}}}"
        "{%- endif -%}"
        "{%- endif -%}"
    )


def is_sentencepiece(tokenizer) -> bool:
    """Our SentencePiece Tokenizer, not a tokenizer.json one (an imported model's, minillm.hf.HFTokenizer)."""
    return getattr(tokenizer, "_proto", None) is not None


def _export_tokenizer_json(tokenizer, folder: Path, model_max_length: int | None) -> list[str]:
    """A tokenizer that already is a tokenizer.json: its own files, with our chat template (the ChatML that
    render_chat renders, which is what minillm trained the model on) in tokenizer_config.json."""
    tokenizer.save(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if model_max_length:
        config.setdefault("model_max_length", model_max_length)
    config["chat_template"] = chat_template()
    if getattr(tokenizer, "im_end_id", None) is not None:
        config["eos_token"] = tokenizer.id_to_piece(tokenizer.im_end_id)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # it would take precedence over ours
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))


def export_tokenizer(tokenizer, folder, model_max_length: int | None = None) -> list[str]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (+ tokenizer.model) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_sentencepiece(tokenizer):
        return _export_tokenizer_json(tokenizer, folder, model_max_length)
    fast = hf_fast_tokenizer(tokenizer)
    fast.save(str(folder / "tokenizer.json"))
    tokenizer.save(folder)  # tokenizer.model, for SentencePiece users
    proto = _sp_proto(tokenizer)
    decoder = {str(i): {"content": p.piece, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False, "special": p.piece != "\n" and p.piece not in MARKUP_TAGS}
               for i, p in enumerate(proto.pieces) if p.type in (3, 4)}
    extra = [p for name, p in _special_pieces(tokenizer).items()
             if name not in ("pad", "im_end") and p not in MARKUP_TAGS]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": None,  # a special unk would make the text "<unk>" one id; SentencePiece spells it out
        "additional_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length or 32768,
        "padding_side": "left",
        "chat_template": chat_template(),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "additional_special_tokens": extra}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


# Tags that are part of a reply's text: single ids, but not "special" to transformers (as Qwen3 and
# MiniMind-3 mark them), so decode(..., skip_special_tokens=True) keeps the reasoning and the tool calls
MARKUP_TAGS = {"<think>", "</think>", "<answer>", "</answer>",
               "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}


def _special_pieces(tokenizer) -> dict:
    from minillm.tokenizer import SPECIAL_TOKENS
    return {name: piece for name, piece in SPECIAL_TOKENS.items() if name in tokenizer.special_ids}


# ---- output folders ------------------------------------------------------------------------------
def check_out(path, overwrite: bool, what: str = "--out"):
    """Refuse to write into an existing non-empty folder (or over a file) unless overwrite."""
    path = Path(path)
    if path.is_file() and what == "--out":
        raise UserError(f"{what} {path} is a file; give a folder")
    busy = path.is_dir() and any(path.iterdir()) if what == "--out" else path.exists()
    if busy and not overwrite:
        raise UserError(f"{what} {path} already exists{' and is not empty' if what == '--out' else ''}; "
                        f"pass --overwrite 1 to replace it, or choose another path")


def _resolve_dtype(name: str, folder: Path, weights_file: str) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise UserError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    from safetensors import safe_open
    try:
        with safe_open(str(folder / weights_file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    except Exception:  # unreadable files are reported by the loader
        pass
    return torch.float32


def write_hf_folder(model, tokenizer, out, dtype: torch.dtype = torch.float32, max_shard_size="5GB",
                    overwrite: bool = False) -> Path:
    """A transformers model folder from a MiniLLM (merged adapters included) and its tokenizer."""
    from minillm.checkpoint import atomic_folder, model_state_dict
    cfg = model.config
    hf_architecture(cfg)  # refuse before writing anything
    check_out(out, overwrite)
    state = hf_state_dict(model_state_dict(model, dtype), cfg)
    with atomic_folder(out) as tmp:
        save_hf_weights(state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer, dtype), indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
            export_tokenizer(tokenizer, tmp, cfg.max_position_embeddings)
    return Path(out)


def _load(checkpoint):
    from minillm.checkpoint import load_checkpoint
    return load_checkpoint(checkpoint, device="cpu", kernel_backend="torch")


def export_model(checkpoint, out, dtype: str = "auto", max_shard_size="5GB", overwrite: bool = False) -> Path:
    """A full checkpoint folder -> a transformers folder (`AutoModelForCausalLM.from_pretrained(out)`)."""
    from minillm.checkpoint import WEIGHTS, resolve_checkpoint
    folder = resolve_checkpoint(checkpoint)
    torch_dtype = _resolve_dtype(dtype, folder, WEIGHTS)
    check_out(out, overwrite)
    model, tokenizer = _load(folder)
    return write_hf_folder(model, tokenizer, out, torch_dtype, max_shard_size, overwrite)


# ---- LoRA adapters -> PEFT ----------------------------------------------------------------------------
def _adapter_base(adapter_folder: Path, doc: dict, base) -> Path:
    from minillm.checkpoint import resolve_checkpoint
    if base:
        return resolve_checkpoint(base)
    recorded = doc.get("base")
    if not recorded:
        raise UserError(f"{adapter_folder} does not record its base model (no 'base' in adapter_config.yaml); "
                        f"pass --base DIR, the checkpoint the adapter was trained on")
    for candidate in (Path(recorded), adapter_folder.parent / Path(recorded).name):
        try:
            return resolve_checkpoint(candidate)
        except NotFound:
            continue
    raise NotFound(f"the base model {recorded} recorded in {adapter_folder}/adapter_config.yaml is not there; "
                   f"pass --base DIR, the checkpoint the adapter was trained on")


def load_adapter_model(adapter, base=None):
    """-> (base model with the adapter applied, tokenizer, adapter settings, adapter folder, base folder)."""
    from minillm.checkpoint import resolve_checkpoint
    from minillm.lora import ADAPTER_WEIGHTS, load_lora, read_lora_config
    adapter_folder = resolve_checkpoint(adapter, marker=ADAPTER_WEIGHTS)
    doc = read_lora_config(adapter_folder)
    base_folder = _adapter_base(adapter_folder, doc, base)
    model, tokenizer = _load(base_folder)
    load_lora(model, adapter_folder)
    return model, tokenizer, doc["lora"], adapter_folder, base_folder


def peft_state_dict(model) -> dict:
    """PEFT's saved names: base_model.model.<module>.lora_A.weight / .lora_B.weight (the adapter name
    'default' is not in the file; see peft.utils.save_and_load.get_peft_model_state_dict)."""
    from minillm.lora import lora_modules
    state, refused = {}, []
    for name, m in lora_modules(model).items():
        if ".mlp.experts." in name or ".mlp.shared_experts." in name or name.endswith(".mlp.gate"):
            refused.append(name)
            continue
        state[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
        if getattr(m, "use_dora", False):  # DoRA's magnitude, under PEFT's file key
            state[f"base_model.model.{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().contiguous().cpu()
    if refused:
        raise UserError(f"the adapter has LoRA on mixture-of-experts layers ({refused[0]}, {len(refused)} in all), "
                        f"which transformers stores fused (one 3-D tensor per layer) or gated, so PEFT cannot load "
                        f"them as LoRA layers; export with --merge 1 for a full model, or train the adapter with "
                        f"--lora_targets q_proj,k_proj,v_proj,o_proj")
    return state


def peft_config(settings: dict, base_name: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": int(settings["rank"]),
        "lora_alpha": settings["alpha"],
        "lora_dropout": float(settings.get("dropout", 0.0)),
        "target_modules": sorted(settings["targets"]),
        "use_rslora": bool(settings.get("rslora", False)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": bool(settings.get("use_dora", False)),
    }


def export_adapter(adapter, out, base=None, base_name: str | None = None, merge: bool = False,
                   dtype: str = "auto", max_shard_size="5GB", overwrite: bool = False) -> Path:
    """An adapter folder -> a PEFT adapter folder, or with merge a full transformers model of the
    base with the adapter folded in."""
    from safetensors.torch import save_file
    from minillm.checkpoint import WEIGHTS, atomic_folder
    from minillm.lora import merge_lora
    check_out(out, overwrite)
    model, tokenizer, settings, adapter_folder, base_folder = load_adapter_model(adapter, base)
    if merge:
        torch_dtype = _resolve_dtype(dtype, base_folder, WEIGHTS)
        merge_lora(model)
        return write_hf_folder(model, tokenizer, out, torch_dtype, max_shard_size, overwrite)
    hf_architecture(model.config)
    state = peft_state_dict(model)
    if dtype != "auto":
        torch_dtype = _resolve_dtype(dtype, base_folder, WEIGHTS)
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    with atomic_folder(out) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        doc = peft_config(settings, base_name or str(base_folder))
        (tmp / PEFT_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return Path(out)


# ---- GGUF -------------------------------------------------------------------------------------------
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from the rotate-half layout (transformers, ours) to the interleaved-pair layout llama.cpp's
    `llama` architecture rotates (convert_hf_to_gguf.py LlamaModel.permute): within each head, row
    j of the first half and row j of the second half become rows 2j and 2j+1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(cfg) -> str:
    if cfg.attention_bias:
        raise UserError("GGUF export covers models without q/k/v biases; this one has them (attention_bias): "
                        "export it to transformers (--out) and convert that with llama.cpp's convert_hf_to_gguf.py")
    if cfg.use_moe:
        raise UserError("GGUF export covers dense models (llama, qwen3) only; this model is a mixture of experts: "
                        "export it to transformers (--out) and convert that with llama.cpp's convert_hf_to_gguf.py")
    return "qwen3" if cfg.qk_norm else "llama"


def gguf_tensors(state: dict, cfg) -> dict:
    """Our names -> llama.cpp's (gguf.TENSOR_NAMES), q/k permuted for the llama architecture."""
    import gguf
    arch = gguf_arch(cfg)
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    per_layer = {"input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
                 "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_norm": T.ATTN_Q_NORM,
                 "self_attn.k_norm": T.ATTN_K_NORM, "post_attention_layernorm": T.FFN_NORM,
                 "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN}
    out = {}
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            out[N[T.TOKEN_EMBD] + ".weight"] = t
        elif name == "model.norm.weight":
            out[N[T.OUTPUT_NORM] + ".weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[N[T.OUTPUT] + ".weight"] = t
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
            if not m or m.group(2) not in per_layer:
                raise RuntimeError(f"no GGUF name for {name}")
            layer, part = int(m.group(1)), m.group(2)
            if arch == "llama" and part == "self_attn.q_proj":
                t = llama_permute(t, cfg.num_attention_heads)
            elif arch == "llama" and part == "self_attn.k_proj":
                t = llama_permute(t, cfg.num_key_value_heads)
            out[N[per_layer[part]].format(bid=layer) + ".weight"] = t
    return out


def gguf_vocab(tokenizer, vocab_size: int):
    """(pieces, scores, token types) of the SentencePiece model as convert_hf_to_gguf.py makes them from our
    transformers export: SentencePiece's type numbers (GGUF's are the same: 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), our special tokens CONTROL (special in tokenizer_config.json; llama.cpp
    matches them in text when it parses specials, as its chat does), the other user-defined pieces ('\n')
    USER_DEFINED, and the rows past the tokenizer (a padded vocab_size) unused [PADn] pieces."""
    from minillm.tokenizer import SPECIAL_TOKENS
    proto = _sp_proto(tokenizer)
    specials = set(SPECIAL_TOKENS.values())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [3 if p.type == 4 and p.piece in specials else int(p.type) for p in proto.pieces]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(5)
    return tokens, scores, types


def _gguf_tokenizer_ok(tokenizer):
    if not is_sentencepiece(tokenizer):
        raise UserError("GGUF export writes a SentencePiece vocabulary, but this model's tokenizer is a tokenizer.json "
                        "(an imported model's): export to transformers (--out) and convert that folder with "
                        "llama.cpp's convert_hf_to_gguf.py")


def export_gguf(model, tokenizer, path, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """One GGUF file: llama (or qwen3 with q/k norm) hyperparameters, tensors (2-D ones in float16 when
    dtype is float16, else float32; norms always float32) and the SentencePiece vocabulary."""
    import gguf
    import numpy as np
    from minillm.checkpoint import model_state_dict
    cfg = model.config
    arch = gguf_arch(cfg)
    _gguf_tokenizer_ok(tokenizer)
    check_out(path, overwrite, what="--gguf")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(model_state_dict(model, torch.float32), cfg)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(path.stem)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, scores, types = gguf_vocab(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.eos_id)
    w.add_eos_token_id(tokenizer.im_end_id)
    w.add_eot_token_id(tokenizer.im_end_id)
    w.add_unk_token_id(_sp_proto(tokenizer).trainer_spec.unk_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template())
    for name, t in tensors.items():
        array = t.numpy()
        if dtype == torch.float16 and t.dim() == 2:
            array = array.astype(np.float16)
        w.add_tensor(name, array)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(path)
    return path


# ---- the command ------------------------------------------------------------------------------------
def _not_inside(path, folder: Path, what: str):
    """Refuse an output that would replace (or sit inside) the folder being exported."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    if path == folder or folder in path.parents or path in folder.parents:
        raise UserError(f"{what} {path} would overwrite the checkpoint {folder} being exported; "
                        f"write somewhere else")


def convert(checkpoint, out=None, gguf=None, base=None, base_name=None, merge=False, dtype="auto",
            max_shard_size="5GB", overwrite=False) -> list[Path]:
    """What scripts/convert_model.py does: a full checkpoint or an adapter folder -> the asked formats."""
    from minillm.checkpoint import WEIGHTS, resolve_checkpoint
    from minillm.lora import ADAPTER_WEIGHTS
    if not out and not gguf:
        raise UserError("nothing to write: give --out DIR (transformers / PEFT folder) and/or --gguf FILE")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    parse_size(max_shard_size)
    folder = Path(checkpoint)
    is_adapter = (folder / ADAPTER_WEIGHTS).is_file() or (folder.with_name(folder.name + ".old") / ADAPTER_WEIGHTS).is_file()
    if not is_adapter:
        folder = resolve_checkpoint(checkpoint)  # NotFound with the usual message
        if merge:
            raise UserError(f"--merge folds a LoRA adapter into its base, but {folder} is a full checkpoint "
                            f"(no {ADAPTER_WEIGHTS}); drop --merge")
        if base:
            raise UserError(f"--base is for adapter folders; {folder} is a full checkpoint")
    elif gguf and not merge:
        raise UserError(f"{folder} is a LoRA adapter; GGUF export writes full models: add --merge 1 to fold the "
                        f"adapter into its base first")
    for path, what in ((out, "--out"), (gguf, "--gguf")):
        if path:
            check_out(path, overwrite, what)
            _not_inside(path, folder, what)
            if base:
                _not_inside(path, Path(base), what)
    written = []
    if is_adapter:
        model, tokenizer, _, _, base_folder = load_adapter_model(folder, base)
        torch_dtype = _resolve_dtype(dtype, base_folder, WEIGHTS)
        if out:
            written.append(export_adapter(folder, out, base, base_name, merge, dtype, max_shard_size, overwrite))
        if gguf:
            from minillm.lora import merge_lora
            written.append(export_gguf(merge_lora(model), tokenizer, gguf, torch_dtype, overwrite))
        return written
    torch_dtype = _resolve_dtype(dtype, folder, WEIGHTS)
    model, tokenizer = _load(folder)
    if gguf:  # refuse before writing anything
        gguf_arch(model.config)
        _gguf_tokenizer_ok(tokenizer)
    if out:
        written.append(write_hf_folder(model, tokenizer, out, torch_dtype, max_shard_size, overwrite))
    if gguf:
        written.append(export_gguf(model, tokenizer, gguf, torch_dtype, overwrite))
    return written

