"""DNS discovery of inference replicas (`serve-router --inference-discovery dns`): what the router's
replica set does as a name's addresses come and go. The resolver is the one thing replaced: a name with
several changing A records cannot exist on this machine (the Swarm test, tests/deploy/test_swarm.py,
runs it against Docker's own DNS)."""

from __future__ import annotations

import asyncio

import pytest

from services.router.replicas import ReplicaSet, choose_replica, prefix_key


class Records:
    """A resolver whose answer the test sets; `None` makes the lookup fail."""

    def __init__(self, addresses: list[str] | None) -> None:
        self.addresses = addresses

    async def __call__(self, host: str) -> list[str]:
        assert host == "tasks.inference"
        if self.addresses is None:
            raise OSError("Name or service not known")
        return list(self.addresses)


def targets(replicas: ReplicaSet) -> list[str]:
    return sorted(r.target for r in replicas.replicas)


def test_every_address_of_the_name_is_a_replica_and_new_ones_are_added():
    async def scenario() -> None:
        records = Records(["10.0.1.5"])
        replicas = ReplicaSet(("tasks.inference:50053",), discovery="dns", resolver=records)
        await replicas.resolve()
        assert targets(replicas) == ["10.0.1.5:50053"]
        records.addresses = ["10.0.1.5", "10.0.1.9", "fd00::7"]
        await replicas.resolve()
        assert targets(replicas) == ["10.0.1.5:50053", "10.0.1.9:50053", "[fd00::7]:50053"]
        await replicas.close()

    asyncio.run(scenario())


def test_a_replica_that_left_dns_takes_no_new_work_and_is_dropped_when_its_calls_end():
    async def scenario() -> None:
        records = Records(["10.0.1.5", "10.0.1.9"])
        replicas = ReplicaSet(("tasks.inference:50053",), discovery="dns", resolver=records)
        await replicas.resolve()
        for r in replicas.replicas:
            r.healthy = True
        leaving = next(r for r in replicas.replicas if r.target == "10.0.1.5:50053")
        leaving.in_flight = 1  # a stream still draining there
        records.addresses = ["10.0.1.9"]
        await replicas.resolve()
        assert leaving in replicas.replicas and leaving.gone
        assert [r.target for r in replicas.healthy] == ["10.0.1.9:50053"]
        for prompt in range(20):
            chosen = choose_replica(replicas.replicas, prefix_key([prompt]), exclude=set())
            assert chosen is not None and chosen.target == "10.0.1.9:50053"
        leaving.in_flight = 0
        await replicas.resolve()
        assert targets(replicas) == ["10.0.1.9:50053"]
        await replicas.close()

    asyncio.run(scenario())


def test_a_failed_lookup_keeps_the_replicas_it_found_before():
    async def scenario() -> None:
        records = Records(["10.0.1.5"])
        replicas = ReplicaSet(("tasks.inference:50053",), discovery="dns", resolver=records)
        await replicas.resolve()
        records.addresses = None
        await replicas.resolve()
        assert targets(replicas) == ["10.0.1.5:50053"]
        assert not replicas.replicas[0].gone
        await replicas.close()

    asyncio.run(scenario())


def test_static_discovery_never_resolves_and_a_malformed_dns_target_fails_at_once():
    async def never(host: str) -> list[str]:
        raise AssertionError("static targets are not resolved")

    async def scenario() -> None:
        replicas = ReplicaSet(("127.0.0.1:1", "127.0.0.1:2"), resolver=never)
        await replicas.resolve()
        assert targets(replicas) == ["127.0.0.1:1", "127.0.0.1:2"]
        await replicas.close()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match=r"expected HOST:PORT, got 'tasks\.inference'"):
        ReplicaSet(("tasks.inference",), discovery="dns")
