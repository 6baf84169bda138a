"""MiniMind drop-in (issue 15): its presets, its flags, its datasets.

Facts come from jingyaogong/minimind: model/model_minimind.py (MiniMindConfig defaults, module
names, forward), trainer/*.py (flags), eval_llm.py (eval flags), model/tokenizer_config.json
(chat template), README (published sizes: minimind-3 "64M", minimind-3-moe "198M-A64M").
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.model import MiniLLM
from minillm.tokenizer import render_tools

ROOT = Path(__file__).resolve().parents[1]


# -- 1. presets --------------------------------------------------------------------------------

def minimind_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state dict MiniMindForCausalLM(MiniMindConfig(...)).state_dict() holds, name -> shape,
    written from model/model_minimind.py (Attention, FeedForward, MOEFeedForward, MiniMindBlock,
    MiniMindModel, MiniMindForCausalLM; tied lm_head is listed under both names, as torch does)."""
    h, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}

    def ffn(prefix, width):
        shapes.update({f"{prefix}.gate_proj.weight": (width, h), f"{prefix}.down_proj.weight": (h, width),
                       f"{prefix}.up_proj.weight": (width, h)})

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (nq * d, h), f"{p}.self_attn.k_proj.weight": (nkv * d, h),
                       f"{p}.self_attn.v_proj.weight": (nkv * d, h), f"{p}.self_attn.o_proj.weight": (h, nq * d),
                       f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,),
                       f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)})
        if cfg.use_moe:
            shapes[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
            for e in range(cfg.n_routed_experts):
                ffn(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
        else:
            ffn(f"{p}.mlp", cfg.intermediate_size)
    return shapes


def minimind_config_defaults(use_moe: bool) -> dict:
    """MiniMindConfig(hidden_size=768, num_hidden_layers=8, use_moe=...)'s values, as its __init__
    computes them."""
    hidden = 768
    inter = math.ceil(hidden * math.pi / 64) * 64
    return dict(hidden_size=hidden, num_hidden_layers=8, vocab_size=6400, num_attention_heads=8,
                num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=inter, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, use_moe=use_moe,
                **(dict(n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=inter, norm_topk_prob=True,
                        aux_loss_coef=5e-4) if use_moe else {}))


def active_params(cfg: ModelConfig, total: int) -> int:
    """trainer_utils.get_model_params: total minus the experts a token does not use."""
    if not cfg.use_moe:
        return total
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_hidden_layers
    return total - expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)


@pytest.mark.parametrize("name,use_moe", [("minimind-3", False), ("minimind-3-moe", True)])
def test_preset_is_minimind3(name, use_moe):
    cfg = ModelConfig.preset(name)
    for key, value in minimind_config_defaults(use_moe).items():
        assert getattr(cfg, key) == value, key
    assert cfg.qk_norm  # Attention.q_norm / k_norm
    assert cfg.n_shared_experts == 0 or not use_moe  # "removed shared expert"


def _meta_model(cfg):
    with torch.device("meta"):
        return MiniLLM(cfg)


@pytest.mark.parametrize("name,published,active", [("minimind-3", "64M", "64M"),
                                                   ("minimind-3-moe", "198M", "64M")])
def test_param_counts_match_published(name, published, active):
    cfg = ModelConfig.preset(name)
    model = _meta_model(cfg)
    total = cfg.num_params()
    assert model.num_params() == total
    assert f"{round(total / 1e6)}M" == published
    assert f"{round(active_params(cfg, total) / 1e6)}M" == active
    # the README's figures, exactly: 63.91M and 198.42M-A63.94M
    assert (total, active_params(cfg, total)) == {"minimind-3": (63_912_192, 63_912_192),
                                                  "minimind-3-moe": (198_416_640, 63_936_768)}[name]


@pytest.mark.parametrize("name", ["minimind-3", "minimind-3-moe"])
def test_state_dict_names_and_shapes_are_minimind(name):
    cfg = ModelConfig.preset(name)
    ours = {k: tuple(v.shape) for k, v in _meta_model(cfg).state_dict().items()}
    assert ours == minimind_shapes(cfg)


# MiniMind's forward, written out from model/model_minimind.py (eval mode, no cache, no mask)

def _mm_rms(x, w, eps):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def _mm_rope(q, k, cfg, T):
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs = torch.outer(torch.arange(T).float(), freqs)
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).unsqueeze(1)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).unsqueeze(1)

    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _mm_ffn(sd, p, x):
    return F.linear(F.silu(F.linear(x, sd[f"{p}.gate_proj.weight"])) * F.linear(x, sd[f"{p}.up_proj.weight"]),
                    sd[f"{p}.down_proj.weight"])


