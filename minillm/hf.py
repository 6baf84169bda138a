"""Import: transformers model folders, MiniMind checkpoints and HF tokenizers as minillm models.

What loads (through `load_checkpoint(path)`, `load_config(path)` and `--init_from path`):
- a transformers folder (config.json + model.safetensors, a sharded model.safetensors.index.json,
  or pytorch_model.bin[.index.json] read with torch.load(weights_only=True)) of LlamaForCausalLM,
  Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen2MoeForCausalLM when its
  shared_expert_gate is zero (what minillm's export writes), or MiniMind's own (model_type minimind);
- a MiniMind state dict file (out/*.pth, e.g. full_sft_768.pth), current or MiniMind2 layout; its
  shape is read from the tensors, MiniMind's defaults and a config.json beside it (MiniMind's fields).

Parameter names are already Llama/Qwen's (see minillm/model.py), so the weight mapping is the identity
except for fused MoE expert tensors (split per expert), Qwen2-MoE's shared expert (split into ungated
shared experts) and a tied lm_head (checked equal to the embedding, then left out).
Every feature minillm's decoder does not compute is refused by name: nothing is dropped silently.
The loaded model is an ordinary MiniLLM; save_checkpoint writes an ordinary minillm checkpoint
that carries the tokenizer files (tokenizer.json + tokenizer_config.json).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.errors import NotFound, UserError
from minillm.tokenizer import SPECIAL_TOKENS, Tokenizer

HF_CONFIG = "config.json"
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
             "Qwen2MoeForCausalLM (zero shared_expert_gate only)", "MiniMindForCausalLM (model_type minimind)")
STATE_SUFFIXES = (".pth", ".pt", ".bin")
_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "minimind": "MiniMindForCausalLM"}
_REFUSED_ARCHS: dict = {}


# ---- what a path is ---------------------------------------------------------------------------
def import_source(path) -> tuple[str, Path] | None:
    """("hf", folder) for a transformers folder (config.json, no minillm config.yaml), ("state", file)
    for a MiniMind-style state dict file (.pth/.pt/.bin); None for anything else (a minillm checkpoint)."""
    path = Path(path)
    if path.is_file() and path.suffix in STATE_SUFFIXES:
        return "state", path
    if path.is_dir() and (path / HF_CONFIG).is_file() and not (path / "config.yaml").is_file():
        return "hf", path
    return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object")
    return doc


# ---- weights ----------------------------------------------------------------------------------
def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle with code in it, truncated, not a torch file
        raise UserError(f"{path} cannot be read as a PyTorch state dict with torch.load(weights_only=True) "
                        f"({' '.join(str(e).split())[:200]}); only plain tensor state dicts load") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # MiniMind's *_resume.pth keeps the weights under "model"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def read_weights(source: tuple[str, Path]) -> dict:
    """{name: tensor} as stored: one safetensors file, its shards, or a torch state dict."""
    from minillm.checkpoint import read_safetensors
    kind, path = source
    if kind == "state":
        return _torch_load(path)
    for single, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _torch_load)):
        if (path / single).is_file():
            return dict(reader(path / single))
        index = path / f"{single}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            state = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise NotFound(f"{index} names the shard {shard}, which is not in {path}")
                state.update(reader(path / shard))
            return state
    raise NotFound(f"{path} has {HF_CONFIG} but no weights: expected model.safetensors, "
                   f"model.safetensors.index.json with its shards, or pytorch_model.bin")


def _weight_shapes(source) -> dict:
    """{name: shape} without reading the tensors where the format allows (safetensors)."""
    from safetensors import safe_open
    kind, path = source
    files = []
    if kind == "hf":
        if (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        elif (path / "model.safetensors.index.json").is_file():
            wm = _read_json(path / "model.safetensors.index.json").get("weight_map") or {}
            files = [path / s for s in sorted(set(wm.values()))]
    if files:
        shapes = {}
        for f in files:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        return shapes
    return {k: tuple(v.shape) for k, v in read_weights(source).items()}


_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def to_minillm_state(state: dict, cfg: ModelConfig, where: str) -> dict:
    """HF / MiniMind names -> minillm names (identity, but fused expert tensors split per expert and
    a tied lm_head checked equal to the embedding, then left out); rotary inv_freq buffers (derived
    from rope_theta, recomputed) are the only tensors skipped."""
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if ".mlp.shared_expert" in name and ".mlp.shared_experts." not in name:
            continue  # Qwen2-MoE's gated shared expert: below
        m = _FUSED.fullmatch(name)
        if m:  # transformers-5 in-memory layout: gate_up_proj [E, 2I, H] (gate first), down_proj [E, H, I]
            layer, kind = m.groups()
            prefix = f"model.layers.{layer}.mlp.experts"
            if kind == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}.{e}.up_proj.weight"] = up[e]
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.down_proj.weight"] = t[e]
            continue
        out[name] = t
    _qwen2_moe_shared(state, out, cfg, where)
    if cfg.tie_word_embeddings and "lm_head.weight" in out:
        embed = out.get("model.embed_tokens.weight")
        if embed is None or not torch.equal(out["lm_head.weight"], embed):
            raise UserError(f"{where}: the config ties the output head to the embedding (tie_word_embeddings) "
                            f"but lm_head.weight differs from model.embed_tokens.weight; the weights and the "
                            f"config do not belong together")
        del out["lm_head.weight"]
    return out


def _qwen2_moe_shared(state: dict, out: dict, cfg: ModelConfig, where: str):
    """Qwen2-MoE's shared expert -> minillm's ungated shared experts, exactly: only a zero
    shared_expert_gate (sigmoid = 0.5 everywhere, folded into down_proj x 0.5) imports."""
    for name, gate in state.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.)shared_expert_gate\.weight", name)
        if not m:
            continue
        p = m.group(1)
        if gate.abs().max().item() != 0:
            raise UserError(f"{where}: {name} is not zero: Qwen2-MoE scales its shared expert by "
                            f"sigmoid(shared_expert_gate(x)) per token, and minillm's shared experts are ungated, "
                            f"so this model (e.g. a Qwen1.5/Qwen2-MoE release) cannot be imported exactly; only "
                            f"zero gates (what minillm's own export writes) import")
        try:
            g, u, dn = (state[f"{p}shared_expert.{k}_proj.weight"] for k in ("gate", "up", "down"))
        except KeyError as e:
            raise UserError(f"{where}: {name} is there but not {e.args[0]}") from None
        n = cfg.n_shared_experts
        if n == 0:
            if any(t.abs().max().item() != 0 for t in (g, u, dn)):
                raise UserError(f"{where}: {p}shared_expert has width {g.shape[0]} (not a multiple of "
                                f"moe_intermediate_size) and is not zero; it cannot be imported exactly")
            continue
        for e, (ge, ue, de) in enumerate(zip(g.chunk(n, 0), u.chunk(n, 0), dn.chunk(n, 1))):
            out[f"{p}shared_experts.{e}.gate_proj.weight"] = ge
            out[f"{p}shared_experts.{e}.up_proj.weight"] = ue
            out[f"{p}shared_experts.{e}.down_proj.weight"] = de * 0.5  # sigmoid(0); a power of two: exact


def load_state_into(model, state: dict, where: str):
    """Copy `state` (minillm names) into `model`, strictly: any missing, unexpected or misshapen tensor
    is a UserError naming them."""
    expected = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
             for k in sorted(state.keys() & expected.keys()) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors minillm's model has no place for: {', '.join(unexpected[:6])}"
                        + (" ..." if len(unexpected) > 6 else ""))
    if missing:
        problems.append(f"{len(missing)} tensors the model needs are absent: {', '.join(missing[:6])}"
                        + (" ..." if len(missing) > 6 else ""))
    if wrong:
        problems.append(f"{len(wrong)} tensors have other shapes: {'; '.join(wrong[:4])}")
    if problems:
        raise UserError(f"{where} does not fit the model its config describes: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)  # lm_head tied: it is the embedding
    return model


# ---- configs ----------------------------------------------------------------------------------
MINIMIND_YARN = dict(rope_scaling="yarn", rope_factor=16.0, rope_original_max_position_embeddings=2048,
                     rope_beta_fast=32.0, rope_beta_slow=1.0, rope_attention_factor=1.0)  # its inference_rope_scaling


def _rope_theta_and_refusals(d: dict, default_theta: float, refuse) -> tuple[float, dict]:
    """(rope_theta, our YaRN fields or {}) from a transformers config's rope_parameters / rope_scaling."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta, yarn = d.get("rope_theta"), {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            refuse(key, value, "expected a mapping")
            continue
        kind = value.get("rope_type", value.get("type", "default"))
        if kind == "yarn":
            if value.get("mscale") or value.get("mscale_all_dim") or value.get("truncate", True) is False:
                refuse(f"{key}.mscale/truncate", "set", "minillm's YaRN has the paper's attention factor and "
                                                        "truncated correction range only")
            factor = value.get("factor")
            original = value.get("original_max_position_embeddings")
            if factor is None or original is None:
                refuse(f"{key}.factor/original_max_position_embeddings", None, "YaRN needs both")
                continue
            yarn = dict(rope_scaling="yarn", rope_factor=float(factor),
                        rope_original_max_position_embeddings=int(original),
                        rope_beta_fast=float(value.get("beta_fast") or 32.0),
                        rope_beta_slow=float(value.get("beta_slow") or 1.0),
                        rope_attention_factor=float(value.get("attention_factor") or 0.0))
        elif kind not in (None, "default"):
            refuse(f"{key}.rope_type", kind, "minillm computes plain RoPE or YaRN (no linear/dynamic/llama3 "
                                             "scaling)")
        if key == "rope_parameters" and value.get("rope_theta") is not None:
            theta = value["rope_theta"] if theta is None else theta
        if key == "rope_parameters" and value.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("rope_parameters.partial_rotary_factor", value["partial_rotary_factor"],
                   "minillm rotates the whole head")
    return float(default_theta if theta is None else theta), yarn


