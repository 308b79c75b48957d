"""The router's decisions without gRPC: a replica's load, which replica a prompt goes to, admission,
and whose error a failure is."""

from __future__ import annotations

import pytest

from meshserve.inference.v1 import inference_service_pb2 as pb
from services.common.errors import ResourceExhaustedError, ServingError, UnavailableError
from services.router.admission import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, admit
from services.router.replicas import Replica, choose_replica, prefix_key, record_call_error


def replica(target: str, **state) -> Replica:
    return Replica(
        target,
        channel=None,
        stub=None,
        healthy=True,
        info=pb.GetModelInfoResponse(max_running=4, max_waiting=2),
        **state,
    )


def test_load_counts_own_requests_at_once_and_other_routers_from_the_last_report():
    r = replica("a", running=5, waiting=1, in_flight_at_report=2, in_flight=2)
    assert r.load == 6  # 4 from other routers + 2 of ours
    r.in_flight = 0  # both of ours finished since the report: their places are free now, not at the next report
    assert r.load == 4
    r.in_flight = 3  # and a new one of ours, not yet reported
    assert r.load == 7
    # the replica reported less than we had in flight (it had not received them yet): never negative
    assert replica("b", running=0, in_flight_at_report=3, in_flight=3).load == 3


def test_a_prefix_goes_to_the_same_replica_unless_it_is_much_busier():
    replicas = [replica(t) for t in ("a", "b", "c")]
    key = prefix_key(list(range(100)))
    preferred = choose_replica(replicas, key, exclude=set())
    assert all(choose_replica(replicas, key, exclude=set()) is preferred for _ in range(3))
    assert prefix_key(list(range(32)) + [7] * 50) == prefix_key(list(range(32)))  # only the first block counts
    preferred.in_flight = 2  # within the slack: affinity wins
    assert choose_replica(replicas, key, exclude=set()) is preferred
    preferred.in_flight = 3  # more than 2 above the least loaded: load wins
    chosen = choose_replica(replicas, key, exclude=set())
    assert chosen is not preferred and chosen.load == 0


def test_a_prefix_never_waits_in_a_queue_while_another_replica_has_a_free_slot():
    replicas = [replica(t) for t in ("a", "b")]
    key = prefix_key(list(range(100)))
    preferred = choose_replica(replicas, key, exclude=set())
    other = next(r for r in replicas if r is not preferred)
    other.in_flight = 2
    preferred.in_flight = 4  # within the slack of 2, but all of its 4 slots are taken
    assert choose_replica(replicas, key, exclude=set()) is other


def test_failed_excluded_and_unhealthy_replicas_are_not_chosen():
    a, b = replica("a"), replica("b")
    key = prefix_key([1, 2, 3])
    assert choose_replica([a, b], key, exclude={"a"}) is b
    b.healthy = False
    assert choose_replica([a, b], key, exclude={"a"}) is None


@pytest.mark.parametrize(
    ("priority", "admitted_up_to"),
    [(PRIORITY_LOW, 5), (PRIORITY_NORMAL, 9), (PRIORITY_HIGH, 10)],  # shares 0.5, 0.9, 1.0 of 10
)
def test_each_priority_is_admitted_up_to_its_share_of_capacity(priority, admitted_up_to):
    for load in range(admitted_up_to):
        admit(priority, load, capacity=10)  # the request makes load + 1 <= share x capacity
    with pytest.raises(ResourceExhaustedError) as refused:
        admit(priority, admitted_up_to, capacity=10)
    assert refused.value.retry_after_s > 0


def test_a_full_replica_stays_in_the_choice_and_a_dead_one_leaves_it():
    import grpc

    r = replica("a")
    record_call_error(r, grpc.StatusCode.RESOURCE_EXHAUSTED)  # refused: its slots were taken meanwhile
    assert r.healthy and choose_replica([r], b"k", exclude=set()) is r
    record_call_error(r, grpc.StatusCode.UNAVAILABLE)  # died or drains: out until a health check passes
    assert not r.healthy and choose_replica([r], b"k", exclude=set()) is None


def test_no_serving_replica_is_unavailable_not_exhausted():
    with pytest.raises(UnavailableError):
        admit(PRIORITY_HIGH, 0, capacity=0)


def test_a_failing_detokenization_stream_is_the_tokenizers_error_not_a_replica_failure():
    """The router fails a stream over only on AioRpcError from the inference call; the tokenizer's
    stream failing mid-answer must surface as the tokenizer's status instead."""
    import asyncio

    import grpc

    async def broken():
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "tokenizer gone"
        )
        yield

    async def nothing():
        return
        yield

    with pytest.raises(UnavailableError, match="tokenizer gone"):
        asyncio.run(_detokenize_once(broken()))
    with pytest.raises(UnavailableError, match="closed the detokenization stream"):
        asyncio.run(_detokenize_once(nothing()))


