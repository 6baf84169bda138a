"""Logit distillation (train_distillation.py): the loss against hand computations and torch's / the
transformers recipe's formulations, masks, chunking, step splits, and the script end to end with a
student smaller than its frozen teacher."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import train_distillation
import train_full_sft
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import SFTDataset, pad_collate
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    """40 demo conversations (some multi-turn, some with a system prompt) in a folder of their own."""
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    lines = (ROOT / "dataset/demo/sft.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def batch(tok, sft_rows):
    """6 rows of different lengths: prompts, several assistant turns, right padding."""
    ds = SFTDataset(sft_rows, tok, max_seq_len=96)
    b = pad_collate(tok.pad_id)([ds[i] for i in range(6)])
    assert not b["loss_mask"].all(dim=1).any() and (b["ids"] == tok.pad_id).any()  # prompts and padding
    return b


def tiny(tok, seed, **shape):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch", **shape)
    # a wider init than the default: distributions far from uniform, so KL and T matter
    return MiniLLM(ModelConfig.from_dict({**cfg.to_dict(), "initializer_range": 0.3}))


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny(tok, 0).eval().requires_grad_(False)


class FixedLogits(torch.nn.Module):
    """A 'student' whose logits are one leaf tensor: the loss's gradient per position is readable."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, inputs, return_aux=False):
        assert inputs.shape == self.logits.shape[:2]
        return self.logits, torch.zeros(())


def totals_of(*batches):
    return {"n_targets": float(sum(b["n_targets"] for b in batches)), "micro_batches": float(len(batches))}


def student_logits(batch, tok, seed=1):
    with torch.no_grad():
        return tiny(tok, seed, hidden_size=32, num_hidden_layers=1)(batch["ids"][:, :-1])


def hand_loss(s_logits, t_logits, batch, alpha, T):
    """The formula, one target position at a time."""
    ids, mask = batch["ids"], batch["loss_mask"]
    ce_terms, kl_terms = [], []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[b, t + 1]:
                continue
            s, te = s_logits[b, t], t_logits[b, t]
            ce_terms.append(-torch.log_softmax(s, -1)[ids[b, t + 1]])
            p, q = torch.softmax(te / T, -1), torch.softmax(s / T, -1)
            kl_terms.append((p * (p.log() - q.log())).sum())
    ce, kl = torch.stack(ce_terms).mean(), torch.stack(kl_terms).mean()
    return alpha * ce + (1 - alpha) * T ** 2 * kl, ce, kl


@pytest.mark.parametrize("alpha, T", [(0.5, 1.5), (0.2, 3.0), (0.9, 1.0)])
def test_loss_matches_hand_computation(tok, batch, teacher, alpha, T):
    s = student_logits(batch, tok)
    loss, metrics = train_distillation.make_distill_loss(teacher, alpha, T, chunk_size=64)(
        FixedLogits(s), batch, totals_of(batch))
    expected, ce, kl = hand_loss(s, teacher(batch["ids"][:, :-1]), batch, alpha, T)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["ce"], ce)
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(metrics["kd_loss"], expected)
    assert kl > 1e-3 and (1 - alpha) * T ** 2 * kl > 0.01 * loss  # the soft term is not negligible here


def test_prompt_and_padding_positions_get_no_gradient(tok, batch, teacher):
    student = FixedLogits(student_logits(batch, tok))
    loss, _ = train_distillation.make_distill_loss(teacher, 0.5, 1.5)(student, batch, totals_of(batch))
    loss.backward()
    per_position = student.logits.grad.abs().sum(-1)
    targets = batch["loss_mask"][:, 1:]
    assert (per_position[~targets] == 0).all()  # system/user text, role headers, padding: exactly nothing
    assert (per_position[targets] > 0).all()


def test_padding_ids_do_not_change_the_loss(tok, batch, teacher):
    """Real models: what sits in the padded positions (never targets) cannot change the loss."""
    student = tiny(tok, 1, hidden_size=32, num_hidden_layers=1)
    loss_fn = train_distillation.make_distill_loss(teacher, 0.5, 1.5)
    other = dict(batch, ids=batch["ids"].masked_fill(batch["ids"] == tok.pad_id, 7))
    torch.testing.assert_close(loss_fn(student, other, totals_of(batch))[0],
                               loss_fn(student, batch, totals_of(batch))[0])


