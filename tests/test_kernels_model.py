"""A tiny model on the Triton path (interpreted on CPU) gives the loss and gradients of the torch path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
minillm = pytest.importorskip("minillm")


def torch_and_triton(**overrides):
    """The debug preset on the torch path and on the Triton path, with the same weights."""
    ref_model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="torch", **overrides))
    model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="triton", **overrides))
    model.load_state_dict(ref_model.state_dict())
    return ref_model, model


def loss_and_grads(model, input_ids, labels):
    out = model(input_ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "num_key_value_heads": 1}])
def test_triton_path_matches_torch_path(overrides):
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=1, **overrides)
    ref_model, model = torch_and_triton(**cfg)

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 512, (2, 13), generator=g)
    labels = torch.randint(0, 512, (2, 13), generator=g)
    labels[0, :4] = -100  # a masked prompt

    losses, grads = zip(*(loss_and_grads(m, input_ids, labels) for m in (ref_model, model)))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-4, msg=f"grad of {name}")


def test_moe_grouped_matmul_path_matches_the_expert_loop(monkeypatch):
    """The Triton MoE path (sorted rows, two grouped matmuls, counts never read on the host) gives
    the loss and gradients of the per-expert loop, including an expert that gets no token."""
    from minillm.model import MoE
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    ref_model, model = torch_and_triton(**cfg)

    route = MoE.route

    def route_never_to_expert_3(self, x_flat):
        ids, weights, probs = route(self, x_flat)
        masked = probs.detach().clone()
        masked[:, 3] = -1
        _, ids = masked.topk(self.top_k, dim=-1)
        weights = probs.gather(-1, ids)
        return ids, weights / weights.sum(-1, keepdim=True), probs
    monkeypatch.setattr(MoE, "route", route_never_to_expert_3)

    input_ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    losses, grads = zip(*(loss_and_grads(m, input_ids, input_ids) for m in (ref_model, model)))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    idle = {n for n in grads[1] if ".experts.3." in n}
    assert idle and not idle & grads[0].keys()  # the loop never ran expert 3
    assert all(grads[1][n].abs().max() == 0 for n in idle)  # the grouped kernel gave it zero gradient
    assert grads[0].keys() == grads[1].keys() - idle
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-4, msg=f"grad of {name}")


def test_moe_triton_path_compiles_into_one_graph():
    """fullgraph=True raises on a graph break: the loop path's counts.tolist() would be one; the
    grouped path keeps the counts on the device, so the whole MoE model is one graph."""
    torch.manual_seed(0)
    cfg = minillm.ModelConfig.preset("debug", kernel_backend="triton", num_hidden_layers=1, use_moe=True,
                                     n_routed_experts=4, num_experts_per_tok=2)
    model = minillm.MiniLLM(cfg)
    input_ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids, labels=input_ids).loss
    torch.testing.assert_close(loss, model(input_ids, labels=input_ids).loss)
    loss.backward()
    assert model.model.layers[0].mlp.experts[0].gate_proj.weight.grad is not None

    loop = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="torch", num_hidden_layers=1,
                                                      use_moe=True, n_routed_experts=4, num_experts_per_tok=2))
    with pytest.raises(Exception, match="(?i)graph break|tolist|data-dependent|Unsupported"):
        torch.compile(loop, backend="aot_eager", fullgraph=True)(input_ids, labels=input_ids)


def test_moe_with_lora_on_the_experts_keeps_the_adapters_on_the_triton_path():
    """LoRA wraps the expert projections; the grouped path would bypass the wrappers, so the layer
    must run them (same logits as the torch path, and the adapters change the output)."""
    from minillm.lora import apply_lora
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=1, use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    models = torch_and_triton(**cfg)
    input_ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = models[1](input_ids)
    for m in models:
        apply_lora(m, rank=4)
    for name, p in models[0].named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.constant_(p, 0.05)  # a non-zero update
    models[1].load_state_dict(models[0].state_dict())  # the same adapters in both
    torch.testing.assert_close(models[1](input_ids), models[0](input_ids), atol=1e-5, rtol=1e-5)
    assert (models[1](input_ids) - plain).abs().max() > 1e-3
