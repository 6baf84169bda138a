"""Chat data for SFT, LoRA, reasoning and DPO: every conversation rendered once by the tokenizer
into (ids, loss_mask) rows, kept in flat arrays, and padded into batches.

An item is the rendered conversation, cut to max_seq_len + 1 tokens: `ids` and `loss_mask`
(True where the token is the assistant's: its replies and each reply's closing <|im_end|>;
Tokenizer.render_chat decides). Which targets a stage trains on is the stage's business: the
stage scripts shift and mask (`labels = ids[:, 1:]` where `loss_mask[:, 1:]`, else -100).
A batch also carries host-int counts (`n_tokens`, `n_targets`, ...) that the trainer totals over
each optimizer step without a device sync.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from minillm.data.jsonl import (FORMATS, BadLineReport, DataError, check_exists, collect_bad, conversation_tools,
                                map_chunks, no_rows_error, parse_line)
from minillm.data.pretrain import token_dtype
from minillm.tokenizer import THINK_OFF_PREFILL

IGNORE_INDEX = -100  # the label of a position that is not trained on (cross-entropy's ignore_index)


def _stable_uniforms(seed: int, lineno: int) -> tuple[float, int]:
    """Two deterministic pseudo-random numbers for one row, independent of processing order."""
    h = hashlib.blake2b(f"{seed}:{lineno}".encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64, int.from_bytes(h[8:], "little")


def _truncated_row(tokenizer, messages, max_seq_len: int, tools=None) -> tuple[list[int], list[int]]:
    if not tools:
        ids, mask = tokenizer.render_chat(messages)
    else:
        try:
            ids, mask = tokenizer.render_chat(messages, tools=tools)
        except TypeError as e:  # a tokenizer class whose render_chat override predates tools
            if "tools" not in str(e):
                raise
            raise ValueError(f"the row has tools, but {type(tokenizer).__name__}.render_chat takes no tools "
                             f"argument; update it to pass tools on to Tokenizer.render_chat") from None
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

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids int64, loss_mask bool) of row i, as rendered."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(self.ids[a:b].astype(np.int64)), torch.from_numpy(self.mask[a:b].copy())


class _ChatDataset(Dataset):
    """Shared build loop: render every line once (optionally in worker processes) into _RowStores."""
    format: str
    stores: tuple[str, ...]

    def _build(self, jsonl_path, tokenizer, skip_bad: bool, num_workers: int | None) -> None:
        src = check_exists(jsonl_path)
        self.path = src
        self.bad_lines = BadLineReport(str(src))
        self.n_no_target = 0  # rows dropped because truncation left no assistant token to learn
        dtype = token_dtype(tokenizer.vocab_size)
        rows = {name: _RowStore(dtype) for name in self.stores}
        for out, bad, n_no_target in map_chunks(src, tokenizer, self._render_chunk, num_workers,
                                                f"rendering {src.name}"):
            collect_bad(src, bad, skip_bad, self.bad_lines)
            self.n_no_target += n_no_target
            for name in self.stores:
                rows[name].add(*out[name])
        for store in rows.values():
            store.finish()
        self.rows = rows
        if len(self) == 0:
            raise no_rows_error(src, self.format, self.bad_lines.count + self.n_no_target, self.bad_lines,
                                f"; {self.n_no_target} rows had no assistant token within max_seq_len "
                                f"{self.max_seq_len}")

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

    Rows longer than max_seq_len + 1 tokens are cut to that length (ids and loss mask together).
    Rows left with no assistant token to learn are skipped and counted in `n_no_target`. With
    `system_prompts`, a conversation without a system message gets one with probability
    `system_prompt_prob` (MiniMind's trick), chosen deterministically from (seed, line number).
    A system message need not come first (it is rendered where it stands, never trained on), and a
    conversation with one anywhere gets no random one.
    Item i -> {"ids", "loss_mask"}, variable length; `lengths` holds each item's number of input
    positions (len(ids) - 1) for LengthGroupedBatchSampler. Reasoning data is SFT data: the
    tokenizer renders a `reasoning_content` field as the think block itself. Tool-use rows render
    with their tools (Tokenizer.render_chat): calls are learned, schemas and tool results are not.

    Adaptive thinking (MiniMind-3's `post_processing_chat`): with `empty_think_ratio` > 0, that share
    of rows (chosen like the system prompts) has every reply without a think block start with an empty
    one, so the model learns that after `<think>\n\n</think>\n\n` (open_thinking off) it answers
    directly, while rows with reasoning teach it to think. MiniMind keeps 0.2 of rows so; data may also
    write the empty block into a reply's content itself.
    """
    format = "sft"
    stores = ("row",)

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 system_prompts: list[str] | None = None, system_prompt_prob: float = 0.0, seed: int = 0,
                 num_workers: int | None = None, empty_think_ratio: float = 0.0):
        if not 0.0 <= empty_think_ratio <= 1.0:
            raise DataError(f"empty_think_ratio {empty_think_ratio} must be in [0, 1]")
        self.max_seq_len, self.empty_think_ratio = max_seq_len, empty_think_ratio
        self.system_prompts = list(system_prompts or [])
        self.system_prompt_prob, self.seed = system_prompt_prob, seed
        self._build(jsonl_path, tokenizer, skip_bad, num_workers)
        self.lengths = self.rows["row"].lengths() - 1

    def _render(self, tokenizer, obj, lineno):
        messages, tools = obj["conversations"], conversation_tools(obj, "conversations")
        if self.system_prompts and not tools and not any(m["role"] == "system" for m in messages):
            u, k = _stable_uniforms(self.seed, lineno)
            if u < self.system_prompt_prob:
                messages = [{"role": "system", "content": self.system_prompts[k % len(self.system_prompts)]}] + messages
        if self.empty_think_ratio and _stable_uniforms(self.seed + 1, lineno)[0] < self.empty_think_ratio:
            messages = [{**m, "content": THINK_OFF_PREFILL + m["content"]}
                        if m["role"] == "assistant" and not m.get("reasoning_content") and "<think>" not in m["content"]
                        else m for m in messages]
        return [_truncated_row(tokenizer, messages, self.max_seq_len, tools)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, loss_mask = self.rows["row"].item(i)
        return {"ids": ids, "loss_mask": loss_mask}


class DPODataset(_ChatDataset):
    """Preference pairs: item -> chosen_ids / chosen_loss_mask / rejected_ids / rejected_loss_mask,
    each rendered and truncated like an SFT row. A pair is skipped (counted in n_no_target) when
    either side has nothing to learn."""
    format = "dpo"
    stores = ("chosen", "rejected")

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 num_workers: int | None = None):
        self.max_seq_len = max_seq_len
        self._build(jsonl_path, tokenizer, skip_bad, num_workers)
        self.lengths = np.maximum(self.rows["chosen"].lengths(), self.rows["rejected"].lengths()) - 1

    def _render(self, tokenizer, obj, lineno):
        return [_truncated_row(tokenizer, obj[side], self.max_seq_len, conversation_tools(obj, side))
                for side in self.stores]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {}
        for side in self.stores:
            item[f"{side}_ids"], item[f"{side}_loss_mask"] = self.rows[side].item(i)
        return item


