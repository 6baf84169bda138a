"""SentencePiece BPE tokenizer with minillm's special tokens and the ChatML chat template.

The tokenizer owns the chat template and the loss mask: every SFT-like stage calls
`render_chat(messages, tools=...) -> (ids, loss_mask)`, and generation calls `render_prompt`.
The model file is made by train_tokenizer.py; a trained one ships in minillm/assets/.

Tool use is rendered as MiniMind-3's (and Qwen3's) template does: the tools' JSON schemas in the
system turn, an assistant's calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
after its text, and consecutive `tool` messages as one user turn of `<tool_response>` blocks.
"""
import hashlib
import json
from pathlib import Path

import sentencepiece as spm

from minillm.errors import NotFound, UserError

ASSETS_DIR = Path(__file__).parent / "assets"
MODEL_FILENAME = "tokenizer.model"

# name -> piece. Each is one user-defined symbol in the model (see train_tokenizer.py).
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
    "tool_call_start": "<tool_call>",
    "tool_call_end": "</tool_call>",
    "tool_response_start": "<tool_response>",
    "tool_response_end": "</tool_response>",
    **{f"reserved_{i}": f"<|reserved_{i}|>" for i in range(4, 8)},
}
# A tokenizer trained before tool use has <|reserved_0..3|> where the tool tags now are: the tool tags
# take those slots (same ids, never seen in any training text), so every existing checkpoint keeps its
# ids and embeddings and gains single-id tool tags; nothing is retrained.
TOOL_TAG_SLOTS = {"<|reserved_0|>": "<tool_call>", "<|reserved_1|>": "</tool_call>",
                  "<|reserved_2|>": "<tool_response>", "<|reserved_3|>": "</tool_response>"}
TOOL_TOKENS = ("tool_call_start", "tool_call_end", "tool_response_start", "tool_response_end")
ROLES = ("system", "user", "assistant", "tool")

# the system turn's tool section, word for word MiniMind-3's (model/tokenizer_config.json) and Qwen3's
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")


def to_json(value) -> str:
    """JSON as transformers' chat templates write it (`tojson`): non-ASCII kept, keys in their order,
    ", " and ": " separators."""
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools) -> str:
    """The tool section of the system turn: one JSON schema per line inside <tools></tools>."""
    return TOOLS_HEADER + "".join("\n" + to_json(t) for t in tools) + TOOLS_FOOTER


def tool_call_parts(call) -> tuple[str, str]:
    """(name, arguments as JSON text) of one call: OpenAI's {"id", "type", "function": {"name", "arguments"}}
    or MiniMind's {"name", "arguments"}; arguments given as a string are used as written, as the templates do."""
    fn = call.get("function") or call
    arguments = fn.get("arguments", {})
    return fn["name"], arguments if isinstance(arguments, str) else to_json(arguments)


def render_tool_calls(calls, after_text: bool) -> str:
    """An assistant's calls as they follow its text: one <tool_call> block each, newline-separated
    (and from the text, when there is text)."""
    out = []
    for i, call in enumerate(calls):
        name, arguments = tool_call_parts(call)
        sep = "\n" if i or after_text else ""
        out.append(f'{sep}<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>')
    return "".join(out)


def render_reasoning(reasoning, answer):
    """An assistant turn with `reasoning_content`, as MiniMind-3's chat template renders it
    (model/tokenizer_config.json): the think block, a blank line, the reply, no <answer> tags.
    MiniMind2-style content that writes `<think>...</think><answer>...</answer>` inline is kept as written."""
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# thinking switched off (eval_model's /think off, the server's open_thinking false): an empty think block
# after the assistant header, so a reasoning model answers directly, as MiniMind-3's template writes it
THINK_OFF_PREFILL = render_reasoning("", "")  # "<think>\n\n</think>\n\n"
# thinking switched on (MiniMind's open_thinking=1): the think block opened for the model to fill
THINK_ON_PREFILL = "<think>\n"


