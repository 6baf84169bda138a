"""--optimizer muon: which weights Muon trains, that each part steps exactly as its own torch optimizer
would, the non-finite guard, exact resume, and a two-process run equal to one process."""
import pytest
import torch
from conftest import crash_after_save

import train_pretrain
from minillm.checkpoint import load_checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.errors import UserError
from minillm.lora import apply_lora
from minillm.model import MiniLLM
from minillm.trainer import MuonAdamW, build_optimizer, is_muon_param

TINY = ["--preset", "debug", "--vocab_size", "6400", "--max_seq_len", "32", "--batch_size", "4",
        "--log_interval", "1", "--num_workers", "0", "--use_tensorboard", "0", "--learning_rate", "3e-3",
        "--optimizer", "muon"]


def run_pretrain(corpus, save_dir, *extra):
    return train_pretrain.main(TINY + ["--data_path", str(corpus), "--save_dir", str(save_dir), *extra])


def tiny_model(**overrides):
    torch.manual_seed(0)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=512, **overrides))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model(use_moe=True)
    muon = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert muon and all(".layers." in f".{n}" for n in muon)
    assert any(n.endswith("q_proj.weight") for n in muon) and any("experts" in n for n in muon)
    for n, p in model.named_parameters():
        if n in muon:
            assert p.dim() == 2
        elif p.dim() == 2:  # the 2-D weights Muon leaves alone: embeddings, head, router
            assert n.endswith(("embed_tokens.weight", "lm_head.weight", ".gate.weight")), n


