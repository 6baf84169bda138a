"""Learning from prompts (RL stages): the prompt data, batched rollouts with our KV-cache generation,
the per-token log-probs of what was sampled, and cutting experience into micro-batches.

train_grpo.py and train_ppo.py build their algorithms on these (advantages, ratios, clipping and KL
live in the scripts); the trainer's `fit(..., rollout=)` calls the script's rollout function once per
step with that step's prompt batches.

Prompt rows are MiniMind's rlaif.jsonl: `{"conversations": [{"role": "user", "content": "..."},
{"role": "assistant", "content": ""}]}`; a trailing empty assistant turn is dropped and the rest is
the prompt, which must end with a user turn. Rows may carry more fields (ours: "answer", the
reference answer rule rewards check against); the dataset keeps each row for the reward function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from minillm.data.chat import IGNORE_INDEX, _stable_uniforms
from minillm.data.jsonl import BadLineReport, DataError, _check_messages, check_tool_use, read_jsonl
from minillm.errors import UserError
from minillm.generate import SamplingParams, generate_batch
from minillm.tokenizer import THINK_OFF_PREFILL

RLAIF_EXAMPLE = ('{"conversations": [{"role": "user", "content": "What is 2 + 3?"}, '
                 '{"role": "assistant", "content": ""}], "answer": "5"}')


def prompt_messages(obj: dict) -> list[dict]:
    """The prompt of an rlaif row: its conversation without a trailing empty assistant turn.
    Raises ValueError(reason) when that is not a conversation ending with a user turn."""
    check_tool_use(obj, ("conversations",))
    conv = obj["conversations"]
    if isinstance(conv, list) and conv and isinstance(conv[-1], dict) and conv[-1].get("role") == "assistant" \
            and conv[-1].get("content") == "" and not conv[-1].get("reasoning_content"):
        conv = conv[:-1]
    _check_messages(conv, "conversations")
    if conv[-1]["role"] != "user":
        raise ValueError('"conversations" must end with a user turn (optionally followed by an empty '
                         'assistant turn): the model writes the reply')
    if "answer" in obj and not isinstance(obj["answer"], str):
        raise ValueError(f'"answer" must be a string, got {type(obj["answer"]).__name__}')
    return conv


class PromptDataset(Dataset):
    """Rendered prompts of an rlaif.jsonl file. Item: {"prompt_ids": LongTensor, "index": row number}.

    `thinking_ratio` (MiniMind's flag): the share of prompts left open for the model to think; the
    others get an empty think block pre-filled after the generation prompt (thinking off), chosen per
    row by a stable hash of (seed, line), so the same rows stay on or off across epochs and resumes.
    Prompts longer than `max_prompt_len` tokens are skipped and counted (cutting a conversation from
    the left would drop its system turn or question).
    """

    def __init__(self, path, tokenizer, max_prompt_len: int, skip_bad: bool = False,
                 thinking_ratio: float = 1.0, seed: int = 0):
        if not 0.0 <= thinking_ratio <= 1.0:
            raise DataError(f"thinking_ratio {thinking_ratio} must be in [0, 1]")
        self.path, self.report = str(path), BadLineReport(str(path))
        think_off = tokenizer.encode(THINK_OFF_PREFILL)
        self.rows, self.prompts, self.lines, self.too_long = [], [], [], 0
        n_lines = 0
        for lineno, obj in read_jsonl(path, {"conversations": list}, skip_bad, check=prompt_messages,
                                      report=self.report):
            n_lines += 1
            ids = tokenizer.render_prompt(prompt_messages(obj))
            if _stable_uniforms(seed, lineno)[0] >= thinking_ratio:
                ids = ids + think_off
            if len(ids) > max_prompt_len:
                self.too_long += 1
                continue
            self.rows.append(obj)
            self.prompts.append(ids)
            self.lines.append(lineno)
        if not self.prompts:
            if n_lines == 0 and not self.report:
                raise DataError(f"{path}: no rows: the file is empty or holds only blank lines; give one JSON "
                                f"object per line, like {RLAIF_EXAMPLE}")
            why = (f"{self.too_long} prompts are longer than max_prompt_len={max_prompt_len}: raise it"
                   if self.too_long else str(self.report))
            raise DataError(f"{path}: no usable prompt rows ({why})")
        self.lengths = [len(p) for p in self.prompts]
        self.total_prompts = len(self.prompts)

    def keep_first(self, n: int) -> None:
        """Train on the first `n` usable prompts only (0 or more than there are = all): the same on every
        rank, so each prompt comes back once per epoch (--max_prompts)."""
        if 0 < n < len(self):
            for name in ("rows", "prompts", "lines", "lengths"):
                setattr(self, name, getattr(self, name)[:n])

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt_ids": torch.tensor(self.prompts[i], dtype=torch.long), "index": torch.tensor(i)}

    def describe(self) -> str:
        skipped = f", {self.too_long} too long skipped" if self.too_long else ""
        bad = f", {self.report}" if self.report else ""
        subset = f" (the first of {self.total_prompts})" if len(self) < self.total_prompts else ""
        return f"{len(self)} prompts{subset} from {self.path}{skipped}{bad}"


DEMO_PROMPTS = 64  # --max_prompts auto on the demo prompts


def resolve_max_prompts(flag: int, on_demo_data: bool, step_prompts: int) -> int:
    """--max_prompts as a count for PromptDataset.keep_first: N > 0 the first N prompts, 0 all, -1 (auto)
    DEMO_PROMPTS on the demo data (at least one step's worth) and all otherwise. `step_prompts` = prompts
    one optimizer step takes over all processes (batch_size x accumulation_steps x world size)."""
    if flag < -1:
        raise UserError(f"--max_prompts {flag}: the number of prompts to train on, 0 (all) or more, or -1 (auto)")
    if flag == -1:
        return max(DEMO_PROMPTS, step_prompts) if on_demo_data else 0
    if 0 < flag < step_prompts:
        raise UserError(f"--max_prompts {flag} is fewer than one optimizer step takes ({step_prompts} = --batch_size x "
                        f"--accumulation_steps x processes): raise it, or lower those")
    return flag


def prompt_collate(items: list[dict]) -> dict:
    """A batch of prompts as lists of ids (generation left-pads them itself) plus their row numbers."""
    prompts = [item["prompt_ids"].tolist() for item in items]
    return {"prompts": prompts, "index": torch.stack([item["index"] for item in items]),
            "n_rows": len(items), "n_tokens": sum(len(p) for p in prompts)}


# -- rollouts ----------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """`num_generations` sampled completions per prompt, laid out for training: row r is prompt
    r // num_generations followed by its completion, right-padded, so a plain causal forward
    (no attention mask) gives every row exactly what it would get alone."""
    ids: torch.Tensor            # [N, T] prompt + completion, right-padded with pad_id
    loss_mask: torch.Tensor      # [N, T] bool: True on the completion's tokens (a stop token included)
    prompt_index: torch.Tensor   # [N] the prompt's position in the batch
    completions: list            # [N] lists of sampled ids (a stop id included when one was hit)
    finished: torch.Tensor       # [N] bool: the completion ended with a stop id (False: cut at the limit)
    lengths: list                # [N] host ints: prompt + completion length

    @property
    def labels(self) -> torch.Tensor:
        """Shifted targets [N, T-1]: the sampled tokens, -100 elsewhere (the SFT convention)."""
        return self.ids[:, 1:].masked_fill(~self.loss_mask[:, 1:], IGNORE_INDEX)


def sample_rollouts(model, prompts: list[list[int]], num_generations: int, params: SamplingParams,
                    pad_id: int, generator=None) -> Rollouts:
    """Sample `num_generations` completions for every prompt in one batched, KV-cached decode
    (left-padded prompts; each row stops at its own stop id)."""
    expanded = [p for p in prompts for _ in range(num_generations)]
    completions = generate_batch(model, expanded, params, pad_id, generator)
    stops = set(params.stop_ids)
    lengths = [len(p) + len(c) for p, c in zip(expanded, completions)]
    device = next(model.parameters()).device
    ids = torch.full((len(expanded), max(lengths)), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (p, c) in enumerate(zip(expanded, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        loss_mask[row, len(p):len(p) + len(c)] = True
    finished = torch.tensor([bool(c) and c[-1] in stops for c in completions])
    index = torch.arange(len(prompts)).repeat_interleave(num_generations)
    return Rollouts(ids.to(device), loss_mask.to(device), index.to(device), completions, finished.to(device),
                    lengths)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N, T, V] of inputs ids[:, :-1], shifted labels [N, T] -> log p(label_t) [N, T] in fp32,
    0 where the label is -100. Through cross_entropy: one fused log-softmax + gather, no log-prob copy."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(labels)
    return -nll


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where `mask` is set (over `dim`, or all); 0 where nothing is set."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries (TRL's `masked_whiten`: unbiased variance);
    shift_mean=False keeps the mean (PPO's rewards whitening)."""
    mean = masked_mean(values, mask)
    centred = values - mean
    var = masked_mean(centred ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1).clamp(min=1)  # Bessel's correction, as TRL
    out = centred * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def experience_batches(experience: dict, lengths: list[int], rows_per_batch: int, order=None) -> list[dict]:
    """Cut experience (tensors with one row per rollout, `ids` and `loss_mask` among them; per-token
    tensors [N, T] or [N, T-1], per-row ones [N]) into micro-batches of `rows_per_batch` rows taken in
    `order` (default: as they are), each trimmed to its longest row and given the host-int counts the
    trainer totals: n_rows, n_tokens (real inputs), n_targets (completion targets)."""
    n = len(lengths)
    order = list(range(n)) if order is None else [int(i) for i in order]
    T = experience["ids"].shape[1]
    batches = []
    for start in range(0, n, rows_per_batch):
        rows = order[start: start + rows_per_batch]
        index = torch.tensor(rows, device=experience["ids"].device)
        length = max(lengths[r] for r in rows)
        batch = {}
        for key, value in experience.items():
            value = value.index_select(0, index)
            if value.dim() >= 2 and value.shape[1] == T:
                value = value[:, :length]
            elif value.dim() >= 2 and value.shape[1] == T - 1:
                value = value[:, :length - 1]
            batch[key] = value
        batch["n_rows"] = len(rows)
        batch["n_tokens"] = sum(lengths[r] - 1 for r in rows)
        batch["n_targets"] = int(batch["loss_mask"][:, 1:].sum())
        batches.append(batch)
    return batches


@torch.no_grad()
def prompt_reward(model, dataset, tokenizer, reward_fn, n: int, params: SamplingParams, samples: int,
                  seed: int = 0) -> tuple[float, dict]:
    """Mean reward (and per-rule means) of `samples` completions to each of the first `n` training prompts,
    sampled with `params` from a fixed seed (temperature 0: greedy, one sample is enough)."""
    n = min(n, len(dataset))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total, parts_sum = 0.0, {}
    for start in range(0, n, 32):
        rows = list(range(start, min(n, start + 32)))
        rollouts = sample_rollouts(model, [dataset.prompts[i] for i in rows], samples, params, tokenizer.pad_id,
                                   generator)
        rewards, parts = reward_fn([dataset.rows[i] for i in rows for _ in range(samples)], rollouts)
        total += rewards.sum().item()
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value.sum().item()
    return total / (n * samples), {name: v / (n * samples) for name, v in parts_sum.items()}