def test_alpha_one_is_plain_sft(tok, batch, teacher):
    """α = 1 is train_full_sft.py's loss, value and gradients, on the same model."""
    student = tiny(tok, 1, hidden_size=32, num_hidden_layers=1)
    kd, _ = train_distillation.make_distill_loss(teacher, 1.0, 1.5)(student, batch, totals_of(batch))
    kd_grads = torch.autograd.grad(kd, list(student.parameters()))
    sft, _ = train_full_sft.sft_loss(student, batch, totals_of(batch))
    sft_grads = torch.autograd.grad(sft, list(student.parameters()))
    torch.testing.assert_close(kd, sft)
    for a, b in zip(kd_grads, sft_grads):
        torch.testing.assert_close(a, b)


def test_alpha_zero_takes_no_gradient_from_ce(tok, batch, teacher):
    s = student_logits(batch, tok)
    student = FixedLogits(s)
    loss, metrics = train_distillation.make_distill_loss(teacher, 0.0, 2.0)(student, batch, totals_of(batch))
    loss.backward()
    hand = FixedLogits(s)
    _, _, kl = hand_loss(hand.logits, teacher(batch["ids"][:, :-1]), batch, 0.0, 2.0)
    (4.0 * kl).backward()
    torch.testing.assert_close(student.logits.grad, hand.logits.grad)
    assert metrics["ce"] > 0  # still computed and logged, weighted 0


@pytest.mark.parametrize("alpha, T", [(0.5, 1.5), (0.0, 2.0)])
def test_matches_torch_kl_div_and_the_transformers_recipe(tok, batch, teacher, alpha, T):
    s = student_logits(batch, tok)
    loss, _ = train_distillation.make_distill_loss(teacher, alpha, T)(FixedLogits(s), batch, totals_of(batch))
    rows = batch["loss_mask"][:, 1:]
    st, te = s[rows], teacher(batch["ids"][:, :-1])[rows]
    targets = batch["ids"][:, 1:][rows]
    n = rows.sum()
    # torch's formulation: KL(target ‖ input) with both as log-probs, summed, per target token
    kl = F.kl_div(F.log_softmax(st / T, -1), F.log_softmax(te / T, -1), log_target=True, reduction="sum") / n
    torch.testing.assert_close(loss, alpha * F.cross_entropy(st, targets) + (1 - alpha) * T ** 2 * kl)
    # the transformers task guide's distillation trainer (lambda_param = 1 - alpha): KLDivLoss with
    # "batchmean" on the target rows (one row = one target token), scaled by T²
    soft = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(st / T, -1), F.softmax(te / T, -1)) * T ** 2
    lam = 1 - alpha
    torch.testing.assert_close(loss, (1 - lam) * F.cross_entropy(st, targets) + lam * soft)


@pytest.mark.parametrize("alpha, T", [(0.5, 1.5), (0.2, 1.0)])
def test_soft_term_equals_trls_gkd_loss_at_beta_zero(tok, batch, teacher, alpha, T):
    """TRL's GKDTrainer.generalized_jsd_loss with beta 0 is KL(teacher_T ‖ student_T) per target token:
    our soft term, and with it the whole loss, on the same tensors."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL is the oracle here (pip install trl)")
    s = student_logits(batch, tok)
    loss, metrics = train_distillation.make_distill_loss(teacher, alpha, T)(FixedLogits(s), batch, totals_of(batch))
    labels = batch["ids"][:, 1:].masked_fill(~batch["loss_mask"][:, 1:], -100)
    trl_kl = gkd.GKDTrainer.generalized_jsd_loss(s, teacher(batch["ids"][:, :-1]), labels, beta=0.0, temperature=T)
    torch.testing.assert_close(metrics["kl"], trl_kl)
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, alpha * ce + (1 - alpha) * T ** 2 * trl_kl)


def test_chunked_equals_unchunked(tok, batch, teacher):
    """Every chunk size gives the whole batch's loss and gradients to fp32 rounding."""
    student = tiny(tok, 1, hidden_size=32, num_hidden_layers=1)
    results = []
    for chunk in (0, 1, 37, 100_000):
        loss, _ = train_distillation.make_distill_loss(teacher, 0.5, 1.5, chunk_size=chunk)(
            student, batch, totals_of(batch))
        results.append((loss, torch.autograd.grad(loss, list(student.parameters()))))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b)


