"""The production path run for real: the CPU, Prometheus and Redis images built from deploy/docker, and
compose's envoy, openai, router, tokenizer, inference, redis and prometheus served, scraped, traced, stopped and
removed. Chat through Envoy both as gRPC and with the `openai` SDK; a repeated greedy request is answered from
the routers' result cache, whose shared tier is the Redis container.

The commands are deploy/README.md's own (the container test section lists them):

    bash deploy/tools/docker.sh base        # Docker engine (Debian's docker.io, started when none runs) and the
                                            # debootstrap-made base image, once per machine
    docker build -f deploy/docker/Dockerfile -t TAG .                 # layers cached between runs
    docker build -f deploy/docker/Dockerfile.prometheus -t TAG .
    docker build -f deploy/docker/Dockerfile.redis -t TAG .
    docker-compose -p PROJECT -f deploy/compose/compose.yaml -f tests/deploy/compose.test.yaml \\
        up -d --no-build envoy prometheus
    ... docker-compose ... stop; docker-compose ... down -v

Jaeger's image cannot be pulled here: tests/deploy/compose.test.yaml replaces it with an OTLP receiver
(tests/deploy/otlp_sink.py) under the same name; Grafana is not started (its provisioning keeps its static
checks). Every run has its own compose project and free host ports, so runs on one machine cannot collide;
image tags are content hashes of the build context, so two checkouts never overwrite each other's image.

Docker is part of `make test`: a machine where it cannot work fails here. MESHSERVE_SKIP_CONTAINERS=1 skips
this module for quick local runs (never under CI=true).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.deploy.conftest import DEPLOY, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SKIP_VARIABLE = "MESHSERVE_SKIP_CONTAINERS"
COMPOSE_FILES = (DEPLOY / "compose" / "compose.yaml", REPO / "tests" / "deploy" / "compose.test.yaml")
MESHSERVE_SERVICES = ("envoy", "router", "tokenizer", "inference")
TRACED_SERVICES = {f"meshserve-{name}" for name in MESHSERVE_SERVICES}
SCRAPED_JOBS = TRACED_SERVICES | {"meshserve-openai"}  # deploy/prometheus/prometheus.yml's jobs
PROJECT_PREFIX = "meshserve-ct-"
LOGS = REPO / ".run" / "containers"
MAX_IMAGE_BYTES = 1_000_000_000  # the CPU image measures ~740 MB; torch or build tools would blow this


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else Debian's docker-compose 1.29: same arguments."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor docker-compose: run `bash deploy/tools/docker.sh engine`")


def content_tag(repository: str, dockerfile: Path, base_id: str) -> str:
    """repository:ct-<hash of the build context, the Dockerfile and the base image>."""
    from tests.deploy.test_dockerfiles import build_context

    digest = hashlib.sha256(base_id.encode() + dockerfile.read_bytes())
    for relative in build_context():
        digest.update(relative.encode() + b"\0" + (REPO / relative).read_bytes())
    return f"{repository}:ct-{digest.hexdigest()[:12]}"


def build(dockerfile: Path, tag: str, timings: dict) -> None:
    """`docker build` unless an image with this content tag exists (then every layer would be cached anyway)."""
    if docker("image", "inspect", tag, check=False).returncode == 0:
        timings[f"build {dockerfile.name}"] = "already built"
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"build-{tag.replace(':', '-')}.log"
    started = time.monotonic()
    with log.open("w") as out:
        # the classic builder: BuildKit needs the buildx plugin with newer clients, and nothing here needs it
        result = subprocess.run(
            ["docker", "build", "-f", str(dockerfile.relative_to(REPO)), "-t", tag, "."],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1500,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
    if result.returncode != 0:
        pytest.fail(f"docker build -f {dockerfile.name} failed:\n{log.read_text()[-4000:]}")
    timings[f"build {dockerfile.name}"] = round(time.monotonic() - started, 1)


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    image: str
    compose: list[str]
    timings: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['MESHSERVE_PORT']}"

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        result = subprocess.run(
            [*self.compose, "-p", self.project, *files, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}\n{self.logs()[-6000:]}"
            )
        return result

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False).stdout

    def container(self, service: str) -> str:
        ids = self.run("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def http_json(self, port_variable: str, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port_variable]}{path}", timeout=10) as response:
            return json.loads(response.read())

    def prometheus(self, query: str) -> list[dict]:
        reply = self.http_json("PROMETHEUS_PORT", "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]


def remove_old_images(keep: set[str], max_age_s: float = 86400) -> None:
    """Content tags of earlier runs, and the build stages their builds left untagged (labelled
    org.meshserve.stage), once a day old: otherwise every code change would leave ~200 MB behind. Images that
    a container still uses stay (docker refuses), and so does the layer cache of anything built since."""
    rows = docker(
        "images", "--filter", "reference=meshserve*:ct-*", "--format", "{{.Repository}}:{{.Tag}}\t{{.CreatedAt}}"
    ).stdout.splitlines()
    for row in rows:
        tag, created = row.split("\t")
        age = time.time() - datetime.strptime(created[:25], "%Y-%m-%d %H:%M:%S %z").timestamp()  # "... +0000 UTC"
        if tag not in keep and age > max_age_s:
            docker("rmi", tag, check=False)
    docker(
        "image",
        "prune",
        "-f",
        "--filter",
        "label=org.meshserve.stage",
        "--filter",
        f"until={int(max_age_s)}s",
        check=False,
    )


def remove_abandoned_projects(compose: list[str]) -> None:
    """Projects of earlier runs whose test process is gone (killed with its machine session, say)."""
    listed = docker(
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        '{{.Label "com.docker.compose.project"}}',
    ).stdout.split()
    for project in sorted(set(listed)):
        match = re.fullmatch(re.escape(PROJECT_PREFIX) + r"(\d+)-\w+", project)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
            env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "unused"}
            subprocess.run(
                [*compose, "-p", project, *files, "down", "-v", "-t", "5"],
                cwd=REPO,
                env=env,
                capture_output=True,
                timeout=120,
            )


def wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                request = health_pb2.HealthCheckRequest(service="meshserve.v1.GenerationService")
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"Envoy at {target} did not report SERVING in {timeout_s:g} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def stack():
    if os.environ.get(SKIP_VARIABLE) == "1" and os.environ.get("CI") != "true":
        pytest.skip(f"{SKIP_VARIABLE}=1: the container test (images, compose) is skipped")
    timings: dict = {}
    started = time.monotonic()
    engine = subprocess.run(
        ["bash", str(DEPLOY / "tools" / "docker.sh"), "base"], capture_output=True, text=True, timeout=900
    )
    if engine.returncode != 0:
        pytest.fail(f"no Docker engine or base image (deploy/tools/docker.sh base):\n{engine.stderr[-3000:]}")
    timings["engine and base image"] = round(time.monotonic() - started, 1)
    compose = compose_command()
    remove_abandoned_projects(compose)

    base_id = docker("image", "inspect", "-f", "{{.Id}}", "meshserve-base:bookworm").stdout.strip()
    image = content_tag("meshserve", DEPLOY / "docker" / "Dockerfile", base_id)
    prometheus = content_tag("meshserve-prometheus", DEPLOY / "docker" / "Dockerfile.prometheus", base_id)
    redis = content_tag("meshserve-redis", DEPLOY / "docker" / "Dockerfile.redis", base_id)
    build(DEPLOY / "docker" / "Dockerfile", image, timings)
    build(DEPLOY / "docker" / "Dockerfile.prometheus", prometheus, timings)
    build(DEPLOY / "docker" / "Dockerfile.redis", redis, timings)
    remove_old_images(keep={image, prometheus, redis})

    ports = {name: free_port() for name in ("MESHSERVE_PORT", "JAEGER_UI_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "MESHSERVE_IMAGE": image,
        "MESHSERVE_PROMETHEUS_IMAGE": prometheus,
        "MESHSERVE_REDIS_IMAGE": redis,
        "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
    }
    project = f"{PROJECT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    stack = Stack(project, env, ports, image, compose, timings)
    try:
        started = time.monotonic()
        # the dependencies (openai, router, tokenizer, inference, redis, jaeger) start first; compose waits for
        # their health
        stack.run("up", "-d", "--no-build", "envoy", "prometheus", timeout=600)
        wait_serving(stack.target, 180)
        timings["compose up until Envoy serves"] = round(time.monotonic() - started, 1)
        yield stack
    finally:
        LOGS.mkdir(parents=True, exist_ok=True)
        logs = stack.logs()
        if logs.count("\n") > 1:  # containers left (a failure before test_compose_down_leaves_nothing_behind)
            (LOGS / f"{project}.log").write_text(logs)
        stack.run("down", "-v", "--remove-orphans", "-t", "10", check=False)
        (LOGS / "timings.json").write_text(json.dumps(timings, indent=2))


def chat_request(text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0),
    )


def test_image_is_small_runs_as_non_root_and_carries_the_served_model(stack):
    size = int(docker("image", "inspect", "-f", "{{.Size}}", stack.image).stdout)
    stack.timings["image size (MB)"] = round(size / 1e6)
    assert size < MAX_IMAGE_BYTES, f"{stack.image} is {size / 1e6:.0f} MB"
    probe = (
        "import importlib.util as u, json, os, pathlib, shutil;"
        "m = [json.loads(p.read_text()) | {'dir': str(p.parent)}"
        " for p in pathlib.Path('/models').glob('*/*/manifest.json')];"
        "print(json.dumps({'uid': os.getuid(), 'models': m,"
        " 'absent': [n for n in ('torch', 'pytest', 'transformers') if u.find_spec(n) is None],"
        " 'tools': [t for t in ('gcc', 'cc', 'c++', 'make', 'protoc') if shutil.which(t)]}))"
    )
    report = json.loads(docker("run", "--rm", stack.image, "python", "-c", probe).stdout)
    assert report["uid"] == 10001
    assert report["absent"] == ["torch", "pytest", "transformers"], "test extras in the runtime image"
    assert report["tools"] == [], "build tools in the runtime image"
    [model] = report["models"]
    assert model["precision"] == "int8"  # serve-inference's default; compose passes no --precision


def test_image_carries_the_operator_library_and_it_loads(stack):
    """w8a8's operators (built in the image's ops stage) load into the image's own onnxruntime."""
    probe = (
        "import onnxruntime as ort; from services.inference.backends import ort_ops;"
        "ort.SessionOptions().register_custom_ops_library(str(ort_ops.library_path()));"
        "print(ort_ops.library_path())"
    )
    path = docker("run", "--rm", stack.image, "python", "-c", probe).stdout.strip()
    assert path.endswith("services/inference/backends/ort_ops/libmeshserve_ort_ops.so")


