"""The rollout policy (services/router/rollout.py): weights checked as a whole, the smooth weighted
round-robin's exact split, pins by header and tenant, and precise errors for unknown names."""

from __future__ import annotations

import collections
import itertools

import pytest

from services.common.errors import InvalidArgumentError, UnavailableError
from services.router.config import RouterConfig
from services.router.rollout import Rollout, parse_weights, pinned_version


def serving(*names: str):
    return lambda name: name in names


ALL = serving("blue", "green")


def split(rollout: Rollout, requests: int, is_serving=ALL) -> collections.Counter[str]:
    return collections.Counter(rollout.choose(None, "t", is_serving) for _ in range(requests))


def test_a_1000_request_split_is_exactly_the_weights_and_interleaved():
    rollout = Rollout(["blue", "green"], {"blue": 95, "green": 5})
    assert split(rollout, 1000) == {"blue": 950, "green": 50}
    # smooth: green's 5 in every 100 are spread out, never two in a row
    turns = [rollout.choose(None, "t", ALL) for _ in range(100)]
    assert not any(a == b == "green" for a, b in itertools.pairwise(turns))
    assert rollout.requests == {"blue": 1045, "green": 55}


def test_a_new_split_takes_effect_for_the_next_request():
    rollout = Rollout(["blue", "green"], {"blue": 95, "green": 5})
    split(rollout, 37)
    rollout.set_weights({"blue": 0, "green": 100})
    assert split(rollout, 10) == {"green": 10}
    rollout.set_weights({"blue": 50, "green": 50})
    assert split(rollout, 100) == {"blue": 50, "green": 50}


def test_rollback_sends_everything_to_the_stable_version_and_a_promotion_moves_it():
    rollout = Rollout(["blue", "green"], {"blue": 10, "green": 90})
    rollout.rollback()
    assert rollout.weights == {"blue": 100, "green": 0} and split(rollout, 20) == {"blue": 20}
    rollout.set_weights({"blue": 0, "green": 100}, stable="green")
    rollout.rollback()
    assert rollout.weights == {"blue": 0, "green": 100}


def test_without_weights_the_stable_version_takes_everything():
    assert Rollout(["blue", "green"]).weights == {"blue": 100, "green": 0}
    assert Rollout(["blue", "green"], stable="green").weights == {"blue": 0, "green": 100}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"blue": 95, "green": 4}, "the weights sum to 99"),
        ({"blue": 95, "green": 50}, "the weights sum to 145"),
        ({"blue": 100}, "missing: green"),
        ({"blue": 95, "green": 5, "purple": 0}, "unknown model version 'purple'; this router serves blue, green"),
        ({"blue": 200, "green": -100}, "a weight is 0..100"),
    ],
)
def test_bad_weights_are_refused_naming_the_field_and_change_nothing(weights, message):
    rollout = Rollout(["blue", "green"], {"blue": 95, "green": 5})
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        rollout.set_weights(weights)
    assert caught.value.field == "weights"
    assert rollout.weights == {"blue": 95, "green": 5}


def test_weights_text_is_parsed_strictly():
    assert parse_weights("blue=95, green=5") == {"blue": 95, "green": 5}
    for text, message in (
        ("blue=95,blue=5", "given twice"),
        ("blue=ninety", "whole percentage"),
        ("blue=9.5", "whole percentage"),
        ("blue=99999999999999999999,green=0", "a weight is 0..100"),
        ("blue=95,green=5,", "expected NAME=VALUE"),
        ("blue", "expected NAME=VALUE"),
        ("", "expected NAME=VALUE"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            parse_weights(text)


def test_a_header_pin_wins_over_the_tenant_pin_and_the_weights():
    rollout = Rollout(["blue", "green"], {"blue": 100, "green": 0}, tenant_versions={"beta": "green"})
    assert rollout.choose("green", "anyone", ALL) == "green"
    assert rollout.choose(None, "beta", ALL) == "green"
    assert rollout.choose("blue", "beta", ALL) == "blue"
    assert rollout.choose(None, "anyone", ALL) == "blue"


def test_a_pin_to_an_unknown_version_is_invalid_and_to_a_version_down_unavailable_naming_it():
    rollout = Rollout(["blue", "green"], {"blue": 100, "green": 0})
    with pytest.raises(InvalidArgumentError, match="unknown model version 'purple'") as caught:
        rollout.choose("purple", "t", ALL)
    assert caught.value.field == "x-meshserve-model-version"
    with pytest.raises(UnavailableError, match="'green' has no inference replica serving"):
        rollout.choose("green", "t", serving("blue"))  # no silent move to blue


def test_a_weighted_version_without_replicas_is_left_out_of_the_turn():
    rollout = Rollout(["blue", "green"], {"blue": 50, "green": 50})
    assert split(rollout, 10, serving("blue")) == {"blue": 10}
    with pytest.raises(UnavailableError, match="no inference replica of model version blue, green"):
        rollout.choose(None, "t", serving())


def test_the_pin_header_is_read_from_metadata():
    assert pinned_version([("x-meshserve-model-version", " green ")]) == "green"
    assert pinned_version([("x-meshserve-model-version", "")]) is None
    assert pinned_version([("x-other", "green")]) is None and pinned_version(None) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"model_versions": ("blue=a:1", "green=b:1"), "rollout_weights": "blue=90,green=5"}, "--rollout-weights: "),
        ({"model_versions": ("blue=a:1",), "stable_version": "green"}, "--stable-version: unknown model version"),
        ({"model_versions": ("blue=a:1",), "tenant_versions": ("t=green",)}, "--tenant-version: unknown"),
        ({"model_versions": ("Blue!=a:1",)}, "--model-version: 'Blue!' is not a version name"),
        ({"model_versions": ("blue",)}, "--model-version: expected NAME=VALUE"),
        ({"inference_targets": ("a:1",), "model_versions": ("blue=b:1",)}, "not both"),
        ({"inference_targets": ("a:1",), "rollout_weights": "blue=100"}, "need --model-version"),
    ],
)
def test_the_router_refuses_a_bad_rollout_at_start_up_naming_the_flag(flags, message):
    flags = {"inference_targets": (), **flags}
    with pytest.raises(ValueError, match=message):
        RouterConfig("127.0.0.1:1", **flags)


def test_several_targets_may_serve_one_version():
    config = RouterConfig(
        "t:1", (), model_versions=("blue=a:1", "green=b:1", "blue=c:1"), rollout_weights="blue=95,green=5"
    )
    assert config.version_targets() == {"blue": ("a:1", "c:1"), "green": ("b:1",)}
    assert config.rollout().weights == {"blue": 95, "green": 5}
    assert RouterConfig("t:1", ()).version_targets() == {"": ("127.0.0.1:50053",)}
