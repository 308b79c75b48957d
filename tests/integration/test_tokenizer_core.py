import pytest

from services.common.errors import InvalidArgumentError
from services.tokenizer.core import ChatMessage, TokenizerCore


@pytest.fixture(scope="module")
def core(model_dir):
    return TokenizerCore(model_dir)


def test_chat_template_adds_default_system_prompt_and_generation_prompt(core):
    text = core.render_chat([ChatMessage("user", "Hi")])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = core.encode_chat([ChatMessage("user", "Hi")])
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> is one special token, thrice


def test_a_system_message_replaces_the_default(core):
    text = core.render_chat([ChatMessage("system", "Be terse."), ChatMessage("user", "Hi")])
    assert "SmolLM" not in text and text.startswith("<|im_start|>system\nBe terse.<|im_end|>")


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 😀🎉 and 世界 and ½", "plain ascii text 12345"])
def test_incremental_decoding_never_breaks_characters_and_equals_full_decode(core, text):
    ids = core.encode_text(text)
    decoder = core.incremental_decoder()
    pieces = [decoder.push([i]) for i in ids]
    assert "".join(pieces) == core.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 0x7FF for c in text):
        assert "" in pieces  # some token ended inside a multi-byte character and was held back


def test_invalid_input_names_the_field(core):
    with pytest.raises(InvalidArgumentError) as caught:
        core.render_chat([ChatMessage("user", "hi"), ChatMessage("robot", "x")])
    assert caught.value.field == "chat.messages[1].role"
    with pytest.raises(InvalidArgumentError) as caught:
        core.decode([5, 10**6])
    assert caught.value.field == "ids[1]"


def test_a_prompt_too_long_for_the_context_is_refused_from_its_length_alone(core):
    # no token covers more than max_token_bytes bytes, so this text has more than 2047 tokens
    text = "a" * (core.max_token_bytes * 2047 + 1)
    with pytest.raises(InvalidArgumentError) as caught:
        core.encode_text(text, max_tokens=2047)
    assert caught.value.field == "text" and "at least 2048 tokens" in caught.value.description
    with pytest.raises(InvalidArgumentError) as caught:
        core.encode_chat([ChatMessage("user", text)], max_tokens=2047)
    assert caught.value.field == "chat"


def test_the_length_bound_never_refuses_what_fits(core):
    """The bound is sound: text of exactly max_tokens tokens is encoded, whatever its bytes per token
    (long runs of '#' and spaces are the vocabulary's longest tokens)."""
    for text in ("#" * 8000, "\n" + " " * 80 + "x" * 3, "hello world " * 300, "日本語のテキスト" * 50, "a"):
        expected = core.tokenizer.encode(text, add_special_tokens=False).ids
        assert core.encode_text(text, max_tokens=len(expected)) == expected
