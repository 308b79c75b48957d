"""tests/unit is the hermetic tier (`make test-fast`): no network, no prepared model, no external binary.
A test that needs the model or a binary (Envoy, buf, redis-server) belongs in tests/integration."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir():
    pytest.fail("tests/unit is hermetic: a test that needs the prepared model belongs in tests/integration")