def test_chunks_keep_teacher_logits_out_of_the_graph(tok, batch, teacher):
    """The backward graph holds no [positions, vocab] tensor per chunk beyond the student's own logits:
    count what autograd saves with the chunked loss vs an unchunked, uncheckpointed one."""
    s = student_logits(batch, tok)
    V = s.shape[-1]

    def saved_vocab_tensors(fn):
        seen = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == V:
                seen.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen)

    chunked = saved_vocab_tensors(lambda: train_distillation.make_distill_loss(teacher, 0.5, 1.5, chunk_size=16)(
        FixedLogits(s), batch, totals_of(batch)))
    plain = saved_vocab_tensors(lambda: hand_loss(FixedLogits(s).logits, teacher(batch["ids"][:, :-1]),
                                                  batch, 0.5, 1.5))
    assert chunked <= s.numel()  # nothing beyond (views of) the student's logits
    assert plain > 2 * s[batch["loss_mask"][:, 1:]].numel()


def test_micro_batch_split_gives_the_same_step(tok, sft_rows, teacher):
    """Two micro-batches with the step's totals: shares add up to the whole batch's loss and gradient."""
    ds = SFTDataset(sft_rows, tok, max_seq_len=96)
    collate = pad_collate(tok.pad_id)
    whole, a, b = collate([ds[i] for i in range(6)]), collate([ds[i] for i in range(2)]), \
        collate([ds[i] for i in range(2, 6)])
    student = tiny(tok, 1, hidden_size=32, num_hidden_layers=1)
    loss_fn = train_distillation.make_distill_loss(teacher, 0.3, 2.0)
    full, _ = loss_fn(student, whole, totals_of(whole))
    full_grads = torch.autograd.grad(full, list(student.parameters()))
    parts = [loss_fn(student, part, totals_of(a, b))[0] for part in (a, b)]
    split_grads = torch.autograd.grad(parts[0] + parts[1], list(student.parameters()))
    torch.testing.assert_close(parts[0] + parts[1], full)
    for x, y in zip(split_grads, full_grads):
        torch.testing.assert_close(x, y)


# -- the script ------------------------------------------------------------------------------------
def run(tmp_path, sft_rows, *extra):
    return train_distillation.main([
        "--data_path", str(sft_rows), "--save_dir", str(tmp_path / "out"), "--max_seq_len", "96",
        "--batch_size", "8", "--device", "cpu", "--num_workers", "0", "--use_tensorboard", "0",
        "--use_compile", "0", "--report_path", "", *extra])


@pytest.fixture
def teacher_dir(tok, tmp_path, teacher):
    save_checkpoint(tmp_path / "out" / "full_sft", teacher, tok)
    return tmp_path / "out" / "full_sft"


def test_smaller_student_learns_from_frozen_teacher(tok, tmp_path, sft_rows, teacher_dir):
    trainer = run(tmp_path, sft_rows, "--init_from", "", "--preset", "debug", "--student_hidden_size", "32",
                  "--student_num_layers", "1",
                  "--max_steps", "8", "--log_interval", "1", "--learning_rate", "1e-2", "--eval_split", "0.2",
                  "--alpha", "0.5", "--temperature", "2")
    student_cfg = trainer.model.config
    assert (student_cfg.hidden_size, student_cfg.num_hidden_layers) == (32, 1)  # the default teacher: 64 x 2
    assert trainer.history[-1] < 0.9 * trainer.history[0]
    assert trainer.eval_history and trainer.step == 8
    # the teacher: untouched in memory, never trained, never saved
    before, _ = load_checkpoint(teacher_dir)
    for (name, p), q in zip(trainer.teacher.named_parameters(), before.parameters()):
        assert torch.equal(p, q), name
        assert not p.requires_grad
    assert not trainer.teacher.training
    assert sum(p.numel() for p in trainer.params) == trainer.model.num_params()
    saved, _ = load_checkpoint(tmp_path / "out" / "full_dist")
    assert saved.config.hidden_size == 32
    doc = yaml.safe_load((tmp_path / "out" / "full_dist" / "config.yaml").read_text())
    assert doc["stage"]["teacher_init_from"] == str(teacher_dir) and doc["stage"]["temperature"] == 2.0


def test_minimind_flags_pick_student_and_teacher(tok, tmp_path, sft_rows, teacher_dir):
    """--from_student_weight / --from_teacher_weight name folders under --save_dir; --teacher_* check the teacher."""
    save_checkpoint(tmp_path / "out" / "small", tiny(tok, 3, hidden_size=32, num_hidden_layers=1), tok)
    trainer = run(tmp_path, sft_rows, "--from_student_weight", "small", "--from_teacher_weight", "full_sft",
                  "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--teacher_use_moe", "0",
                  "--max_steps", "1")
    assert trainer.model.config.hidden_size == 32 and trainer.step == 1
    with pytest.raises(UserError, match="--teacher_hidden_size 768, but the teacher"):
        run(tmp_path, sft_rows, "--from_student_weight", "small", "--teacher_hidden_size", "768")
    with pytest.raises(UserError, match="both say where the teacher is"):
        run(tmp_path, sft_rows, "--from_student_weight", "small", "--teacher_init_from", str(teacher_dir),
            "--from_teacher_weight", "full_sft")
    with pytest.raises(UserError, match="--alpha 1.5"):
        run(tmp_path, sft_rows, "--from_student_weight", "small", "--alpha", "1.5")
    with pytest.raises(UserError, match="no checkpoint folder .*nothing"):  # MiniMind's name for a missing student
        run(tmp_path, sft_rows, "--from_student_weight", "nothing")