def _sliding_layers(d: dict, n_layers: int) -> list:
    """The layers that would attend through a sliding window (Qwen2/Qwen3: only with use_sliding_window
    and a window; which layers: layer_types, else those from max_window_layers on)."""
    if not d.get("use_sliding_window") or not d.get("sliding_window"):
        return []
    if d.get("layer_types"):
        return [i for i, t in enumerate(d["layer_types"]) if t != "full_attention"]
    first = int(d.get("max_window_layers", 0) or 0)
    return [i for i in range(n_layers) if i >= first]


def config_from_hf(d: dict, where: str) -> ModelConfig:
    """transformers config.json (a dict) -> ModelConfig; a UserError naming every feature minillm's
    decoder would not compute the same way."""
    model_type = d.get("model_type", "")
    archs = d.get("architectures") or []
    arch = archs[0] if archs else _ARCH_BY_TYPE.get(model_type, "")
    if model_type == "minimind" or arch == "MiniMindForCausalLM":
        return config_from_minimind(d, where)
    if arch in _REFUSED_ARCHS:
        raise UserError(f"{where}: {arch} is not supported: {_REFUSED_ARCHS[arch]}")
    if arch not in [a.split(" ")[0] for a in SUPPORTED]:
        raise UserError(f"{where}: architecture {arch or model_type or '(none given)'} is not supported; "
                        f"minillm imports {', '.join(SUPPORTED)}")
    problems = []

    def refuse(feature, value, why):
        problems.append(f"{feature}={value!r} ({why})")

    layers = int(d["num_hidden_layers"])
    heads = int(d["num_attention_heads"])
    kv = d.get("num_key_value_heads") or heads
    hidden = int(d["hidden_size"])
    # Qwen3Config's head_dim defaults to 128; the others derive it (transformers' getattr fallback)
    head_dim = d.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else hidden // heads)
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # one function in transformers' ACT2FN
        refuse("hidden_act", act, "minillm's MLP is SwiGLU with silu")
    if d.get("mlp_bias"):
        refuse("mlp_bias", True, "minillm's MLP projections have no biases")
    attention_bias = False
    if arch == "Qwen2ForCausalLM":
        attention_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
    elif arch == "Qwen2MoeForCausalLM":
        attention_bias = bool(d.get("qkv_bias", True))
    elif d.get("attention_bias"):
        refuse("attention_bias", True, f"{arch} then puts a bias on o_proj too; minillm has q/k/v biases only "
                                       f"(Qwen2's)")
    sliding = _sliding_layers(d, layers)
    if sliding:
        refuse("use_sliding_window", d.get("use_sliding_window", True),
               f"sliding-window attention on layers {sliding[:4]}{'...' if len(sliding) > 4 else ''}; minillm "
               f"attends to the whole context")
    theta, yarn = _rope_theta_and_refusals(d, 10000.0, refuse)
    values = dict(**yarn,vocab_size=int(d["vocab_size"]), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=int(kv), head_dim=int(head_dim),
                  intermediate_size=int(d["intermediate_size"]),
                  max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
                  rope_theta=theta, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                  qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), attention_bias=attention_bias,
                  initializer_range=float(d.get("initializer_range", 0.02)))
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        if int(d.get("decoder_sparse_step", 1)) != 1:
            refuse("decoder_sparse_step", d["decoder_sparse_step"], "minillm puts an MoE in every layer")
        if d.get("mlp_only_layers"):
            refuse("mlp_only_layers", d["mlp_only_layers"], "minillm puts an MoE in every layer")
        values.update(use_moe=True, n_routed_experts=int(d.get("num_experts") or d.get("num_local_experts")),
                      num_experts_per_tok=int(d["num_experts_per_tok"]), n_shared_experts=0,
                      moe_intermediate_size=int(d["moe_intermediate_size"]),
                      norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                      aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)))
    if arch == "Qwen2MoeForCausalLM":
        # one shared expert of width W, scaled by sigmoid(shared_expert_gate(x)): minillm's ungated shared
        # experts hold it exactly when the gate is zero (a constant 0.5, folded into down_proj; checked on
        # load) and W is a multiple of moe_intermediate_size (split into W / moe_intermediate_size experts)
        width, moe_width = int(d.get("shared_expert_intermediate_size", 0)), values["moe_intermediate_size"]
        if width % moe_width == 0:
            values["n_shared_experts"] = width // moe_width
        elif width == 1:
            values["n_shared_experts"] = 0  # a one-row zero expert (minillm's export without shared experts)
        else:
            refuse("shared_expert_intermediate_size", width, f"not a multiple of moe_intermediate_size={moe_width}; "
                                                             f"minillm's shared experts are that wide")
    if problems:
        raise UserError(f"{where}: {arch} with features minillm does not compute: {'; '.join(problems)}")
    return ModelConfig.from_dict(values, where=where)


