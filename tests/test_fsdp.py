"""--fsdp 1 (FSDP2) and --grad_checkpointing: sharded training equals one process, its checkpoints resume on
1 and on 2 processes, two torchrun "machines" equal one 2-process launch, and recomputing activations gives
the same gradients. CPU, gloo, fp32; the multi-process runs are few (each launch imports torch per process)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_pretrain
from minillm.checkpoint import load_checkpoint
from minillm.config import ModelConfig, load_yaml
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 4, 2
# one optimizer step = 4 rows x 2 micro-batches, as 1 process x batch 4 or 2 processes x batch 2
COMMON = ["--preset", "debug", "--vocab_size", "6400", "--max_seq_len", "32", "--log_interval", "1",
          "--num_workers", "0", "--use_tensorboard", "0", "--learning_rate", "3e-3", "--max_steps", str(STEPS),
          "--save_interval", str(SAVE_AT), "--accumulation_steps", "2", "--device", "cpu", "--dtype", "float32",
          "--eval_split", "0.0513",  # 24 held-out rows: whole eval batches of 2 and of 4
          "--optimizer", "adamw"]  # FSDP2 trains with AdamW (Muon needs whole matrices)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Under torchrun: an uninterrupted sharded run, then (same processes) a sharded resume on 2 ranks from its
# step-2 checkpoint; rank 0 alone then runs the trained model (what stage scripts do after fit).
DRIVER = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import train_pretrain
    from minillm.trainer import Trainer
    out, args = Path(sys.argv[1]), sys.argv[2:]
    norms, update = [], Trainer._update
    Trainer._update = lambda self, *a: norms.append(update(self, *a)) or norms[-1]  # the logged grad norms
    whole = train_pretrain.main(args + ["--save_dir", str(out / "whole")])
    Trainer._update, grad_norms = update, [float(n) for n in norms]
    if whole.dist.is_main:
        x = torch.arange(12).view(1, 12)
        with torch.no_grad():
            logits = whole.model(x).tolist()  # rank 0 alone: the gathered model needs no other rank
        shutil.copytree(out / "whole/pretrain.history/step_00000002", out / "resume2/pretrain")
    dist.barrier()
    resumed = train_pretrain.main(args + ["--save_dir", str(out / "resume2"), "--from_resume", "1"])
    if whole.dist.is_main:
        (out / "result.json").write_text(json.dumps({"history": whole.history, "eval": whole.eval_history,
                                                     "grad_norms": grad_norms,
                                                     "resumed": resumed.history, "logits": logits}))
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined here, not torn down at interpreter exit
""")


def _weights(folder):
    model, _ = load_checkpoint(folder, with_tokenizer=False)
    return model.state_dict()


def _assert_same_weights(a, b, exact=False):
    """Equal up to float rounding. Not `exact`: another reduction order (sharded norms, reduce-scatter)
    changes the last bits of a gradient, and AdamW divides by sqrt(v), so where a gradient is near zero an
    element can move by a fraction of one step (lr 3e-3): all but a few per mille of the elements must
    agree to 1e-5, and none by more than 3e-4."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        if exact:
            assert diff.max() <= 1e-6, name
        else:
            assert diff.max() <= 3e-4 and (diff > 1e-5).float().mean() <= 2e-3, (name, diff.max())


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One process (the reference) and a 2-process FSDP launch on the same global batches."""
    out = tmp_path_factory.mktemp("fsdp")
    norms, update = [], Trainer._update
    Trainer._update = lambda self, *a: norms.append(update(self, *a)) or norms[-1]
    try:
        one = train_pretrain.main(COMMON + ["--data_path", str(corpus), "--batch_size", "4",
                                            "--save_dir", str(out / "one")])
    finally:
        Trainer._update = update
    one.grad_norms = [float(n) for n in norms]
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(driver), str(out / "two"), *COMMON, "--data_path", str(corpus),
                        "--batch_size", "2", "--fsdp", "1"], capture_output=True, text=True, env=ENV, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "FSDP2 sharded" in r.stdout
    return one, json.loads((out / "two/result.json").read_text()), out