def test_vocabulary_mismatch_is_a_clear_error(tok, tmp_path, sft_rows, teacher_dir):
    # another tokenizer (one piece's score changed: same size, other model) under the teacher
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok._proto)
    proto.pieces[-1].score -= 1.0
    other = Tokenizer(proto.SerializeToString())
    save_checkpoint(tmp_path / "other_tok", load_checkpoint(teacher_dir)[0], other)
    with pytest.raises(UserError, match="do not share a vocabulary"):
        run(tmp_path, sft_rows, "--teacher_init_from", str(tmp_path / "other_tok"), "--init_from", "",
            "--preset", "debug")
    # same tokenizer, other output size
    with pytest.raises(UserError, match=r"vocab_size 2048\) and the student \(tokenizer \w+, vocab_size 2112\)"):
        run(tmp_path, sft_rows, "--init_from", "", "--preset", "debug", "--vocab_size", "2112")
    with pytest.raises(UserError, match="the teacher: --teacher_init_from"):
        run(tmp_path, sft_rows, "--teacher_init_from", str(tmp_path / "missing"), "--init_from", "",
            "--preset", "debug")


def test_init_layers_keeps_the_named_layers(tok, tmp_path, sft_rows, teacher_dir):
    base = tiny(tok, 4, num_hidden_layers=3)
    shallow = train_distillation.keep_layers(base, [2, 0], "base")
    assert shallow.config.num_hidden_layers == 2 and shallow.model.layers[1].layer == 1
    ref, got = base.state_dict(), shallow.state_dict()
    for name, t in got.items():
        source = name.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.0.") \
            if name.startswith("model.layers.") else name
        assert torch.equal(t, ref[source]), name
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():  # the same blocks in the same order compute the same function
        h = base.model.embed_tokens(x)
        cos, sin = base._rope(12)
        for i in (2, 0):
            h, _ = base.model.layers[i](h, cos, sin)
        torch.testing.assert_close(shallow(x), base.lm_head(base.model.norm(h)))
    # through the script: a 1-layer student from the 2-layer teacher's checkpoint, then the errors
    trainer = run(tmp_path, sft_rows, "--init_from", str(teacher_dir), "--init_layers", "1", "--max_steps", "1")
    assert trainer.model.config.num_hidden_layers == 1
    with pytest.raises(UserError, match="has layers 0..1"):
        run(tmp_path, sft_rows, "--init_from", str(teacher_dir), "--init_layers", "0,5")
    with pytest.raises(UserError, match="give one"):
        run(tmp_path, sft_rows, "--init_from", "", "--init_layers", "0")


