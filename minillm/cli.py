"""Command-line pieces the user-facing scripts share (eval_model.py, serve_openai_api.py): which
checkpoint folder a run means, and MiniMind's eval/serve flags mapped onto ours, so its commands run."""
from __future__ import annotations

import sys
from pathlib import Path

from minillm.config import weight_path
from minillm.errors import UserError

MODE_FOLDERS = {0: "pretrain", 1: "full_sft", 2: "dpo", 3: "reason"}


def model_folder(args) -> Path:
    """--checkpoint DIR, else the --model_mode stage's folder under --save_dir."""
    return Path(args.checkpoint) if args.checkpoint else Path(args.save_dir) / MODE_FOLDERS[args.model_mode]


def load_for_inference(args):
    """The checkpoint the flags name, on --device, in eval mode, bf16 on CUDA: -> (model, tokenizer, folder)."""
    import torch

    from minillm.checkpoint import load_checkpoint
    from minillm.config import check_device
    folder = model_folder(args)
    device = check_device(args.device)  # a UserError when this machine has no such device
    model, tok = load_checkpoint(folder, device=device)
    if getattr(args, "inference_rope_scaling", None):
        use_yarn(model, args.inference_rope_scaling, trained_seq_len(folder))
    model.eval()
    if device.startswith("cuda"):
        model.to(torch.bfloat16)
    return model, tok, folder


def trained_seq_len(folder) -> int | None:
    """The --max_seq_len a checkpoint was trained at (its config.yaml's train section), if recorded."""
    from minillm.config import load_yaml
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    value = (load_yaml(path).get("train") or {}).get("max_seq_len")
    return int(value) if value else None


def use_yarn(model, factor, trained: int | None = None) -> None:
    """--inference_rope_scaling [F]: YaRN at inference, as MiniMind's switch sets it (factor 16 over an original
    2048-token context, attention factor 1); a number F sets factor F over `trained` (the length the checkpoint
    was trained at) with YaRN's own attention factor."""
    from minillm.hf import MINIMIND_YARN
    cfg = model.config
    fields = dict(MINIMIND_YARN)
    if factor is not True:
        try:
            fields["rope_factor"] = float(factor)
        except ValueError:
            raise UserError(f"--inference_rope_scaling {factor!r}: give a factor (a number >= 1) or nothing") from None
        fields["rope_attention_factor"] = 0.0
        if trained:
            fields["rope_original_max_position_embeddings"] = trained
    for k, v in fields.items():
        setattr(cfg, k, v)
    cfg.validate()
    model.reset_rope()


def add_minimind_flags(p):
    """MiniMind's eval_llm.py / eval_model.py flags, so its commands run here (mapped onto ours)."""
    g = p.add_argument_group("MiniMind's flags", "accepted so MiniMind's eval commands run; each maps onto a flag above")
    g.add_argument("--weight", default=None, metavar="NAME",
                   help="checkpoint folder <save_dir>/NAME (pretrain, full_sft, dpo, reason, ...), else MiniMind's "
                        "<save_dir>/NAME_<hidden_size>[_moe].pth; a name holding 'pretrain' continues raw text, as "
                        "--model_mode 0")
    g.add_argument("--load_from", default=None, metavar="DIR",
                   help="load this checkpoint folder (= --checkpoint DIR); MiniMind's 'model' means its own "
                        ".pth weights and is ignored here (--weight picks the folder)")
    g.add_argument("--lora_weight", default=None, metavar="NAME", help="= --lora_name NAME (None = no adapter)")
    g.add_argument("--historys", type=int, default=None, metavar="N", help="= --history_cnt N")
    g.add_argument("--out_dir", default=None, metavar="DIR", help="(MiniMind2) = --save_dir DIR")
    g.add_argument("--open_thinking", type=int, choices=(0, 1), default=None,
                   help="MiniMind's thinking switch: 1 opens a think block after the assistant header, 0 prefills "
                        "an empty one so the model answers directly (the chat's /think on|off as it starts; the "
                        "server's default for requests that do not say); not given: the model decides")
    g.add_argument("--inference_rope_scaling", nargs="?", const=True, default=None, metavar="F",
                   help="YaRN at inference (MiniMind's switch: factor 16 over an original 2048-token context, "
                        "attention factor 1); with a number F, factor F over the length the checkpoint trained at")
    for name, kind in (("hidden_size", int), ("num_hidden_layers", int), ("use_moe", int)):
        g.add_argument(f"--{name}", type=kind, default=None, metavar="N",
                       help="ignored: the checkpoint's config fixes the model's shape (with --weight they pick "
                        "among MiniMind's NAME_<hidden_size>[_moe].pth files)")


MINIMIND_ALIASES = {"lora_weight": "lora_name", "historys": "history_cnt", "out_dir": "save_dir"}


def apply_minimind_flags(args, argv=None) -> None:
    """Maps MiniMind's flags onto ours (UserError for a contradiction or what is not implemented)."""
    given = set()
    for a in argv if argv is not None else sys.argv[1:]:
        if a.startswith("--"):
            given.add(a[2:].split("=", 1)[0])
    for theirs, ours in MINIMIND_ALIASES.items():
        value = getattr(args, theirs)
        if value is None:
            continue
        if ours in given and str(getattr(args, ours)) != str(value):
            raise UserError(f"--{theirs} {value} and --{ours} {getattr(args, ours)} disagree: give one")
        setattr(args, ours, "" if theirs == "lora_weight" and value in ("None", "none") else value)
    if args.load_from not in (None, "model"):
        if args.checkpoint or args.weight:
            raise UserError(f"--load_from {args.load_from} and --{'checkpoint' if args.checkpoint else 'weight'} "
                            f"both name the model: give one")
        args.checkpoint = args.load_from
    if args.weight is not None:
        if args.checkpoint:
            raise UserError(f"--weight {args.weight} and --checkpoint {args.checkpoint} both name the model: give one")
        if "model_mode" in given:
            raise UserError(f"--weight {args.weight} and --model_mode {args.model_mode} both pick the checkpoint "
                            f"folder: give one")
        args.checkpoint = str(weight_path(args.save_dir, args.weight, "--weight", args.hidden_size, args.use_moe))
        modes = {folder: mode for mode, folder in MODE_FOLDERS.items()}
        args.model_mode = modes.get(args.weight, 0 if "pretrain" in args.weight else 1)
