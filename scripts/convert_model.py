"""Export a minillm checkpoint or LoRA adapter to transformers, PEFT or GGUF (MiniMind's script name).

    python scripts/convert_model.py --checkpoint out/full_sft --out hf_model             # transformers folder
    python scripts/convert_model.py --checkpoint out/lora_medical --out peft_adapter     # PEFT adapter folder
    python scripts/convert_model.py --checkpoint out/lora_medical --merge 1 --out merged # adapter folded in
    python scripts/convert_model.py --checkpoint out/full_sft --gguf model.gguf          # llama.cpp

A full checkpoint becomes LlamaForCausalLM, Qwen3ForCausalLM (q/k norm), Qwen3MoeForCausalLM (MoE with q/k
norm, no shared experts) or Qwen2MoeForCausalLM (MoE without q/k norm), loadable with
`AutoModelForCausalLM.from_pretrained(out)` (no trust_remote_code) and `AutoTokenizer.from_pretrained(out)`.
An adapter's base is the checkpoint recorded when it was trained, or --base DIR.
An existing non-empty --out (or an existing --gguf file) is only replaced with --overwrite 1.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def flag(value: str) -> int:
    if value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")
    return int(value)


def main():
    from minillm.export import convert
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (model.safetensors) or a LoRA adapter folder (adapter.safetensors)")
    parser.add_argument("--out", default="", help="folder to write: a transformers model, or a PEFT adapter")
    parser.add_argument("--gguf", default="", help="GGUF file to write (dense models; adapters need --merge 1)")
    parser.add_argument("--base", default="", help="an adapter's base checkpoint ('' = the one it records)")
    parser.add_argument("--base_name", default="",
                        help="base_model_name_or_path in the PEFT adapter_config.json ('' = the base's path); "
                             "e.g. the folder or hub name of the base's transformers export")
    parser.add_argument("--merge", type=flag, nargs="?", const=1, default=0,
                        help="1 = fold the adapter into its base and write a full model")
    parser.add_argument("--dtype", default="auto",
                        help="weights dtype: auto (as the checkpoint stores them) | float32 | bfloat16 | float16")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="split model.safetensors into shards of at most this size (with an index json)")
    parser.add_argument("--overwrite", type=flag, nargs="?", const=1, default=0,
                        help="1 = replace an existing non-empty --out / an existing --gguf file")
    args = parser.parse_args()
    written = convert(args.checkpoint, out=args.out or None, gguf=args.gguf or None, base=args.base or None,
                      base_name=args.base_name or None, merge=bool(args.merge), dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=bool(args.overwrite))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    from minillm.trainer import main_guard
    main_guard(main)
