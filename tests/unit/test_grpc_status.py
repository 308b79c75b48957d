import grpc
from google.rpc import error_details_pb2

from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.common.grpc_status import to_grpc_status


def _details(status):
    from google.rpc import status_pb2

    trailer = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return status_pb2.Status.FromString(trailer).details


def test_invalid_argument_carries_a_field_violation():
    status = to_grpc_status(InvalidArgumentError("sampling.top_p", "must be in (0, 1]"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert _details(status)[0].Unpack(bad)
    assert bad.field_violations[0].field == "sampling.top_p"


def test_resource_exhausted_and_unavailable_carry_retry_info():
    for error, code in (
        (ResourceExhaustedError("full", 1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("draining", 2.0), grpc.StatusCode.UNAVAILABLE),
    ):
        status = to_grpc_status(error)
        assert status.code == code
        info = error_details_pb2.RetryInfo()
        assert _details(status)[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() == error.retry_after_s * 1000


def test_a_downstream_status_is_passed_on_unchanged():
    """What the router does with a dependency's error: the same code and message reach its caller,
    with the domain errors' details rebuilt (RetryInfo here)."""
    from services.common.errors import DownstreamError
    from services.common.grpc_status import from_rpc_error

    def received(status: grpc.Status) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
        )

    passed = from_rpc_error(received(to_grpc_status(DownstreamError("DEADLINE_EXCEEDED", "took too long"))))
    assert isinstance(passed, DownstreamError)
    again = to_grpc_status(passed)
    assert (again.code, again.details) == (grpc.StatusCode.DEADLINE_EXCEEDED, "took too long")
    refused = from_rpc_error(received(to_grpc_status(ResourceExhaustedError("full", 1.5))))
    assert isinstance(refused, ResourceExhaustedError) and refused.retry_after_s == 1.5