def thinking_prefill(open_thinking) -> str:
    """Text after the assistant header: None -> "" (the model decides whether to think), True -> an
    opened think block, False -> an empty one (MiniMind-3's template with open_thinking true / false)."""
    if open_thinking is None:
        return ""
    return THINK_ON_PREFILL if open_thinking else THINK_OFF_PREFILL


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self.sp.piece_to_id("<tool_call>") == self.sp.unk_id() and all(
                self.sp.id_to_piece(self.sp.piece_to_id(p)) == p for p in TOOL_TAG_SLOTS):
            self._proto = rename_pieces(self._proto, TOOL_TAG_SLOTS)
            self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {}
        for name, piece in SPECIAL_TOKENS.items():
            token_id = self.sp.piece_to_id(piece)
            if self.sp.id_to_piece(token_id) != piece:
                raise UserError(f"tokenizer model has no {piece!r} token; it was not made by train_tokenizer.py "
                                f"(retrain with `python train_tokenizer.py`)")
            self.special_ids[name] = token_id
        self._set_specials(self.special_ids)

    def _set_specials(self, special_ids: dict):
        """The special-id attributes from {name: id} (SPECIAL_TOKENS' names). Another backend (an HF
        tokenizer.json, minillm.hf.HFTokenizer) calls this after its own setup; names it lacks
        are None there (the think tags: left out of think_tag_ids)."""
        self.special_ids = dict(special_ids)
        self.pad_id = special_ids["pad"]
        self.eos_id = special_ids["endoftext"]  # separates pretraining documents
        self.im_start_id = special_ids.get("im_start")
        self.im_end_id = special_ids.get("im_end")
        self.think_tag_ids = [special_ids[k] for k in ("think_start", "think_end", "answer_start", "answer_end")
                              if special_ids.get(k) is not None]
        self.has_tool_tokens = all(special_ids.get(k) is not None for k in TOOL_TOKENS)
        # either one ends an assistant reply
        self.stop_ids = [i for i in dict.fromkeys((self.im_end_id, self.eos_id)) if i is not None]
        self._special_id_set = frozenset(i for i in special_ids.values() if i is not None)
        self._newline = self.encode("\n")

    # ---- loading / saving ---------------------------------------------------------------------
    @classmethod
    def load(cls, path=None):
        """Load a .model file, or a folder holding tokenizer.model; None -> the shipped tokenizer.
        A tokenizer.json (or a folder holding one: a transformers folder, preferred there over a
        tokenizer.model beside it) loads as minillm.hf.HFTokenizer, which needs `tokenizers`."""
        path = Path(path) if path is not None else ASSETS_DIR / MODEL_FILENAME
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if path.suffix == ".json":
            from minillm.hf import HFTokenizer
            return HFTokenizer.load(path)
        if path.is_dir():
            path = path / MODEL_FILENAME
        if not path.is_file():
            raise NotFound(f"tokenizer model not found: {path}. Pass a .model file or a folder containing "
                           f"{MODEL_FILENAME}, or create one with `python train_tokenizer.py --out {path}`")
        proto, tokenizer = path.read_bytes(), None
        try:
            tokenizer = cls(proto) if proto else None
        except (RuntimeError, IndexError):  # sentencepiece could not parse the bytes
            pass
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if tokenizer is None:
            raise UserError(f"{path} cannot be read as a SentencePiece model: the file is empty, truncated or "
                            f"corrupt; copy it again or make one with `python train_tokenizer.py`")
        return tokenizer

    def save(self, folder):
        """Write folder/tokenizer.model (the serialized SentencePiece model); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILENAME
        path.write_bytes(self._proto)
        return path

    @property
    def fingerprint(self):
        """Short stable id of the model bytes; the data loader keys its token cache on it."""
        return hashlib.sha1(self._proto).hexdigest()[:12]

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text):
        """Ids of text; no BOS/EOS added. Special tokens written in the text map to their single id."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts, num_threads=-1):
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_id_set]
        return self.sp.decode(ids)

    def id_to_piece(self, token_id):
        return self.sp.id_to_piece(int(token_id))

    def __len__(self):
        return self.vocab_size

    # ---- chat template ------------------------------------------------------------------------
    def render_chat(self, messages, add_generation_prompt=False, tools=None, open_thinking=None):
        """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message -> (ids, loss_mask).

        loss_mask is 1 exactly on each assistant turn's content (its think block and tool calls
        included) and its <|im_end|>; 0 on the role header, system/user/tool turns, the tool schemas
        and the trailing newline. Header, content and end token are encoded separately, so the mask
        never depends on BPE merges across their boundaries.

        tools: OpenAI-style JSON schemas, written into the system turn (after a leading system
        message's text, or as a system turn of their own). An assistant message may carry
        `tool_calls` (its content may then be ""); a `tool` message's content is the tool's result.
        add_generation_prompt ends with the assistant header and `thinking_prefill(open_thinking)`.
        """
        _validate_messages(messages)
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and not self.has_tool_tokens:
            raise UserError("this tokenizer has no <tool_call>/<tool_response> tokens, so it cannot render tools or "
                            "tool calls; use a tokenizer made by train_tokenizer.py (or one of MiniMind-3's)")
        ids, loss_mask = [], []

        def add(tokens, trained):
            ids.extend(tokens)
            loss_mask.extend([int(trained)] * len(tokens))

        def turn(role, content, trained=False):
            add([self.im_start_id] + self.encode(role + "\n"), False)
            add(self.encode(content) + [self.im_end_id], trained)
            add(self._newline, False)

        if tools:
            system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
            turn("system", system + render_tools(tools))
            if messages[0]["role"] == "system":
                messages = messages[1:]
        for i, message in enumerate(messages):
            role, content = message["role"], message.get("content") or ""
            if role == "tool":  # consecutive results share one user turn
                first = i == 0 or messages[i - 1]["role"] != "tool"
                last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                add(([self.im_start_id] + self.encode("user") if first else [])
                    + self.encode(f"\n<tool_response>\n{content}\n</tool_response>")
                    + ([self.im_end_id] + self._newline if last else []), False)
                continue
            if role == "assistant":
                # the calls follow the reply on a new line; with no reply (text after any think block) they
                # follow at once, as MiniMind-3's template writes them
                reply = content.split("</think>")[-1].lstrip("\n")
                if message.get("reasoning_content"):
                    content = render_reasoning(message["reasoning_content"], content)
                if message.get("tool_calls"):
                    content += render_tool_calls(message["tool_calls"], after_text=bool(reply))
            turn(role, content, trained=role == "assistant")
        if add_generation_prompt:
            add([self.im_start_id] + self.encode("assistant\n"), False)
            add(self.encode(thinking_prefill(open_thinking)), False)
        return ids, loss_mask

    def render_prompt(self, prompt_or_messages, tools=None, open_thinking=None):
        """Ids that prompt the model for an assistant reply; a str becomes one user message.
        open_thinking: None lets the model decide, True opens a think block, False prefills an empty one."""
        messages = prompt_or_messages
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        # tools only when given, and the think prefill appended here: a subclass that overrides render_chat
        # with the older (messages, add_generation_prompt) signature keeps working without tools
        ids = (self.render_chat(messages, add_generation_prompt=True, tools=tools) if tools
               else self.render_chat(messages, add_generation_prompt=True))[0]
        return ids + self.encode(thinking_prefill(open_thinking)) if open_thinking is not None else ids


