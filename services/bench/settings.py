"""The settings of one run of the mesh benchmark (`meshserve bench`): written once, its flags derived.

No gRPC here, so the command line can build its parser without loading the stubs."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config_flags import flag


@dataclass(frozen=True)
class MeshBenchSettings:
    """One run of the mesh benchmark."""

    target: str = "localhost:8080"
    """The public endpoint, host:port."""
    concurrency: int = 1
    """Streams open at once."""
    requests: int | None = None
    """Requests to send in all, warm-ups not included (unset: 4 x --concurrency)."""
    max_tokens: int = 128
    """Tokens to generate per request."""
    chat: bool = True
    """Send each prompt as a user chat message; --no-chat sends it as a plain prompt."""
    temperature: float = 0.0
    """0 is greedy."""
    seed: int | None = None
    """Sampling seed, for --temperature > 0."""
    warmup: int = 0
    """Requests sent one at a time before measuring, not reported."""
    timeout_s: float | None = field(default=None, metadata=flag("--timeout"))
    """Per-request deadline in seconds."""
    connect_timeout_s: float = field(default=10.0, metadata=flag("--connect-timeout"))
    """Seconds to wait for the endpoint."""

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError("--timeout must be > 0")

    @property
    def total_requests(self) -> int:
        return self.requests if self.requests is not None else 4 * self.concurrency
