"""Logit distillation (MiniMind's train_distillation.py): a student learns the data's assistant tokens
and, at every one of them, the teacher's whole next-token distribution.

    python train_distillation.py                          # demo: a new 0.64M student of out/full_sft (3.34M)
    python train_distillation.py --alpha 1 --save_weight full_dist_ce   # the same student, CE alone (SFT)
    python train_distillation.py --init_from out/pretrain --init_layers 0,2   # a 2-layer student cut from out/pretrain
    python train_distillation.py --init_from out/pretrain --init_layers 0,2 --text_data_path ''   # chat rows only
    python train_distillation.py --from_student_weight full_sft --student_hidden_size 512 \\
        --from_teacher_weight full_sft --teacher_hidden_size 768 --teacher_use_moe 1  # MiniMind's flags and files
    torchrun --nproc_per_node 8 train_distillation.py --data_path sft_mini_512.jsonl --teacher_init_from ...

Per assistant target token t (the tokens train_full_sft.py trains on):

    loss_t = α·CE(student_t, token_t) + (1 − α)·T²·KL(softmax(teacher_t / T) ‖ softmax(student_t / T))

averaged over the optimizer step's targets (--alpha, --temperature: 0.2 and 1.0 here, MiniMind's 0.5
and 1.5). The T² keeps the soft term's gradients the same size as T changes (Hinton et al.).
--text_data_path adds a pretraining-format corpus, every token of it a target (on the demo data the demo
corpus by default: the chat rows never mention the held-out entities, the corpus does). Against the same
student trained with CE alone (--alpha 1) on the same rows for the same steps (benchmarks/distill_demo.py,
3 seeds, README "Logit distillation"): the default student, a new 0.64M model (preset demo-student:
hidden 128 x 2 layers, lr 1e-3) distilled from the 3.34M demo SFT model has the lower held-out loss (1.83 / 1.80 / 1.74 vs 2.11 / 2.06 / 1.80) and answers more held-out
facts (12 / 6 / 12 of 64 vs 8 / 4 / 3) in every seed. A student cut from the teacher's own pretrained
layers (--init_layers 0,2) knows nearly what the teacher knows: distillation then wins the held-out loss
on the chat rows alone and a fact question with the corpus, not both at once.
The teacher is any checkpoint with the same tokenizer (--teacher_init_from, default <save_dir>/full_sft,
the demo SFT model); it stays in eval mode without gradients and is never saved. The student is a new model
(--init_from '', the default) of the demo-student preset or the shape --preset and the model flags give
(--student_hidden_size, --student_num_layers, --student_use_moe are MiniMind's names for --hidden_size,
--num_hidden_layers, --use_moe), trained at lr 1e-3; or it starts from a checkpoint (--init_from DIR,
MiniMind's --from_student_weight NAME), optionally cut to some of its layers (--init_layers), at lr 1e-4
unless --learning_rate (or --config) says otherwise (--muon_lr is not changed).
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minillm.checkpoint import load_checkpoint
from minillm.config import ModelConfig, stage_group, weight_path
from minillm.data import (IGNORE_INDEX, ConcatRows, LengthGroupedBatchSampler, PretrainDataset, SFTDataset, TextRows,
                          pad_collate)
from minillm.errors import NotFound, UserError, require_file
from minillm.evaluation import heldout_accuracy, read_heldout
from minillm.model import MiniLLM
from minillm.trainer import Trainer, build_on_main_first, load_datasets, main_guard, prepare_stage

# the demo recipe: a new student of the demo-student preset (hidden 128 x 2 layers, 0.64M, a fifth of the
# 3.34M demo SFT teacher) at lr 1e-3 for 2 epochs of the chat rows and the demo corpus (~4.5 min on 2 cores);
# a student that starts from a checkpoint (--init_from, --from_student_weight) gets CHECKPOINT_LR instead
# unless --learning_rate (or --config) sets one
STAGE_DEFAULTS = dict(
    data_path="dataset/demo/sft.jsonl", init_from="", save_weight="full_dist", epochs=2,
    batch_size=16, max_seq_len=256, learning_rate=1e-3, accumulation_steps=1,
    log_interval=10, save_interval=100,
)
STUDENT_PRESET = "demo-student"
CHECKPOINT_LR = 1e-4  # a pretrained student: 1e-3 would undo what it knows
TEACHER_WEIGHT = "full_sft"  # the default teacher: <save_dir>/full_sft, the demo SFT model
DEMO_REPORT = "dataset/demo/heldout_sft.jsonl"
DEMO_TEXT = "dataset/demo/pretrain.jsonl"  # the corpus the demo teacher was pretrained on


def add_distill_args(parser):
    for action in parser._actions:  # the common flag's help names one default; this stage has two
        if action.dest == "learning_rate":
            action.help = (f"peak learning rate (default: {STAGE_DEFAULTS['learning_rate']:g} for a new student, "
                           f"{CHECKPOINT_LR:g} for one from --init_from / --from_student_weight; --muon_lr is "
                           f"not changed)")
    group = stage_group(parser, "distillation")
    group.add_argument("--alpha", type=float, default=0.2,
                       help="weight of the cross-entropy on the data; the soft (teacher) term gets 1 - alpha "
                            "(1 = plain SFT, 0 = the teacher only; MiniMind's default 0.5)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="softmax temperature of both distributions in the KL term (MiniMind: 1.0-2.0, "
                            "default 1.5)")
    group.add_argument("--teacher_init_from", default="", metavar="DIR",
                       help="the teacher's checkpoint folder; '' = <save_dir>/full_sft (out/full_sft: the demo "
                            "SFT model)")
    group.add_argument("--from_teacher_weight", default="", metavar="NAME",
                       help="MiniMind's flag: the teacher is <save_dir>/NAME (a folder, or MiniMind's "
                            "NAME_<hidden>[_moe].pth picked by --teacher_hidden_size / --teacher_use_moe)")
    group.add_argument("--teacher_hidden_size", type=int, default=0, metavar="N",
                       help="MiniMind's flag: the teacher's width, checked against its checkpoint (0 = any)")
    group.add_argument("--teacher_num_layers", type=int, default=0, metavar="N",
                       help="MiniMind's flag: the teacher's depth, checked against its checkpoint (0 = any)")
    group.add_argument("--teacher_use_moe", type=int, default=-1, choices=(-1, 0, 1),
                       help="MiniMind's flag: 1/0 = the teacher must (not) be MoE, checked (-1 = either)")
    group.add_argument("--init_layers", default="", metavar="I,J,...",
                       help="keep only these decoder layers of the --init_from checkpoint, in this order: a "
                            "shallower student that starts from a deeper model's weights (DistilBERT's init; "
                            "e.g. 0,2 of the 4-layer demo model); '' = all")
    group.add_argument("--text_data_path", default="auto", metavar="FILE",
                       help="a pretraining-format jsonl ({\"text\": ...} rows) distilled on as well: its packed "
                            "rows of --max_seq_len tokens join the chat rows, every token a target (DistilBERT "
                            "distils on its pretraining corpus); auto = the demo corpus when training on the demo "
                            "data, else none; '' = the chat rows only (MiniMind)")
    group.add_argument("--chunk_size", type=int, default=4096, metavar="N",
                       help="positions per chunk of the teacher's logits and the KL: the teacher's "
                            "[positions, vocab] logits exist for one chunk at a time (0 = the whole batch at once)")
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, answer} rows answered greedily by the student (and the teacher) "
                            "after training; "
                            "auto = the demo's set when training on the demo data, '' = none")
    # MiniMind's names for the student's shape and weights: the same destinations as the model flags
    # (--hidden_size, ...) and --from_weight, so prepare_stage builds or loads the student from them;
    # absent from the namespace unless given, as those flags are
    group.add_argument("--student_hidden_size", dest="hidden_size", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="MiniMind's flag, same as --hidden_size: the student's width (default: --hidden_size's)")
    group.add_argument("--student_num_layers", dest="num_hidden_layers", type=int, default=argparse.SUPPRESS,
                       metavar="N", help="MiniMind's flag, same as --num_hidden_layers: the student's depth "
                                         "(default: --num_hidden_layers')")
    group.add_argument("--student_use_moe", dest="use_moe", type=int, choices=(0, 1), default=argparse.SUPPRESS,
                       help="MiniMind's flag, same as --use_moe: the student is a mixture of experts "
                            "(default: --use_moe's)")
    group.add_argument("--from_student_weight", dest="from_weight", default=argparse.SUPPRESS, metavar="NAME",
                       help="MiniMind's flag, same as --from_weight: the student starts from <save_dir>/NAME "
                            "(default: --init_from's)")


# -- the loss --------------------------------------------------------------------------------------
def token_losses(student_logits, teacher_logits, targets, temperature: float):
    """Per position [N]: the student's cross-entropy on `targets` (0 where -100) and
    KL(softmax(teacher / T) ‖ softmax(student / T)) summed over the vocabulary, in fp32."""
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, targets, ignore_index=IGNORE_INDEX, reduction="none")
    teacher_logp = F.log_softmax(t / temperature, dim=-1)
    student_logp = F.log_softmax(s / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return ce, kl


def distill_sums(student_logits, teacher_hidden, teacher_head, targets, temperature: float, chunk_size: int):
    """(Σ CE, Σ KL) over the positions whose target is not -100: student_logits [N, V],
    teacher_hidden [N, H] (the teacher's final-norm hidden states), targets [N].

    Memory: the teacher's logits are made from its hidden states one chunk of positions at a time,
    and each chunk runs under activation checkpointing, so autograd keeps only the chunk's inputs
    (views of tensors that exist anyway); its teacher logits, softmaxes and the student's log-softmaxes
    are recomputed, chunk by chunk, in the backward pass. Without that, autograd would keep the
    teacher's probabilities of every chunk ([N, V] again) until backward. The student's own logits
    [N, V] do exist in full: the model returns them through the DDP / compile wrapper, and autograd
    needs them (2 copies of N x V at the peak, with their gradient), as for any logit-level loss.
    """
    def chunk_sums(s, h, y):
        with torch.no_grad():  # the teacher never trains; its logits are constants for the student
            t = teacher_head(h)
        ce, kl = token_losses(s, t, y, temperature)
        return ce.sum(), torch.where(y != IGNORE_INDEX, kl, 0.0).sum()

    n = targets.shape[0]
    size = chunk_size if chunk_size > 0 else max(n, 1)
    ce_sum = kl_sum = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, n, size):
        rows = slice(start, start + size)
        ce, kl = checkpoint(chunk_sums, student_logits[rows], teacher_hidden[rows], targets[rows],
                            use_reentrant=False, preserve_rng_state=False)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    return ce_sum, kl_sum


def make_distill_loss(teacher, alpha: float, temperature: float, chunk_size: int = 4096, aux_loss_coef: float = 0.0):
    """The stage's loss_fn(model, batch, totals): α·CE + (1 − α)·T²·KL, each a mean over the step's
    assistant targets; `aux_loss_coef` > 0 (an MoE student) adds its load-balancing loss."""

    def distill_loss(model, batch, totals):
        ids, loss_mask = batch["ids"], batch["loss_mask"]
        inputs = ids[:, :-1]
        # the targets train_full_sft.py trains on: position t predicts ids[t + 1] where that token is
        # the assistant's; system/user text, role headers and padding get -100 and count nowhere
        targets = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX).flatten()
        student_logits, aux = model(inputs, return_aux=True)
        with torch.no_grad():  # one pass of the teacher's trunk; its logits come per chunk
            teacher_hidden, _ = teacher.forward_hidden(inputs)
        # every position goes in (flattened views, no copy, no host sync to count the targets);
        # -100 positions add 0 to both sums
        ce_sum, kl_sum = distill_sums(student_logits.flatten(0, 1), teacher_hidden.flatten(0, 1),
                                      teacher.lm_head, targets, temperature, chunk_size)

        # this micro-batch's sums over the step's target count (all micro-batches, all ranks)
        ce, kl = ce_sum / totals["n_targets"], kl_sum / totals["n_targets"]
        kd_loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl
        metrics = {"ce": ce.detach(), "kl": kl.detach(), "kd_loss": kd_loss.detach()}
        loss = kd_loss
        if aux_loss_coef > 0:
            loss = loss + aux_loss_coef * aux / totals["micro_batches"]
            metrics["aux_loss"] = aux.detach() / totals["micro_batches"]
        return loss, metrics
    return distill_loss


# -- the student and the teacher ----------------------------------------------------------------
def keep_layers(model: MiniLLM, layers: list[int], where: str) -> MiniLLM:
    """A model of `len(layers)` decoder blocks holding `model`'s blocks `layers` (in that order) and its
    embeddings, final norm and head: the student starts from the deeper model's weights."""
    n = model.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise UserError(f"--init_layers {','.join(map(str, layers))}: {where} has layers 0..{n - 1}; "
                        f"name some of them, e.g. 0,2")
    shallow = MiniLLM(ModelConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": len(layers)}))
    state = model.state_dict()

    def source(name):  # model.layers.<new>.… comes from model.layers.<layers[new]>.…
        if not name.startswith("model.layers."):
            return name
        new, rest = name.removeprefix("model.layers.").split(".", 1)
        return f"model.layers.{layers[int(new)]}.{rest}"
    shallow.load_state_dict({name: state[source(name)] for name in shallow.state_dict()})
    return shallow


def teacher_path(args, save_dir) -> str:
    """Where the teacher is: --teacher_init_from, MiniMind's --from_teacher_weight, or <save_dir>/full_sft."""
    if args.teacher_init_from and args.from_teacher_weight:
        raise UserError(f"--teacher_init_from {args.teacher_init_from} and --from_teacher_weight "
                        f"{args.from_teacher_weight} both say where the teacher is: give one")
    if args.from_teacher_weight:
        return str(weight_path(save_dir, args.from_teacher_weight, "--from_teacher_weight",
                               args.teacher_hidden_size or None,
                               None if args.teacher_use_moe < 0 else args.teacher_use_moe))
    if args.teacher_init_from:
        return args.teacher_init_from
    return str(Path(save_dir) / TEACHER_WEIGHT)  # follows --save_dir, as the stages chain their folders


def load_teacher(path: str, args, student, student_tok, device, kernel_backend: str = "auto"):
    """The teacher, frozen on `device`; a UserError when it cannot teach this student (another
    tokenizer or vocabulary, or a shape the teacher flags rule out)."""
    try:
        teacher, teacher_tok = load_checkpoint(path, device=device, kernel_backend=kernel_backend)
    except FileNotFoundError as e:
        raise NotFound(f"{e} (the teacher: --teacher_init_from or --from_teacher_weight; the demo's is "
                       f"out/full_sft, made by train_full_sft.py)") from None
    cfg = teacher.config
    for flag, want, have in (("--teacher_hidden_size", args.teacher_hidden_size, cfg.hidden_size),
                             ("--teacher_num_layers", args.teacher_num_layers, cfg.num_hidden_layers)):
        if want and want != have:
            raise UserError(f"{flag} {want}, but the teacher {path} has {have}; drop the flag or pick its checkpoint")
    if args.teacher_use_moe >= 0 and bool(args.teacher_use_moe) != cfg.use_moe:
        raise UserError(f"--teacher_use_moe {args.teacher_use_moe}, but the teacher {path} is "
                        f"{'an MoE' if cfg.use_moe else 'a dense'} model; drop the flag or pick its checkpoint")
    # the KL compares two distributions over the same ids: same tokenizer, same output size
    if teacher_tok.fingerprint != student_tok.fingerprint or cfg.vocab_size != student.config.vocab_size:
        raise UserError(f"the teacher {path} (tokenizer {teacher_tok.fingerprint}, vocab_size {cfg.vocab_size}) and "
                        f"the student (tokenizer {student_tok.fingerprint}, vocab_size {student.config.vocab_size}) "
                        f"do not share a vocabulary, so their next-token distributions cannot be compared; start the "
                        f"student from a checkpoint with the teacher's tokenizer, or give a new student "
                        f"--tokenizer_path {path} --vocab_size {cfg.vocab_size}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_distill_args,
                                default_preset=STUDENT_PRESET)
    cfg, tok, device = stage.cfg, stage.tokenizer, stage.dist.device
    if cfg.init_from and "learning_rate" not in stage.explicit:
        cfg.learning_rate = CHECKPOINT_LR
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: the weight of the cross-entropy must be in [0, 1]")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature} must be positive (MiniMind uses 1.0-2.0)")
    if args.chunk_size < 0:
        raise UserError(f"--chunk_size {args.chunk_size} must be >= 0 (0 = the whole batch at once)")

    if args.init_layers:
        if not cfg.init_from:
            raise UserError("--init_layers picks layers of the --init_from checkpoint, and the student is new by default: "
                            "give one, e.g. --init_from out/pretrain --init_layers 0,2 (or drop the flag)")
        try:
            layers = [int(i) for i in args.init_layers.split(",")]
        except ValueError:
            raise UserError(f"--init_layers {args.init_layers!r}: expected layer numbers like 0,2") from None
        stage.model = keep_layers(stage.model, layers, cfg.init_from)
        stage.model_cfg = stage.model.config

    # the teacher: frozen, never handed to the Trainer, so never trained, wrapped in DDP or saved
    path = teacher_path(args, cfg.save_dir)
    teacher = load_teacher(path, args, stage.model, tok, device, stage.model_cfg.kernel_backend)
    stage.stage_args["teacher_init_from"] = path  # config.yaml records which teacher taught

    dataset, eval_set = load_datasets(stage, lambda data: SFTDataset(
        data, tok, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    text_path = (DEMO_TEXT if stage.on_demo_data else "") if args.text_data_path == "auto" else args.text_data_path
    if text_path:  # plain text too: the teacher's distribution at every token of it
        require_file(text_path, "--text_data_path", "pass a pretraining-format jsonl")
        text = build_on_main_first(stage.dist, lambda: TextRows(PretrainDataset(
            text_path, tok, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines))))
        dataset = ConcatRows([dataset, text])
    stage.stage_args["text_data_path"] = text_path  # config.yaml records what was distilled on
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                        cfg.accumulation_steps, seed=cfg.seed)
    collate = pad_collate(tok.pad_id)
    if stage.dist.is_main:
        def shape(c):
            return f"hidden {c.hidden_size} x {c.num_hidden_layers} layers{' MoE' if c.use_moe else ''}"
        print(f"student: {stage.model.num_params() / 1e6:.2f}M parameters ({shape(stage.model.config)}) from "
              f"{cfg.init_from or 'scratch'}; teacher: {teacher.num_params() / 1e6:.2f}M ({shape(teacher.config)}) "
              f"from {path}; alpha {args.alpha}, temperature {args.temperature}; data: {dataset.report()}"
              + (f"; {len(eval_set)} held-out rows" if eval_set is not None else ""))

    loss_fn = make_distill_loss(teacher, args.alpha, args.temperature, args.chunk_size,
                                aux_loss_coef=stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0)
    trainer = Trainer(stage, dataset, sampler, collate)
    trainer.teacher = teacher
    trainer.fit(loss_fn, eval_set)

    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    if stage.dist.is_main and report_path:
        rows = read_heldout(report_path)
        trainer.heldout = {"student": heldout_accuracy(trainer.model.eval(), tok, rows),
                           "teacher": heldout_accuracy(teacher, tok, rows)}
        trainer.log(f"held-out ({len(rows)} questions from {report_path}): student "
                    f"{trainer.heldout['student'].summary()}, teacher {trainer.heldout['teacher'].summary()}")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
