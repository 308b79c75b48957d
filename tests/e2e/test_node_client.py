"""A client in another language: clients/node/client.js (@grpc/grpc-js, proto loaded at run time) streams a
generation through an Envoy of our own with TLS and JWT auth, in front of the mesh's router."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import secured_envoy

CLIENT = REPO / "clients" / "node" / "client.js"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    assert executable, "Node.js is needed for clients/node (apt-get install nodejs)"
    assert (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "clients/node has no node_modules: run `npm ci --prefix clients/node` (make install does)"
    )
    return executable


@pytest.fixture(scope="module")
def secured(mesh, tmp_path_factory) -> Iterator[dict]:
    with secured_envoy(mesh, tmp_path_factory.mktemp("node-client"), tls=True) as envoy:
        yield {"target": envoy.target, "ca": envoy.ca, "token": envoy.token("node")}


def run_client(node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(CLIENT), *args], capture_output=True, text=True, timeout=60, cwd=CLIENT.parent)


def test_node_client_streams_a_generation_through_envoy(node, secured):
    result = run_client(
        node,
        "--target",
        secured["target"],
        "--ca",
        str(secured["ca"]),
        "--token",
        secured["token"],
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
        "The capital of France is",
    )
    assert result.returncode == 0, result.stderr
    responses = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [r["response"] for r in responses]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"} and len(kinds) >= 3, "streamed in chunks"
    assert "Paris" in "".join(r["chunk"]["text"] for r in responses[:-1])
    complete = responses[-1]["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH"
    assert complete["completion_tokens"] == 6

    # the plain text mode prints the text and a summary
    result = run_client(
        node,
        "--target",
        secured["target"],
        "--ca",
        str(secured["ca"]),
        "--token",
        secured["token"],
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "The capital of France is",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "FINISH_REASON_LENGTH" in result.stderr


def test_node_client_reports_the_status_of_a_refused_call(node, secured):
    result = run_client(node, "--target", secured["target"], "--ca", str(secured["ca"]), "--max-tokens", "2", "Hi")
    assert result.returncode == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "error: UNAUTHENTICATED: Jwt is missing" in result.stderr
