"""Degradation decisions without a mesh: which tier serves a request, and when LOW is shed."""

from __future__ import annotations

import pytest

from meshserve.v1.generation_service_pb2 import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from services.common.errors import ResourceExhaustedError
from services.router.tiers import PressureMonitor, ServiceTime, TierLoad, choose_tier, queue_wait_estimate

FULL = TierLoad(load=8, capacity=8, max_running=8)
IDLE = TierLoad(load=0, capacity=8, max_running=8)


def test_the_main_tier_serves_while_it_has_room():
    assert not choose_tier(PRIORITY_NORMAL, IDLE, IDLE, None, 1.0).fallback


@pytest.mark.parametrize("priority", [PRIORITY_LOW, PRIORITY_NORMAL])
def test_low_and_normal_go_to_the_fallback_when_the_main_tier_is_full(priority):
    choice = choose_tier(priority, FULL, IDLE, None, 1.0)
    assert choice.fallback and choice.reason == "main_at_capacity"


def test_high_is_never_degraded_it_is_refused_on_the_main_tier():
    with pytest.raises(ResourceExhaustedError):
        choose_tier(PRIORITY_HIGH, FULL, IDLE, None, 1.0)
    assert not choose_tier(PRIORITY_HIGH, TierLoad(7, 8, 8), IDLE, 0.001, 10.0).fallback


def test_both_tiers_full_is_resource_exhausted_and_no_fallback_tier_means_the_old_refusal():
    with pytest.raises(ResourceExhaustedError):
        choose_tier(PRIORITY_NORMAL, FULL, FULL, None, 1.0)
    with pytest.raises(ResourceExhaustedError):
        choose_tier(PRIORITY_NORMAL, FULL, None, None, 1.0)


def test_a_deadline_shorter_than_the_main_queue_goes_to_the_fallback():
    queued = TierLoad(load=6, capacity=16, max_running=4)  # 3 ahead on 4 slots
    assert queue_wait_estimate(queued, 2.0) == pytest.approx(1.5)
    assert queue_wait_estimate(IDLE, 2.0) == 0.0
    choice = choose_tier(PRIORITY_NORMAL, queued, IDLE, 1.0, 2.0)
    assert choice.fallback and choice.reason == "deadline"
    assert not choose_tier(PRIORITY_NORMAL, queued, IDLE, 2.0, 2.0).fallback
    assert not choose_tier(PRIORITY_NORMAL, queued, IDLE, None, 2.0).fallback


def test_low_is_shed_only_after_utilisation_stayed_high_for_the_window():
    monitor = PressureMonitor(threshold=0.9, window_s=60)
    monitor.observe(0.95, now=0)
    monitor.observe(0.95, now=59)
    monitor.check(PRIORITY_LOW)  # not yet
    monitor.observe(1.0, now=60)
    assert monitor.shedding
    with pytest.raises(ResourceExhaustedError) as caught:
        monitor.check(PRIORITY_LOW)
    assert caught.value.retry_after_s > 0
    monitor.check(PRIORITY_NORMAL)
    monitor.observe(0.5, now=61)
    assert not monitor.shedding
    monitor.observe(0.95, now=62)
    assert not monitor.shedding  # the window starts again


def test_service_time_follows_finished_requests():
    mean = ServiceTime(initial_s=2.0, weight=0.5)
    mean.observe(4.0)
    assert mean.mean_s == 3.0
