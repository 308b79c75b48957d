"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    """Where the router's dependencies are and the defaults it applies to public requests."""

    tokenizer_target: str
    """host:port of the tokenizer service."""
    inference_targets: tuple[str, ...]
    """host:port of every inference replica; with DNS discovery, names resolving to any number of them."""
    inference_discovery: str = "static"
    """static: each target is one replica; dns: each target's name is resolved again every few seconds and
    every address it has is a replica (a Swarm service with `endpoint_mode: dnsrr`, a headless Service)."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it unset."""
    max_streams_per_tenant: int = 64
    """Concurrent streams one tenant may hold on this router (0: no limit); more get RESOURCE_EXHAUSTED.
    Unauthenticated requests are all one tenant, "anonymous"."""
    max_stream_duration_s: float = 600.0
    """A stream ends with DEADLINE_EXCEEDED after this long, whatever deadline the client set (or none)."""
    fallback_targets: tuple[str, ...] = ()
    """host:port of the fallback tier's replicas (a lighter variant of the model); empty: no fallback."""
    shed_utilisation: float = 0.9
    """Main-tier utilisation (requests over running slots) above which LOW requests may be shed..."""
    shed_low_after_s: float = 60.0
    """...once it has stayed there this long (0: never shed)."""
    result_cache_mb: float = 64.0
    """Memory tier of the result cache, in MiB (0 turns the cache off)."""
    result_cache_redis: str | None = None
    """redis://host:port/db of the shared tier; None: memory only."""
    result_cache_ttl_s: int = 3600
    """How long the shared tier keeps an answer."""

    def __post_init__(self) -> None:
        if not self.inference_targets:
            raise ValueError("at least one --inference-target is required")
        if self.inference_discovery not in ("static", "dns"):
            raise ValueError("--inference-discovery must be static or dns")
        if self.max_streams_per_tenant < 0:
            raise ValueError("--max-streams-per-tenant must be >= 0 (0: no limit)")
        if not self.max_stream_duration_s > 0:
            raise ValueError("--max-stream-duration-s must be > 0")
        if not 0 < self.shed_utilisation <= 1 or self.shed_low_after_s < 0:
            raise ValueError("--shed-utilisation must be in (0, 1] and --shed-low-after-s >= 0")
        if self.result_cache_mb < 0 or self.result_cache_ttl_s < 1:
            raise ValueError("--result-cache-mb must be >= 0 and --result-cache-ttl-s >= 1")
        if self.result_cache_redis and not self.result_cache_mb:
            raise ValueError("--result-cache-redis needs the memory tier (--result-cache-mb > 0)")