def minimind_logits(sd, cfg, ids):
    B, T = ids.shape
    nq, nkv, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = _mm_rms(x, sd[f"{p}.input_layernorm.weight"], eps)
        q = F.linear(a, sd[f"{p}.self_attn.q_proj.weight"]).view(B, T, nq, d)
        k = F.linear(a, sd[f"{p}.self_attn.k_proj.weight"]).view(B, T, nkv, d)
        v = F.linear(a, sd[f"{p}.self_attn.v_proj.weight"]).view(B, T, nkv, d)
        q, k = _mm_rms(q, sd[f"{p}.self_attn.q_norm.weight"], eps), _mm_rms(k, sd[f"{p}.self_attn.k_norm.weight"], eps)
        q, k = _mm_rope(q, k, cfg, T)
        rep = nq // nkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # repeat_kv
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), sd[f"{p}.self_attn.o_proj.weight"])
        m = _mm_rms(x, sd[f"{p}.post_attention_layernorm.weight"], eps)
        if not cfg.use_moe:
            x = x + _mm_ffn(sd, f"{p}.mlp", m)
            continue
        flat = m.reshape(-1, m.shape[-1])
        scores = F.softmax(F.linear(flat, sd[f"{p}.mlp.gate.weight"]), dim=-1)
        w, idx = torch.topk(scores, k=cfg.num_experts_per_tok, dim=-1, sorted=False)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(flat)
        for e in range(cfg.n_routed_experts):
            mask = idx == e
            if mask.any():
                tok = mask.any(-1).nonzero().flatten()
                y.index_add_(0, tok, _mm_ffn(sd, f"{p}.mlp.experts.{e}", flat[tok]) * w[mask].view(-1, 1))
        x = x + y.view_as(x)
    x = _mm_rms(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["lm_head.weight"])


