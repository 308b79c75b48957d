"""Two model versions side by side in a real mesh (`meshserve up --model-version blue=int8 --model-version
green=int8`): 1,000 bounded requests split by the weights, a header pins a request to its version, `meshserve
rollout set` and `rollback` change the split at once while running streams finish untouched, bad weights and
unknown versions are refused in one sentence, and the admin API is not reachable through Envoy."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from meshserve.admin.v1 import rollout_service_pb2 as admin_pb
from meshserve.admin.v1 import rollout_service_pb2_grpc as admin_grpc
from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import REPO, wait_until
from tests.e2e.conftest import launch_mesh, metric_value

HEADER = "x-meshserve-model-version"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def versions(model_dir, otlp_receiver):
    """blue on inference-0, green on inference-1 (the same weights under two names: the model is small);
    the result cache off, so every request reaches a replica."""
    up = ["--model-version=blue=int8", "--model-version=green=int8", "--rollout-weights=blue=95,green=5"]
    with launch_mesh(
        otlp_receiver, inference_args=["--num-slots=8"], router_args=["--result-cache-mb=0"], up_args=up
    ) as mesh:
        yield mesh


def admin_target(mesh) -> str:
    return f"127.0.0.1:{mesh.router_port + 10}"


def bounded(prompt: str = "Say a word.", max_tokens: int = 1, min_tokens: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        no_cache=True,
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens),
    )


def served_by(stub, request=None, metadata=()) -> str:
    return list(stub.Generate(request or bounded(), metadata=metadata, timeout=60))[-1].complete.model_version


def replica_requests(mesh, replica: str, version: str) -> float:
    """Requests of max_tokens 1 that `replica` served as `version`: its generated tokens under that label."""
    return metric_value(mesh.metrics(replica), "meshserve_generation_tokens_total", model_version=version)


def rollout(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "rollout", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_1000_bounded_requests_split_by_the_weights(versions):
    mesh = versions
    before = {v: replica_requests(mesh, r, v) for r, v in (("inference-0", "blue"), ("inference-1", "green"))}
    with grpc.insecure_channel(mesh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with ThreadPoolExecutor(8) as pool:
            answered = list(pool.map(lambda _: served_by(stub), range(1000)))
    assert answered.count("blue") + answered.count("green") == 1000
    assert abs(answered.count("green") / 1000 - 0.05) <= 0.03, answered.count("green")
    # the replicas agree: each counted its own version's requests, under its version's label
    after = {v: replica_requests(mesh, r, v) for r, v in (("inference-0", "blue"), ("inference-1", "green"))}
    assert after["blue"] - before["blue"] == answered.count("blue")
    assert after["green"] - before["green"] == answered.count("green")
    router = mesh.metrics("router")
    assert metric_value(router, "meshserve_requests_total", model_version="green", code="OK") >= answered.count("green")
    assert metric_value(router, "meshserve_router_inference_replicas_serving", model_version="green") == 1


def test_a_header_pins_a_request_to_its_version_and_an_unknown_one_is_refused(versions):
    mesh = versions
    before = replica_requests(mesh, "inference-1", "green")
    with grpc.insecure_channel(mesh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert {served_by(stub, metadata=((HEADER, "green"),)) for _ in range(20)} == {"green"}
        for hostile in ("purple", "GREEN", "../blue", "x" * 2000):
            with pytest.raises(grpc.RpcError) as caught:
                served_by(stub, metadata=((HEADER, hostile),))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, hostile
            assert HEADER in caught.value.details() and "blue, green" in caught.value.details()
        assert served_by(stub) in ("blue", "green")  # the service is fine afterwards
    assert replica_requests(mesh, "inference-1", "green") - before == 20
    # the OpenAI-compatible API through Envoy passes the pin on too
    assert openai_completion(mesh, "green")[0] == 200
    assert replica_requests(mesh, "inference-1", "green") - before == 21
    status, body = openai_completion(mesh, "purple")
    assert status == 400 and HEADER in body["error"]["message"] + str(body["error"].get("param")), body


def test_the_spans_of_a_request_name_its_version(versions):
    """The router's GenAI span and the replica's Generate span carry meshserve.model.version."""
    mesh = versions
    with grpc.insecure_channel(mesh.target) as channel:
        request = bounded()
        request.request_id = "rollout-span-1"
        served_by(pb_grpc.GenerationServiceStub(channel), request, ((HEADER, "green"),))

    def versions_by_service() -> dict[str, str]:
        found = {}
        for service, span in list(mesh.receiver.spans):
            attributes = {kv.key: kv.value.string_value for kv in span.attributes}
            if attributes.get("meshserve.request_id") == "rollout-span-1" and "meshserve.model.version" in attributes:
                found[service] = attributes["meshserve.model.version"]
        return found

    wait_until(lambda: len(versions_by_service()) == 2, 15, "the router's and the replica's spans arrive")
    assert versions_by_service() == {"meshserve-router": "green", "meshserve-inference": "green"}


def openai_completion(mesh, version: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{mesh.port}/v1/completions",
        method="POST",
        data=json.dumps({"model": MODEL, "prompt": "Say a word.", "max_tokens": 1, "temperature": 0}).encode(),
        headers={"content-type": "application/json", HEADER: version},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_set_and_rollback_under_8_streams_lose_none_and_steer_new_requests(versions):
    mesh = versions
    admin = admin_target(mesh)
    with grpc.insecure_channel(mesh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first_chunk = threading.Barrier(9, timeout=120)
        results: list[tuple[str, int, int, str]] = []

        def stream(i: int) -> None:
            text, tokens = [], 0
            for response in stub.Generate(bounded(f"Tell story {i}.", 48, 48), timeout=300):
                if response.HasField("chunk"):
                    text.append(response.chunk.text)
                    if tokens == 0:
                        first_chunk.wait()
                    tokens += len(response.chunk.token_ids)
                else:
                    c = response.complete
                    results.append(("".join(text), tokens, c.completion_tokens, c.model_version))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        first_chunk.wait()  # all 8 are streaming
        changed = rollout("set", "--weights", "blue=0,green=100", "--router", admin)
        assert changed.returncode == 0, changed.stderr
        assert "blue=0" in changed.stdout and "green=100" in changed.stdout
        assert {served_by(stub) for _ in range(10)} == {"green"}
        back = rollout("rollback", "--router", admin)
        assert back.returncode == 0, back.stderr
        assert {served_by(stub) for _ in range(10)} == {"blue"}
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 8, "a stream was lost"
        for text, tokens, completion_tokens, version in results:
            assert tokens == completion_tokens == 48 and text and version in ("blue", "green")
    status = rollout("status", "--router", admin)
    assert status.returncode == 0 and "blue=100" in status.stdout and "stable blue" in status.stdout


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ("blue=90,green=5", "weights: the weights sum to 95"),
        ("blue=50,purple=50", "weights: unknown model version 'purple'; this router serves blue, green"),
        ("blue=100", "weights: give every version a weight"),
        ("blue=half,green=50", "--weights: the weight of 'blue' must be a whole percentage"),
    ],
)
def test_bad_weights_from_the_cli_are_one_sentence_and_change_nothing(versions, weights, says):
    admin = admin_target(versions)
    before = rollout("status", "--router", admin).stdout.split(" requests")[0]
    refused = rollout("set", "--weights", weights, "--router", admin)
    assert refused.returncode != 0
    assert says in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert rollout("status", "--router", admin).stdout.split(" requests")[0] == before


def test_the_admin_api_is_not_reachable_through_the_public_endpoint(versions):
    mesh = versions
    everything_to_green = admin_pb.SetWeightsRequest(
        weights=[admin_pb.VersionWeight(name="blue", weight=0), admin_pb.VersionWeight(name="green", weight=100)]
    )
    with grpc.insecure_channel(mesh.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            admin_grpc.RolloutServiceStub(channel).SetWeights(everything_to_green, timeout=10)
        assert caught.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
    with grpc.insecure_channel(admin_target(mesh)) as channel:
        state = admin_grpc.RolloutServiceStub(channel).GetRollout(admin_pb.GetRolloutRequest(), timeout=10).rollout
    assert {v.name: v.weight for v in state.versions}["green"] != 100
