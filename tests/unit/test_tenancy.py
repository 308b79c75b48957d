"""Who may have what: the tenant and priority cap from Envoy's headers, concurrent streams per tenant,
and the refusal of an unauthenticated listener beyond loopback."""

from __future__ import annotations

import pytest

from meshserve.v1.generation_service_pb2 import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from services.cli.launcher import check_exposure
from services.common.errors import ResourceExhaustedError
from services.router.tenancy import ANONYMOUS, Caller, TenantStreams


def test_without_a_verified_claim_high_priority_is_capped_at_normal():
    caller = Caller.from_metadata([("user-agent", "x")])
    assert caller.tenant == ANONYMOUS
    assert caller.priority(PRIORITY_HIGH) == PRIORITY_NORMAL
    assert caller.priority(PRIORITY_LOW) == PRIORITY_LOW


def test_a_tenant_whose_token_allows_high_gets_it():
    caller = Caller.from_metadata([("x-meshserve-tenant", "acme"), ("x-meshserve-max-priority", "high")])
    assert (caller.tenant, caller.priority(PRIORITY_HIGH)) == ("acme", PRIORITY_HIGH)
    capped = Caller.from_metadata([("x-meshserve-tenant", "acme"), ("x-meshserve-max-priority", "low")])
    assert capped.priority(PRIORITY_NORMAL) == PRIORITY_LOW
    unknown = Caller.from_metadata([("x-meshserve-max-priority", "root")])
    assert unknown.priority(PRIORITY_HIGH) == PRIORITY_NORMAL


def test_a_tenant_past_its_stream_limit_is_refused_with_retry_advice_and_others_are_not():
    streams = TenantStreams(limit=2)
    streams.acquire("a")
    streams.acquire("a")
    with pytest.raises(ResourceExhaustedError) as caught:
        streams.acquire("a")
    assert caught.value.retry_after_s > 0 and "max_streams_per_tenant" in str(caught.value)
    streams.acquire("b")
    streams.release("a")
    streams.acquire("a")
    assert streams.open_streams("a") == 2 and streams.open_streams("b") == 1


def test_zero_means_no_stream_limit():
    streams = TenantStreams(limit=0)
    for _ in range(1000):
        streams.acquire("a")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_auth(host):
    assert check_exposure(host, "none", False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_beyond_loopback_without_auth_refuses_to_start_unless_allowed(host):
    with pytest.raises(SystemExit, match="--auth jwt"):
        check_exposure(host, "none", False)
    assert "WARNING" in check_exposure(host, "none", True)
    assert check_exposure(host, "jwt", False) is None
