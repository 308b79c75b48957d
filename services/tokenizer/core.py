"""Tokenization without gRPC: text and chat ⇄ token ids, and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from services.common.contract import check_fits_context, validate_chat, validate_prompt_text
from services.common.errors import InvalidArgumentError
from services.modelstore.layout import ModelDirectory


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class TokenizerCore:
    """The model's tokenizer and chat template, loaded from a prepared model directory."""

    def __init__(self, model: ModelDirectory) -> None:
        self.tokenizer = Tokenizer.from_file(str(model.tokenizer_path))
        # the same sandbox Hugging Face uses for chat templates: templates are data, not code
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            model.chat_template
        )
        self.eos_token_ids = model.eos_token_ids
        self.bos_token_id = model.bos_token_id
        # no token covers more bytes than this, so text of n bytes has at least n / max_token_bytes tokens
        self.max_token_bytes = max(
            len(self.tokenizer.decode([i], skip_special_tokens=False).encode()) for i in range(self.vocab_size)
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of plain text. Text whose byte length alone proves it has more than `max_tokens`
        tokens is refused before it is tokenized."""
        validate_prompt_text(text, "text")
        self._check_fits(text, max_tokens, "text")
        return self._encode(text)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        validate_chat([(m.role, m.content) for m in messages])
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True
        )

    def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None = None) -> list[int]:
        """Token ids of a conversation rendered with the chat template (special tokens such as
        <|im_start|> are matched as added tokens)."""
        validate_chat([(m.role, m.content) for m in messages])
        self._check_fits("".join(m.content for m in messages), max_tokens, "chat")
        return self._encode(self.render_chat(messages))

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not): run in a thread, tokenization of a long
        # prompt leaves the event loop and its other streams running
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def _check_fits(self, text: str, max_tokens: int | None, field: str) -> None:
        if max_tokens is not None:
            check_fits_context(len(text.encode()), self.max_token_bytes, max_tokens, field)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self._check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def _check_ids(self, ids: list[int]) -> None:
        vocab = self.vocab_size
        for i, token in enumerate(ids):
            if token >= vocab:
                raise InvalidArgumentError(f"ids[{i}]", f"token id {token} is outside the vocabulary of {vocab}")


class IncrementalDecoder:
    """Streams text for a growing token sequence. A token that ends inside a multi-byte UTF-8
    character yields no text until the character completes, so no chunk is ever broken."""

    def __init__(self, core: TokenizerCore) -> None:
        self._core = core
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        self._core._check_ids(ids)
        pieces = []
        for token in ids:
            piece = self._stream.step(self._core.tokenizer, token)
            if piece:
                pieces.append(piece)
        return "".join(pieces)