# ----------------------------------------------------------------------------------------------
# Collation

def _pad_stack(tensors: list[torch.Tensor], length: int, value) -> torch.Tensor:
    out = torch.full((len(tensors), length), value, dtype=tensors[0].dtype)
    for row, t in zip(out, tensors):
        row[: len(t)] = t
    return out


class PadCollate:
    """Pads items to the batch's longest row: ids with pad_id, loss_mask with False.

    `sides` are the key prefixes to pad ("" for SFT items, "chosen_" and "rejected_" for DPO pairs,
    padded to one common length so a stage can concatenate them into one forward). Adds host-int
    counts: `n_tokens` (real input positions over all sides), `n_rows`, and per side
    `n_{side}targets` (assistant targets: loss_mask[1:] summed). Counts the real and padded
    positions of every batch it builds (in shared memory, so DataLoader workers add up too);
    `padding_fraction()` is what the scripts print.
    """

    def __init__(self, pad_id: int, sides: tuple[str, ...] = ("",)):
        self.pad_id, self.sides = pad_id, sides
        self._real, self._total = mp.Value("q", 0), mp.Value("q", 0)

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(item[f"{side}ids"]) for item in items for side in self.sides)
        batch, real = {"n_rows": len(items)}, 0
        for side in self.sides:
            batch[f"{side}ids"] = _pad_stack([item[f"{side}ids"] for item in items], length, self.pad_id)
            batch[f"{side}loss_mask"] = _pad_stack([item[f"{side}loss_mask"] for item in items], length, False)
            batch[f"n_{side}targets"] = int(batch[f"{side}loss_mask"][:, 1:].sum())
            real += sum(len(item[f"{side}ids"]) - 1 for item in items)
        for key, value in items[0].items():  # anything else an item carries (a stage's extras) is stacked
            if key not in batch and not any(key in (f"{s}ids", f"{s}loss_mask") for s in self.sides):
                batch[key] = torch.stack([item[key] for item in items])
        batch["n_tokens"] = real
        with self._real.get_lock():
            self._real.value += real
        with self._total.get_lock():
            self._total.value += (length - 1) * len(items) * len(self.sides)
        return batch

    def padding_fraction(self) -> float:
        """Padded positions / all positions served so far (0.0 before the first batch)."""
        total = self._total.value
        return 1.0 - self._real.value / total if total else 0.0


