"""Batch samplers: seeded, rank-sharded, resumable mid-epoch, and grouped per optimizer step.

Both yield this rank's micro-batches (lists of dataset indices), in order, and are used as a
DataLoader's `batch_sampler`. The unit of data is the optimizer step: `batch_size * world_size *
accumulation_steps` rows. Which rows form a step depends only on that product, never on how it
is split into ranks and micro-batches, so 1 process x batch 8, batch 2 x accumulation 4 and
2 processes x batch 4 train on the same rows at every step (with the trainer's exact loss
normalisation, they compute the same update).

`set_epoch(epoch, start_batch)` positions the next iteration; `start_batch` counts this rank's
micro-batches already consumed in that epoch (the trainer saves it with each checkpoint), and
`len()` is then the number of micro-batches left.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


def _epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _split_step(step_rows: np.ndarray, rank: int, world_size: int, accumulation_steps: int) -> list[list[int]]:
    """One optimizer step's rows -> this rank's micro-batches: `accumulation_steps` consecutive
    chunks of the step, each dealt across the ranks (rank r takes chunk[r::world_size])."""
    return [chunk[rank::world_size].tolist() for chunk in np.array_split(step_rows, accumulation_steps)]


class _StepSampler(Sampler[list[int]]):
    """What both samplers share: rank checks, the position, and cutting steps into micro-batches.
    A subclass says which rows make up each optimizer step of an epoch (`steps(epoch)`)."""

    def __init__(self, batch_size: int, rank: int, world_size: int, accumulation_steps: int, seed: int,
                 shuffle: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1 or accumulation_steps < 1:
            raise ValueError(f"batch_size {batch_size} and accumulation_steps {accumulation_steps} must be >= 1")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.accumulation_steps, self.seed, self.shuffle = accumulation_steps, seed, shuffle
        self.step_rows = batch_size * world_size * accumulation_steps
        self.epoch, self.start_batch = 0, 0

    def steps(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        micro = [mb for step in self.steps(self.epoch)
                 for mb in _split_step(step, self.rank, self.world_size, self.accumulation_steps)]
        return iter(micro[self.start_batch:])

    def __len__(self) -> int:
        return max(len(self.steps(self.epoch)) * self.accumulation_steps - self.start_batch, 0)


class ShardedBatchSampler(_StepSampler):
    """Pretraining's sampler: a seeded permutation per epoch, cut into optimizer steps of
    `batch_size * world_size * accumulation_steps` rows (a short last step is dropped: fixed
    shapes and equal step counts on every rank)."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 accumulation_steps: int = 1, shuffle: bool = True, seed: int = 0):
        super().__init__(batch_size, rank, world_size, accumulation_steps, seed, shuffle)
        self.dataset_len = dataset_len

    def steps(self, epoch: int) -> list[np.ndarray]:
        order, s = _epoch_permutation(self.dataset_len, self.seed, epoch, self.shuffle), self.step_rows
        return [order[i: i + s] for i in range(0, len(order) - s + 1, s)]


class LengthGroupedBatchSampler(_StepSampler):
    """Steps of rows of similar length, so padding wastes little compute (SFT, DPO, reasoning).

    Per epoch: seeded permutation -> mega-batches of `mega_batch_mult` steps -> each sorted by
    length (longest first) -> cut into steps -> step order shuffled. Inside a step the rows stay
    sorted, so each micro-batch holds neighbours in length. The last step may be short; it is
    kept when it still gives every rank one row in every micro-batch.
    """

    def __init__(self, lengths, batch_size: int, rank: int = 0, world_size: int = 1, accumulation_steps: int = 1,
                 seed: int = 0, mega_batch_mult: int = 64, shuffle: bool = True):
        super().__init__(batch_size, rank, world_size, accumulation_steps, seed, shuffle)
        self.lengths = np.asarray(lengths)
        self.mega_batch_mult = mega_batch_mult

    def steps(self, epoch: int) -> list[np.ndarray]:
        n, s = len(self.lengths), self.step_rows
        order = _epoch_permutation(n, self.seed, epoch, self.shuffle)
        mega = s * self.mega_batch_mult
        steps = []
        for start in range(0, n, mega):
            idx = order[start: start + mega]
            idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
            steps += [idx[b: b + s] for b in range(0, len(idx), s)]
        steps = [step for step in steps if len(step) >= self.world_size * self.accumulation_steps]
        if self.shuffle:
            step_order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(steps))
            steps = [steps[i] for i in step_order]
        return steps