@pytest.mark.parametrize("name", ["minimind-3", "minimind-3-moe"])
def test_minimind_state_dict_loads_with_equal_logits(name):
    # two layers keep it quick; everything else is the preset's
    cfg = ModelConfig.preset(name, num_hidden_layers=2, kernel_backend="torch")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in minimind_shapes(cfg).items():
        if key == "lm_head.weight":
            continue
        if len(shape) == 1:  # norms: around 1, not exactly, so a swapped q/k norm would show
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied, as MiniMind saves it
    model = MiniLLM(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    with torch.no_grad():
        ours, theirs = model(ids), minimind_logits(sd, cfg, ids)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


# -- 2. MiniMind's flags -----------------------------------------------------------------------

def run(script, *args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """MiniMind's pretrain command (its flags, values as it writes them) on a little demo data, then its
    SFT command with --from_weight pretrain: out/pretrain and out/full_sft."""
    root = tmp_path_factory.mktemp("minimind")
    for name, n in (("pretrain", 40), ("sft", 24)):
        lines = (ROOT / f"dataset/demo/{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "out"
    common = ["--save_dir", out, "--epochs", 1, "--batch_size", 4, "--device", "cpu", "--dtype", "bfloat16",
              "--num_workers", 0, "--accumulation_steps", 1, "--grad_clip", 1.0, "--log_interval", 1,
              "--save_interval", 1, "--from_resume", 0, "--use_compile", 0, "--max_steps", 1]
    pre = run("train_pretrain.py", "--preset", "debug", "--data_path", root / "pretrain.jsonl", "--save_weight",
              "pretrain", "--max_seq_len", 32, "--from_weight", "none", "--use_wandb", "--wandb_project",
              "MiniMind-Pretrain", *common)
    sft = run("train_full_sft.py", "--data_path", root / "sft.jsonl", "--save_weight", "full_sft", "--max_seq_len",
              64, "--from_weight", "pretrain", "--use_wandb", *common)
    return root, out, pre, sft


def test_trainer_accepts_minimind_flags(chain):
    root, out, pre, sft = chain
    assert "--use_wandb: minillm logs to TensorBoard" in pre.stdout and "MiniMind-Pretrain" in pre.stdout
    assert (out / "logs" / "pretrain").is_dir()  # where the note says the logs are
    assert f"from {out / 'pretrain'}" in sft.stdout  # --from_weight pretrain -> <save_dir>/pretrain
    assert (out / "full_sft").is_dir()


def test_from_weight_refusals(chain):
    root, out, _, _ = chain
    base = ["--data_path", root / "sft.jsonl", "--save_dir", out, "--device", "cpu"]
    r = run("train_full_sft.py", *base, "--from_weight", "pretrain_768", ok=False)
    assert "--from_weight pretrain_768: no checkpoint folder" in r.stderr and ".pth" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("train_full_sft.py", *base, "--from_weight", "pretrain", "--init_from", out / "pretrain", ok=False)
    assert "--from_weight pretrain and --init_from" in r.stderr
    # MiniMind's shape flags: a fine-tuned model keeps its checkpoint's shape, said by name
    r = run("train_full_sft.py", *base, "--from_weight", "pretrain", "--hidden_size", 768, "--use_moe", 1, ok=False)
    assert "hidden_size" in r.stderr and "use_moe" in r.stderr and "Traceback" not in r.stderr


def test_eval_model_takes_minimind_eval_flags(chain):
    """eval_llm.py's flags: --load_from model --weight NAME under --save_dir, --lora_weight None,
    --historys, --open_thinking 0 (the chat starts with /think off), shape flags noted and ignored."""
    _, out, _, _ = chain
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--load_from", "model", "--save_dir", str(out),
                        "--weight", "full_sft", "--lora_weight", "None", "--historys", "2", "--open_thinking", "0",
                        "--hidden_size", "768", "--num_hidden_layers", "8", "--use_moe", "0", "--device", "cpu",
                        "--max_new_tokens", "3", "--interactive", "--show_prompt"],
                       cwd=ROOT, input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"model: {out / 'full_sft'} " in r.stdout and "; chat" in r.stdout
    assert "[--hidden_size 768 ignored: the checkpoint's config fixes the shape (hidden_size 64)]" in r.stdout
    assert "[--num_hidden_layers 8 ignored" in r.stdout and "[--use_moe 0 ignored" in r.stdout
    prompt = r.stdout.split("[prompt:")[1].split("\n")[0]
    assert prompt.rstrip("'").endswith("assistant\\n<think>\\n\\n</think>\\n\\n")  # thinking off from the start
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--save_dir", str(out), "--weight", "full_sft",
                        "--inference_rope_scaling", "x"], cwd=ROOT, input="hi\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--inference_rope_scaling 'x': give a factor" in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_model_flag_mapping(chain, monkeypatch, capsys):
    import io

    import eval_model
    from minillm.lora import apply_lora, save_lora
    from minillm.checkpoint import load_checkpoint
    _, out, _, _ = chain
    model, _ = load_checkpoint(out / "full_sft")
    apply_lora(model, rank=2)
    save_lora(out / "lora_medical", model, {})
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    base = ["--device", "cpu", "--max_new_tokens", "2", "--interactive"]
    eval_model.main(base + ["--out_dir", str(out), "--weight", "pretrain"])  # MiniMind2's --out_dir
    said = capsys.readouterr().out
    assert f"model: {out / 'pretrain'} (" in said and "raw text continuation" in said  # 'pretrain' in --weight
    eval_model.main(base + ["--load_from", str(out / "full_sft"), "--save_dir", str(out), "--lora_weight",
                            "lora_medical"])
    assert "+ LoRA lora_medical" in capsys.readouterr().out
    args = eval_model.build_parser().parse_args(["--weight", "pretrain", "--historys", "4", "--save_dir", str(out)])
    eval_model.apply_minimind_flags(args, ["--weight", "pretrain", "--historys", "4"])
    assert (args.checkpoint, args.model_mode, args.history_cnt) == (str(out / "pretrain"), 0, 4)
    (out / "reason").mkdir(exist_ok=True)
    args = eval_model.build_parser().parse_args(["--weight", "reason", "--save_dir", str(out)])
    eval_model.apply_minimind_flags(args, ["--weight", "reason"])
    assert (args.checkpoint, args.model_mode) == (str(out / "reason"), 3)
    with pytest.raises(FileNotFoundError, match="--weight rlhf: no checkpoint folder"):
        eval_model.apply_minimind_flags(eval_model.build_parser().parse_args(["--weight", "rlhf"]), [])
    for argv, says in ((["--weight", "dpo", "--model_mode", "2"], "both pick"),
                       (["--historys", "2", "--history_cnt", "4"], "disagree"),
                       (["--load_from", "x", "--checkpoint", "y"], "both name")):
        with pytest.raises(ValueError, match=says):
            eval_model.apply_minimind_flags(eval_model.build_parser().parse_args(argv), argv)


def test_minimind_pth_files_by_their_weight_name(tmp_path):
    """MiniMind saves out/<weight>_<hidden_size>[_moe].pth: --from_weight / --weight NAME find it (picked by
    --hidden_size / --use_moe when several are there) and the import loads it."""
    import argparse

    from minillm.config import apply_minimind_flags
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_bytes((ROOT / "minillm/assets/tokenizer.model").read_bytes())
    cfg = ModelConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=192, qk_norm=True, rms_norm_eps=1e-6)
    g = torch.Generator().manual_seed(0)
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.05 * torch.randn(s, generator=g)
          for k, s in minimind_shapes(cfg).items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    torch.save({k: v.half() for k, v in sd.items()}, out / "full_sft_64.pth")
    torch.save({}, out / "full_sft_64_moe.pth")  # never opened: --use_moe 0 picks the dense one
    (out / "full_sft_64_resume.pth").write_bytes(b"")  # MiniMind's resume file is not a weight name

    def from_weight(*flags):
        args = argparse.Namespace(save_dir=str(out), from_weight="full_sft", **dict(zip(flags[::2], flags[1::2])))
        apply_minimind_flags(args)
        return args.init_from
    assert from_weight("use_moe", False) == str(out / "full_sft_64.pth")
    assert from_weight("hidden_size", 64, "use_moe", True) == str(out / "full_sft_64_moe.pth")
    with pytest.raises(ValueError, match="several MiniMind weight files"):
        from_weight()
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--save_dir", str(out), "--weight", "full_sft",
                        "--hidden_size", "64", "--use_moe", "0", "--device", "cpu", "--max_new_tokens", "2",
                        "--interactive"], cwd=ROOT, input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"model: {out / 'full_sft_64.pth'} (" in r.stdout and "ignored" not in r.stdout