def test_fsdp_equals_one_process_and_exports_the_usual_checkpoint(runs):
    one, two, out = runs
    assert len(two["history"]) == STEPS
    assert two["history"] == pytest.approx(one.history, rel=1e-5)
    # AdamW hardly sees a uniformly mis-scaled gradient, the norm does (and clipping acts on it). The norms
    # agree to ~6e-5, not 1e-6: torch's fp32 norm of the 409,600-element embedding gradient is itself off
    # by 1.3e-4 from the fp64 value on this CPU, and two half-size shards round differently
    assert two["grad_norms"] == pytest.approx(one.grad_norms, rel=3e-4)
    assert [loss for _, loss in two["eval"]] == pytest.approx([loss for _, loss in one.eval_history], rel=1e-5)
    # model.safetensors holds the whole model (gathered from the shards), loadable as any checkpoint
    _assert_same_weights(_weights(out / "two/whole/pretrain"), _weights(out / "one/pretrain"))
    assert (out / "two/whole/pretrain/dcp/.metadata").is_file()
    # after fit, rank 0 alone ran the trained model: the saved final weights' logits
    final, _ = load_checkpoint(out / "two/whole/pretrain", with_tokenizer=False)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(two["logits"]), final(torch.arange(12).view(1, 12)), atol=1e-5)


def test_a_two_rank_checkpoint_resumes_on_two_ranks_and_on_one(runs, corpus):
    one, two, out = runs
    whole = _weights(out / "two/whole/pretrain")
    # 2 ranks (in the launch): the last steps' losses and the final weights of the uninterrupted run
    assert two["resumed"] == pytest.approx(two["history"][SAVE_AT:], rel=1e-6)
    _assert_same_weights(_weights(out / "two/resume2/pretrain"), whole, exact=True)
    # 1 rank: the step-2 shards resharded into one process, batch 4 = 2 processes x 2
    shutil.copytree(out / "two/whole/pretrain.history/step_00000002", out / "resume1/pretrain")
    resumed = train_pretrain.main(COMMON + ["--data_path", str(corpus), "--batch_size", "4", "--fsdp", "1",
                                            "--save_dir", str(out / "resume1"), "--from_resume", "1"])
    assert resumed.step == STEPS
    assert resumed.history == pytest.approx(two["history"][SAVE_AT:], rel=1e-5)
    _assert_same_weights(_weights(out / "resume1/pretrain"), whole)


def test_resume_refuses_what_would_change_the_run(runs, corpus):
    _, _, out = runs
    shutil.copytree(out / "two/whole/pretrain.history/step_00000002", out / "refuse/pretrain")
    base = COMMON + ["--data_path", str(corpus), "--save_dir", str(out / "refuse"), "--from_resume", "1"]
    # 1 process x batch 2 is half the 2 x 2 rows the saved data position counts in
    with pytest.raises(UserError, match=r"2 processes x --batch_size 2, this run has 1 x 2"):
        train_pretrain.main(base + ["--batch_size", "2", "--fsdp", "1"])
    with pytest.raises(UserError, match=r"--fsdp 1, this run has --fsdp 0"):
        train_pretrain.main(base + ["--batch_size", "4"])