def test_lora_adapters_stay_on_adamw_unless_asked():
    model = tiny_model()
    params = apply_lora(model, 4, 8, 0.0, "q_proj,v_proj", False)
    named = [(n, p) for n, p in model.named_parameters() if any(p is q for q in params)]
    assert not any(is_muon_param(n, p) for n, p in named)
    assert all(is_muon_param(n, p, adapters=True) for n, p in named)
    cfg = TrainConfig(optimizer="muon")
    with pytest.raises(UserError, match="--muon_adapters 1"):
        build_optimizer(named, cfg, torch.device("cpu"))
    opt = build_optimizer(named, TrainConfig(optimizer="muon", muon_adapters=1), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and sum(len(g["params"]) for g in opt.muon.param_groups) == len(named)


def test_each_part_steps_exactly_like_its_own_torch_optimizer():
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.05, weight_decay=0.1)
    model, ref = tiny_model(), tiny_model()
    opt = build_optimizer(list(model.named_parameters()), cfg, torch.device("cpu"))
    ref_named = list(ref.named_parameters())
    ref_muon = torch.optim.Muon([p for n, p in ref_named if is_muon_param(n, p)], lr=0.05, weight_decay=0.1,
                                momentum=0.95, nesterov=True, adjust_lr_fn="original")
    rest = [p for n, p in ref_named if not is_muon_param(n, p)]
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(3):
        for m in (model, ref):
            m(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        opt.step(), ref_muon.step(), ref_adamw.step()
        opt.zero_grad(), ref_muon.zero_grad(), ref_adamw.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [g["peak_lr"] for g in opt.param_groups] == [0.05, 1e-3, 1e-3]


def test_a_flagged_step_changes_nothing():
    model = tiny_model()
    opt = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 512, (2, 16))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # no momentum was taken from the bad gradient either
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_muon_run_learns_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    n = 3
    whole = run_pretrain(corpus, tmp_path / "a", "--max_steps", str(2 * n), "--save_interval", str(n))
    assert whole.history[-1] < whole.history[0] - 0.2, whole.history

    crash_after_save(monkeypatch, n, lambda: run_pretrain(corpus, tmp_path / "b", "--max_steps", str(2 * n), "--save_interval", str(n)))
    resumed = run_pretrain(corpus, tmp_path / "b", "--max_steps", str(2 * n), "--save_interval", str(n),
                           "--from_resume", "1")
    assert resumed.history == whole.history[n:]
    a, _ = load_checkpoint(tmp_path / "a" / "pretrain", with_tokenizer=False)
    b, _ = load_checkpoint(tmp_path / "b" / "pretrain", with_tokenizer=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name

    # the optimizer cannot change under a resumed run
    with pytest.raises(UserError, match="--optimizer 'muon' -> 'adamw'"):
        train_pretrain.main([*TINY[:-2], "--data_path", str(corpus), "--save_dir", str(tmp_path / "b"),
                             "--max_steps", str(3 * n), "--from_resume", "1", "--optimizer", "adamw"])


def test_pretraining_defaults_to_muon_and_says_so(corpus, tmp_path, capsys):
    """train_pretrain.py trains with Muon unless told otherwise (the fine-tuning stages keep AdamW), and its
    start-up line names the optimizer and both learning rates."""
    base = [*TINY[:-2], "--data_path", str(corpus), "--max_steps", "1"]
    default = train_pretrain.main(base + ["--save_dir", str(tmp_path / "m")])
    assert isinstance(default.optimizer, MuonAdamW)
    assert "rows, Muon lr 0.02 + AdamW lr 0.003;" in capsys.readouterr().out
    adamw = train_pretrain.main(base + ["--save_dir", str(tmp_path / "a"), "--optimizer", "adamw"])
    assert isinstance(adamw.optimizer, torch.optim.AdamW)
    assert "rows, AdamW lr 0.003;" in capsys.readouterr().out


# torch.optim.Muon orthogonalises each update with Newton-Schulz in bf16. Two processes average their
# gradients in another float order than one process sums its micro-batches (~1e-7 apart in fp32); bf16
# rounding inside the five NS iterations turns that into differences of ~1e-3 in the weights after a few
# steps. This wrapper runs train_pretrain.py with the same iteration in fp32, so the DDP plumbing itself
# (the same rows, the averaged gradients, every rank stepping alike) can be checked as tightly as AdamW's.
FP32_NS = '''
import runpy, sys
import torch
import torch.optim._muon as muon

def zeropower_fp32(grad, ns_coefficients, ns_steps, eps):
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x

muon._zeropower_via_newtonschulz = zeropower_fp32
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_two_process_muon_run_matches_one_process(corpus, tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wrapper = tmp_path / "fp32_ns.py"
    wrapper.write_text(FP32_NS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    common = [*TINY[:TINY.index("--batch_size")], *TINY[TINY.index("--batch_size") + 2:], "--data_path", str(corpus),
              "--max_steps", "4", "--accumulation_steps", "2", "--device", "cpu", "--dtype", "float32"]

    def train(name, nproc, ns_fp32):
        script = [str(wrapper), str(root / "train_pretrain.py")] if ns_fp32 else [str(root / "train_pretrain.py")]
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", "2", "--master_port", "29547"]
        out = subprocess.run([*launch, *script, *common, "--batch_size", str(4 // nproc),
                              "--save_dir", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Muon lr" in out.stdout
        losses = [float(x) for x in re.findall(r"^step \d+/\d+ .*? loss ([0-9.]+)", out.stdout, re.M)]
        model, _ = load_checkpoint(tmp_path / name / "pretrain", with_tokenizer=False)
        return losses, model.state_dict()

    def max_diff(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in a)

    one, two = train("one", 1, True), train("two", 2, True)
    assert len(one[0]) == 4 and one[0] == pytest.approx(two[0], rel=1e-4)
    assert max_diff(one[1], two[1]) < 1e-5           # fp32 Newton-Schulz: as exact as AdamW's DDP test
    # the stock bf16 iteration: the same run to bf16 rounding (1.4e-3 measured), far below what a real
    # bug would move (one Muon step is 0.02 per element at this --muon_lr)
    one_bf16, two_bf16 = train("one_bf16", 1, False), train("two_bf16", 2, False)
    assert one_bf16[0] == pytest.approx(two_bf16[0], rel=1e-3)
    assert 0 < max_diff(one_bf16[1], two_bf16[1]) < 5e-3
    assert max_diff(one[1], one_bf16[1]) > 1e-4      # the wrapper did change the iteration
