"""Degrading under pressure, as the deployment guides describe it: a lighter fallback tier of the model
for requests the main tier cannot meet, and shedding LOW requests while utilisation stays high.

* A LOW or NORMAL request goes to the fallback tier when every main replica is at its admission limit,
  or when its deadline is shorter than the main tier's current queue estimate. HIGH is never degraded:
  it queues on the main tier or is refused there.
* While the main tier's utilisation has stayed at or above `threshold` for `window_s`, LOW requests are
  refused at once (RESOURCE_EXHAUSTED with RetryInfo) until it falls below the threshold again.

Pure decisions over numbers the router already has; no gRPC here.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.v1.generation_service_pb2 import PRIORITY_HIGH, PRIORITY_LOW
from services.common.errors import ResourceExhaustedError, UnavailableError
from services.router.admission import admit


@dataclass(frozen=True)
class TierLoad:
    """One tier as the router sees it: requests on it, running slots + queue places, running slots."""

    load: int
    capacity: int
    max_running: int


@dataclass(frozen=True)
class TierChoice:
    fallback: bool
    reason: str = ""
    """Why the fallback tier serves it: "main_at_capacity" or "deadline"."""


def queue_wait_estimate(main: TierLoad, mean_service_s: float) -> float:
    """Seconds a new request would wait for a main-tier slot: none while a slot is free, else the
    requests ahead of it over the slots, times how long a request holds a slot."""
    if main.max_running <= 0:
        return float("inf")
    ahead = main.load - main.max_running + 1
    return 0.0 if ahead <= 0 else ahead / main.max_running * mean_service_s


def choose_tier(
    priority: int, main: TierLoad, fallback: TierLoad | None, remaining_s: float | None, mean_service_s: float
) -> TierChoice:
    """Where a request of `priority` runs, or the error that refuses it (RESOURCE_EXHAUSTED with
    RetryInfo when both tiers are full, UNAVAILABLE when none serves)."""
    try:
        admit(priority, main.load, main.capacity)
    except (ResourceExhaustedError, UnavailableError):
        if priority == PRIORITY_HIGH or fallback is None or fallback.capacity <= 0:
            raise
        admit(priority, fallback.load, fallback.capacity)  # raises when the fallback is full too
        return TierChoice(True, "main_at_capacity")
    if (
        priority != PRIORITY_HIGH
        and fallback is not None
        and remaining_s is not None
        and remaining_s < queue_wait_estimate(main, mean_service_s)
    ):
        try:
            admit(priority, fallback.load, fallback.capacity)
            return TierChoice(True, "deadline")
        except (ResourceExhaustedError, UnavailableError):
            pass  # the main tier's queue is the better chance
    return TierChoice(False)


class PressureMonitor:
    """Sustained high utilisation: `shedding` once utilisation stayed >= `threshold` for `window_s`,
    until a sample falls below it."""

    def __init__(self, threshold: float, window_s: float) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._above_since: float | None = None
        self.shedding = False

    def observe(self, utilisation: float, now: float) -> None:
        if utilisation < self.threshold:
            self._above_since, self.shedding = None, False
            return
        if self._above_since is None:
            self._above_since = now
        self.shedding = now - self._above_since >= self.window_s

    def check(self, priority: int) -> None:
        """Refuses a LOW request while shedding."""
        if self.shedding and priority == PRIORITY_LOW:
            raise ResourceExhaustedError(
                f"low-priority requests are shed while utilisation stays above {self.threshold:.0%}; retry later",
                retry_after_s=self.window_s / 4 or 1.0,
            )


class ServiceTime:
    """Mean time a request holds a main-tier slot (exponentially weighted over finished requests)."""

    def __init__(self, initial_s: float = 2.0, weight: float = 0.1) -> None:
        self.mean_s = initial_s
        self.weight = weight

    def observe(self, seconds: float) -> None:
        self.mean_s += self.weight * (seconds - self.mean_s)
