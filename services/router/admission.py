"""Admission control: decide before any tokenization or prefill whether a request can be served.

Each priority class may use the cluster's capacity (running slots + queue places of the healthy
inference replicas) up to its own share, so low priority is shed first under pressure and high
priority keeps being admitted while any capacity is left.
"""

from __future__ import annotations

from meshserve.v1.generation_service_pb2 import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from services.common.errors import ResourceExhaustedError, UnavailableError

# share of capacity each class may fill (convert.py makes an unset priority NORMAL)
ADMIT_SHARE: dict[int, float] = {PRIORITY_LOW: 0.5, PRIORITY_NORMAL: 0.9, PRIORITY_HIGH: 1.0}


def admit(priority: int, load: int, capacity: int) -> None:
    """Raises if a request of `priority` must be refused when `load` of `capacity` is in use."""
    if capacity <= 0:
        raise UnavailableError("no inference replica is serving", retry_after_s=1.0)
    share = ADMIT_SHARE[priority]
    if load + 1 > share * capacity:
        # a short retry delay: slots free as fast as generations finish
        raise ResourceExhaustedError(
            f"the service is at capacity ({load} of {capacity} requests in flight); retry later", retry_after_s=0.5
        )
