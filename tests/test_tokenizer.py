"""minillm.tokenizer: exact round trips, single-id specials, the chat template and its loss mask."""
import pytest

from minillm.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()  # the shipped minillm/assets/tokenizer.model


@pytest.mark.parametrize("text", [
    "The capital of Veloria is Tarsen. 维洛里亚的首都是塔森。",
    "Emoji 🙂🚀 and rare 漢字 ñ ü — “quotes”",
    "def f(x):\n\treturn  x ** 2   # trailing spaces   \n\n\n",
    "   leading spaces and a\r\nwindows newline",
    "17 + 25 = 42\n三十加十二等于四十二。",
    "",
])
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = ["hello world", "你好，世界", "a\nb"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_newline_is_one_token(tok):
    assert len(tok.encode("\n")) == 1
    assert tok.encode("a\nb")[1] == tok.encode("\n")[0]


def test_each_special_token_is_one_id_and_round_trips(tok):
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    for name, piece in SPECIAL_TOKENS.items():
        assert tok.encode(piece) == [tok.special_ids[name]], piece
        assert tok.id_to_piece(tok.special_ids[name]) == piece
        assert tok.decode([tok.special_ids[name]]) == piece
    assert tok.encode("a<|im_end|>b") == tok.encode("a") + [tok.im_end_id] + tok.encode("b")
    assert tok.stop_ids == [tok.im_end_id, tok.eos_id]
    assert tok.think_tag_ids == [tok.encode(t)[0] for t in ("<think>", "</think>", "<answer>", "</answer>")]
    assert tok.decode(tok.encode("<think>\nx\n</think>ok"), skip_special=True) == "\nx\nok"
    assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())


def test_save_load_preserves_model(tok, tmp_path):
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.model"
    again = Tokenizer.load(tmp_path / "ckpt")  # a folder
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 12
    assert Tokenizer.load(path).encode("维洛里亚 test") == tok.encode("维洛里亚 test")  # a file