# -- 3. MiniMind-3's datasets --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from minillm.tokenizer import Tokenizer
    return Tokenizer.load()


def test_reasoning_content_renders_as_minimind3_template(tok):
    """model/tokenizer_config.json: an assistant turn is '<|im_start|>assistant\\n<think>\\n' + reasoning
    + '\\n</think>\\n\\n' + content; empty content is fine when reasoning carries the turn."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "", "reasoning_content": "only thinking"}]
    ids, mask = tok.render_chat(messages)
    assert tok.decode(ids) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                               "<|im_start|>assistant\n<think>\ntwo and two\n</think>\n\n4<|im_end|>\n"
                               "<|im_start|>user\nand?<|im_end|>\n"
                               "<|im_start|>assistant\n<think>\nonly thinking\n</think>\n\n<|im_end|>\n")
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<think>\ntwo and two\n</think>\n\n4<|im_end|><think>\nonly thinking\n</think>\n\n<|im_end|>"
    # MiniMind2's inline r1 content is trained as written, answer tags and all
    r1 = "<think>\nx\n</think>\n<answer>\ny\n</answer>"
    ids, mask = tok.render_chat([messages[1], {"role": "assistant", "content": r1}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == r1 + "<|im_end|>"


def test_reasoning_parser_reads_both_forms():
    from minillm.reasoning import extract_answer
    assert extract_answer("<think>\nx\n</think>\n<answer>\n12\n</answer>") == "12"  # MiniMind2
    assert extract_answer("<think>\nx\n</think>\n\n12") == "12"  # MiniMind-3
    assert extract_answer("<think>\n\n</think>\n\n12") is None  # no reasoning: not a reasoning reply


MINIMIND3_ROWS = [  # the shapes of MiniMind-3's sft_t2t data (README_en.md "SFT data", dataset/lm_dataset.py)
    {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
    {"conversations": [{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]},
    {"conversations": [{"role": "system", "content": "# Tools ...", "tools": "[{\"name\": \"translate_text\"}]"},
                       {"role": "user", "content": "把'你好世界'翻译成english"},
                       {"role": "assistant", "content": "",
                        "tool_calls": "[{\"name\":\"translate_text\",\"arguments\":{\"text\":\"你好世界\"}}]"},
                       {"role": "tool", "content": "{\"translated_text\":\"Hello World\"}"},
                       {"role": "assistant", "content": "Hello World"}]},
    {"conversations": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]}]},
    {"conversations": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"},
                       {"role": "assistant", "content": "ok"}]},
    # fields a loader fills with null (datasets' Features) are no tool use
    {"conversations": [{"role": "user", "content": "q", "tools": None, "tool_calls": None, "reasoning_content": None},
                       {"role": "assistant", "content": "", "reasoning_content": "thinking only", "tool_calls": None}]},
]


def test_minimind3_sft_rows_load_with_their_tools(tok, tmp_path):
    """MiniMind-3's tool rows (tools as a JSON string on the system message, tool_calls as a JSON string,
    tool-role results) load as they are; the loss covers the call and the replies, never the schemas
    or the tool's result."""
    from minillm.data import SFTDataset
    path = tmp_path / "sft_t2t_mini.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MINIMIND3_ROWS), encoding="utf-8")
    ds = SFTDataset(path, tok, max_seq_len=512)  # no --skip_bad_lines: every row is good
    assert len(ds) == len(MINIMIND3_ROWS) and not ds.bad_lines
    item = ds[2]
    ids, mask = item["ids"].tolist(), item["loss_mask"].tolist()
    system = ("<|im_start|>system\n# Tools ...\n\n" + render_tools([{"name": "translate_text"}]) + "<|im_end|>\n")
    call = '<tool_call>\n{"name": "translate_text", "arguments": {"text": "你好世界"}}\n</tool_call>'
    assert tok.decode(ids) == (system + "<|im_start|>user\n把'你好世界'翻译成english<|im_end|>\n"
                               "<|im_start|>assistant\n" + call + "<|im_end|>\n"
                               '<|im_start|>user\n<tool_response>\n{"translated_text":"Hello World"}\n'
                               "</tool_response><|im_end|>\n<|im_start|>assistant\nHello World<|im_end|>\n")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == call + "<|im_end|>Hello World<|im_end|>"
    # one id each: the two in the system turn's instructions and the call's
    assert ids.count(tok.special_ids["tool_call_start"]) == 3 and ids.count(tok.special_ids["tool_call_end"]) == 3


