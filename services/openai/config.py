"""Configuration of the OpenAI-compatible service (`meshserve serve-openai`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from services.common.config_flags import flag
from services.common.contract import MAX_PROMPT_BYTES

MAX_BODY_BYTES = 4 * MAX_PROMPT_BYTES
"""A body larger than this holds more than any request may (a prompt's 1 MiB, escaped as JSON, with its
fields): refused while it is read, so the service never holds an unbounded body, with or without Envoy. It is
also the largest WebSocket message the server reads at all."""


def _is_ip_target(target: str) -> bool:
    host, _, port = target.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return port.isdigit()


@dataclass(frozen=True)
class OpenAIConfig:
    """Where the service listens and what it talks to."""

    router_targets: tuple[str, ...] = field(default=("127.0.0.1:50051",), metadata=flag("--router-target"))
    """A router's public gRPC endpoint. One target may be any gRPC name (`dns:///router:50051` spreads
    calls over every address it resolves to); several must be IP:port, spread round robin."""
    tokenizer_target: str | None = None
    """The tokenizer service, asked only for the text of tokens in logprobs; without it tokens are named
    `token_id:N` (vLLM's --return-tokens-as-token-ids format)."""
    max_choices: int = 16
    """At most this many generations per request (n times the number of prompts)."""
    max_request_bytes: int = 1 << 20
    """The largest WebSocket request message (bytes of its JSON text), refused with an error frame and close
    code 1009. Envoy counts HTTP bodies (`--max-request-bytes`) but not WebSocket messages, so `meshserve up`
    passes its own limit on: a request is held to one limit either way. 0: the service's own bound (4 MiB, the
    largest HTTP body it reads)."""
    ws_request_timeout_s: float = 30.0
    """A WebSocket that sends no request frame within this many seconds is closed (1008)."""

    def __post_init__(self) -> None:
        if not self.router_targets:
            raise ValueError("at least one --router-target is needed")
        if len(self.router_targets) > 1 and not all(_is_ip_target(t) for t in self.router_targets):
            raise ValueError(
                "several --router-target values must all be IP:port; for host names pass one "
                "dns:///NAME:PORT target that resolves to every router"
            )
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be >= 1, got {self.max_choices}")
        if self.max_request_bytes < 0:
            raise ValueError(f"max_request_bytes must be >= 0 (0: the service bound), got {self.max_request_bytes}")
        if not self.ws_request_timeout_s > 0:
            raise ValueError(f"ws_request_timeout_s must be > 0, got {self.ws_request_timeout_s}")

    @property
    def ws_message_limit(self) -> int:
        """The largest WebSocket request message served (bytes)."""
        return min(self.max_request_bytes or MAX_BODY_BYTES, MAX_BODY_BYTES)

    @property
    def router_channel_target(self) -> str:
        """One gRPC target for all routers: the name itself, or an `ipv4:`/`ipv6:` address list."""
        if len(self.router_targets) == 1:
            return self.router_targets[0]
        scheme = "ipv6" if any(t.startswith("[") for t in self.router_targets) else "ipv4"
        return f"{scheme}:{','.join(self.router_targets)}"