def pad_collate(pad_id: int) -> PadCollate:
    return PadCollate(pad_id)


def dpo_collate(pad_id: int) -> PadCollate:
    return PadCollate(pad_id, sides=("chosen_", "rejected_"))


# ----------------------------------------------------------------------------------------------
# Held-out split

class Subset(Dataset):
    """Rows `indices` of a dataset, with their `lengths` (so the length-grouped sampler works)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(dataset.lengths)[self.indices] if hasattr(dataset, "lengths") else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def __getattr__(self, name):  # report(), bad_lines, ... of the whole dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def holdout_split(dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train, held-out): a seeded `fraction` of the rows held out (at least one), the same on
    every rank and every run with this seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval_split {fraction}: use a fraction between 0 and 1 (e.g. 0.05), or 0 for none")
    n = len(dataset)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise DataError(f"--eval_split {fraction} leaves no training rows out of {n}")
    order = np.random.default_rng([seed, 2]).permutation(n)
    return Subset(dataset, np.sort(order[n_eval:])), Subset(dataset, np.sort(order[:n_eval]))


class TextRows(Dataset):
    """A pretraining corpus as chat-shaped items: PretrainDataset's packed rows (seq_len + 1 ids, documents
    run on, EOS between) with every position a target: {"ids", "loss_mask" all True}. For a stage that
    trains on chat rows and plain text together (train_distillation.py --text_data_path)."""

    def __init__(self, packed):
        self.packed = packed
        self.lengths = np.full(len(packed), packed.seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.packed[i]
        return {"ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}

    def report(self) -> str:
        return f"{len(self)} packed text rows of {self.packed.seq_len} tokens from {self.packed.source}"


class ConcatRows(ConcatDataset):
    """torch's ConcatDataset of {"ids", "loss_mask"} datasets, with their `lengths` joined (the
    length-grouped sampler then batches similar lengths from any of them) and their reports."""

    def __init__(self, datasets):
        super().__init__(datasets)
        self.lengths = np.concatenate([np.asarray(d.lengths) for d in self.datasets])

    def report(self) -> str:
        return " + ".join(d.report() for d in self.datasets)