def test_minimind3_dpo_pairs_with_tool_calls_load(tok, tmp_path):
    from minillm.data import DPODataset
    q = {"role": "user", "content": "hi"}
    rows = [{"chosen": [q, {"role": "assistant", "content": "good"}], "rejected": [q, {"role": "assistant", "content": "bad"}]},
            {"chosen": [q, {"role": "assistant", "content": "", "tool_calls": '[{"name": "f", "arguments": {}}]'}],
             "rejected": [q, {"role": "assistant", "content": "bad"}], "tools": [{"name": "f"}]}]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = DPODataset(path, tok, max_seq_len=256)
    assert len(ds) == 2
    chosen = ds[1]["chosen_ids"].tolist()
    assert tok.decode(chosen).startswith("<|im_start|>system\n# Tools") and tok.special_ids["tool_call_start"] in chosen


def test_tokenizer_path_takes_minimind_model_folder(tmp_path):
    """MiniMind's tokenizer is model/tokenizer.json (+ tokenizer_config.json): --tokenizer_path model/ passes
    the path check (Tokenizer.load reads it through minillm.hf)."""
    from minillm.config import TrainConfig
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    TrainConfig(tokenizer_path=str(tmp_path / "model")).check_paths()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without tokenizer.model or tokenizer.json"):
        TrainConfig(tokenizer_path=str(tmp_path / "empty")).check_paths()
