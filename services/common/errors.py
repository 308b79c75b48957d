"""Domain errors shared by every service core. They carry what a client needs (the field, retry
advice) and no gRPC types; `grpc_status.py` turns them into gRPC statuses at the edge."""

from __future__ import annotations


class ServingError(Exception):
    """Base of errors that are the client's to handle, not bugs."""


class InvalidArgumentError(ServingError):
    """A request field is invalid; `field` is its path, e.g. `sampling.top_p`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ResourceExhaustedError(ServingError):
    """The server is at capacity; retrying after `retry_after_s` may succeed."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(ServingError):
    """The service is starting, draining or lost a dependency."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AbortedError(ServingError):
    """The client (or its tenant, through Abort) ended the request: CANCELLED, never continued elsewhere."""


class InternalError(ServingError):
    """A fault that ended one request (a bug, or the request hit one): INTERNAL to its client alone."""


class DownstreamError(ServingError):
    """A dependency ended a call with another status (e.g. DEADLINE_EXCEEDED), passed on unchanged;
    `code` is the status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
