"""Tokenization without gRPC: text and chat ⇄ token ids, and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from services.common.errors import InvalidArgumentError
from services.modelstore.layout import ModelDirectory

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class TokenizerCore:
    """The model's tokenizer and chat template, loaded from a prepared model directory."""

    def __init__(self, model: ModelDirectory) -> None:
        self.tokenizer = Tokenizer.from_file(str(model.tokenizer_path))
        # the same sandbox Hugging Face uses for chat templates: templates are data, not code
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(model.chat_template)
        self.eos_token_ids = model.eos_token_ids
        self.bos_token_id = model.bos_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        if not text:
            raise InvalidArgumentError("text", "must not be empty")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[ChatMessage]) -> str:
        if not messages:
            raise InvalidArgumentError("chat.messages", "must hold at least one message")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgumentError(f"chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True
        )

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        # special tokens in the rendered template (<|im_start|>) are matched as added tokens
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self._check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self) -> "IncrementalDecoder":
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
