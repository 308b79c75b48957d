"""Model versions side by side: which version a new request goes to (a rollout's policy).

A router may serve several named versions of the model at once (`--model-version NAME=HOST:PORT`,
e.g. two precisions, or two prepared directories), each its own set of replicas. A new request is

1. pinned, when it names a version: the `x-meshserve-model-version` header, else its tenant's version
   (`--tenant-version TENANT=NAME`, for A/B by tenant). A pin is kept or refused: pinned to a version with
   no serving replica it gets UNAVAILABLE naming the version, never a silent move to another;
2. otherwise split by weight (percentages summing to 100) with nginx's smooth weighted round-robin:
   every request adds each version's weight to its credit, the version with the most credit gets the
   request and pays back the total. Over any 100 requests of a router each version gets its weight,
   exactly, and the versions interleave instead of coming in runs. A version with no serving replica
   is left out of the turn (its weight shared by the others) until it serves again.

Weights change at once (`SetWeights`, `Rollback`), for new requests only: a running stream holds its
replica to its end. Nothing is persisted: a restarted router starts from its flags.

Pure decisions over names and numbers; no gRPC here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from services.common.contract import MODEL_VERSION_HEADER, check_version_name
from services.common.errors import InvalidArgumentError, UnavailableError

VERSION_HEADER = MODEL_VERSION_HEADER
"""Request metadata that pins a request to a version (Envoy passes it through)."""


def parse_assignment(text: str, field: str) -> tuple[str, str]:
    """("key", "value") of "key=value"; InvalidArgumentError naming `field` otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise InvalidArgumentError(field, f"expected NAME=VALUE, got {text[:80]!r}")
    return key.strip(), value.strip()


def parse_weights(text: str, field: str = "weights") -> dict[str, int]:
    """ "blue=95,green=5" as {"blue": 95, "green": 5}; not yet checked against the served versions."""
    weights: dict[str, int] = {}
    for item in text.split(","):
        name, value = parse_assignment(item, field)
        if name in weights:
            raise InvalidArgumentError(field, f"version {name!r} is given twice")
        if not value.isdigit():
            raise InvalidArgumentError(field, f"the weight of {name!r} must be a whole percentage, got {value[:20]!r}")
        if int(value) > 100:
            raise InvalidArgumentError(field, f"the weight of {name!r} is {value[:20]}; a weight is 0..100")
        weights[name] = int(value)
    return weights


def pinned_version(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The version a request's metadata pins it to (the first x-meshserve-model-version), or None."""
    for key, value in metadata or ():
        if key == VERSION_HEADER:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            return text.strip() or None
    return None


def format_weights(weights: Mapping[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights.items())


class Rollout:
    """The versions, their weights, the stable version, the tenants' pins, and the weighted turn.

    `versions` is the order the router was given them (the order ties are broken in)."""

    def __init__(
        self,
        versions: Iterable[str],
        weights: Mapping[str, int] | None = None,
        stable: str | None = None,
        tenant_versions: Mapping[str, str] | None = None,
    ) -> None:
        self.versions: tuple[str, ...] = tuple(versions)
        if not self.versions:
            raise ValueError("a rollout needs at least one version")
        if len(set(self.versions)) != len(self.versions):
            raise InvalidArgumentError("model_version", "a version name is given twice")
        self.stable = self.check_known(stable, "stable_version") if stable else self.versions[0]
        self.tenant_versions = {
            tenant: self.check_known(name, f"tenant_version[{tenant}]")
            for tenant, name in (tenant_versions or {}).items()
        }
        self.weights: dict[str, int] = {}
        if weights is None:
            weights = {name: 100 if name == self.stable else 0 for name in self.versions}
        self.set_weights(weights)
        self.requests = dict.fromkeys(self.versions, 0)
        """Requests sent to each version since the router started."""

    def check_known(self, name: str, field: str) -> str:
        """`name` when it is a served version; InvalidArgumentError naming `field` and the versions otherwise."""
        if name not in self.versions:
            served = ", ".join(self.versions)
            raise InvalidArgumentError(field, f"unknown model version {name[:80]!r}; this router serves {served}")
        return name

    def set_weights(self, weights: Mapping[str, int], stable: str | None = None) -> None:
        """Replaces every weight at once (and the stable version, when given), or changes nothing and
        raises InvalidArgumentError naming the field: an unknown version, one left out, a weight outside
        0..100, weights that do not sum to 100."""
        for name in weights:
            self.check_known(name, "weights")
        missing = [name for name in self.versions if name not in weights]
        if missing:
            raise InvalidArgumentError(
                "weights", f"give every version a weight (0 takes it out of the split); missing: {', '.join(missing)}"
            )
        for name, weight in weights.items():
            if not 0 <= weight <= 100:
                raise InvalidArgumentError("weights", f"the weight of {name!r} is {weight}; a weight is 0..100")
        total = sum(weights.values())
        if total != 100:
            raise InvalidArgumentError(
                "weights", f"the weights sum to {total} ({format_weights(weights)}); they must sum to 100"
            )
        if stable is not None:
            self.stable = self.check_known(stable, "stable_version")
        self.weights = {name: weights[name] for name in self.versions}
        # a new split starts a new turn: credit earned under the old weights would skew the first requests
        self._credit = dict.fromkeys(self.versions, 0)

    def rollback(self) -> None:
        """All new requests to the stable version."""
        self.set_weights({name: 100 if name == self.stable else 0 for name in self.versions})

    def choose(self, pinned: str | None, tenant: str, serving: Callable[[str], bool]) -> str:
        """The version a new request goes to: its pin (`pinned`, the header's value, else its tenant's
        version), or the weighted turn among the versions `serving` says have a replica serving.
        InvalidArgumentError for a pin to an unknown version, UnavailableError naming the version for a
        pin to one that does not serve, or when no weighted version serves."""
        if pinned is not None:
            name = self.check_known(pinned, VERSION_HEADER)
        else:
            name = self.tenant_versions.get(tenant) or self._turn(serving)
        if not serving(name):
            raise UnavailableError(f"model version {name!r} has no inference replica serving", retry_after_s=1.0)
        self.requests[name] += 1
        return name

    def _turn(self, serving: Callable[[str], bool]) -> str:
        """Smooth weighted round-robin (nginx) over the versions with weight that serve."""
        candidates = [name for name in self.versions if self.weights[name] > 0 and serving(name)]
        if not candidates:
            weighted = ", ".join(name for name in self.versions if self.weights[name] > 0)
            raise UnavailableError(f"no inference replica of model version {weighted} is serving", retry_after_s=1.0)
        total = 0
        for name in candidates:
            self._credit[name] += self.weights[name]
            total += self.weights[name]
        best = max(candidates, key=lambda name: self._credit[name])  # max keeps the first of equals
        self._credit[best] -= total
        return best


@dataclass(frozen=True)
class VersionTarget:
    """One `--model-version NAME=HOST:PORT`."""

    name: str
    target: str


def parse_version_targets(specs: Iterable[str]) -> list[VersionTarget]:
    """The router's `--model-version` flags; several flags may name one version (several targets)."""
    parsed = []
    for spec in specs:
        name, target = parse_assignment(spec, "--model-version")
        parsed.append(VersionTarget(check_version_name(name, "--model-version"), target))
    return parsed
