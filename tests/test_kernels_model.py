"""A tiny model on the Triton path (interpreted on CPU) gives the loss and gradients of the torch path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
minillm = pytest.importorskip("minillm")


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "num_key_value_heads": 1}])
def test_triton_path_matches_torch_path(overrides):
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=1, **overrides)
    ref_model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="torch", **cfg))
    model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="triton", **cfg))
    model.load_state_dict(ref_model.state_dict())

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 512, (2, 13), generator=g)
    labels = torch.randint(0, 512, (2, 13), generator=g)
    labels[0, :4] = -100  # a masked prompt

    losses, grads = [], []
    for m in (ref_model, model):
        out = m(input_ids, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-4, msg=f"grad of {name}")
