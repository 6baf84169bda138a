"""Sampling engine. It works in token ids only and knows nothing of tokenization; the thin
`generate` wrapper at the bottom lets the tokenizer render the prompt and decode the stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from minillm.errors import UserError
from minillm.model import KVCache, MiniLLM, eval_mode


class PromptTooLongError(UserError):
    """The prompt plus max_new_tokens does not fit the model's positions (RoPE table, KV cache)."""

    def __init__(self, prompt_len: int, max_new_tokens: int, limit: int):
        self.prompt_len, self.max_new_tokens, self.limit = prompt_len, max_new_tokens, limit
        room = limit - max_new_tokens
        fix = (f"shorten the prompt to at most {room} tokens or lower max_new_tokens" if room > 0
               else f"lower max_new_tokens below {limit}")
        super().__init__(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={limit}: {fix}")


def prompt_room(config, max_new_tokens: int) -> int:
    """The longest prompt the engine accepts with this max_new_tokens (<= 0: none fits)."""
    return config.max_position_embeddings - max_new_tokens


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.85   # 0 = greedy
    top_k: int = 0              # 0 = off
    top_p: float = 0.85         # 1.0 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the row (CTRL-style)
    stop_ids: Sequence[int] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits, seen, penalty: float):
    """Divide positive / multiply negative logits of tokens in `seen` [B, V] (bool) by `penalty`."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, params: SamplingParams, generator=None):
    """logits [B, V] (fp32) -> next ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_ids(model: MiniLLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 pad_id: int = 0, generator=None) -> Iterator[list[int | None]]:
    """Yield, after every decoding step, one new id per row (None once a row has stopped).

    Prompts of different lengths are left-padded into one batch; positions and attention
    ignore the padding, so each row decodes exactly as it would alone. A row stops at any
    of `params.stop_ids` (the stop id itself is yielded) or after max_new_tokens.

    Checked when called, before any step: an empty prompt raises ValueError, and a prompt that
    with max_new_tokens would run past max_position_embeddings raises PromptTooLongError
    (callers that want to keep going, like a chat, truncate to `prompt_room` first).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest > prompt_room(model.config, params.max_new_tokens):
        raise PromptTooLongError(longest, params.max_new_tokens, model.config.max_position_embeddings)
    return _decode(model, prompts, params, pad_id, generator)


@torch.inference_mode()
def prefill(model, prompts, pad_id: int, room: int = 0):
    """Left-pad `prompts` into one batch and run it into a fresh KV cache that has `room` free positions
    after the longest prompt; -> (last-position logits [B, V] in fp32, the cache). Padding is masked out
    and positions count real tokens only, so every row gets what it would get alone."""
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    cache = KVCache(model.config, B, longest + room, device, model.lm_head.weight.dtype)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        cache.attention_mask[row, :longest - len(p)] = False
    cache.has_padding = any(len(p) != longest for p in prompts)
    with eval_mode(model):
        return model(ids, cache=cache)[:, -1].float(), cache


@torch.inference_mode()
def _decode(model, prompts, params, pad_id, generator):
    device = next(model.parameters()).device
    B = len(prompts)
    logits, cache = prefill(model, prompts, pad_id, room=params.max_new_tokens)

    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, list(p)] = True
    stop = torch.tensor(sorted(set(params.stop_ids)) or [-1], device=device)
    done = [False] * B
    with eval_mode(model):
        for _ in range(params.max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            nxt = sample_next(logits, params, generator)
            seen[torch.arange(B, device=device), nxt] = True
            hit_stop = torch.isin(nxt, stop).tolist()
            out = nxt.tolist()
            step = []
            for row in range(B):
                step.append(None if done[row] else out[row])
                done[row] = done[row] or hit_stop[row]
            yield step
            if all(done):
                break
            logits = model(nxt.unsqueeze(1), cache=cache)[:, -1].float()


def generate_batch(model, prompts, params: SamplingParams, pad_id: int = 0, generator=None) -> list[list[int]]:
    """All new ids per row (stop id included when one was hit)."""
    rows = [[] for _ in prompts]
    for step in generate_ids(model, prompts, params, pad_id, generator):
        for row, tok in enumerate(step):
            if tok is not None:
                rows[row].append(tok)
    return rows


def generate(model, tokenizer, messages_or_prompt, max_new_tokens: int = 256, temperature: float = 0.85,
             top_p: float = 0.85, top_k: int = 0, repetition_penalty: float = 1.0, chat: bool = True,
             stream: bool = False, generator=None, tools=None, open_thinking: bool | None = None):
    """Text in, text out. `messages_or_prompt`: a list of chat messages, or a string (a user
    message when chat=True, raw text to continue when chat=False, as a pretrained model wants),
    or a list of token ids, used as they are (already rendered; `chat`, `tools` and `open_thinking`
    are then ignored).

    Chat only: `tools` (OpenAI-style JSON schemas) are shown to the model in the system turn, and its
    reply may then hold `<tool_call>` blocks (minillm.tools parses and runs them); `open_thinking`
    None lets the model decide whether to think, True opens a think block after the assistant
    header, False prefills an empty one (MiniMind's switch). The prefilled text is not part of the reply.

    stream=True returns an iterator of text pieces; otherwise the whole reply as a string.
    The stop token is not part of the returned text. A prompt too long for the model raises
    PromptTooLongError here, before anything is generated, also when streaming.
    """
    if _is_ids(messages_or_prompt):
        prompt = [int(t) for t in messages_or_prompt]
    elif chat:
        prompt = (tokenizer.render_prompt(messages_or_prompt, tools=tools, open_thinking=open_thinking)
                  if tools or open_thinking is not None else tokenizer.render_prompt(messages_or_prompt))
    else:
        if not isinstance(messages_or_prompt, str):
            raise ValueError("chat=False continues raw text: pass a string")
        if tools or open_thinking is not None:
            raise ValueError("tools and open_thinking are for chat; chat=False continues raw text")
        prompt = tokenizer.encode(messages_or_prompt)
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, tokenizer.stop_ids)
    steps = generate_ids(model, [prompt], params, tokenizer.pad_id, generator)  # checks the prompt now
    pieces = _stream_text(tokenizer, steps, params)
    return pieces if stream else "".join(pieces)


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) for t in x)


def _stream_text(tokenizer, steps, params):
    new_ids, emitted = [], ""
    stop = set(params.stop_ids)
    for (tok,) in steps:
        if tok is None or tok in stop:
            break
        new_ids.append(tok)
        text = tokenizer.decode(new_ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(emitted):]
        emitted = text
    text = tokenizer.decode(new_ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]
