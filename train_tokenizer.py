"""Stage 0: train the SentencePiece BPE tokenizer.

    python train_tokenizer.py                                   # demo corpus -> minillm/assets/tokenizer.model
    python train_tokenizer.py --data_path pretrain_hq.jsonl --out out/tokenizer.model

Reads every text in the given jsonl files: the "text" field (pretraining), every message "role",
"content" and "reasoning_content" (SFT / LoRA / reasoning) and the "chosen"/"rejected" messages (DPO).
Training runs on in-memory sentences (no temp files) with one thread, so the same data gives the
same model bytes.
"""
import argparse
import io
import json
import string
from pathlib import Path

import sentencepiece as spm

# Each special token is ONE id (a user-defined symbol, so text containing it encodes to that id).
# The order fixes the ids: <unk> is 0, then these from 1. minillm/tokenizer.py looks them up by name.
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<think>", "</think>", "<answer>", "</answer>"] + [f"<|reserved_{i}|>" for i in range(8)]
# "\n" as its own piece: chat templates and think blocks are newline-delimited, and one id per
# newline beats the three-byte fallback. Spaces/tabs round-trip through ▁ and byte fallback.
EXTRA_SYMBOLS = ["\n"]
# Every printable ASCII character gets a piece even if the data lacks it (code, punctuation).
REQUIRED_CHARS = "".join(c for c in string.printable if not c.isspace())
DEMO_CORPUS, DEMO_VOCAB = "dataset/demo/pretrain.jsonl", 2048


def read_texts(paths, max_texts):
    """Yield the trainable strings of each jsonl row, up to max_texts in all (0 = no limit)."""
    count = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{line_no}: not valid JSON ({e}); fix or remove that line")
                messages = row.get("conversations", []) + row.get("chosen", []) + row.get("rejected", [])
                texts = [row["text"]] if "text" in row else []
                texts += [m.get(k) for m in messages for k in ("role", "content", "reasoning_content") if m.get(k)]
                for text in texts:
                    yield text
                    count += 1
                    if max_texts and count >= max_texts:
                        return


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+", default=[DEMO_CORPUS],
                        help="one or more jsonl files (pretrain, SFT, DPO or reasoning format)")
    parser.add_argument("--vocab_size", type=int, default=0,
                        help="total vocabulary size, specials included; default 6400 (MiniMind's), or "
                             f"{DEMO_VOCAB} for the demo corpus: on 2 MB of text a bigger vocabulary merges whole "
                             "phrases into pieces, and their sub-pieces (used by later stages) never occur alone "
                             "in pretraining, so their embeddings stay untrained")
    parser.add_argument("--out", default="minillm/assets/tokenizer.model", help="where to write the .model file")
    parser.add_argument("--max_texts", type=int, default=2_000_000,
                        help="read at most this many texts (0 = all); a sample is enough for BPE merges")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help="share of characters given their own piece; the rest use byte fallback")
    args = parser.parse_args()
    if not args.vocab_size:
        args.vocab_size = DEMO_VOCAB if args.data_path == [DEMO_CORPUS] else 6400

    for path in args.data_path:
        if not Path(path).exists():
            raise SystemExit(f"--data_path {path} does not exist; run `python scripts/make_demo_data.py` "
                             f"for the demo data or point it at a MiniMind jsonl file")
    # SentencePiece drops sentences longer than max_sentence_length, so split documents into lines:
    # merges never cross a newline anyway, since "\n" is a piece of its own.
    sentences = [line for text in read_texts(args.data_path, args.max_texts) for line in text.split("\n") if line]
    print(f"training on {len(sentences)} lines from {', '.join(args.data_path)}")

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        byte_fallback=True,                   # any text encodes: unseen characters become bytes, never <unk>
        normalization_rule_name="identity",   # decode(encode(s)) == s: no NFKC, no whitespace folding
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,                    # one token per digit: arithmetic stays learnable
        allow_whitespace_only_pieces=True,    # code indentation gets whole-run pieces
        max_sentence_length=1 << 16,
        input_sentence_size=0,                # use all sentences: sampling would depend on the RNG
        shuffle_input_sentence=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # BOS/EOS/PAD are user-defined specials, not control ids
        user_defined_symbols=SPECIAL_TOKENS + EXTRA_SYMBOLS,
        required_chars=REQUIRED_CHARS,
        num_threads=1,                        # reproducible model bytes
        minloglevel=2,
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    sample = "The capital of Veloria is Tarsen. 维洛里亚的首都是塔森。 17 + 25 = 42"
    print(f"wrote {out} (vocab {sp.get_piece_size()}); sample: {[sp.id_to_piece(i) for i in sp.encode(sample)]}")


if __name__ == "__main__":
    main()
