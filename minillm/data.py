"""Data: jsonl readers, the pre-tokenized pretraining cache, and the SFT / DPO datasets.

Formats (MiniMind's, so its public datasets drop in):
    pretrain   {"text": "..."}
    SFT        {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    DPO        {"chosen": [messages], "rejected": [messages]}
    reasoning  SFT format; the tokenizer renders an assistant `reasoning_content` field itself.

A batch is a dict of int64 tensors: `input_ids` [B, T] and `labels` [B, T], where labels are
already shifted (labels[:, t] is the token that follows input_ids[:, t]) and -100 means "no loss".
DPO batches carry the same pair twice, prefixed `chosen_` and `rejected_`.

Nothing here tokenizes inside the data loader: pretraining text is tokenized once into a
memory-mapped cache file, SFT / DPO conversations are rendered once when the dataset is built.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IGNORE_INDEX = -100
CACHE_FORMAT_VERSION = 1
SKIP_HINT = "fix the line or pass --skip_bad_lines to skip such lines"
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------
# jsonl reading and validation

class DataError(ValueError):
    """A problem in the user's data, always phrased as `file:line: reason (what to do)`."""


@dataclass
class BadLineReport:
    """Counts the lines skipped with skip_bad=True; `str(report)` is the line a script prints."""
    path: str
    count: int = 0
    first: str | None = None  # "file:line: reason" of the first skipped line

    def add(self, where: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = where

    def __bool__(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        if not self.count:
            return f"no bad lines in {self.path}"
        return f"skipped {self.count} bad lines in {self.path} (first: {self.first})"


def _type_name(t) -> str:
    return {str: "a string", list: "a list", dict: "an object", int: "an integer"}.get(t, t.__name__)


def _check_messages(messages: Any, field: str) -> None:
    """Raises ValueError(reason) unless `messages` is a list of {role, content} messages."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{field}" must be a non-empty list of messages')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f'"{field}"[{i}] is not an object')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f'"{field}"[{i}] has role {role!r}; expected one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise ValueError(f'"{field}"[{i}] ({role}) has no string "content"')
        if not content and not (role == "assistant" and m.get("reasoning_content")):
            raise ValueError(f'"{field}"[{i}] ({role}) has empty "content"')


def check_pretrain(obj: dict) -> None:
    pass  # the required {"text": str} check in read_jsonl is all a pretraining row needs


def check_sft(obj: dict) -> None:
    _check_messages(obj["conversations"], "conversations")
    if not any(m["role"] == "assistant" for m in obj["conversations"]):
        raise ValueError('"conversations" has no assistant turn (nothing to learn from)')


def check_dpo(obj: dict) -> None:
    for field in ("chosen", "rejected"):
        _check_messages(obj[field], field)
        if obj[field][-1]["role"] != "assistant":
            raise ValueError(f'"{field}" must end with an assistant turn')


# name -> (required fields and types, structural check)
FORMATS: dict[str, tuple[dict[str, type], Callable[[dict], None]]] = {
    "pretrain": ({"text": str}, check_pretrain),
    "sft": ({"conversations": list}, check_sft),
    "dpo": ({"chosen": list, "rejected": list}, check_dpo),
}


def parse_line(raw: bytes, required: dict[str, type], check: Callable[[dict], None] | None = None) -> dict:
    """Parses one jsonl line; raises ValueError(reason) when it is bad."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for field, ftype in required.items():
        if field not in obj:
            raise ValueError(f'missing field "{field}"')
        if not isinstance(obj[field], ftype):
            raise ValueError(f'field "{field}" must be {_type_name(ftype)}, got {type(obj[field]).__name__}')
        if ftype in (str, list) and len(obj[field]) == 0:
            raise ValueError(f'field "{field}" is empty')
    if check is not None:
        check(obj)
    return obj


def _bad_line(path, lineno: int, reason: str, skip_bad: bool, report: BadLineReport | None) -> None:
    where = f"{path}:{lineno}: {reason}"
    if not skip_bad:
        raise DataError(f"{where} ({SKIP_HINT})")
    if report is not None:
        report.add(where)


def _check_exists(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def read_jsonl(path, required: dict[str, type] | None = None, skip_bad: bool = False,
               check: Callable[[dict], None] | None = None,
               report: BadLineReport | None = None) -> Iterator[tuple[int, dict]]:
    """Streams `(line_number, obj)` from a jsonl file, one line in memory at a time.

    `required` maps field -> type; `check` adds format-specific structure (see FORMATS). A bad
    line raises DataError("file:line: reason (hint)"); with skip_bad=True it is skipped and
    counted in `report`. Blank lines are ignored; line numbers are 1-based.
    """
    path = _check_exists(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = parse_line(raw, required or {}, check)
            except ValueError as e:
                _bad_line(path, lineno, str(e), skip_bad, report)
                continue
            yield lineno, obj


# ----------------------------------------------------------------------------------------------
# Chunked, order-preserving parallel map over the lines of a jsonl file.
# Workers parse, validate and tokenize; the parent only reads raw bytes and writes results, so
# neither side ever holds the whole file. Pool.imap would read the whole input eagerly (its
# feeder thread drains the iterator), so we keep a bounded window of apply_async results instead.

_CHUNK_BYTES = 1 << 20
_worker_state: dict = {}


def _tokenizer_payload(tokenizer) -> tuple:
    """What a worker needs to rebuild the tokenizer: its file if it has one, else a pickle."""
    path = getattr(tokenizer, "path", None)
    if path is not None and Path(path).is_file() and hasattr(type(tokenizer), "load"):
        return ("load", type(tokenizer), str(path))
    return ("pickle", pickle.dumps(tokenizer))


def _init_worker(payload, job) -> None:
    kind = payload[0]
    tok = payload[1].load(payload[2]) if kind == "load" else pickle.loads(payload[1])
    _worker_state.update(tokenizer=tok, job=job)


def _run_chunk(chunk):
    return _worker_state["job"](_worker_state["tokenizer"], chunk)


def _read_chunks(path: Path) -> Iterator[list[tuple[int, bytes]]]:
    chunk, size = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            chunk.append((lineno, raw))
            size += len(raw)
            if size >= _CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _default_workers(path: Path) -> int:
    if path.stat().st_size < 4 * _CHUNK_BYTES:
        return 0  # process start-up costs more than it saves
    return min(os.cpu_count() or 1, 16)


def _map_chunks(path: Path, tokenizer, job, num_workers: int | None, desc: str) -> Iterator:
    """Yields `(job(tokenizer, chunk), chunk_bytes)` for each chunk of lines, in file order."""
    from tqdm import tqdm

    if num_workers is None:
        num_workers = _default_workers(path)
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
               disable=None, leave=False)
    chunks = _read_chunks(path)
    try:
        if num_workers <= 1:
            for chunk in chunks:
                yield job(tokenizer, chunk)
                bar.update(sum(len(raw) for _, raw in chunk))
            return
        # fork is cheap and workers touch no torch state; elsewhere the platform default is used
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(num_workers, _init_worker, (_tokenizer_payload(tokenizer), job)) as pool:
            pending = deque()
            for chunk in chunks:
                pending.append((pool.apply_async(_run_chunk, (chunk,)), sum(len(r) for _, r in chunk)))
                if len(pending) >= 2 * num_workers:
                    result, n = pending.popleft()
                    yield result.get()
                    bar.update(n)
            while pending:
                result, n = pending.popleft()
                yield result.get()
                bar.update(n)
    finally:
        bar.close()


def _collect_bad(path, bad: list[tuple[int, str]], skip_bad: bool, report: BadLineReport) -> None:
    for lineno, reason in bad:
        _bad_line(path, lineno, reason, skip_bad, report)


# ----------------------------------------------------------------------------------------------
# Pretraining: token cache + packed dataset

def _token_dtype(vocab_size: int):
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
    dtype, eos = _token_dtype(tokenizer.vocab_size), tokenizer.eos_id
    # in-process, encode_batch may use every core itself; inside a worker one thread each is right
    encoded = [tokenizer.encode(t) for t in texts] if _worker_state else tokenizer.encode_batch(texts)
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
    src = _check_exists(jsonl_path)
    out, meta = _find_cache(src, tokenizer)
    if meta is not None:
        if meta["bad_lines"] and not skip_bad:
            raise DataError(f"{meta['first_bad']} ({SKIP_HINT}; the token cache {out} skipped "
                            f"{meta['bad_lines']} bad lines)")
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(_token_dtype(tokenizer.vocab_size))
    report = BadLineReport(str(src))
    n_tokens = n_docs = 0
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for tokens, docs, bad in _map_chunks(src, tokenizer, _encode_chunk, num_workers, f"tokenizing {src.name}"):
                _collect_bad(src, bad, skip_bad, report)
                f.write(tokens.tobytes())
                n_tokens += len(tokens)
                n_docs += docs
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
    every token after the first is a target exactly once. Item -> {"input_ids": row[:-1],
    "labels": row[1:]}, int64 tensors of length seq_len.
    """

    def __init__(self, jsonl_path, tokenizer, seq_len: int, skip_bad: bool = False, num_workers: int | None = None):
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

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        row = torch.from_numpy(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1].astype(np.int64))
        return {"input_ids": row[:-1], "labels": row[1:]}


# ----------------------------------------------------------------------------------------------
# Samplers: seeded, rank-sharded, resumable mid-epoch

def _epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class _ResumableMixin:
    """Position bookkeeping shared by both samplers.

    `start_index` counts this rank's items (samples or batches) already consumed in `epoch`; the
    next `__iter__` skips them. The global position is start_index * world_size, which is what
    state_dict stores, so a run may resume on a different world_size when the position divides.
    """
    epoch: int
    start_index: int
    world_size: int

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch, self.start_index = epoch, start_index

    def state_dict(self, consumed: int) -> dict:
        """`consumed`: items this rank took from the current `iter()` (the trainer counts them;
        the sampler itself runs ahead of the model because of DataLoader prefetching)."""
        return {"epoch": self.epoch, "position": (self.start_index + consumed) * self.world_size,
                "seed": self.seed, "n": self._n()}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["n"] != self._n():
            raise ValueError(f"sampler state is for seed {state['seed']} over {state['n']} items, but this run has "
                             f"seed {self.seed} over {self._n()}: the data or seed changed since the checkpoint")
        if state["position"] % self.world_size:
            raise ValueError(f"cannot resume at global position {state['position']} with world_size {self.world_size}")
        self.set_epoch(state["epoch"], state["position"] // self.world_size)


class ShardedSampler(_ResumableMixin, Sampler[int]):
    """Seeded per-epoch permutation (same on every rank), cut to a multiple of world_size; rank r
    takes positions r::world_size.

    So ranks interleave the single-process order: the union over ranks of their k-th samples is
    the 1-process order's samples k*W .. k*W+W-1, and a W-process run with per-rank batch b sees
    exactly the global batches of a 1-process run with batch W*b (up to the dropped tail).
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start_index = 0, 0
        self.samples_per_rank = dataset_len // world_size  # per full epoch

    def _n(self) -> int:
        return self.dataset_len

    def __iter__(self) -> Iterator[int]:
        order = _epoch_permutation(self.dataset_len, self.seed, self.epoch, self.shuffle)
        mine = order[: self.samples_per_rank * self.world_size][self.rank:: self.world_size]
        return iter(mine[self.start_index:].tolist())

    def __len__(self) -> int:  # what the next iter() yields
        return max(self.samples_per_rank - self.start_index, 0)


class ShardedBatchSampler(_ResumableMixin, Sampler[list[int]]):
    """ShardedSampler's order for this rank cut into batches of batch_size (a short last batch is
    dropped: fixed shapes, equal step counts on every rank). Use as `batch_sampler`; the position
    (`set_epoch(epoch, start_batch)`) counts batches. Step k's batches over all W ranks hold the
    same samples as step k of a 1-process run with batch W * batch_size."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        self.samples = ShardedSampler(dataset_len, rank, world_size, shuffle, seed)
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.epoch, self.start_index = 0, 0

    def _n(self) -> int:
        return self.samples.dataset_len

    def __iter__(self) -> Iterator[list[int]]:
        self.samples.set_epoch(self.epoch, self.start_index * self.batch_size)
        order, b = list(self.samples), self.batch_size
        return iter([order[i: i + b] for i in range(0, len(order) - b + 1, b)])

    def __len__(self) -> int:  # batches the next iter() yields on this rank
        return max(self.samples.samples_per_rank // self.batch_size - self.start_index, 0)


class LengthGroupedBatchSampler(_ResumableMixin, Sampler[list[int]]):
    """Batches of similar length, so padding wastes little compute (use as `batch_sampler`).

    Per epoch: seeded permutation -> mega-batches of `mega_batch_mult` global batches -> each
    sorted by length (longest first) -> cut into global batches of batch_size * world_size ->
    global batch order shuffled. Rank r takes global_batch[r::world_size], so as with
    ShardedSampler a W-rank run sees the same global batches as 1 rank with W times the batch.
    The last global batch may be short (kept when it still gives every rank one sample).
    """

    def __init__(self, lengths, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 mega_batch_mult: int = 64, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.mega_batch_mult, self.shuffle = seed, mega_batch_mult, shuffle
        self.epoch, self.start_index = 0, 0

    def _n(self) -> int:
        return len(self.lengths)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        n, g = len(self.lengths), self.batch_size * self.world_size
        order = _epoch_permutation(n, self.seed, epoch, self.shuffle)
        mega = g * self.mega_batch_mult
        batches = []
        for s in range(0, n, mega):
            idx = order[s: s + mega]
            idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
            batches += [idx[b: b + g] for b in range(0, len(idx), g)]
        batches = [b for b in batches if len(b) >= self.world_size]
        if self.shuffle:
            batch_order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in batch_order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch)[self.start_index:]:
            yield batch[self.rank:: self.world_size].tolist()

    def __len__(self) -> int:  # batches the next iter() yields on this rank
        return max(len(self.global_batches(self.epoch)) - self.start_index, 0)


# ----------------------------------------------------------------------------------------------
# Chat data: SFT / reasoning / DPO

def _stable_uniforms(seed: int, lineno: int) -> tuple[float, int]:
    """Two deterministic pseudo-random numbers for one row, independent of processing order."""
    h = hashlib.blake2b(f"{seed}:{lineno}".encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64, int.from_bytes(h[8:], "little")


def _truncated_row(tokenizer, messages, max_seq_len: int) -> tuple[list[int], list[int]]:
    ids, mask = tokenizer.render_chat(messages)
    if len(ids) != len(mask):
        raise ValueError(f"render_chat returned {len(ids)} ids but {len(mask)} mask entries")
    # truncate ids and mask together: a row holds max_seq_len inputs plus one shifted target
    return ids[: max_seq_len + 1], mask[: max_seq_len + 1]


def _has_target(mask: list[int]) -> bool:
    return any(mask[1:])


class _RowStore:
    """Variable-length token rows in flat numpy arrays + offsets (compact for millions of rows)."""

    def __init__(self, dtype):
        self.dtype, self._ids, self._mask, self._lens = dtype, [], [], []

    def add(self, ids_list, mask_list) -> None:
        if not ids_list:
            return
        self._ids.append(np.concatenate([np.asarray(x, dtype=self.dtype) for x in ids_list]))
        self._mask.append(np.concatenate([np.asarray(m, dtype=np.bool_) for m in mask_list]))
        self._lens.append(np.asarray([len(x) for x in ids_list], dtype=np.int64))

    def finish(self) -> None:
        self.ids = np.concatenate(self._ids) if self._ids else np.zeros(0, self.dtype)
        self.mask = np.concatenate(self._mask) if self._mask else np.zeros(0, np.bool_)
        lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        del self._ids, self._mask, self._lens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, labels): the row's ids shifted by one, labels -100 where mask is 0."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = torch.from_numpy(self.ids[a:b].astype(np.int64))
        mask = torch.from_numpy(self.mask[a + 1: b].copy())
        return ids[:-1], torch.where(mask, ids[1:], IGNORE_INDEX)


class _ChatDataset(Dataset):
    """Shared build loop: render every line once (optionally in worker processes) into _RowStores."""
    format: str
    stores: tuple[str, ...]

    def _build(self, jsonl_path, tokenizer, skip_bad: bool, num_workers: int | None) -> None:
        src = _check_exists(jsonl_path)
        self.path = src
        self.bad_lines = BadLineReport(str(src))
        self.n_no_target = 0  # rows dropped because truncation left no assistant token to learn
        dtype = _token_dtype(tokenizer.vocab_size)
        rows = {name: _RowStore(dtype) for name in self.stores}
        for out, bad, n_no_target in _map_chunks(src, tokenizer, self._render_chunk, num_workers,
                                                 f"rendering {src.name}"):
            _collect_bad(src, bad, skip_bad, self.bad_lines)
            self.n_no_target += n_no_target
            for name in self.stores:
                rows[name].add(*out[name])
        for store in rows.values():
            store.finish()
        self.rows = rows
        if len(self) == 0:
            raise DataError(f"{src}: no usable rows ({self.bad_lines}; {self.n_no_target} rows had no assistant "
                            f"token within max_seq_len {self.max_seq_len})")

    def _render_chunk(self, tokenizer, chunk):
        required, check = FORMATS[self.format]
        out = {name: ([], []) for name in self.stores}
        bad, n_no_target = [], 0
        for lineno, raw in chunk:
            try:
                rendered = self._render(tokenizer, parse_line(raw, required, check), lineno)
            except ValueError as e:
                bad.append((lineno, str(e)))
                continue
            if not all(_has_target(mask) for _, mask in rendered):
                n_no_target += 1
                continue
            for name, (ids, mask) in zip(self.stores, rendered):
                out[name][0].append(ids)
                out[name][1].append(mask)
        return out, bad, n_no_target

    def __getstate__(self):
        # pickled into worker processes: _render_chunk is a bound method, the big arrays are
        # not needed there
        state = dict(self.__dict__)
        state.pop("rows", None)
        return state

    def __len__(self) -> int:
        return len(self.rows[self.stores[0]])

    def report(self) -> str:
        """One line for the script to print after loading."""
        return (f"{len(self)} rows from {self.path}; {self.bad_lines}; "
                f"{self.n_no_target} rows skipped with no assistant token within max_seq_len={self.max_seq_len}")


class SFTDataset(_ChatDataset):
    """Multi-turn ChatML conversations rendered once by `tokenizer.render_chat`.

    Rows longer than max_seq_len + 1 tokens are cut to that length (ids and loss mask together,
    so no label points past the row). Rows left with no assistant token to learn are skipped and
    counted in `n_no_target`. With `system_prompts`, a conversation without a system message gets
    one with probability `system_prompt_prob` (MiniMind's trick), chosen deterministically from
    (seed, line number). Item i -> {"input_ids": ids[:-1], "labels": ids[1:] where mask[1:] else -100},
    variable length; `lengths` holds each item's length for LengthGroupedBatchSampler.
    """
    format = "sft"
    stores = ("row",)

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 system_prompts: list[str] | None = None, system_prompt_prob: float = 0.0, seed: int = 0,
                 num_workers: int | None = None):
        self.max_seq_len = max_seq_len
        self.system_prompts = list(system_prompts or [])
        self.system_prompt_prob, self.seed = system_prompt_prob, seed
        self._build(jsonl_path, tokenizer, skip_bad, num_workers)
        self.lengths = np.diff(self.rows["row"].offsets) - 1

    def _render(self, tokenizer, obj, lineno):
        messages = obj["conversations"]
        if self.system_prompts and messages[0]["role"] != "system":
            u, k = _stable_uniforms(self.seed, lineno)
            if u < self.system_prompt_prob:
                messages = [{"role": "system", "content": self.system_prompts[k % len(self.system_prompts)]}] + messages
        return [_truncated_row(tokenizer, messages, self.max_seq_len)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.rows["row"].item(i)
        return {"input_ids": input_ids, "labels": labels}


class ReasoningDataset(SFTDataset):
    """Reasoning distillation data: SFT rows whose assistant turns hold a think block, either inline
    (`<think>...</think><answer>...</answer>`) or as a `reasoning_content` field, which the
    tokenizer renders. The think/answer loss weighting belongs to the stage script."""


class DPODataset(_ChatDataset):
    """Preference pairs: item -> chosen_input_ids / chosen_labels / rejected_input_ids /
    rejected_labels, each rendered and truncated like an SFT row (labels -100 off the assistant
    turns). A pair is skipped (counted in n_no_target) when either side has nothing to learn."""
    format = "dpo"
    stores = ("chosen", "rejected")

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 num_workers: int | None = None):
        self.max_seq_len = max_seq_len
        self._build(jsonl_path, tokenizer, skip_bad, num_workers)
        self.lengths = np.maximum(np.diff(self.rows["chosen"].offsets), np.diff(self.rows["rejected"].offsets)) - 1

    def _render(self, tokenizer, obj, lineno):
        return [_truncated_row(tokenizer, obj[side], self.max_seq_len) for side in self.stores]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {}
        for side in self.stores:
            item[f"{side}_input_ids"], item[f"{side}_labels"] = self.rows[side].item(i)
        return item


# ----------------------------------------------------------------------------------------------
# Collation

def _pad_stack(tensors: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(tensors), length), value, dtype=torch.int64)
    for row, t in zip(out, tensors):
        row[: len(t)] = t
    return out


class PadCollate:
    """Pads a list of items to the batch's longest: input_ids with pad_id, labels with -100.

    Counts real and padded positions over every batch it built (in shared memory, so the counts
    also add up across DataLoader worker processes); `padding_fraction()` is what scripts print.
    """

    def __init__(self, pad_id: int, keys: tuple[tuple[str, str], ...] = (("input_ids", "labels"),)):
        self.pad_id, self.keys = pad_id, keys
        self._real, self._total = mp.Value("q", 0), mp.Value("q", 0)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(item[ids_key]) for item in items for ids_key, _ in self.keys)
        batch, real = {}, 0
        for ids_key, labels_key in self.keys:
            batch[ids_key] = _pad_stack([item[ids_key] for item in items], length, self.pad_id)
            batch[labels_key] = _pad_stack([item[labels_key] for item in items], length, IGNORE_INDEX)
            real += sum(len(item[ids_key]) for item in items)
        with self._real.get_lock():
            self._real.value += real
        with self._total.get_lock():
            self._total.value += length * len(items) * len(self.keys)
        return batch

    def padding_fraction(self) -> float:
        """Padded positions / all positions served so far (0.0 before the first batch)."""
        total = self._total.value
        return 1.0 - self._real.value / total if total else 0.0

    def reset(self) -> None:
        self._real.value = self._total.value = 0


def pad_collate(pad_id: int) -> PadCollate:
    return PadCollate(pad_id)


def dpo_collate(pad_id: int) -> PadCollate:
    """Pads chosen and rejected to one common length, so the trainer can torch.cat them into one batch."""
    return PadCollate(pad_id, keys=(("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels")))


def build_dataloader(dataset, batch_size: int | None = None, sampler=None, batch_sampler=None,
                     collate_fn=None, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a sampler (with batch_size) or a batch_sampler (without); never shuffles
    itself, the sampler owns the order (seeded, sharded, resumable)."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                          pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
