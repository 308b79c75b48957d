"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    """Where the router's dependencies are and the defaults it applies to public requests."""

    tokenizer_target: str
    """host:port of the tokenizer service."""
    inference_targets: tuple[str, ...]
    """host:port of every inference replica."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it unset."""

    def __post_init__(self) -> None:
        if not self.inference_targets:
            raise ValueError("at least one --inference-target is required")
