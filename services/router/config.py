"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config_flags import flag
from services.common.errors import InvalidArgumentError
from services.router.result_cache_disk import check_disk_path
from services.router.rollout import Rollout, parse_assignment, parse_version_targets, parse_weights


@dataclass(frozen=True)
class RouterConfig:
    """Where the router's dependencies are and the defaults it applies to public requests."""

    tokenizer_target: str = field(metadata=flag(default="127.0.0.1:50052"))
    """host:port of the tokenizer service."""
    inference_targets: tuple[str, ...] = field(metadata=flag("--inference-target", default=()))
    """host:port of an inference replica; with DNS discovery, a name resolving to any number of them. They
    serve one unnamed version; without --model-version the default is 127.0.0.1:50053."""
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
    model_versions: tuple[str, ...] = field(default=(), metadata=flag("--model-version", metavar="NAME=HOST:PORT"))
    """A named model version and a replica of it (with DNS discovery, a name per version), served side by
    side with the other versions (a rollout: canary, blue-green, A/B); instead of --inference-target. The
    first version named is the stable one unless --stable-version says otherwise."""
    rollout_weights: str | None = field(default=None, metadata=flag(metavar="NAME=PERCENT,..."))
    """Percent of new requests per version, summing to 100, e.g. blue=95,green=5; unset: all to the stable
    version. `meshserve rollout set` changes them on a running router."""
    stable_version: str | None = field(default=None, metadata=flag(metavar="NAME"))
    """The version `meshserve rollout rollback` sends all traffic to (default: the first --model-version)."""
    tenant_versions: tuple[str, ...] = field(default=(), metadata=flag("--tenant-version", metavar="TENANT=NAME"))
    """Pins a tenant's requests to a version (A/B by tenant); a request's x-meshserve-model-version header
    pins it too, and wins."""
    admin_host: str = "127.0.0.1"
    """Interface of the admin port (the RolloutService): loopback, or the internal network in containers;
    never routed by Envoy."""
    admin_port: int = 0
    """gRPC port of the admin RolloutService (0: none)."""

    def __post_init__(self) -> None:
        if self.drain_notice_s < 0:
            raise ValueError("--drain-notice-s must be >= 0")
        if self.model_versions and self.inference_targets:
            raise ValueError("give --inference-target (one unnamed version) or --model-version, not both")
        if not self.model_versions and not self.inference_targets:
            object.__setattr__(self, "inference_targets", ("127.0.0.1:50053",))  # the conventional port
        if not self.model_versions and (self.rollout_weights or self.stable_version or self.tenant_versions):
            raise ValueError("--rollout-weights, --stable-version and --tenant-version need --model-version")
        if not 0 <= self.admin_port <= 65535:
            raise ValueError("--admin-port must be a port number (0: no admin port)")
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
        self.rollout()  # a bad version name or weight fails at start-up, in one sentence

    def version_targets(self) -> dict[str, tuple[str, ...]]:
        """Each version's targets, in the order the versions were named; the unnamed version is ""."""
        if not self.model_versions:
            return {"": self.inference_targets}
        grouped: dict[str, list[str]] = {}
        try:
            for version in parse_version_targets(self.model_versions):
                grouped.setdefault(version.name, []).append(version.target)
        except InvalidArgumentError as error:
            raise ValueError(f"{error.field}: {error.description}") from None
        return {name: tuple(targets) for name, targets in grouped.items()}

    def rollout(self) -> Rollout:
        """The rollout the flags describe (ValueError naming the flag for a bad one)."""
        versions = self.version_targets()
        try:
            weights = parse_weights(self.rollout_weights, "--rollout-weights") if self.rollout_weights else None
            tenants = dict(parse_assignment(spec, "--tenant-version") for spec in self.tenant_versions)
            return Rollout(versions, weights, self.stable_version, tenants)
        except InvalidArgumentError as error:
            field = {"weights": "--rollout-weights", "stable_version": "--stable-version"}.get(error.field, error.field)
            if field.startswith("tenant_version"):
                field = "--tenant-version"
            raise ValueError(f"{field}: {error.description}") from None
