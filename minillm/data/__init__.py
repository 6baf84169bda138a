"""Data: reading the user's jsonl, the pretraining token cache, chat rows, samplers and collation.

    jsonl.py      validation with file:line errors; the parallel, order-preserving tokenize map
    pretrain.py   the memory-mapped token cache and packed fixed-length rows
    chat.py       SFT / DPO conversations rendered once into (ids, loss_mask) rows; padding; held-out split
    samplers.py   seeded, rank-sharded, resumable batch samplers grouped per optimizer step

Nothing here tokenizes inside the data loader: pretraining text is tokenized once into the cache,
conversations are rendered once when the dataset is built.
"""
from minillm.data.chat import (IGNORE_INDEX, ConcatRows, DPODataset, PadCollate, SFTDataset, Subset, TextRows, dpo_collate,
                               holdout_split, pad_collate)
from minillm.data.jsonl import FORMATS, BadLineReport, DataError, parse_line, read_jsonl
from minillm.data.pretrain import PretrainDataset, build_token_cache, default_cache_dir, packed_collate, token_cache_path
from minillm.data.samplers import LengthGroupedBatchSampler, ShardedBatchSampler

__all__ = ["IGNORE_INDEX", "ConcatRows", "TextRows", "DPODataset", "PadCollate", "SFTDataset", "Subset", "dpo_collate", "holdout_split",
           "pad_collate", "FORMATS", "BadLineReport", "DataError", "parse_line", "read_jsonl", "PretrainDataset",
           "build_token_cache", "default_cache_dir", "packed_collate", "token_cache_path",
           "LengthGroupedBatchSampler", "ShardedBatchSampler"]
