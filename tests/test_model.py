import pytest
import torch

import minillm
from minillm.config import ModelConfig, PRESETS, load_yaml, save_yaml
from minillm.generate import SamplingParams, generate_batch, sample_next
from minillm.model import KVCache, MiniLLM


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", **kw)
    model = MiniLLM(cfg).eval()
    # a larger init than training's, so logits differ clearly between tokens and positions
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("moe", [False, True])
def test_future_tokens_never_change_earlier_logits(moe):
    model = tiny(use_moe=moe)
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_decode_equals_full_forward(moe):
    model = tiny(use_moe=moe)
    x = torch.randint(0, 512, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 3, 32, "cpu", torch.float32)
        parts = [model(x[:, :7], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert cache.length == 20
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(num_attention_heads=4, num_key_value_heads=2)
    mha = MiniLLM(ModelConfig.preset("debug", num_attention_heads=4, num_key_value_heads=4)).eval()
    group, d = 2, gqa.config.head_dim
    state = {}
    for name, t in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            t = t.view(2, d, -1).repeat_interleave(group, dim=0).reshape(4 * d, -1)
        state[name] = t
    mha.load_state_dict(state)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_moe_aux_loss_is_minimal_when_balanced():
    model = tiny(use_moe=True, n_routed_experts=4, num_experts_per_tok=1)
    moe = model.model.layers[0].mlp
    n = 64
    balanced_ids = torch.arange(n).remainder(4).unsqueeze(1)
    uniform = torch.full((n, 4), 0.25)
    assert moe.aux_loss(balanced_ids, uniform).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(n, 1)
    collapsed = moe.aux_loss(torch.zeros(n, 1, dtype=torch.long), skewed_probs).item()
    assert collapsed == pytest.approx(4 * 0.97, rel=1e-5)
    partly = moe.aux_loss(torch.arange(n).remainder(2).unsqueeze(1), torch.full((n, 4), 0.25)).item()
    assert partly >= 1.0 - 1e-6


def test_moe_routes_each_token_to_its_top_k_experts_only():
    model = tiny(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0)
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 10, model.config.hidden_size)
    with torch.no_grad():
        out, _ = moe(x)
        ids, weights, _ = moe.route(x.view(-1, x.shape[-1]))
        expected = torch.zeros(10, x.shape[-1])
        for t in range(10):
            for j in range(2):
                expected[t] += weights[t, j] * moe.experts[int(ids[t, j])](x[0, t:t + 1])[0]
    assert torch.allclose(out[0], expected, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(10))


def test_moe_aux_loss_reaches_the_training_loss():
    model = tiny(use_moe=True).train()
    x = torch.randint(0, 512, (2, 9))
    out = model(x[:, :-1], labels=x[:, 1:])
    assert out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + model.config.aux_loss_coef * out.aux_loss.item(),
                                            rel=1e-5)
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_loss_ignores_masked_labels_and_matches_logits():
    model = tiny()
    x = torch.randint(0, 512, (2, 10))
    labels = torch.randint(0, 512, (2, 10))
    labels[0, :4] = -100
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        assert model(x, labels=labels).loss.item() == pytest.approx(expected.item(), rel=1e-5)
        # "sum" is the mean times the counted positions; "none" is per position, 0 where masked
        n = (labels != -100).sum()
        assert model(x, labels=labels, reduction="sum").ce_loss.item() == pytest.approx(expected.item() * n.item(),
                                                                                         rel=1e-5)
        per_token = model(x, labels=labels, reduction="none").ce_loss
        assert per_token.shape == (2, 10) and per_token[0, :4].eq(0).all()
        by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                    reduction="none").view(2, 10)
        torch.testing.assert_close(per_token, by_hand)
        with pytest.raises(ValueError, match="reduction"):
            model(x, labels=labels, reduction="max")


def test_moe_top1_renormalises_like_transformers():
    """norm_topk_prob at k = 1 makes the single gate weight 1 (transformers' Qwen2-MoE renormalises for
    every k); without the flag it stays the softmax probability."""
    torch.manual_seed(0)
    x = torch.randn(6, 64)
    for norm in (True, False):
        moe = MiniLLM(ModelConfig.preset("debug", vocab_size=512, use_moe=True, num_experts_per_tok=1,
                                         norm_topk_prob=norm, kernel_backend="torch")).model.layers[0].mlp
        ids, weights, probs = moe.route(x)
        expected = torch.ones(6, 1) if norm else probs.gather(-1, ids)
        torch.testing.assert_close(weights, expected)
        assert (weights < 1).all() != norm


