"""An OpenAI-compatible chat server: a FastAPI app over one engine thread that decodes every active
request together (continuous batching).

The engine thread owns the models. Per model it keeps one running batch: a KVCache whose rows are
the active sequences, left-padded so that every row's last token sits at the same column. Requests
that arrive together are prefilled together (left-padded, like generate_batch), sample their first
token, and join the running batch between two decode steps: the shorter of the two caches gets
empty columns on the left (attention_mask False there), then the rows are concatenated. Positions
count real tokens only (MiniLLM._cached_positions), so a row decodes exactly as it would alone.
A row that ends (stop token, max_tokens, a stop string, a client gone) leaves at the next step
boundary; the cache is rebuilt without it and without the columns no remaining row uses. Copies
of the cache happen only at these join/leave events (and when it runs out of columns), never per step.

Each request's tokens go to an asyncio queue on the server's event loop; the HTTP side turns them
into text (whole characters only), cuts stop strings, splits `<think>...</think>` out into
reasoning_content, drops MiniMind2's `<answer>` tags and, for a request with `tools`, cuts each
`<tool_call>` block out of the content into OpenAI's `tool_calls` (finish_reason "tool_calls"). The
client runs the tools and sends their results back as `tool` messages (MiniMind's serve_openai_api.py).
"""
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minillm.generate import SamplingParams, prefill, sample_next
from minillm.model import KVCache, eval_mode
from minillm.tokenizer import THINK_OFF_PREFILL
from minillm.tools import CALL_CLOSE, CALL_OPEN, parse_call

