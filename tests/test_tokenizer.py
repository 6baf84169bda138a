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