def test_greedy_chat_answers_paris_through_envoy(stack):
    with grpc.insecure_channel(stack.target) as channel:
        responses = list(
            pb_grpc.GenerationServiceStub(channel).Generate(
                chat_request("What is the capital of France?", 48), timeout=120
            )
        )
    assert "Paris" in "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    assert responses[-1].HasField("complete")


def test_one_trace_holds_the_spans_of_all_four_services(stack):
    trace_id = os.urandom(16).hex()
    traceparent = f"00-{trace_id}-{os.urandom(8).hex()}-01"
    with grpc.insecure_channel(stack.target) as channel:  # a prompt of its own: never a result-cache replay
        list(
            pb_grpc.GenerationServiceStub(channel).Generate(
                chat_request(f"Hi! I am {trace_id[:8]}.", 4), timeout=120, metadata=[("traceparent", traceparent)]
            )
        )
    deadline = time.monotonic() + 60  # the services' exporters send every 5 s
    while True:
        spans = [s for s in stack.http_json("JAEGER_UI_PORT", "/spans") if s["trace_id"] == trace_id]
        services = {s["service"] for s in spans}
        if services >= TRACED_SERVICES:
            break
        assert time.monotonic() < deadline, f"trace {trace_id} has spans of {services} only"
        time.sleep(1)
    names = {s["name"] for s in spans}
    assert {"tokenize", "prefill", "decode"} <= names, names