class _DecodeStreamCall:
    """A DecodeStream call standing in for grpc's: a task consumes the request iterator (as grpc's does) while
    the responses come from `responses`."""

    def __init__(self, requests, responses) -> None:
        import asyncio

        self.received: list = []
        self.responses = responses
        self.consumer = asyncio.get_running_loop().create_task(self._consume(requests))

    async def _consume(self, requests) -> None:
        async for request in requests:
            self.received.append(list(request.ids))

    def __aiter__(self):
        return self.responses

    def cancel(self) -> bool:
        return False  # like a call that already ended at its deadline: grpc does not cancel the consumer then


class _Tokenizer:
    def __init__(self, responses) -> None:
        self.responses = responses
        self.calls: list[_DecodeStreamCall] = []

    def DecodeStream(self, requests, timeout=None):
        self.calls.append(_DecodeStreamCall(requests, self.responses))
        return self.calls[-1]


async def _detokenize_once(responses) -> str:
    from services.router.core import _Detokenization

    detokenization = _Detokenization(_Tokenizer(responses), timeout=None)
    try:
        return await detokenization.text([1])
    finally:
        detokenization.close()


def test_a_detokenization_stream_that_ended_at_its_deadline_is_deadline_exceeded_not_internal():
    """The detokenization stream shares the request's deadline with the inference call and may end
    first: its read raises the stream's own status, which reaches the client as is (not INTERNAL)."""
    import asyncio

    import grpc

    from services.common.grpc_status import to_grpc_status

    async def deadline_exceeded():
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded"
        )
        yield

    with pytest.raises(ServingError) as caught:
        asyncio.run(_detokenize_once(deadline_exceeded()))
    assert to_grpc_status(caught.value).code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_closing_a_detokenization_ends_its_request_stream_even_when_the_call_ended_first():
    """grpc consumes a stream's requests in a task of its own that cancelling an ended call leaves waiting;
    unless the request stream ends, the garbage collector destroys that task with errors in the log."""
    import asyncio

    from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
    from services.router.core import _Detokenization

    async def texts():
        yield tokenizer_pb.DecodeStreamResponse(text="hi")

    async def scenario() -> _DecodeStreamCall:
        tokenizer = _Tokenizer(texts())
        detokenization = _Detokenization(tokenizer, timeout=None)
        assert await detokenization.text([7]) == "hi"
        detokenization.close()
        call = tokenizer.calls[0]
        await asyncio.wait_for(call.consumer, timeout=5)
        return call

    assert asyncio.run(scenario()).received == [[7]]


class _Reports:
    """A WatchLoad call standing in for a replica's: these reports, then `end`."""

    def __init__(self, loads, end) -> None:
        self.loads, self.end, self.cancelled = list(loads), end, False

    async def read(self):
        import asyncio

        if self.loads:
            return pb.WatchLoadResponse(load=self.loads.pop(0))
        if self.end == "silence":
            await asyncio.sleep(3600)
        raise self.end

    def cancel(self) -> None:
        self.cancelled = True


def _watch(r: Replica, reports: _Reports, monkeypatch) -> None:
    import asyncio
    import types

    from services.router import replicas

    monkeypatch.setattr(replicas, "LOAD_REPORT_TIMEOUT_S", 0.05)
    r.stub = types.SimpleNamespace(WatchLoad=lambda request: reports)
    asyncio.run(replicas.ReplicaSet._watch_load(r))
    assert reports.cancelled


def test_load_reports_update_the_replica_and_a_broken_stream_forgets_them(monkeypatch):
    import grpc

    r = replica("a", in_flight=2)
    seen = []
    loads = [pb.GetLoadResponse(running=3, waiting=1, kv_cache_usage=0.75)]

    class Recording(_Reports):
        async def read(self):
            seen.append((r.running, r.waiting, r.kv_cache_usage, r.in_flight_at_report))
            return await super().read()

    gone = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    _watch(r, Recording(loads, gone), monkeypatch)
    assert seen[-1] == (3, 1, 0.75, 2)  # applied, with our in-flight count at that report
    assert (r.running, r.waiting, r.in_flight_at_report) == (0, 0, 0)  # a restarted replica starts empty


def test_a_silent_load_stream_is_dropped_and_what_it_reported_forgotten(monkeypatch):
    r = replica("a")
    _watch(r, _Reports([pb.GetLoadResponse(running=2)], "silence"), monkeypatch)  # ends after the timeout
    assert r.running == 0
