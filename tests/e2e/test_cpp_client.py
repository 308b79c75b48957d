"""The C++ client (clients/cpp), generated from protos/ with Debian's protoc and grpc_cpp_plugin and
compiled here, against the live mesh through Envoy: a streamed greedy chat answer, and a refused call's
status code and field violation read from the google.rpc status details."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CLIENT_DIR = REPO / "clients" / "cpp"


@pytest.fixture(scope="module")
def cpp_client() -> Path:
    """Built with Debian's protoc and gRPC C++, which make test installs (clients/cpp/install.sh)."""
    built = subprocess.run(
        ["make", "-C", str(CLIENT_DIR), "-j2", f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=900
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return CLIENT_DIR / "build" / "meshserve_client"


def run(client: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(client), *args], capture_output=True, text=True, timeout=120)


def test_cpp_client_streams_a_greedy_chat_answer_through_envoy(cpp_client, mesh):
    result = run(
        cpp_client,
        "--target",
        mesh.target,
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "What is the capital of France?",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    summary = re.search(r"\[(stop|length): (\d+) prompt \+ (\d+) completion tokens in (\d+) chunks", result.stderr)
    assert summary, result.stderr
    assert int(summary[2]) > 5 and int(summary[4]) >= 3  # streamed in several chunks, not one


def test_cpp_client_prints_a_refused_calls_code_and_field_violation(cpp_client, mesh):
    result = run(cpp_client, "--target", mesh.target, "--chat", "--temperature", "-1", "Hi")
    assert result.returncode == 1 and result.stdout == ""
    assert "error: INVALID_ARGUMENT (3):" in result.stderr
    assert re.search(r"^field violation: sampling\.temperature: .*got -1", result.stderr, re.MULTILINE), result.stderr