def test_what_fsdp_does_not_shard_is_refused_by_name(runs, tmp_path):
    """A LoRA adapter (save_adapter) is refused before anything trains, naming --fsdp 0."""
    import train_lora
    _, _, out = runs
    with pytest.raises(UserError, match=r"--fsdp 1 shards whole-model training.*--fsdp 0"):
        train_lora.main(["--init_from", str(out / "one/pretrain"), "--fsdp", "1", "--device", "cpu",
                         "--num_workers", "0", "--use_tensorboard", "0", "--max_steps", "1",
                         "--save_dir", str(tmp_path)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_like_one_two_process_launch(runs, corpus):
    """Two torchrun launches as node 0 and node 1 (c10d rendezvous on localhost, one process each) train
    the same steps as one 2-process launch. With --grad_checkpointing 1, which must not change the result."""
    _, two, out = runs

    def launch(save_dir):
        port = _free_port()
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                   str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "minillm",
                                   "--rdzv_endpoint", f"localhost:{port}", str(ROOT / "train_pretrain.py"), *COMMON,
                                   "--data_path", str(corpus), "--batch_size", "2", "--fsdp", "1",
                                   "--grad_checkpointing", "1", "--save_dir", str(save_dir)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for rank in (0, 1)]
        return nodes, [node.communicate(timeout=400) for node in nodes]

    nodes, results = launch(out / "nodes")
    if any(n.returncode != 0 and "SIGABRT" in err for n, (_, err) in zip(nodes, results)):
        # one known flake, seen once so far (a fresh-clone run while another job loaded the 2 cores): a worker
        # aborts in gloo ("terminate called without an active exception") seconds into the run and the other
        # node gives up minutes later. A second launch on a fresh port and folder must pass; anything else fails.
        nodes, results = launch(out / "nodes_again")
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-3000:]
    log = "".join(stdout for stdout, _ in results)
    assert "on 2 x cpu (float32, FSDP2 sharded, grad checkpointing every 1 block(s))" in log
    saved = out / ("nodes_again" if (out / "nodes_again").exists() else "nodes")
    _assert_same_weights(_weights(saved / "pretrain"), _weights(out / "two/whole/pretrain"))


# -- activation checkpointing ---------------------------------------------------------------------
def _loss_and_grads(model, ids, every: int):
    model.grad_checkpointing = every
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout: the recomputed forward must draw the same masks
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(moe):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", vocab_size=512, num_hidden_layers=3, dropout=0.0 if moe else 0.1,
                             use_moe=moe)
    model = MiniLLM(cfg).train()
    ids = torch.randint(0, 512, (2, 24))
    loss, grads = _loss_and_grads(model, ids, 0)
    for every in (1, 2):
        loss_ac, grads_ac = _loss_and_grads(model, ids, every)
        assert torch.allclose(loss_ac, loss, atol=1e-6, rtol=0)
        assert grads_ac.keys() == grads.keys()
        for name in grads:
            assert torch.allclose(grads_ac[name], grads[name], atol=1e-6, rtol=1e-5), (every, name)


def test_activation_checkpointing_keeps_fewer_activations():
    """What the backward pass holds on to after the forward: a checkpointed block keeps its input only."""
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=512, num_hidden_layers=4)).train()
    ids = torch.randint(0, 512, (2, 64))

    def saved_bytes(every):
        model.grad_checkpointing = every
        kept = {}

        def pack(t):
            kept[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids[:, :-1], labels=ids[:, 1:]).loss
        return sum(kept.values())
    full, every_block, every_other = saved_bytes(0), saved_bytes(1), saved_bytes(2)
    assert every_block < every_other < full
    assert every_block < 0.6 * full, (every_block, full)
    model.eval()  # never in eval mode: nothing to save for
    model.grad_checkpointing = 1
    with torch.no_grad():
        model(ids)


def test_grad_checkpointing_is_a_training_switch_not_saved_with_the_model(corpus, tmp_path):
    trainer = train_pretrain.main(COMMON + ["--data_path", str(corpus), "--batch_size", "4", "--max_steps", "1",
                                            "--grad_checkpointing", "1", "--save_dir", str(tmp_path)])
    assert trainer.model.grad_checkpointing == 1
    doc = load_yaml(tmp_path / "pretrain/config.yaml")
    assert doc["train"]["grad_checkpointing"] == 1 and "grad_checkpointing" not in doc["model"]
    loaded, _ = load_checkpoint(tmp_path / "pretrain", with_tokenizer=False)
    assert getattr(loaded, "grad_checkpointing", 0) == 0
