"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config_flags import flag
from services.router.result_cache_disk import check_disk_path


@dataclass(frozen=True)
class RouterConfig:
    """Where the router's dependencies are and the defaults it applies to public requests."""

    tokenizer_target: str = field(metadata=flag(default="127.0.0.1:50052"))
    """host:port of the tokenizer service."""
    inference_targets: tuple[str, ...] = field(metadata=flag("--inference-target", default=("127.0.0.1:50053",)))
    """host:port of an inference replica; with DNS discovery, a name resolving to any number of them."""
    inference_discovery: str = field(default="static", metadata=flag(choices=("static", "dns")))
    """static: each target is one replica; dns: each target's name is resolved again every few seconds and
    every address it has is a replica (a Swarm service with `endpoint_mode: dnsrr`, a headless Service)."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it unset."""
    max_streams_per_tenant: int = 64
    """Concurrent streams one tenant may hold on this router (0: no limit); more get RESOURCE_EXHAUSTED.
    Unauthenticated requests are all one tenant, "anonymous"."""
    max_stream_duration_s: float = 600.0
    """A stream ends with DEADLINE_EXCEEDED after this long, whatever deadline the client set (or none)."""
    fallback_targets: tuple[str, ...] = field(default=(), metadata=flag("--fallback-target"))
    """host:port of a replica of the fallback tier (a lighter variant of the model); none: no fallback."""
    shed_utilisation: float = 0.9
    """Main-tier utilisation (requests over running slots) above which LOW requests are shed, once it
    has stayed there for --shed-low-after-s."""
    shed_low_after_s: float = 60.0
    """Seconds of sustained utilisation above --shed-utilisation before LOW requests are shed (0: never)."""
    result_cache_mb: float = 64.0
    """Memory tier of the result cache, in MiB (0 turns the cache off)."""
    result_cache_redis: str | None = field(default=None, metadata=flag(metavar="URL"))
    """Shared tier of the result cache, e.g. redis://127.0.0.1:6379/0; unset: memory only."""
    result_cache_ttl_s: int = 3600
    """Seconds the shared tier keeps an answer."""
    result_cache_disk: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """Disk tier of the result cache: a SQLite file (created if absent; its directory must be writable),
    kept across restarts, looked up after memory and before Redis; unset: no disk tier."""
    result_cache_disk_mb: float = 1024.0
    """Bound of the disk tier in MiB (its database's pages in use); least recently used answers go first."""
    result_cache_disk_ttl_s: int = 86400
    """Seconds the disk tier keeps an answer."""
    drain_notice_s: float = 2.0
    """After SIGTERM, keep accepting this long while Envoy's health checks notice NOT_SERVING."""

    def __post_init__(self) -> None:
        if self.drain_notice_s < 0:
            raise ValueError("--drain-notice-s must be >= 0")
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
        if not self.result_cache_disk_mb > 0 or self.result_cache_disk_ttl_s < 1:
            raise ValueError("--result-cache-disk-mb must be > 0 and --result-cache-disk-ttl-s >= 1")
        if self.result_cache_disk is not None:  # given, if only as "": that is no file to open
            if not self.result_cache_mb:
                raise ValueError("--result-cache-disk needs the memory tier (--result-cache-mb > 0)")
            check_disk_path(self.result_cache_disk)