__all__ = ["APIError", "ChoiceText", "Engine", "ReasoningSplitter", "THINK_OFF_PREFILL", "ToolCallFilter",
           "create_app", "model_ids", "parse_request", "split_reasoning", "thinking_switch"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_N = 16


# ---- errors in OpenAI's shape -----------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the engine ---------------------------------------------------------------------------------
@dataclass
class Seq:
    """One choice of one request: what the engine decodes as one row."""
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    emit: Callable  # emit(("token", id) | ("end", finish_reason) | ("error", message)), thread-safe
    index: int = 0
    model: str = ""
    cancelled: bool = False  # set by the HTTP side (client gone, stop string): leaves at the next step
    finished: bool = False   # ended by the engine (stop token, max_tokens, error)
    produced: int = 0
    last: int = 0


def _relayout(cache: KVCache, rows, src_start: int, dst_start: int, max_len: int) -> KVCache:
    """A new cache holding `rows` of `cache`, its columns [src_start, length) moved to start at
    dst_start (columns before: padding, mask False; after: free, mask True as KVCache's are)."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=cache.attention_mask.device)
    n = cache.length - src_start
    new = KVCache.__new__(KVCache)  # filled below: no zero-filled allocation to throw away
    new.k, new.v = [], []
    for k, v in zip(cache.k, cache.v):
        shape = (len(rows), k.shape[1], max_len, k.shape[3])
        nk, nv = k.new_zeros(shape), v.new_zeros(shape)
        nk[:, :, dst_start:dst_start + n] = k[rows, :, src_start:cache.length]
        nv[:, :, dst_start:dst_start + n] = v[rows, :, src_start:cache.length]
        new.k.append(nk)
        new.v.append(nv)
    mask = torch.ones(len(rows), max_len, dtype=torch.bool, device=rows.device)
    mask[:, :dst_start] = False
    mask[:, dst_start:dst_start + n] = cache.attention_mask[rows, src_start:cache.length]
    new.attention_mask, new.max_len, new.length = mask, max_len, dst_start + n
    new.has_padding = not bool(mask[:, :new.length].all())
    return new


class _Batch:
    """The running batch of one model: its sequences and their cache rows."""

    def __init__(self):
        self.seqs: list[Seq] = []
        self.cache: KVCache | None = None


class Engine:
    """One thread, the models' only user. submit() from any thread; rows are decoded together."""

    HEADROOM = 64  # cache columns added at a time

    def __init__(self, models: dict, pad_id: int, stop_ids, max_batch: int = 32):
        self.models, self.pad_id, self.stop_ids = models, pad_id, set(stop_ids)
        self.max_batch = max_batch
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Seq] = []
        self.batches = {name: _Batch() for name in models}
        self.steps = 0    # decode steps run
        self.peak = 0     # most rows decoded in one step
        self.aborted = 0  # rows that left unfinished (client gone, stop string)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def shutdown(self):
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, seqs: list[Seq]):
        self.inbox.put(list(seqs))

    def active(self) -> int:
        """Rows being decoded plus rows waiting for room (requests not yet taken in are not counted)."""
        return sum(len(b.seqs) for b in self.batches.values()) + len(self.waiting)

    # -- the loop --
    def _run(self):
        while not self._stop.is_set():
            self._take(block=not any(b.seqs for b in self.batches.values()) and not self.waiting)
            for name, batch in self.batches.items():
                self._drop_done(batch)
                if batch.seqs:
                    try:
                        self._step(name, batch)
                    except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                        failed, batch.seqs, batch.cache = batch.seqs, [], None
                        for s in failed:
                            s.finished = True
                            s.emit(("error", f"engine failure: {type(e).__name__}: {e}"))

    def _take(self, block: bool):
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    self.waiting.extend(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        self.aborted += sum(s.cancelled for s in self.waiting)
        self.waiting = [s for s in self.waiting if not s.cancelled]
        for name, batch in self.batches.items():
            room = self.max_batch - len(batch.seqs)
            group = [s for s in self.waiting if s.model == name][:max(room, 0)]
            if not group:
                continue
            taken = set(map(id, group))
            self.waiting = [s for s in self.waiting if id(s) not in taken]
            try:
                self._admit(name, batch, group)
            except Exception:  # noqa: BLE001 - one at a time, so only the faulty request fails
                for s in group:
                    try:
                        self._admit(name, batch, [s])
                    except Exception as e:  # noqa: BLE001
                        s.finished = True
                        s.emit(("error", f"engine failure: {type(e).__name__}: {e}"))

    @torch.inference_mode()
    def _admit(self, name: str, batch: _Batch, group: list[Seq]):
        """Prefill `group` together (left-padded), sample each row's first token, merge the rows that
        go on into the running batch."""
        B = len(group)
        logits, cache = prefill(self.models[name], [s.prompt for s in group], self.pad_id)
        keep = self._sample(group, logits)
        if not keep:
            return
        if len(keep) < B:
            cache = _relayout(cache, keep, 0, 0, cache.max_len)
        seqs = [group[i] for i in keep]
        if batch.cache is None:
            batch.seqs, batch.cache = seqs, _relayout(cache, range(len(seqs)), 0, 0, cache.length + self.HEADROOM)
            return
        old = batch.cache
        length = max(old.length, cache.length)
        max_len = length + max(old.max_len - old.length, 1)
        old = _relayout(old, range(len(batch.seqs)), 0, length - old.length, max_len)
        new = _relayout(cache, range(len(seqs)), 0, length - cache.length, max_len)
        merged = old
        merged.k = [torch.cat((a, b)) for a, b in zip(old.k, new.k)]
        merged.v = [torch.cat((a, b)) for a, b in zip(old.v, new.v)]
        merged.attention_mask = torch.cat((old.attention_mask, new.attention_mask))
        merged.has_padding = not bool(merged.attention_mask[:, :length].all())
        batch.seqs, batch.cache = batch.seqs + seqs, merged

    @torch.inference_mode()
    def _step(self, name: str, batch: _Batch):
        model, cache = self.models[name], batch.cache
        if cache.length >= cache.max_len:
            batch.cache = cache = _relayout(cache, range(len(batch.seqs)), 0, 0, cache.length + self.HEADROOM)
        device = cache.attention_mask.device
        last = torch.tensor([[s.last] for s in batch.seqs], dtype=torch.long, device=device)
        with eval_mode(model):
            logits = model(last, cache=cache)[:, -1].float()
        self.steps += 1
        self.peak = max(self.peak, len(batch.seqs))
        keep = set(self._sample(batch.seqs, logits))
        for i, s in enumerate(batch.seqs):
            if i not in keep:
                s.cancelled = True  # finished: leaves below

    def _sample(self, seqs: list[Seq], logits) -> list[int]:
        """Each row's next token (greedy rows in one argmax, others with their own params and
        generator, as sample_next does for one row); emits it; -> the rows that go on."""
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        picks = {}
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                picks[i] = t
        for i, s in enumerate(seqs):
            if i not in picks:
                picks[i] = int(sample_next(logits[i:i + 1], s.params, s.generator)[0])
        keep = []
        for i, s in enumerate(seqs):
            if s.cancelled:
                continue
            tok = picks[i]
            s.finished = True  # until it is kept below
            s.produced += 1
            s.last = tok
            if tok in self.stop_ids:
                s.emit(("end", "stop"))
                continue
            s.emit(("token", tok))
            if s.produced >= s.params.max_new_tokens:
                s.emit(("end", "length"))
                continue
            s.finished = False
            keep.append(i)
        return keep

    def _drop_done(self, batch: _Batch):
        """Remove finished or cancelled rows, and the leading columns no remaining row uses."""
        keep = [i for i, s in enumerate(batch.seqs) if not s.cancelled]
        if len(keep) == len(batch.seqs):
            return
        self.aborted += sum(s.cancelled and not s.finished for s in batch.seqs)
        batch.seqs = [batch.seqs[i] for i in keep]
        if not keep:
            batch.cache = None
            return
        cache = batch.cache
        used = cache.attention_mask[keep, :cache.length].any(0)
        start = int(used.long().argmax())  # first column a remaining row uses
        free = cache.max_len - cache.length
        batch.cache = _relayout(cache, keep, start, 0, cache.length - start + max(free, 1))


# ---- text: stop strings and the think split ----------------------------------------------------
def _held_prefix(text: str, words) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of `words`."""
    best = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:n]):
                best = n
                break
    return best


class ReasoningSplitter:
    """Streams text into (reasoning, content) pieces: a leading `<think>...</think>` block is the
    reasoning (its surrounding blank lines dropped), the rest is content, MiniMind2's <answer> tags
    removed. Tags split across pieces are held back until they are whole."""
    OPEN, CLOSE = "<think>", "</think>"
    CONTENT_TAGS = ("<answer>", "</answer>", "<think>", "</think>")

    def __init__(self, opened: bool = False):
        # opened: the prompt already opened the think block (open_thinking on), so the reply starts inside it
        self.mode, self.buf = ("lead_reasoning" if opened else "start"), ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.mode == "start":
                s = self.buf.lstrip()
                if s.startswith(self.OPEN):
                    self.mode, self.buf = "lead_reasoning", s[len(self.OPEN):]
                    continue
                # wait while a think tag may still come (a few blank characters, or part of the tag)
                if not final and ((not s and len(self.buf) < 8) or (s and self.OPEN.startswith(s))):
                    return reasoning, content
                self.mode = "content"
                continue
            if self.mode.startswith("lead_"):  # blank lines after <think> or </think>
                self.buf = self.buf.lstrip()
                if not self.buf and not final:
                    return reasoning, content
                self.mode = self.mode[len("lead_"):]
                continue
            tags = (self.CLOSE,) if self.mode == "reasoning" else self.CONTENT_TAGS
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if hits:
                pos, tag = min(hits)
                if self.mode == "reasoning":
                    reasoning += self.buf[:pos].rstrip()
                    self.mode = "lead_content"
                else:
                    content += self.buf[:pos]
                self.buf = self.buf[pos + len(tag):]
                continue
            hold = 0 if final else _held_prefix(self.buf, tags)
            out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
            if self.mode == "reasoning":
                kept = out if final else out.rstrip()  # trailing blanks wait: they may end the block
                self.buf = out[len(kept):] + self.buf
                reasoning += kept.rstrip() if final else kept
            else:
                content += out
            return reasoning, content


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole reply, as the server splits it."""
    return ReasoningSplitter().feed(text, final=True)


class ToolCallFilter:
    """Streams content with its `<tool_call>` blocks cut out: the text between them passes on, each
    well-formed block becomes a ToolCall in `calls` once closed, the blank space around it going with it;
    a malformed or unclosed one passes on as the text the model wrote. A tag split across pieces
    (and trailing blanks, which may precede a block) is held back until it is whole, so the pieces
    join to what the whole text gives at once."""

    def __init__(self):
        self.buf, self.inside, self.after_call, self.calls = "", False, False, []
        self.blanks = ""  # the blank space before the open block: dropped with a call, kept with text

    def feed(self, text: str, final: bool = False) -> str:
        self.buf += text
        out = ""
        while True:
            if self.inside:
                pos = self.buf.find(CALL_CLOSE)
                if pos < 0:
                    if not final:
                        return out
                    out, self.buf, self.inside = out + self.blanks + CALL_OPEN + self.buf, "", False  # never closed
                    continue
                raw, self.buf, self.inside = self.buf[:pos], self.buf[pos + len(CALL_CLOSE):], False
                call = parse_call(raw.strip())
                if call.error:
                    out += self.blanks + CALL_OPEN + raw + CALL_CLOSE
                else:
                    self.calls.append(call)
                    self.after_call = True
                continue
            if self.after_call:  # blank space after a call goes with it
                self.buf = self.buf.lstrip()
                if not self.buf and not final:
                    return out
                self.after_call = False
            pos = self.buf.find(CALL_OPEN)
            if pos >= 0:
                text = self.buf[:pos].rstrip()
                out, self.blanks = out + text, self.buf[len(text):pos]
                self.buf, self.inside = self.buf[pos + len(CALL_OPEN):], True
                continue
            if final:
                out, self.buf = out + self.buf, ""
                return out
            # hold a tag's start and the blanks before it: both go if a block follows
            keep = self.buf[:len(self.buf) - _held_prefix(self.buf, (CALL_OPEN,))].rstrip()
            out, self.buf = out + keep, self.buf[len(keep):]
            return out


class ChoiceText:
    """Token ids of one choice -> (reasoning, content) deltas, with the request's stop strings; with
    tools, the content's tool calls are collected in `calls`."""

    def __init__(self, tokenizer, stop: list[str], tools: bool = False, think_opened: bool = False):
        self.tok, self.stop = tokenizer, stop
        self.ids, self.sent = [], 0  # characters of the raw text passed on
        self.splitter = ReasoningSplitter(opened=think_opened)
        self.tool_filter = ToolCallFilter() if tools else None
        self.stopped = False

    @property
    def calls(self) -> list:
        return self.tool_filter.calls if self.tool_filter else []

    def add(self, tok: int) -> tuple[str, str]:
        self.ids.append(tok)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return "", ""
        if self.stop:
            hits = [text.find(s, max(self.sent - len(s), 0)) for s in self.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.stopped = True
                return self._pass(text[:min(hits)], final=True)
            return self._pass(text[:len(text) - _held_prefix(text, self.stop)])
        return self._pass(text)

    def finish(self) -> tuple[str, str]:
        if self.stopped:
            return "", ""
        return self._pass(self.tok.decode(self.ids), final=True)

    def _pass(self, upto: str, final: bool = False):
        piece = upto[self.sent:] if len(upto) > self.sent else ""
        self.sent = max(self.sent, len(upto))
        reasoning, content = self.splitter.feed(piece, final=final)
        if self.tool_filter is not None:
            content = self.tool_filter.feed(content, final=final)
        return reasoning, content


# ---- requests -----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    model: str
    prompt: list[int]
    params: list[SamplingParams]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: list[str] = field(default_factory=list)
    tools: bool = False         # parse the replies' <tool_call> blocks into tool_calls
    think_opened: bool = False  # the prompt ends inside an opened think block (open_thinking on)


def _number(body, name, kind, default, lo=None, hi=None, lo_open=False):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        lo_s = f"{'>' if lo_open else '>='} {lo}" if lo is not None else ""
        raise APIError(400, f"'{name}' must be {lo_s}{' and ' if lo_s and hi is not None else ''}"
                            f"{f'<= {hi}' if hi is not None else ''}, got {value}", name)
    return kind(value)


def thinking_switch(body, default: bool | None) -> bool | None:
    """open_thinking (MiniMind), chat_template_kwargs.enable_thinking / open_thinking (vLLM-style):
    True, False, or None (not asked: the server's default)."""
    if body.get("open_thinking") is not None:
        return bool(body["open_thinking"])
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    for key in ("enable_thinking", "open_thinking"):
        if kwargs.get(key) is not None:
            return bool(kwargs[key])
    return default


def parse_request(body, tokenizer, config, model_ids: dict, default_max_tokens: int,
                  default_thinking: bool | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model") or next(iter(model_ids))
    if model not in model_ids:
        raise APIError(404, f"The model '{model}' does not exist; this server has: {', '.join(model_ids)}",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported: use system, user, assistant or "
                                f"tool", f"messages[{i}].role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        msg = {"role": role, "content": content}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        clean.append(msg)
    tools = _tools(body)
    if (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in clean)) and \
            not getattr(tokenizer, "has_tool_tokens", False):
        raise APIError(400, "this model's tokenizer has no <tool_call>/<tool_response> tokens: tools, tool calls "
                            "and tool messages are not supported", "tools")
    temperature = _number(body, "temperature", float, 0.85, 0, 2)
    top_p = _number(body, "top_p", float, 0.85, 0, 1, lo_open=True)
    n = _number(body, "n", int, 1, 1, MAX_N)
    limit = config.max_position_embeddings
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(name)
    max_tokens = _number(body, name, int, min(default_max_tokens, limit - 1), 1, limit - 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    truncate = body.get("truncate")
    if truncate not in (None, "left", "none"):
        raise APIError(400, f"'truncate' must be 'left' or 'none', got {truncate!r}", "truncate")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")

    thinking = thinking_switch(body, default_thinking)
    prompt = tokenizer.render_prompt(clean, tools=tools or None, open_thinking=thinking)
    room = limit - max_tokens
    if len(prompt) > room:
        if asked is None and len(prompt) < limit:  # no max_tokens asked: reply in the room left
            max_tokens = limit - len(prompt)
        elif truncate == "left" and room >= 1:
            prompt = prompt[-room:]
        else:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in "
                                f"the completion). Please reduce the length of the messages or completion, or "
                                f"send \"truncate\": \"left\" to drop the prompt's oldest tokens.",
                           "messages", "context_length_exceeded")
    params = [SamplingParams(max_tokens, temperature, 0, top_p, 1.0, tokenizer.stop_ids) for _ in range(n)]
    return ChatRequest(model, prompt, params, seed, n, bool(body.get("stream", False)),
                       bool(stream_options.get("include_usage", False)), stop, tools=bool(tools),
                       think_opened=thinking is True)


def _tools(body) -> list:
    """The request's `tools` ([] when none, or with tool_choice "none"), checked: OpenAI's
    {"type": "function", "function": {"name", "description", "parameters"}} objects."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise APIError(400, f"tool_choice {choice!r} is not supported: use \"auto\" (the model decides) or \"none\"",
                       "tool_choice")
    if tools is None or choice == "none":
        return []
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be an array of {type: function, function: {name, parameters}}", "tools")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                f"\"parameters\": {{...}}}}}}", f"tools[{j}]")
    return tools


def _tool_calls(calls, where: str) -> list:
    """An assistant message's tool_calls as OpenAI sends them back (arguments as JSON text, rendered as
    written, which is how the server returned them)."""
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be an array", where)
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise APIError(400, f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                                f"{{\"name\", \"arguments\"}}}}", f"{where}[{j}]")
    return calls


# ---- the app ------------------------------------------------------------------------------------
def create_app(models: dict, tokenizer, max_batch: int = 32, default_max_tokens: int = 512,
               default_thinking: bool | None = None, seed: int | None = None):
    """models: {model id: MiniLLM} (the first is the default). The engine starts with the app.
    `seed`: requests without their own `seed` draw one from a generator seeded with it, so a server
    started with --seed answers the same sequence of requests the same way (None: fresh randomness)."""
    import random
    seed_source = random.Random(seed) if seed is not None else None
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from contextlib import asynccontextmanager

    config = next(iter(models.values())).config
    engine = Engine(models, tokenizer.pad_id, tokenizer.stop_ids, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="minillm", lifespan=lifespan)
    app.state.engine = engine

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return error(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "active": engine.active()}

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "minillm"}
                                           for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in models:
            return error(APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found"))
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "minillm"}

    async def chat_page():
        page = STATIC_DIR / "chat.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return PlainTextResponse("no chat page yet (minillm/static/chat.html); the API is at /v1", status_code=404)

    app.get("/")(chat_page)
    app.get("/chat")(chat_page)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(APIError(400, f"the request body is not valid JSON: {e}"))
        try:
            req = parse_request(body, tokenizer, config, models, default_max_tokens, default_thinking)
        except APIError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i, params in enumerate(req.params):
            gen = None
            if params.temperature > 0:
                if req.seed is not None:
                    row_seed = req.seed + i
                else:
                    row_seed = (seed_source.getrandbits(48) if seed_source is not None
                                else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
                gen = torch.Generator().manual_seed(row_seed)

            def emit(item, i=i):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, item))
                except RuntimeError:  # the event loop is gone (shutdown): nobody to tell, the row leaves
                    seqs[i].cancelled = True
            seqs.append(Seq(list(req.prompt), params, gen, emit, i, req.model))
        engine.submit(seqs)
        texts = [ChoiceText(tokenizer, req.stop, req.tools, req.think_opened) for _ in seqs]

        def finish_reason(i, f):
            return "tool_calls" if f == "stop" and texts[i].calls else f

        def tool_calls(i, start=0):
            """OpenAI's tool_calls of choice i from its start-th call on (with their index, for a stream)."""
            out = []
            for k, call in enumerate(texts[i].calls[start:], start):
                call.id = call.id or f"call_{uuid.uuid4().hex[:24]}"
                out.append({"index": k, **call.openai()})
            return out
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}

        async def events_until_done():
            """(choice, reasoning delta, content delta, finish_reason or None, error or None) ..., also when
            a token only closed a tool call (texts[i].calls grew)"""
            left, n_calls = set(range(req.n)), [0] * req.n
            while left:
                i, (kind, value) = await events.get()
                if i not in left:
                    continue
                if kind == "token":
                    r, c = texts[i].add(value)
                    if texts[i].stopped:
                        seqs[i].cancelled = True
                        left.discard(i)
                        yield i, r, c, "stop", None
                    elif r or c or len(texts[i].calls) > n_calls[i]:
                        n_calls[i] = len(texts[i].calls)
                        yield i, r, c, None, None
                elif kind == "end":
                    r, c = texts[i].finish()
                    left.discard(i)
                    yield i, r, c, value, None
                else:
                    left.discard(i)
                    yield i, "", "", None, value

        def usage():
            done = sum(s.produced for s in seqs)
            return {"prompt_tokens": len(req.prompt), "completion_tokens": done,
                    "total_tokens": len(req.prompt) + done}

        if not req.stream:
            reasoning, content, finish = [""] * req.n, [""] * req.n, [None] * req.n
            try:
                async for i, r, c, f, err in events_until_done():
                    if err:
                        return error(APIError(500, err, type="server_error", code="engine_error"))
                    reasoning[i] += r
                    content[i] += c
                    finish[i] = f or finish[i]
            finally:
                for s in seqs:
                    s.cancelled = True
            choices = []
            for i in range(req.n):
                message = {"role": "assistant", "content": content[i]}
                if reasoning[i]:
                    message["reasoning_content"] = reasoning[i]
                if texts[i].calls:  # OpenAI's shape: content null when the reply is calls only
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls(i)]
                    message["content"] = content[i] or None
                choices.append({"index": i, "message": message, "logprobs": None,
                                "finish_reason": finish_reason(i, finish[i])})
            return {**base, "object": "chat.completion", "choices": choices, "usage": usage()}

        def chunk(choices, **extra):
            doc = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            if req.include_usage and "usage" not in extra:
                doc["usage"] = None
            return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                for i in range(req.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                calls_sent = [0] * req.n
                async for i, r, c, f, err in events_until_done():
                    if err:
                        e = APIError(500, err, type="server_error", code="engine_error")
                        yield f"data: {json.dumps(e.body())}\n\n"
                        return
                    delta = {}
                    if r:
                        delta["reasoning_content"] = r
                    if c:
                        delta["content"] = c
                    if len(texts[i].calls) > calls_sent[i]:  # each call as soon as its block is closed
                        delta["tool_calls"] = tool_calls(i, calls_sent[i])
                        calls_sent[i] = len(texts[i].calls)
                    if delta:
                        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    if f:
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason(i, f)}])
                if req.include_usage:
                    yield chunk([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away mid-stream: its rows leave the batch
                for s in seqs:
                    s.cancelled = True

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def model_ids(folder, loras) -> list[str]:
    base = f"minillm:{Path(folder).name}"
    return [base] + [f"{base}+{name}" for name in loras]
