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
import re
import string
from pathlib import Path

import sentencepiece as spm

from minillm.errors import UserError, require_file

# Each special token is ONE id (a user-defined symbol, so text containing it encodes to that id).
# The order fixes the ids: <unk> is 0, then these from 1. minillm/tokenizer.py looks them up by name.
# the tool tags take the slots tokenizers made before tool use reserved (<|reserved_0..3|>): same ids
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<think>", "</think>", "<answer>", "</answer>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"] + \
                 [f"<|reserved_{i}|>" for i in range(4, 8)]
# "\n" as its own piece: chat templates and think blocks are newline-delimited, and one id per
# newline beats the three-byte fallback. Spaces/tabs round-trip through ▁ and byte fallback.
EXTRA_SYMBOLS = ["\n"]
# Every printable ASCII character gets a piece even if the data lacks it (code, punctuation).
REQUIRED_CHARS = "".join(c for c in string.printable if not c.isspace())
DEMO_CORPUS, DEMO_VOCAB = "dataset/demo/pretrain.jsonl", 2048
# pieces every model holds whatever the corpus: <unk>, the specials, "\n", 256 byte-fallback pieces and
# the printable ASCII characters; each other character the corpus covers adds one
MIN_VOCAB = 1 + len(SPECIAL_TOKENS) + len(EXTRA_SYMBOLS) + 256 + len(REQUIRED_CHARS)


def read_texts(paths, max_texts):
    """Yield the trainable strings of each jsonl row, up to max_texts in all (0 = no limit)."""
    count = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(_utf8_lines(f, path), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}; "
                                    f"fix or remove that line")
                messages = [m for field in ("conversations", "chosen", "rejected")
                            for m in (row.get(field) if isinstance(row.get(field), list) else []) if isinstance(m, dict)]
                texts = [row["text"]] if isinstance(row.get("text"), str) else []
                texts += [m[k] for m in messages for k in ("role", "content", "reasoning_content")
                          if isinstance(m.get(k), str) and m[k]]
                for text in texts:
                    yield text
                    count += 1
                    if max_texts and count >= max_texts:
                        return


def _utf8_lines(f, path):
    """The lines of `f`; a UserError naming the file and line where it stops being UTF-8."""
    line_no = 0
    try:
        for line_no, line in enumerate(f, 1):
            yield line
    except UnicodeDecodeError:
        raise UserError(f"{path}:{line_no + 1}: not valid UTF-8 (at or near that line); save the file as UTF-8") from None


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
        require_file(path, "--data_path", "run `python scripts/make_demo_data.py` for the demo data or point it "
                                          "at a MiniMind jsonl file")
    if args.vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab_size {args.vocab_size} is too small: <unk>, {len(SPECIAL_TOKENS)} special tokens, "
                        f"\"\\n\", 256 byte-fallback pieces and {len(REQUIRED_CHARS)} printable ASCII characters alone "
                        f"take {MIN_VOCAB} (plus one per other character of the corpus); use --vocab_size {MIN_VOCAB} "
                        f"or more")
    if not 0.98 <= args.character_coverage <= 1:  # SentencePiece's own bounds
        raise UserError(f"--character_coverage {args.character_coverage} must be in [0.98, 1]")
    if args.max_texts < 0:
        raise UserError(f"--max_texts {args.max_texts} must be >= 0 (0 = all)")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass the .model file to write, e.g. {out / 'tokenizer.model'}")
    # SentencePiece drops sentences longer than max_sentence_length, so split documents into lines:
    # merges never cross a newline anyway, since "\n" is a piece of its own.
    sentences = [line for text in read_texts(args.data_path, args.max_texts) for line in text.split("\n") if line]
    corpus = ", ".join(args.data_path)
    if not sentences:
        raise UserError(f"no text to train on in {corpus}: no row has a \"text\" field or messages with "
                        f"\"content\"; point --data_path at pretrain, SFT, DPO or reasoning jsonl")
    print(f"training on {len(sentences)} lines from {corpus}")

    model = io.BytesIO()
    try:
        train_sentencepiece(sentences, model, args)
    except RuntimeError as e:
        raise UserError(explain_sentencepiece_error(str(e), args, len(sentences))) from None

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    sample = "The capital of Veloria is Tarsen. 维洛里亚的首都是塔森。 17 + 25 = 42"
    print(f"wrote {out} (vocab {sp.get_piece_size()}); sample: {[sp.id_to_piece(i) for i in sp.encode(sample)]}")


def explain_sentencepiece_error(text: str, args, n_lines: int) -> str:
    """SentencePiece's RuntimeError ("INTERNAL: src/....cc(638) [check] Vocabulary size ...") as a line
    that names the flag and what to do."""
    corpus = ", ".join(args.data_path)
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if too_high:
        most = int(too_high.group(2))
        fix = (f"use more text or --vocab_size {most} or less" if most >= MIN_VOCAB else
               f"use more text: a tokenizer needs at least {MIN_VOCAB} pieces")
        return (f"--vocab_size {args.vocab_size} is more than {corpus} can fill: its {n_lines} "
                f"{'lines give' if n_lines != 1 else 'line gives'} at most {most} pieces; {fix}")
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
    if too_small:
        need = int(too_small.group(2))
        return (f"--vocab_size {args.vocab_size} is too small for {corpus}: the special tokens, 256 byte-fallback "
                f"pieces and the characters it covers at --character_coverage {args.character_coverage} need "
                f"{need}; use --vocab_size {need} or more, or a lower --character_coverage")
    text = " ".join(text.split())
    check = re.match(r"^\S+: \S+\(\d+\) \[(.*?)\]\s*(.*)$", text)  # "INTERNAL: src/x.cc(94) [check] detail"
    detail = (check.group(2) or f"its check {check.group(1)} failed") if check else text
    return f"sentencepiece could not train a tokenizer on {corpus}: {detail}"


def train_sentencepiece(sentences, model_writer, args):
    """The BPE training call: deterministic, byte fallback, the specials as user-defined symbols."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_writer,
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


if __name__ == "__main__":
    from minillm.trainer import main_guard
    main_guard(main)