def test_text_data_path_distils_on_plain_text_rows_every_token_a_target(tok, tmp_path, sft_rows, teacher_dir):
    """--text_data_path: the corpus' packed rows join the chat rows with a loss mask of all ones, and a
    wrong path is one clear error."""
    from minillm.data import ConcatRows, PretrainDataset, TextRows
    corpus = tmp_path / "text.jsonl"
    lines = (ROOT / "dataset/demo/pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packed = PretrainDataset(corpus, tok, 96, num_workers=0)
    text = TextRows(packed)
    assert len(text) == len(packed) > 4 and list(text.lengths) == [96] * len(packed)
    assert torch.equal(text[3]["ids"], packed[3]) and text[3]["loss_mask"].all()
    chat = SFTDataset(sft_rows, tok, max_seq_len=96)
    both = ConcatRows([chat, text])
    assert len(both) == len(chat) + len(text)
    assert torch.equal(both[len(chat) + 2]["ids"], packed[2]) and torch.equal(both[5]["ids"], chat[5]["ids"])
    assert list(both.lengths) == list(chat.lengths) + [96] * len(text)
    with pytest.raises(IndexError):
        both[len(both)]

    trainer = run(tmp_path, sft_rows, "--init_from", "", "--preset", "debug", "--student_hidden_size", "32",
                  "--student_num_layers", "1", "--epochs", "1", "--log_interval", "1", "--learning_rate", "1e-2",
                  "--text_data_path", str(corpus))
    # one epoch covers both: the chat rows and every packed text row (8 rows per step)
    assert trainer.step == -(-(len(chat) + len(text)) // 8)
    with pytest.raises(UserError, match=r"--text_data_path .*nope\.jsonl"):
        run(tmp_path, sft_rows, "--init_from", "", "--preset", "debug", "--text_data_path", str(tmp_path / "nope.jsonl"))


def test_defaults_distil_into_a_new_demo_student_and_a_checkpoint_student_gets_a_lower_lr(tmp_path, sft_rows,
                                                                                           teacher_dir):
    """No student flags: a new model of the demo-student preset (0.64M, hidden 128 x 2) at lr 1e-3; a student
    from a checkpoint gets 1e-4 unless --learning_rate or a --config sets the rate."""
    trainer = run(tmp_path, sft_rows, "--max_steps", "1")
    cfg = trainer.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 384)
    assert 0.6e6 < trainer.model.num_params() < 0.7e6
    assert trainer.cfg.learning_rate == 1e-3 and trainer.cfg.init_from == ""
    doc = yaml.safe_load((tmp_path / "out" / "full_dist" / "config.yaml").read_text())
    assert doc["train"]["learning_rate"] == 1e-3 and doc["model"]["hidden_size"] == 128

    from_ckpt = run(tmp_path, sft_rows, "--init_from", str(teacher_dir), "--init_layers", "0", "--max_steps", "1",
                    "--save_weight", "cut")
    assert from_ckpt.cfg.learning_rate == 1e-4
    doc = yaml.safe_load((tmp_path / "out" / "cut" / "config.yaml").read_text())
    assert doc["train"]["learning_rate"] == 1e-4
    given = run(tmp_path, sft_rows, "--init_from", str(teacher_dir), "--max_steps", "1", "--learning_rate", "5e-4",
                "--save_weight", "given")
    assert given.cfg.learning_rate == 5e-4
    config = tmp_path / "lr.yaml"
    config.write_text("train:\n  learning_rate: 3.0e-4\n")
    by_config = run(tmp_path, sft_rows, "--init_from", str(teacher_dir), "--max_steps", "1", "--config", str(config),
                    "--save_weight", "config")
    assert by_config.cfg.learning_rate == 3e-4
    # MiniMind's --from_student_weight names a checkpoint under --save_dir: a checkpoint student, lr 1e-4
    by_name = run(tmp_path, sft_rows, "--from_student_weight", "full_sft", "--max_steps", "1", "--save_weight", "named")
    assert by_name.cfg.learning_rate == 1e-4 and by_name.model.config.hidden_size == 64
    # a --config file's train section may name the checkpoint: the model config is the checkpoint's
    config.write_text(f"train:\n  init_from: {teacher_dir}\n")
    from_yaml = run(tmp_path, sft_rows, "--max_steps", "1", "--config", str(config), "--save_weight", "yaml")
    assert from_yaml.cfg.init_from == str(teacher_dir) and from_yaml.cfg.learning_rate == 1e-4
    assert from_yaml.model.config == from_yaml.stage.model_cfg == load_checkpoint(teacher_dir)[0].config


def test_on_the_demo_data_the_demo_corpus_is_distilled_on_too(tok, tmp_path, teacher_dir, monkeypatch):
    """--text_data_path auto: the demo corpus joins the demo chat rows (what lifts the demo student's held-out
    facts, README); on other data nothing is added, as MiniMind's script does."""
    monkeypatch.chdir(ROOT)
    trainer = train_distillation.main([
        "--save_dir", str(tmp_path / "out"), "--max_seq_len", "96", "--batch_size", "8", "--device", "cpu",
        "--num_workers", "0", "--use_tensorboard", "0", "--use_compile", "0", "--report_path", "",
        "--init_from", "", "--preset", "debug", "--student_hidden_size", "32", "--student_num_layers", "1",
        "--max_steps", "1"])
    doc = yaml.safe_load((tmp_path / "out" / "full_dist" / "config.yaml").read_text())
    assert doc["stage"]["text_data_path"] == "dataset/demo/pretrain.jsonl"
    chat = SFTDataset("dataset/demo/sft.jsonl", tok, max_seq_len=96)
    text = train_distillation.PretrainDataset("dataset/demo/pretrain.jsonl", tok, 96)
    assert len(trainer.dataset) == len(chat) + len(text)
    assert trainer.dataset.report() == f"{chat.report()} + {len(text)} packed text rows of 96 tokens from " \
                                       f"dataset/demo/pretrain.jsonl"
