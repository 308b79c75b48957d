"""`meshserve up --dev-tls --auth jwt` as an operator runs it: the launcher's own wiring of TLS and JWT in
front of gRPC and the OpenAI API, with a token from `meshserve mint-token` (the CLI, not the library).
test_public_endpoint.py renders the same options into an Envoy of its own; this checks that `up` does."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import REPO
from tests.e2e.conftest import Mesh, launch_mesh

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class SecureMesh:
    mesh: Mesh
    ca: Path
    credentials: Path

    @property
    def target(self) -> str:
        return f"localhost:{self.mesh.port}"

    def mint_token(self, tenant: str) -> str:
        command = [sys.executable, "-m", "services.cli.main", "mint-token", "--tenant", tenant]
        command += ["--credentials-dir", str(self.credentials)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
        return result.stdout.strip()


@pytest.fixture(scope="module")
def secure(model_dir, otlp_receiver, tmp_path_factory) -> Iterator[SecureMesh]:
    credentials = tmp_path_factory.mktemp("credentials")
    up_args = ["--dev-tls", "--auth", "jwt", "--credentials-dir", str(credentials)]
    with launch_mesh(otlp_receiver, inference_args=["--num-slots=2"], up_args=up_args) as mesh:
        ca = mesh.run_dir / "tls" / "ca.pem"
        assert f"clients trust {ca}" in Path(mesh.log_path).read_text(), "up does not say which CA to trust"
        yield SecureMesh(mesh, ca, credentials)


def generate(secure: SecureMesh, metadata=()) -> str:
    request = pb.GenerateRequest(
        prompt="The capital of France is", sampling=pb.SamplingParameters(max_tokens=8, temperature=0.0)
    )
    credentials = grpc.ssl_channel_credentials(secure.ca.read_bytes())
    with grpc.secure_channel(secure.target, credentials) as channel:
        responses = pb_grpc.GenerationServiceStub(channel).Generate(request, metadata=metadata, timeout=60)
        return "".join(r.chunk.text for r in responses)


def test_grpc_needs_a_minted_token_over_tls_verified_by_the_dev_ca(secure):
    with pytest.raises(grpc.RpcError) as anonymous:
        generate(secure)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as forged:
        generate(secure, (("authorization", "Bearer not.a.token"),))
    assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = secure.mint_token("tenant-secure-up")
    assert generate(secure, (("authorization", f"Bearer {token}"),)).strip()


def test_plaintext_is_not_served(secure):
    with grpc.insecure_channel(secure.target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_openai_api_sits_behind_the_same_tls_and_jwt(secure):
    def client(api_key: str) -> openai.OpenAI:
        trust = ssl.create_default_context(cafile=str(secure.ca))
        http = openai.DefaultHttpxClient(verify=trust, timeout=60)
        return openai.OpenAI(base_url=f"https://{secure.target}/v1", api_key=api_key, http_client=http, max_retries=0)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with pytest.raises(openai.AuthenticationError):
        client("not-a-token").chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    answer = client(secure.mint_token("tenant-secure-up-openai")).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    assert "Paris" in answer.choices[0].message.content
