"""Who is asking, and what they may have: the tenant, its highest priority, its concurrent streams.

Envoy verifies the client's JWT and passes two of its claims on as request headers (and removes any
a client sent itself, with or without auth): the tenant (`x-meshserve-tenant`) and the highest priority
the tenant may ask for (`x-meshserve-max-priority`: low, normal or high). Without them a request is the
anonymous tenant's, capped at NORMAL: a client cannot make itself HIGH by asking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.v1.generation_service_pb2 import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from services.common.contract import MAX_PRIORITY_HEADER, TENANT_HEADER
from services.common.errors import ResourceExhaustedError

ANONYMOUS = "anonymous"
_PRIORITY_NAMES = {"low": PRIORITY_LOW, "normal": PRIORITY_NORMAL, "high": PRIORITY_HIGH}


@dataclass(frozen=True)
class Caller:
    tenant: str
    max_priority: int

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        headers = {key: value for key, value in metadata or () if isinstance(value, str)}
        tenant = headers.get(TENANT_HEADER) or ANONYMOUS
        # an unknown claim value grants nothing beyond the default
        max_priority = _PRIORITY_NAMES.get(headers.get(MAX_PRIORITY_HEADER, "").lower(), PRIORITY_NORMAL)
        return cls(tenant[:128], max_priority)

    def priority(self, requested: int) -> int:
        """The priority a request runs at: what it asked for, at most what its tenant may have."""
        return min(requested, self.max_priority)


class TenantStreams:
    """Concurrent streams per tenant (in this router process), refused past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        """Counts a new stream of `tenant`, or raises RESOURCE_EXHAUSTED (with RetryInfo) at the limit."""
        if self.limit and self._open.get(tenant, 0) >= self.limit:
            raise ResourceExhaustedError(
                f"too many concurrent streams for this tenant (max_streams_per_tenant is {self.limit}); retry later",
                retry_after_s=1.0,
            )
        self._open[tenant] = self._open.get(tenant, 0) + 1

    def release(self, tenant: str) -> None:
        left = self._open.get(tenant, 0) - 1
        if left > 0:
            self._open[tenant] = left
        else:
            self._open.pop(tenant, None)

    def open_streams(self, tenant: str) -> int:
        return self._open.get(tenant, 0)
