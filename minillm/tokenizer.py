"""SentencePiece BPE tokenizer with minillm's special tokens and the ChatML chat template.

The tokenizer owns the chat template and the loss mask: every SFT-like stage calls
`render_chat(messages) -> (ids, loss_mask)`, and generation calls `render_prompt`.
The model file is made by train_tokenizer.py; a trained one ships in minillm/assets/.
"""
import hashlib
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
    **{f"reserved_{i}": f"<|reserved_{i}|>" for i in range(8)},
}
ROLES = ("system", "user", "assistant")


def render_reasoning(reasoning, answer):
    """An assistant turn with `reasoning_content`, as MiniMind-3's chat template renders it
    (model/tokenizer_config.json): the think block, a blank line, the reply, no <answer> tags.
    MiniMind2-style content that writes `<think>...</think><answer>...</answer>` inline is kept as written."""
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# thinking switched off (eval_model's /think off, the server's open_thinking false): an empty think block
# after the assistant header, so a reasoning model answers directly, as MiniMind-3's template writes it
THINK_OFF_PREFILL = render_reasoning("", "")  # "<think>\n\n</think>\n\n"


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
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
    def render_chat(self, messages, add_generation_prompt=False):
        """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message -> (ids, loss_mask).

        loss_mask is 1 exactly on each assistant turn's content tokens and its <|im_end|>; 0 on the
        role header, system/user turns and the trailing newline. Header, content and end token are
        encoded separately, so the mask never depends on BPE merges across their boundaries.
        """
        _validate_messages(messages)
        ids, loss_mask = [], []

        def add(tokens, trained):
            ids.extend(tokens)
            loss_mask.extend([int(trained)] * len(tokens))

        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant" and message.get("reasoning_content"):
                content = render_reasoning(message["reasoning_content"], content)
            is_reply = role == "assistant"
            add([self.im_start_id] + self.encode(role + "\n"), False)
            add(self.encode(content) + [self.im_end_id], is_reply)
            add(self._newline, False)
        if add_generation_prompt:
            add([self.im_start_id] + self.encode("assistant\n"), False)
        return ids, loss_mask

    def render_prompt(self, prompt_or_messages):
        """Ids that prompt the model for an assistant reply; a str becomes one user message."""
        messages = prompt_or_messages
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.render_chat(messages, add_generation_prompt=True)[0]


def _validate_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m.get('content')).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages[{i}]['reasoning_content'] must be a str, got {type(reasoning).__name__}")