def rename_pieces(proto: bytes, renames: dict) -> bytes:
    """A serialized SentencePiece ModelProto with pieces renamed ({old: new}), everything else kept
    byte for byte. ModelProto field 1 is the repeated SentencePiece message, whose field 1 is the
    piece text; this walks the protobuf wire format directly so no protobuf package is needed."""
    out = bytearray()
    for number, wire, raw, payload in _fields(proto):
        if number == 1 and wire == 2:
            piece = bytearray()
            for n, w, sub_raw, sub_payload in _fields(payload):
                text = sub_payload.decode("utf-8") if n == 1 and w == 2 else None
                if text in renames:
                    new = renames[text].encode("utf-8")
                    sub_raw = _varint_bytes(1 << 3 | 2) + _varint_bytes(len(new)) + new
                piece += sub_raw
            raw = _varint_bytes(1 << 3 | 2) + _varint_bytes(len(piece)) + bytes(piece)
        out += raw
    return bytes(out)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, the field's raw bytes, its payload if length-delimited) of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        wire, payload = key & 7, None
        if wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            payload, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, buf[start:pos], payload


def _validate_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES}, got {m.get('role')!r}")
        calls = m.get("tool_calls")
        if calls and m["role"] != "assistant":
            raise ValueError(f"messages[{i}] has 'tool_calls'; only assistant messages make tool calls")
        # an assistant message that only calls tools may have content None, as OpenAI's clients send it
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m.get('content')).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages[{i}]['reasoning_content'] must be a str, got {type(reasoning).__name__}")
        if calls:
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"messages[{i}]['tool_calls'] must be a list of calls, got {type(calls).__name__}")
            for j, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ValueError(f"messages[{i}]['tool_calls'][{j}] must be a dict with a 'name' (or a "
                                     f"'function' with one) and 'arguments'")
                if not isinstance(fn.get("arguments", {}), (dict, str)):
                    raise ValueError(f"messages[{i}]['tool_calls'][{j}]['arguments'] must be an object or a JSON "
                                     f"string, got {type(fn['arguments']).__name__}")