def test_token_logprobs_zero_on_masked_positions():
    model = tiny()
    x = torch.randint(0, 512, (2, 8))
    labels = x.roll(-1, 1)
    labels[:, :3] = -100
    with torch.no_grad():
        lp = model.token_logprobs(x, labels)
        ref = model(x).log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (lp[:, :3] == 0).all()
    assert torch.allclose(lp[:, 3:], ref[:, 3:], atol=1e-5)


def test_presets_have_the_documented_sizes():
    def millions(name):
        return ModelConfig.preset(name).num_params() / 1e6
    assert millions("minimind2-small") == pytest.approx(26, abs=1)
    assert millions("minimind2") == pytest.approx(104, abs=1)
    assert millions("minimind-3") == pytest.approx(64, abs=1)
    assert millions("1b") == pytest.approx(1000, rel=0.1)
    assert millions("demo") == pytest.approx(3.3, abs=0.05) and millions("demo-student") == pytest.approx(0.64, abs=0.01)
    cfg = ModelConfig.preset("minimind-3")
    assert (cfg.head_dim, cfg.intermediate_size, cfg.num_key_value_heads) == (96, 2432, 4)
    for name in ("debug", "minimind2-moe"):
        cfg = ModelConfig.preset(name)
        assert MiniLLM(cfg).num_params() == cfg.num_params()


def test_parameter_names_follow_llama():
    names = set(MiniLLM(ModelConfig.preset("debug")).state_dict())
    for n in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.1.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.down_proj.weight"):
        assert n in names


def test_config_yaml_round_trip_and_errors(tmp_path):
    cfg = ModelConfig.preset("minimind2-moe")
    save_yaml(tmp_path / "c.yaml", cfg)
    assert ModelConfig.from_dict(load_yaml(tmp_path / "c.yaml")["model"]) == cfg
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
    assert set(PRESETS) >= {"debug", "minimind2-small", "minimind2", "minimind2-moe", "minimind-3", "1b"}


# -- generation ---------------------------------------------------------------------------------
def test_left_padded_batch_generates_like_single_prompts():
    model = tiny()
    prompts = [[5, 9, 13, 200, 7, 31, 2], [40, 41], [300, 301, 302, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    batch = generate_batch(model, prompts, params)
    single = [generate_batch(model, [p], params)[0] for p in prompts]
    assert batch == single
    assert all(len(r) == 8 for r in batch)


def test_generation_stops_at_stop_token():
    model = tiny()
    params = SamplingParams(max_new_tokens=10, temperature=0)
    free = generate_batch(model, [[1, 2, 3]], params)[0]
    stop_at = free[3]
    first = free.index(stop_at)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=[stop_at])
    assert generate_batch(model, [[1, 2, 3]], params)[0] == free[:first + 1]


def test_top_k_top_p_and_repetition_penalty():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), g)) for _ in range(200)}
    assert draws == {0, 1}
    # softmax mass of token 0 is ~0.71: top_p=0.5 keeps only it, top_p=0.9 keeps two
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(100)}
    assert draws == {0}
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.9), g)) for _ in range(300)}
    assert draws == {0, 1}
    assert int(sample_next(logits, SamplingParams(temperature=0))) == 0
    from minillm.generate import apply_repetition_penalty
    seen = torch.tensor([[True, False, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[2.5, 4.0, 1.0, 0.0, -2.0]]


def test_public_api_names():
    for name in ("ModelConfig", "MiniLLM", "Tokenizer", "load_checkpoint", "save_checkpoint", "generate"):
        assert hasattr(minillm, name), name


def test_text_generate_streams_the_same_text_as_whole():
    tok = minillm.Tokenizer.load()
    model = tiny(vocab_size=tok.vocab_size)
    msgs = [{"role": "user", "content": "维洛里亚的首都是哪里? What is 2 + 3?"}]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = minillm.generate(model, tok, msgs, max_new_tokens=12, temperature=1.0, top_p=0.9, generator=g1)
    pieces = list(minillm.generate(model, tok, msgs, max_new_tokens=12, temperature=1.0, top_p=0.9,
                                   stream=True, generator=g2))
    assert "".join(pieces) == whole and len(pieces) > 1
    assert "<|im_end|>" not in whole
