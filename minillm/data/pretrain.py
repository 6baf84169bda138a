"""Pretraining data: the corpus tokenized once into a memory-mapped token cache, read as packed
fixed-length rows (documents run on across rows, EOS between them)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from minillm.data.jsonl import (FORMATS, SKIP_HINT, BadLineReport, DataError, check_exists, collect_bad, in_worker,
                                map_chunks, no_rows_error, parse_line)

CACHE_FORMAT_VERSION = 1


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


def _encode_chunk(tokenizer, chunk):
    """Worker job: -> (tokens of every good document, each followed by EOS; n_docs; bad lines)."""
    required, check = FORMATS["pretrain"]
    texts, bad = [], []
    for lineno, raw in chunk:
        try:
            texts.append(parse_line(raw, required, check)["text"])
        except ValueError as e:
            bad.append((lineno, str(e)))
    dtype, eos = token_dtype(tokenizer.vocab_size), tokenizer.eos_id
    # in-process, encode_batch may use every core itself; inside a worker one thread each is right
    encoded = [tokenizer.encode(t) for t in texts] if in_worker() else tokenizer.encode_batch(texts)
    docs = [np.asarray(ids + [eos], dtype=dtype) for ids in encoded] if texts else []
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    return tokens, len(texts), bad


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE_DIR", Path.home() / ".cache" / "minillm"))


def token_cache_path(jsonl_path, tokenizer) -> Path:
    """Where the cache for (this file as it is now, this tokenizer) lives beside the source."""
    src = Path(jsonl_path).resolve()
    st = src.stat()
    key_src = json.dumps([str(src), st.st_size, st.st_mtime_ns, tokenizer.fingerprint, CACHE_FORMAT_VERSION])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return src.with_name(f"{src.name}.{key}.tokens")


def _meta_path(tokens_path: Path) -> Path:
    return tokens_path.with_name(tokens_path.name + ".json")


def _load_meta(tokens_path: Path) -> dict | None:
    """The sidecar of a complete cache, or None. The sidecar is written last, so its presence
    (with a matching file size) means the token file is whole."""
    try:
        meta = json.loads(_meta_path(tokens_path).read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        if tokens_path.stat().st_size == meta["n_tokens"] * itemsize:
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _find_cache(jsonl_path, tokenizer) -> tuple[Path, dict | None]:
    """-> (path to use, its metadata if a complete cache is already there)."""
    beside = token_cache_path(jsonl_path, tokenizer)
    fallback = default_cache_dir() / beside.name
    for candidate in (beside, fallback):
        meta = _load_meta(candidate)
        if meta is not None:
            return candidate, meta
    return (beside if os.access(beside.parent, os.W_OK) else fallback), None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_token_cache(jsonl_path, tokenizer, num_workers: int | None = None, skip_bad: bool = False) -> Path:
    """Tokenizes the "text" of every line once into a flat memory-mapped token file; returns its path.

    Each document is followed by `tokenizer.eos_id`. The file sits beside the source as
    `<source>.<key>.tokens` (key: absolute path, size, mtime, tokenizer fingerprint, format
    version) with a JSON sidecar (n_tokens, dtype, n_docs, source, bad lines), or under
    `~/.cache/minillm` ($MINILLM_CACHE_DIR) when the source folder is not writable. A later call
    finds it and tokenizes nothing. Written under a temporary name and renamed, sidecar last, so
    an interrupted build is never trusted. num_workers 0/1 tokenizes in-process (identical
    result); None picks one per CPU for large files. Under DDP call it on one rank first, then
    barrier, so ranks don't all tokenize.
    """
    src = check_exists(jsonl_path)
    out, meta = _find_cache(src, tokenizer)
    if meta is not None:
        if meta["bad_lines"] and not skip_bad:
            raise DataError(f"{meta['first_bad']} ({SKIP_HINT}; the token cache {out} skipped "
                            f"{meta['bad_lines']} bad lines)")
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    report = BadLineReport(str(src))
    n_tokens = n_docs = 0
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for tokens, docs, bad in map_chunks(src, tokenizer, _encode_chunk, num_workers, f"tokenizing {src.name}"):
                collect_bad(src, bad, skip_bad, report)
                f.write(tokens.tobytes())
                n_tokens += len(tokens)
                n_docs += docs
        if n_docs == 0:  # an empty file, or every line skipped: an error, and nothing cached
            raise no_rows_error(src, "pretrain", report.count, report)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"n_tokens": n_tokens, "dtype": dtype.name, "n_docs": n_docs, "source": str(src),
            "tokenizer": tokenizer.fingerprint, "bad_lines": report.count, "first_bad": report.first,
            "format_version": CACHE_FORMAT_VERSION}
    _atomic_write_text(_meta_path(out), json.dumps(meta, indent=1))
    return out


class PretrainDataset(Dataset):
    """Fixed-length packed rows over the token cache: documents run on across rows, EOS between.

    Row i is tokens[i*seq_len : i*seq_len + seq_len + 1]; consecutive rows share one token so that
    every token after the first is a target exactly once. Item i -> the row's seq_len + 1 ids.
    """

    def __init__(self, jsonl_path, tokenizer, seq_len: int, skip_bad: bool = False, num_workers: int | None = None):
        self.source = str(jsonl_path)  # as given (the cache's sidecar keeps the path it was first built from)
        self.path = build_token_cache(jsonl_path, tokenizer, num_workers=num_workers, skip_bad=skip_bad)
        self.meta = _load_meta(self.path)
        self.seq_len = seq_len
        self.n_tokens = self.meta["n_tokens"]
        self.bad_lines = BadLineReport(str(jsonl_path), self.meta["bad_lines"], self.meta["first_bad"])
        self.n_rows = (self.n_tokens - 1) // seq_len
        if self.n_rows < 1:
            raise DataError(f"{jsonl_path}: the corpus has {self.n_tokens} tokens, fewer than one row of "
                            f"max_seq_len + 1 = {seq_len + 1}; use more text or a smaller --max_seq_len")
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # opened lazily so each DataLoader worker maps the file itself
            self._tokens = np.memmap(self.path, dtype=self.meta["dtype"], mode="r", shape=(self.n_tokens,))
        return self._tokens

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}  # never pickle the mapped array

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i: int) -> torch.Tensor:
        """Row i: seq_len + 1 token ids (int64); the model reads row[:-1] and predicts row[1:]."""
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        return torch.from_numpy(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1].astype(np.int64))


def packed_collate(rows: list[torch.Tensor]) -> dict:
    """Packed rows -> {"ids": [B, seq_len + 1], "n_tokens", "n_targets"}: every position after the
    first is a target, so both counts are B * seq_len (host ints, as the trainer wants them)."""
    ids = torch.stack(rows)
    n = ids.shape[0] * (ids.shape[1] - 1)
    return {"ids": ids, "n_tokens": n, "n_targets": n}