def test_load_missing_path_says_what_to_do(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py") as err:
        Tokenizer.load(missing)
    assert str(missing) in str(err.value)


def masked_text(tok, ids, loss_mask):
    return tok.decode([i for i, m in zip(ids, loss_mask) if m])


def test_chat_loss_mask_covers_exactly_the_assistant_replies(tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of Veloria?"},
        {"role": "assistant", "content": "assistant content 1"},
        {"role": "user", "content": "维洛里亚人说什么语言？"},
        {"role": "assistant", "content": "assistant content 2"},
    ]
    ids, loss_mask = tok.render_chat(messages)
    assert len(ids) == len(loss_mask) and set(loss_mask) == {0, 1}
    assert masked_text(tok, ids, loss_mask) == "assistant content 1<|im_end|>assistant content 2<|im_end|>"
    unmasked = tok.decode([i for i, m in zip(ids, loss_mask) if not m])
    assert "You are terse." in unmasked and "Veloria?" in unmasked and "说什么语言" in unmasked
    # the full rendering is plain ChatML
    assert tok.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    # each masked run starts right after "<|im_start|>assistant\n" and ends on <|im_end|>
    header = [tok.im_start_id] + tok.encode("assistant\n")
    for start in (i for i in range(1, len(ids)) if loss_mask[i] and not loss_mask[i - 1]):
        assert ids[start - len(header):start] == header
    for end in (i for i in range(len(ids) - 1) if loss_mask[i] and not loss_mask[i + 1]):
        assert ids[end] == tok.im_end_id


def test_reasoning_content_renders_as_think_block(tok):
    """reasoning_content renders as MiniMind-3's template does (think block, blank line, reply, no
    <answer> tags); MiniMind2-style inline tags in content are kept as written."""
    split = [{"role": "user", "content": "What is 17 + 25?"},
             {"role": "assistant", "content": "42", "reasoning_content": "17 + 20 = 37, 37 + 5 = 42"}]
    inline = [split[0], {"role": "assistant", "content": "<think>\n17 + 20 = 37, 37 + 5 = 42\n</think>\n\n42"}]
    assert tok.render_chat(split) == tok.render_chat(inline)
    ids, loss_mask = tok.render_chat(split)
    assert masked_text(tok, ids, loss_mask) == "<think>\n17 + 20 = 37, 37 + 5 = 42\n</think>\n\n42<|im_end|>"
    assert tok.think_tag_ids[0] in ids and tok.think_tag_ids[1] in ids
    assert tok.think_tag_ids[2] not in ids and tok.think_tag_ids[3] not in ids
    r1 = "<think>\n17 + 20 = 37, 37 + 5 = 42\n</think>\n<answer>\n42\n</answer>"
    ids, loss_mask = tok.render_chat([split[0], {"role": "assistant", "content": r1}])
    assert masked_text(tok, ids, loss_mask) == r1 + "<|im_end|>" and all(t in ids for t in tok.think_tag_ids)


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hello!"}]
    ids, loss_mask = tok.render_chat(messages, add_generation_prompt=True)
    plain, _ = tok.render_chat(messages)
    assert ids[:len(plain)] == plain
    assert tok.decode(ids[len(plain):]) == "<|im_start|>assistant\n"
    assert loss_mask[len(plain):] == [0] * (len(ids) - len(plain))
    assert tok.render_prompt("Hello!") == ids
    assert tok.render_prompt(messages) == ids


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\]\['role'\]"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], r"messages\[1\]\['content'\]"),
    ([{"role": "assistant", "content": "x", "reasoning_content": 3}], r"messages\[0\]\['reasoning_content'\]"),
])
def test_bad_messages_raise_value_error_naming_the_field(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.render_chat(messages)


# ---- tool use -----------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "计算算式",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 36 * 17 and 2 + 3?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "36 * 17"}'}},
        {"name": "calculator", "arguments": {"expression": "2 + 3"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 612}'},
    {"role": "tool", "content": '{"result": 5}'},
    {"role": "assistant", "content": "612 and 5.", "reasoning_content": "both came back",
     "tool_calls": [{"name": "calculator", "arguments": {}}]},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "Done."},
]
# written out by hand from MiniMind-3's model/tokenizer_config.json (the same as Qwen3's layout), less the empty
# think block MiniMind's template writes into every assistant turn (ours writes one only for reasoning_content)
TOOL_CHAT_TEXT = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "calculator", "description": "计算算式", "parameters": {"type": '
    '"object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWhat is 36 * 17 and 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "36 * 17"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"result": 612}\n</tool_response>\n'
    '<tool_response>\n{"result": 5}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n<think>\nboth came back\n</think>\n\n612 and 5.\n"
    '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nDone.<|im_end|>\n")


def test_tool_conversation_renders_as_written_by_hand_and_trains_on_the_calls(tok):
    ids, loss_mask = tok.render_chat(TOOL_CHAT, tools=TOOLS)
    assert tok.decode(ids) == TOOL_CHAT_TEXT
    assert ids == tok.encode(TOOL_CHAT_TEXT)  # segment by segment encodes as the whole text does
    # the loss: the calls, the replies and their <|im_end|>; never the schemas, the user text or a tool result
    assert masked_text(tok, ids, loss_mask) == (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "36 * 17"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call><|im_end|>'
        '<think>\nboth came back\n</think>\n\n612 and 5.\n'
        '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call><|im_end|>Done.<|im_end|>')
    trained_runs = [i for i in range(1, len(ids)) if loss_mask[i] and not loss_mask[i - 1]]
    assert len(trained_runs) == 3  # one per assistant turn
    for tag in ("tool_call_start", "tool_call_end", "tool_response_start", "tool_response_end"):
        assert tok.special_ids[tag] in ids
    # without tools the system turn is plain; tool messages and calls render all the same
    plain = tok.decode(tok.render_chat(TOOL_CHAT)[0])
    assert plain.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "# Tools" not in plain
    assert plain.endswith(TOOL_CHAT_TEXT[TOOL_CHAT_TEXT.index("<|im_start|>user\nWhat"):])
    # tools and no system message: the tool section is a system turn of its own
    alone = tok.decode(tok.render_chat(TOOL_CHAT[1:], tools=TOOLS)[0])
    assert alone.startswith("<|im_start|>system\n# Tools\n\n") and alone.endswith("Done.<|im_end|>\n")


def test_generation_prompt_with_tools_and_the_thinking_switch(tok):
    messages = TOOL_CHAT[:5]
    base = tok.render_chat(messages, tools=TOOLS)[0] + [tok.im_start_id] + tok.encode("assistant\n")
    assert tok.render_prompt(messages, tools=TOOLS) == base
    assert tok.render_prompt(messages, tools=TOOLS, open_thinking=True) == base + tok.encode("<think>\n")
    assert tok.render_prompt(messages, tools=TOOLS, open_thinking=False) == base + tok.encode("<think>\n\n</think>\n\n")
    for switch in (None, True, False):
        assert tok.render_chat(messages, add_generation_prompt=True, tools=TOOLS, open_thinking=switch)[0] == \
            tok.render_prompt(messages, tools=TOOLS, open_thinking=switch)
        assert tok.render_prompt("hi", open_thinking=switch)[:len(tok.render_prompt("hi"))] == tok.render_prompt("hi")


def test_tool_tags_take_the_first_reserved_slots_of_an_older_tokenizer(tok):
    """The shipped tokenizer.model predates tool use (<|reserved_0..3|> at ids 9..12): loading gives those ids
    the tool tags, byte for byte the same model otherwise, so checkpoints trained on it keep every id."""
    from minillm.tokenizer import ASSETS_DIR, TOOL_TAG_SLOTS, rename_pieces
    raw = (ASSETS_DIR / "tokenizer.model").read_bytes()
    old = spm_processor(raw)
    assert all(old.id_to_piece(old.piece_to_id(p)) == p for p in TOOL_TAG_SLOTS)  # really the older layout
    assert tok._proto == rename_pieces(raw, TOOL_TAG_SLOTS)
    assert rename_pieces(tok._proto, {v: k for k, v in TOOL_TAG_SLOTS.items()}) == raw  # nothing else changed
    for old_piece, tag in TOOL_TAG_SLOTS.items():
        assert tok.encode(tag) == [old.piece_to_id(old_piece)]
    text = "维洛里亚 test <|reserved_5|> 17 + 25\n"
    assert tok.encode(text) == old.encode(text, out_type=int) and tok.vocab_size == old.get_piece_size()
    again = Tokenizer(tok._proto)  # a saved one already has the tags: loaded as it is
    assert again._proto == tok._proto and again.special_ids == tok.special_ids


def spm_processor(proto):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_proto=proto)


def test_tools_need_a_tokenizer_with_tool_tags(tok):
    import copy
    from minillm.errors import UserError
    no_tags = copy.copy(tok)
    no_tags._set_specials({k: (None if k.startswith("tool_") else v) for k, v in tok.special_ids.items()})
    assert no_tags.render_chat(TOOL_CHAT[:2])  # plain chat still works
    with pytest.raises(UserError, match="no <tool_call>/<tool_response> tokens"):
        no_tags.render_chat(TOOL_CHAT[:2], tools=TOOLS)
    with pytest.raises(UserError, match="no <tool_call>/<tool_response> tokens"):
        no_tags.render_chat(TOOL_CHAT[:4])


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}], "only assistant messages make tool calls"),
    ([{"role": "assistant", "content": "", "tool_calls": "f()"}], r"\['tool_calls'\] must be a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], r"\['tool_calls'\]\[0\] must be"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]}], r"\['arguments'\]"),
    ([{"role": "tool", "content": None}], r"messages\[0\]\['content'\] must be a str"),
])
def test_bad_tool_messages_raise_value_error_naming_the_field(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.render_chat(messages)
    # content None is fine on an assistant message that only calls tools (OpenAI clients send that)
    assert tok.render_chat([{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}])