def config_from_minimind(d: dict, where: str, weight_names=(), shapes: dict | None = None) -> ModelConfig:
    """MiniMind's MiniMindConfig fields (current model/model_minimind.py, or MiniMind2's) -> ModelConfig.

    Current MiniMind: q/k RMSNorm per head, eps 1e-6, routed experts only (num_experts, top-1 by
    default, top-k weights renormalised). MiniMind2: no q/k norm, eps 1e-5, n_routed_experts plus
    n_shared_experts, renormalised only when top-k > 1. Which one a checkpoint is comes from its
    tensors (q_norm present or not) where they are at hand, else from the config's keys."""
    names = set(weight_names)
    shapes = shapes or {}
    if "tok_embeddings.weight" in names or any(".attention.wq." in n for n in names):
        raise UserError(f"{where}: MiniMind's 2024 (v1) layout (tok_embeddings, layers.N.attention.wq, ...) is "
                        f"not supported; minillm reads MiniMind2's and the current model_minimind.py's names")
    if names:
        current = any(".self_attn.q_norm." in n for n in names)
    else:
        current = "num_experts" in d or "head_dim" in d or "inference_rope_scaling" in d
    problems = []

    def refuse(feature, value, why):
        problems.append(f"{feature}={value!r} ({why})")

    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        refuse("hidden_act", act, "minillm's MLP is SwiGLU with silu")
    theta, yarn = _rope_theta_and_refusals(d, 1e6, refuse)
    if d.get("inference_rope_scaling"):  # MiniMind's switch: its fixed YaRN settings
        yarn = {**MINIMIND_YARN, **{k: v for k, v in yarn.items() if k != "rope_scaling"}} if not yarn else yarn
    if d.get("scoring_func", "softmax") != "softmax":
        refuse("scoring_func", d["scoring_func"], "minillm's router is a softmax")
    hidden = int(d.get("hidden_size", shapes.get("model.embed_tokens.weight", (0, 768))[1]))
    heads = int(d.get("num_attention_heads", 8))
    head_dim = int(d.get("head_dim") or (shapes.get("model.layers.0.self_attn.q_norm.weight", (0,))[0])
                   or hidden // heads)
    if "model.layers.0.self_attn.q_proj.weight" in shapes and "num_attention_heads" not in d:
        heads = shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim
    kv = d.get("num_key_value_heads")
    if kv is None:
        k_shape = shapes.get("model.layers.0.self_attn.k_proj.weight")
        kv = k_shape[0] // head_dim if k_shape else (4 if current else 2)
    layers = d.get("num_hidden_layers")
    if layers is None:
        found = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
        layers = max(found) + 1 if found else 8
    use_moe = bool(d.get("use_moe", any(".mlp.experts." in n for n in names)))
    if d.get("intermediate_size"):
        inter = int(d["intermediate_size"])
    elif "model.layers.0.mlp.gate_proj.weight" in shapes:
        inter = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    elif "model.layers.0.mlp.experts.0.gate_proj.weight" in shapes and not d.get("moe_intermediate_size"):
        inter = shapes["model.layers.0.mlp.experts.0.gate_proj.weight"][0]
    elif current:
        inter = math.ceil(hidden * math.pi / 64) * 64
    else:
        inter = 64 * ((int(hidden * 8 / 3) + 63) // 64)
    vocab = d.get("vocab_size") or shapes.get("model.embed_tokens.weight", (6400,))[0]
    values = dict(vocab_size=int(vocab), hidden_size=hidden, num_hidden_layers=int(layers),
                  num_attention_heads=heads, num_key_value_heads=int(kv), head_dim=head_dim,
                  intermediate_size=inter, max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                  rope_theta=theta, **yarn,
                  rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if current else 1e-5)),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), qk_norm=current)
    if use_moe:
        experts = d.get("num_experts", d.get("n_routed_experts"))
        if experts is None:
            experts = len({n.split(".mlp.experts.")[1].split(".")[0] for n in names if ".mlp.experts." in n}) or 4
        shared = 0 if current else int(d.get("n_shared_experts", 1))
        if names and not current:
            shared = len({n.split(".mlp.shared_experts.")[1].split(".")[0]
                          for n in names if ".mlp.shared_experts." in n and n.startswith("model.layers.0.")})
        top_k = int(d.get("num_experts_per_tok", 1 if current else 2))
        norm = bool(d.get("norm_topk_prob", True))
        if not current and top_k == 1:
            norm = False  # MiniMind2 renormalises only when top_k > 1
        moe_inter = d.get("moe_intermediate_size") or (
            shapes.get("model.layers.0.mlp.experts.0.gate_proj.weight", (inter,))[0])
        values.update(use_moe=True, n_routed_experts=int(experts), num_experts_per_tok=top_k, n_shared_experts=shared,
                      moe_intermediate_size=int(moe_inter), norm_topk_prob=norm,
                      aux_loss_coef=float(d.get("router_aux_loss_coef", d.get("aux_loss_alpha", 5e-4))))
    if problems:
        raise UserError(f"{where}: MiniMind model with features minillm does not compute: {'; '.join(problems)}")
    return ModelConfig.from_dict(values, where=where)


