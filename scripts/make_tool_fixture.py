"""Write the trained tool model that tests/test_tool_e2e.py runs: a checkpoint folder's weights in fp16,
its config and tokenizer, no optimizer state (6.7 MB for the 3.3M-parameter demo model).

    python scripts/make_tool_fixture.py --model out/full_sft_tools                  # -> tests/fixtures/tool_model
    python scripts/make_tool_fixture.py --model out/full_sft_tools --overwrite 1    # replace the committed one

The model it was made from, and the commands that trained it, are in tests/fixtures/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.errors import UserError  # noqa: E402
from minillm.trainer import main_guard  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/full_sft_tools", help="checkpoint folder of the trained tool model")
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "tool_model"), help="folder to write")
    p.add_argument("--overwrite", type=int, default=0, choices=[0, 1], help="1: replace an existing --out folder")
    args = p.parse_args(argv)

    import torch
    from minillm.checkpoint import load_checkpoint, save_checkpoint

    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such checkpoint folder; train it with the README's tool SFT command")
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite 1 to replace it")
    model, tok = load_checkpoint(args.model, device="cpu")
    save_checkpoint(args.out, model, tok, dtype=torch.float16)
    print(f"wrote {args.out}: {model.num_params() / 1e6:.2f}M parameters in fp16 from {args.model}")


if __name__ == "__main__":
    main_guard(main)