def test_openai_sdk_chat_answers_paris_through_envoy(stack):
    """The OpenAI-compatible API on Envoy's published port (compose's `openai` service behind it), with the
    official SDK as the client: the model list names the served model, a greedy chat answers "Paris"."""
    client = openai.OpenAI(base_url=f"http://{stack.target}/v1", api_key="unused", timeout=120, max_retries=2)
    [model] = client.models.list().data
    reply = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=48,
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")


def redis_keys(stack: Stack) -> int:
    """Entries in compose's Redis, the routers' shared result-cache tier."""
    reply = docker("exec", stack.container("redis"), "redis-cli", "dbsize").stdout
    return int(reply.strip())


def test_a_repeated_greedy_request_is_answered_from_the_result_cache(stack):
    """The router stores a greedy answer (in memory and in the Redis container) and replays it to the same
    request: the first reply says cached = false, the second cached = true with the same text."""
    request = chat_request(f"Name one colour. (run {secrets.token_hex(4)})", 8)  # never answered before
    keys_before = redis_keys(stack)
    replies = []
    with grpc.insecure_channel(stack.target) as channel:
        for _ in range(2):
            responses = list(pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=120))
            replies.append(("".join(r.chunk.text for r in responses if r.HasField("chunk")), responses[-1].complete))
            if len(replies) == 1:  # the write to Redis follows the answer: wait for it before asking again
                deadline = time.monotonic() + 10
                while redis_keys(stack) <= keys_before:
                    assert time.monotonic() < deadline, "the router stored nothing in Redis (--result-cache-redis)"
                    time.sleep(0.2)
    (first_text, first), (second_text, second) = replies
    assert first.cached is False and second.cached is True
    assert second_text == first_text and second.completion_tokens == first.completion_tokens > 0