def load_config(path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, a config.yaml-like doc) of a transformers folder or a MiniMind state dict file."""
    source = import_source(path)
    if source is None:
        raise NotFound(f"{path} is neither a transformers folder (config.json) nor a state dict file "
                       f"({'/'.join(STATE_SUFFIXES)})")
    kind, p = source
    if kind == "hf":
        d = _read_json(p / HF_CONFIG)
        if d.get("model_type") == "minimind":
            shapes = _weight_shapes(source)
            cfg = config_from_minimind(d, str(p / HF_CONFIG), shapes.keys(), shapes)
        else:
            cfg = config_from_hf(d, str(p / HF_CONFIG))
    else:
        side = p.parent / HF_CONFIG
        d = _read_json(side) if side.is_file() else {}
        shapes = _weight_shapes(source)
        cfg = config_from_minimind(d, f"{p}" + (f" with {side}" if side.is_file() else ""), shapes.keys(), shapes)
    return cfg, {"model": cfg.to_dict(), "imported_from": str(p)}


def load_model(path, device="cpu", kernel_backend: str | None = None):
    """MiniLLM with the weights of a transformers folder or MiniMind state dict file."""
    from minillm.model import MiniLLM
    source = import_source(path)
    cfg, _ = load_config(path)
    if kernel_backend is not None:
        cfg.kernel_backend = kernel_backend
    state = to_minillm_state(read_weights(source), cfg, str(source[1]))
    return load_state_into(MiniLLM(cfg), state, str(source[1])).to(device)


class MissingTokenizer:
    """Stands in for the tokenizer of a state dict file that has none beside it: any use is a
    UserError saying what to pass (the stage scripts never touch it when --tokenizer_path is given)."""
    vocab_size = 0

    def __init__(self, message: str):
        self._message = message

    def __getattr__(self, name):
        if name.startswith("__") or name == "_message":  # copy/pickle probes: not a use
            raise AttributeError(name)
        raise UserError(self._message)


def load_tokenizer(path):
    """The tokenizer that belongs to a transformers folder or a state dict file: tokenizer.json
    (HFTokenizer) or tokenizer.model beside it; a MissingTokenizer when there is none."""
    kind, p = import_source(path)
    folder = p if kind == "hf" else p.parent
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder)
    if (folder / "tokenizer.model").is_file():
        try:
            return Tokenizer.load(folder)
        except UserError as e:  # a foreign SentencePiece model: an error when used, so --tokenizer_path can stand in
            return MissingTokenizer(f"{e}. minillm reads a transformers folder's tokenizer.model only when "
                                    f"minillm made it; give the folder its tokenizer.json, or pass --tokenizer_path")
    return MissingTokenizer(f"{p} comes without a tokenizer (no tokenizer.json or tokenizer.model beside it); "
                            f"pass --tokenizer_path DIR (e.g. MiniMind's model/ folder, which holds its "
                            f"tokenizer.json) or copy the tokenizer files next to it")


# ---- tokenizer.json ---------------------------------------------------------------------------
def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def is_chatml(template) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


class HFTokenizer(Tokenizer):
    """A tokenizer.json (the `tokenizers` package) behind minillm's Tokenizer API: encode/decode/
    pieces/specials come from it, render_chat / render_prompt (ChatML, the loss mask) are Tokenizer's.

    Specials: <|im_start|>, <|im_end|>, <|endoftext|>, <think>, </think>, <answer>, </answer> where the
    vocabulary has them; pad is <|pad|>, else tokenizer_config.json's pad_token, else <|endoftext|>;
    the end-of-document id is <|endoftext|>, else the eos_token. Chat needs a ChatML chat template
    (tokenizer_config.json's chat_template or chat_template.jinja) and the two ChatML tokens.
    """

    FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

    def __init__(self, files: dict, source: str = "tokenizer.json"):
        try:
            import tokenizers
        except ImportError:
            raise UserError(f"{source} needs the `tokenizers` package: pip install tokenizers "
                            f"(or pip install 'minillm[hf]')") from None
        self._files = dict(files)
        self.source = source
        try:
            self.tk = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:
            raise UserError(f"{source} cannot be read by the tokenizers package "
                            f"({' '.join(str(e).split())[:200]})") from None
        tcfg = {}
        if "tokenizer_config.json" in files:
            try:
                tcfg = json.loads(files["tokenizer_config.json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"tokenizer_config.json beside {source} is not valid JSON ({e})") from None
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].decode("utf-8")
        self.chat_template = template
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        ids = {name: self.tk.token_to_id(piece) for name, piece in SPECIAL_TOKENS.items()}
        ids = {k: v for k, v in ids.items() if v is not None}
        eos = ids.get("endoftext")
        if eos is None:
            eos = self._id_of(_token_text(tcfg.get("eos_token")))
        if eos is None:
            eos = self._id_of("</s>")
        if eos is None:
            raise UserError(f"{source}: no end-of-text token (<|endoftext|>, tokenizer_config.json's eos_token or "
                            f"</s>); minillm separates documents with it")
        pad = ids.get("pad")
        if pad is None:
            pad = self._id_of(_token_text(tcfg.get("pad_token")))
        ids["endoftext"], ids["pad"] = eos, eos if pad is None else pad
        self._set_specials(ids)
        decoder = self.tk.get_added_tokens_decoder()
        self._special_id_set = self._special_id_set | {i for i, t in decoder.items() if t.special}

    def _id_of(self, piece):
        return self.tk.token_to_id(piece) if piece else None

    @classmethod
    def load(cls, path=None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise NotFound(f"tokenizer file not found: {path}")
        files = {"tokenizer.json": path.read_bytes()}
        for name in cls.FILES[1:]:
            if (path.parent / name).is_file():
                files[name] = (path.parent / name).read_bytes()
        return cls(files, source=str(path))

    def save(self, folder):
        """Write the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (folder / name).write_bytes(data)
        return folder / "tokenizer.json"

    @property
    def fingerprint(self):
        h = hashlib.sha1()
        for name in sorted(self._files):
            h.update(name.encode() + b"\0" + self._files[name])
        return h.hexdigest()[:12]

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, num_threads=-1):
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_id_set]
        return self.tk.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id):
        return self.tk.id_to_token(int(token_id))

    def check_chat(self):
        """UserError unless this tokenizer can render ChatML (what every chat stage trains on)."""
        if self.im_start_id is None or self.im_end_id is None:
            raise UserError(f"{self.source} has no <|im_start|>/<|im_end|> tokens; minillm renders chats as "
                            f"ChatML, so this tokenizer serves pretraining (raw text) only")
        if not is_chatml(self.chat_template):
            what = ("this model has no chat template (tokenizer_config.json chat_template), so none in ChatML"
                    if not self.chat_template else "this model's chat template is not ChatML")
            raise UserError(f"{self.source}: {what}; minillm renders ChatML (<|im_start|>role\\n"
                            f"...<|im_end|>), so chat stages and chat generation are refused; pretraining on raw "
                            f"text works")

    def render_chat(self, messages, add_generation_prompt=False, **options):
        self.check_chat()
        return super().render_chat(messages, add_generation_prompt, **options)