def test_rest_generate_streams_newline_delimited_json(stack):
    body = json.dumps({"prompt": "The capital of France is", "sampling": {"max_tokens": 4, "temperature": 0}})
    request = urllib.request.Request(
        f"http://{stack.target}/v1/generate",
        data=body.encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        lines = [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]
    assert "Paris" in "".join(line["chunk"]["text"] for line in lines[:-1])
    assert lines[-1]["complete"]["completion_tokens"] == 4


def test_prometheus_scrapes_every_meshserve_target(stack):
    with grpc.insecure_channel(stack.target) as channel:
        list(pb_grpc.GenerationServiceStub(channel).Generate(chat_request("Hello", 4), timeout=120))
    deadline = time.monotonic() + 90  # scrapes every 5 s; DNS discovery refreshes every 30 s
    while True:
        up = {r["metric"]["job"]: r["value"][1] for r in stack.prometheus('up{job=~"meshserve-.*"}')}
        tokens = stack.prometheus("sum(meshserve_generation_tokens_total)")
        generated = float(tokens[0]["value"][1]) if tokens else 0.0
        if set(up) == SCRAPED_JOBS and set(up.values()) == {"1"} and generated > 0:
            break
        assert time.monotonic() < deadline, f"up={up}, generated tokens={generated}"
        time.sleep(2)


def test_compose_stop_drains_a_running_stream(stack):
    """A stream in flight when `docker compose stop` starts ends with its full answer or UNAVAILABLE, never
    cut without a status, and every container exits by itself (0) before compose's grace runs out."""
    events: dict[str, float] = {}
    stopped: dict[str, subprocess.CompletedProcess] = {}

    def stop() -> None:
        events["stop started"] = time.monotonic()
        stopped["result"] = stack.run("stop", timeout=300, check=False)
        events["stop finished"] = time.monotonic()

    stopper = threading.Thread(target=stop)
    request = chat_request("Write a long story about a dragon who learns to fly.", 200)
    chunks, outcome = 0, None
    with grpc.insecure_channel(stack.target) as channel:
        try:
            for response in pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=240):
                if response.HasField("chunk"):
                    chunks += 1
                    if chunks == 3:
                        stopper.start()
                elif response.HasField("complete"):
                    outcome = "complete"
                    events["stream ended"] = time.monotonic()
        except grpc.RpcError as error:
            outcome = error.code()
            events["stream ended"] = time.monotonic()
            assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{error.code()}: {error.details()}"
    assert chunks >= 3, f"the stream ended after {chunks} chunks, before the stop could begin"
    stopper.join(timeout=300)
    assert outcome in ("complete", grpc.StatusCode.UNAVAILABLE), "the stream ended without a status"
    assert events["stream ended"] > events["stop started"] + 1, (
        "the stream was over before the stop began: nothing was drained (make the request longer)"
    )
    assert stopped["result"].returncode == 0, stopped["result"].stderr[-2000:]
    stack.timings["compose stop (s)"] = round(events["stop finished"] - events["stop started"], 1)
    stack.timings["stream during stop"] = f"{outcome} after {chunks} chunks"
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{stack.project}-stop.log").write_text(stack.logs())  # the services' own drain lines
    for service in (*MESHSERVE_SERVICES, "openai", "redis", "prometheus"):
        state = json.loads(docker("inspect", "-f", "{{json .State}}", stack.container(service)).stdout)
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (
            f"{service}: {state['Status']} with {state['ExitCode']} (137: killed at the end of the grace period)"
        )


def test_compose_down_leaves_nothing_behind(stack):
    stack.run("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    assert docker("ps", "-a", "-q", "--filter", label).stdout.split() == []
    assert docker("volume", "ls", "-q", "--filter", label).stdout.split() == []
    assert docker("network", "ls", "-q", "--filter", label).stdout.split() == []
