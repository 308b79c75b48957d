"""The Swarm stack (deploy/swarm/stack.yaml) run on a real single-node Swarm: deployed with
deploy/tools/swarm.py, it becomes healthy and answers through Envoy (TLS, JWT); inference scales 1 -> 2 under
load and the new replica takes some of it with no failed request; a rolling update of inference under 4
greedy streams loses none (each answer is the one it had before); a replica killed with `docker kill` is
rescheduled and the streams on it resume elsewhere with the same tokens; `swarm.py rm` leaves nothing
behind. One deployment serves all of them (a module-scoped fixture, tests in this order).

The node is left as it was found: the fixture runs `docker swarm init --advertise-addr 127.0.0.1` only when
the engine is in no Swarm, and then leaves it at the end. This kernel has no IPVS, so Swarm's virtual IPs and
ingress mesh would not route here: the stack uses `endpoint_mode: dnsrr` and host-mode ports anyway (they are
what STRICT_DNS and the routers' DNS discovery need).

Differences from the committed stack, in a generated override file: `jaeger` is the OTLP receiver of
tests/deploy/otlp_sink.py (Jaeger's image cannot be pulled here), one replica of router, tokenizer and
inference (two cores), and the routers' result cache is off: a greedy request answered from the cache would
never reach the replicas being updated or killed. Images are the container test's content-tagged ones.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.gateway.config import TlsFiles, public_channel
from tests.conftest import free_port, wait_until
from tests.deploy.conftest import DEPLOY, REPO
from tests.deploy.test_containers import LOGS, SKIP_VARIABLE, build, content_tag, docker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STACK_FILE = DEPLOY / "swarm" / "stack.yaml"
HELPER = DEPLOY / "tools" / "swarm.py"
STACK_PREFIX = "meshserve-st-"
PROMPTS = (  # distinct first tokens: prefix affinity spreads them over the replicas
    "Once upon a time, in a quiet village by the sea,",
    "The three most important inventions in history are",
    "Photosynthesis is the process by which",
    "My favourite recipe for a rainy Sunday starts with",
)


def swarm_state() -> str:
    return json.loads(docker("info", "--format", "{{json .Swarm}}").stdout).get("LocalNodeState", "")


def helper(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )


def stack_resources(stack: str) -> dict[str, list[str]]:
    label = f"label=com.docker.stack.namespace={stack}"
    kinds = {
        "services": ("service", "ls", "-q"),
        "containers": ("ps", "-a", "-q"),
        "networks": ("network", "ls", "-q"),
        "secrets": ("secret", "ls", "-q"),
        "configs": ("config", "ls", "-q"),
        "volumes": ("volume", "ls", "-q"),
    }
    found = {kind: docker(*command, "--filter", label).stdout.split() for kind, command in kinds.items()}
    return {kind: ids for kind, ids in found.items() if ids}


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    port: int
    tls: TlsFiles
    token: str
    timings: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def service(self, short: str) -> str:
        return f"{self.name}_{short}"

    def containers(self, short: str) -> list[str]:
        """Running containers of a service, oldest first."""
        rows = docker(
            "ps", "--filter", f"label=com.docker.swarm.service.name={self.service(short)}",
            "--filter", "status=running", "--format", "{{.ID}} {{.Status}}",
        ).stdout.splitlines()  # fmt: skip
        return [row.split()[0] for row in reversed(rows)]

    def healthy(self, short: str) -> list[str]:
        rows = docker(
            "ps", "--filter", f"label=com.docker.swarm.service.name={self.service(short)}",
            "--filter", "health=healthy", "--format", "{{.ID}}",
        ).stdout.split()  # fmt: skip
        return rows

    def metric(self, container: str, name: str, port: int = 9103) -> float:
        """The sum of a metric's samples, read inside the container (metrics ports are not published)."""
        url = f"http://localhost:{port}/metrics"
        probe = f"import urllib.request as u; print(u.urlopen('{url}', timeout=5).read().decode())"
        text = docker("exec", container, "python", "-c", probe, check=False).stdout
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def generate(self, prompt: str, max_tokens: int, channel: grpc.Channel | None = None) -> tuple[list[int], str]:
        """(token ids, text) of one greedy completion through Envoy; raises grpc.RpcError on failure."""
        request = pb.GenerateRequest(
            prompt=prompt, sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0)
        )
        own = channel is None
        channel = channel or public_channel(self.target, self.tls)
        try:
            ids, text, complete = [], [], None
            for response in pb_grpc.GenerationServiceStub(channel).Generate(
                request, timeout=300, metadata=[("authorization", f"Bearer {self.token}")]
            ):
                if response.HasField("chunk"):
                    ids += response.chunk.token_ids
                    text.append(response.chunk.text)
                elif response.HasField("complete"):
                    complete = response.complete
            assert complete is not None, "the stream ended without GenerateComplete"
            assert complete.completion_tokens == len(ids)
            return ids, "".join(text)
        finally:
            if own:
                channel.close()

    def logs(self) -> str:
        out = []
        for line in docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={self.name}",
                           "--format", "{{.Name}}", check=False).stdout.split():  # fmt: skip
            out.append(docker("service", "logs", "--tail", "40", "--no-task-ids", line, check=False, timeout=60).stdout)
        return "\n".join(out)


def override(image: str) -> dict:
    """The test's compose file over the stack: see the module docstring."""
    router = yaml.safe_load(STACK_FILE.read_text())["services"]["router"]["command"]
    cache = router.index("--result-cache-redis")
    router = [*router[:cache], *router[cache + 2 :], "--result-cache-mb", "0"]
    return {
        "version": "3.8",
        "services": {
            "jaeger": {
                "image": image,
                "command": ["python", "/otlp_sink.py", "--otlp-port", "4317", "--http-port", "16686"],
                "configs": [{"source": "otlp_sink", "target": "/otlp_sink.py"}],
            },
            "router": {"command": router, "deploy": {"replicas": 1}},
            "tokenizer": {"deploy": {"replicas": 1}},
            "inference": {"deploy": {"replicas": 1}},
        },
        "configs": {"otlp_sink": {"file": str(REPO / "tests" / "deploy" / "otlp_sink.py")}},
    }


def wait_converged(stack: Stack, timeout_s: float) -> None:
    """Every service of the stack runs as many tasks as it wants, and every task with a health check is healthy."""

    def converged() -> bool:
        rows = docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={stack.name}",
                      "--format", "{{.Name}} {{.Replicas}}").stdout.splitlines()  # fmt: skip
        for row in rows:
            name, replicas = row.split()[:2]
            running, wanted = replicas.split("/")
            short = name.removeprefix(f"{stack.name}_")
            if running != wanted or (short != "jaeger" and len(stack.healthy(short)) < int(wanted)):
                return False
        return len(rows) == 9

    try:
        wait_until(converged, timeout_s, "every service of the stack runs healthy", interval_s=1)
    except AssertionError as error:
        raise AssertionError(
            f"{error}\n{docker('service', 'ls', check=False).stdout}\n{stack.logs()[-6000:]}"
        ) from None


def wait_serving(stack: Stack, timeout_s: float) -> None:
    def serving() -> bool:
        with public_channel(stack.target, stack.tls) as channel:
            try:
                request = health_pb2.HealthCheckRequest(service="meshserve.v1.GenerationService")
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout_s, "Envoy reports SERVING through TLS", interval_s=0.5)


def test_deploy_refuses_a_node_that_is_in_no_swarm():
    """Runs before the fixture initialises a Swarm; on a node that is in one already (someone else's), the
    refusal cannot be shown without leaving that Swarm, so it is skipped with that reason."""
    if os.environ.get(SKIP_VARIABLE) == "1" and os.environ.get("CI") != "true":
        pytest.skip(f"{SKIP_VARIABLE}=1")
    subprocess.run(["bash", str(DEPLOY / "tools" / "docker.sh"), "engine"], capture_output=True, timeout=900)
    if swarm_state() != "inactive":
        pytest.skip(f"this engine is in a Swarm already ({swarm_state()}): not leaving it to show the refusal")
    stack = f"{STACK_PREFIX}noswarm-{os.getpid()}"
    result = helper("deploy", "--stack", stack, "--secrets", str(REPO))
    assert result.returncode == 1
    assert "this Docker engine is not part of a Swarm (state: inactive): run `docker swarm init`" in result.stderr
    assert swarm_state() == "inactive"


@pytest.fixture(scope="module")
def swarm() -> Iterator[None]:
    if os.environ.get(SKIP_VARIABLE) == "1" and os.environ.get("CI") != "true":
        pytest.skip(f"{SKIP_VARIABLE}=1: the container tests are skipped")
    engine = subprocess.run(
        ["bash", str(DEPLOY / "tools" / "docker.sh"), "base"], capture_output=True, text=True, timeout=900
    )
    assert engine.returncode == 0, f"deploy/tools/docker.sh base failed:\n{engine.stderr[-3000:]}"
    initialised = False
    networks_before = set(docker("network", "ls", "-q").stdout.split())
    if swarm_state() == "inactive":
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        initialised = True
    try:
        yield
    finally:
        if initialised:  # leave the node as it was: out of the Swarm, without the bridge `swarm init` made
            docker("swarm", "leave", "--force", check=False)
            for network in set(docker("network", "ls", "-q").stdout.split()) - networks_before:
                docker("network", "rm", network, check=False)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    from services.gateway.credentials import ensure_dev_tls, ensure_signing_key

    directory = tmp_path_factory.mktemp("swarm-secrets")
    ensure_dev_tls(directory / "tls")
    ensure_signing_key(directory / "keys")
    for source in ("tls/server.pem", "tls/server-key.pem", "keys/jwks.json"):
        shutil.copy(directory / source, directory / Path(source).name)
    return directory


def test_deploy_refuses_an_alertmanager_that_does_not_answer_and_starts_nothing(swarm, secrets_dir):
    stack = f"{STACK_PREFIX}noam-{os.getpid()}"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = helper("deploy", "--stack", stack, "--secrets", str(secrets_dir), "--alertmanager-url", url)
    assert result.returncode == 1
    assert f"no Alertmanager answers at {url}" in result.stderr and "nothing was deployed" in result.stderr
    assert stack_resources(stack) == {}
    missing = helper("deploy", "--stack", stack, "--secrets", str(secrets_dir / "tls"))
    assert missing.returncode == 1 and "lacks jwks.json" in missing.stderr
    assert stack_resources(stack) == {}


@pytest.fixture(scope="module")
def stack(swarm, secrets_dir, tmp_path_factory) -> Iterator[Stack]:
    from services.gateway.credentials import mint_token

    timings: dict = {}
    started = time.monotonic()
    base_id = docker("image", "inspect", "-f", "{{.Id}}", "meshserve-base:bookworm").stdout.strip()
    images = {}
    for variable, repository, dockerfile in (
        ("MESHSERVE_IMAGE", "meshserve", "Dockerfile"),
        ("MESHSERVE_PROMETHEUS_IMAGE", "meshserve-prometheus", "Dockerfile.prometheus"),
        ("MESHSERVE_REDIS_IMAGE", "meshserve-redis", "Dockerfile.redis"),
        ("MESHSERVE_ALERTMANAGER_IMAGE", "meshserve-alertmanager", "Dockerfile.alertmanager"),
    ):
        images[variable] = content_tag(repository, DEPLOY / "docker" / dockerfile, base_id)
        build(DEPLOY / "docker" / dockerfile, images[variable], timings)
    timings["images"] = round(time.monotonic() - started, 1)
    work = tmp_path_factory.mktemp("swarm")
    (work / "override.yaml").write_text(yaml.safe_dump(override(images["MESHSERVE_IMAGE"])))
    port = free_port()
    name = f"{STACK_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    env = {**os.environ, **images, "MESHSERVE_PORT": str(port)}
    tls = TlsFiles(secrets_dir / "server.pem", secrets_dir / "server-key.pem", secrets_dir / "tls" / "ca.pem")
    token = mint_token(secrets_dir / "keys", "swarm-test")
    stack = Stack(name, env, port, tls, token, timings)
    try:
        started = time.monotonic()
        deployed = helper(
            "deploy", "--stack", name, "--secrets", str(secrets_dir), "-c", str(work / "override.yaml"),
            "--resolve-image", "never", env=env,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        wait_converged(stack, 420)
        wait_serving(stack, 120)
        timings["deploy until healthy and serving"] = round(time.monotonic() - started, 1)
        yield stack
    finally:
        if stack_resources(name):
            LOGS.mkdir(parents=True, exist_ok=True)
            (LOGS / f"{name}.log").write_text(stack.logs())
            helper("rm", "--stack", name, "--volumes")
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "swarm-timings.json").write_text(json.dumps(timings, indent=2))


def test_the_stack_is_healthy_and_answers_through_envoy_with_tls_and_jwt(stack):
    ids, text = stack.generate("The capital of France is", 8)
    assert "Paris" in text and len(ids) == 8
    with public_channel(stack.target, stack.tls) as channel, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="Hi"), timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the secrets are Swarm secrets in the container, not files of the image
    [envoy] = stack.containers("envoy")
    mounted = docker("exec", envoy, "ls", "/run/secrets").stdout.split()
    assert sorted(mounted) == ["jwks.json", "server-key.pem", "server.pem"]
    image = stack.env["MESHSERVE_IMAGE"]
    assert docker("run", "--rm", "--entrypoint", "ls", image, "/run/secrets", check=False).stdout.split() == []


class Load:
    """Worker threads sending greedy requests through Envoy until stopped; each prompt's tokens must equal
    its reference (when one is given). Every failure is kept."""

    def __init__(
        self,
        stack: Stack,
        prompts: list[str],
        max_tokens: int,
        references: dict[str, list[int]] | None = None,
        workers: int | None = None,
    ):
        self.stack, self.max_tokens, self.references = stack, max_tokens, references
        self.stop = threading.Event()
        self.done: list[str] = []
        self.failures: list[str] = []
        workers = workers or len(prompts)  # worker i cycles through prompts i, i + workers, ...
        self.threads = [
            threading.Thread(target=self._work, args=(prompts[i::workers],), daemon=True) for i in range(workers)
        ]

    def _work(self, prompts: list[str]) -> None:
        with public_channel(self.stack.target, self.stack.tls) as channel:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                prompt = prompts[i % len(prompts)]
                try:
                    ids, _ = self.stack.generate(prompt, self.max_tokens, channel)
                except grpc.RpcError as error:
                    self.failures.append(f"{prompt[:20]}: {error.code().name} {error.details()}")
                    continue
                if self.references is not None and ids != self.references[prompt]:
                    self.failures.append(f"{prompt[:20]}: tokens {ids} differ from {self.references[prompt]}")
                self.done.append(prompt)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def test_scaling_inference_to_two_puts_load_on_the_new_replica_without_a_failed_request(stack):
    [first] = stack.containers("inference")
    started = time.monotonic()
    # eight prompts of distinct prefixes from three workers: prefix affinity sends some of them to each replica
    # (the chance that all eight prefer the first one is 1/256)
    with Load(stack, [f"{i} " + PROMPTS[i % 4] for i in range(8)], 16, workers=3) as load:
        wait_until(lambda: len(load.done) >= 3, 120, "the load runs")
        docker("service", "scale", "--detach", f"{stack.service('inference')}=2")
        wait_until(lambda: len(stack.healthy("inference")) == 2, 300, "a second healthy inference replica", 1)
        [new] = [c for c in stack.containers("inference") if c != first]
        wait_until(
            lambda: stack.metric(new, "meshserve_generation_tokens_total") >= 32,
            120,
            "the new replica generated for some requests",
            1,
        )
        served_before = len(load.done)
        wait_until(lambda: len(load.done) >= served_before + 3, 60, "more requests after scaling")
    stack.timings["scale 1 -> 2 until the new replica served"] = round(time.monotonic() - started, 1)
    assert load.failures == []
    assert stack.metric(first, "meshserve_generation_tokens_total") > 0


@pytest.fixture(scope="module")
def references(stack) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, asked once with nothing else running."""
    return {prompt: stack.generate(prompt, 48)[0] for prompt in PROMPTS}


def test_a_rolling_update_of_inference_under_four_greedy_streams_loses_none(stack, references):
    before = set(stack.containers("inference"))
    assert len(before) == 2
    started = time.monotonic()
    with Load(stack, list(PROMPTS), 48, references) as load:
        wait_until(lambda: len(load.done) >= 4, 120, "the streams run")
        docker("service", "update", "--force", "--detach", stack.service("inference"))

        def finished() -> str | None:
            status = docker("service", "inspect", "-f", "{{json .UpdateStatus}}", stack.service("inference")).stdout
            state = (json.loads(status) or {}).get("State")
            return state if state in ("completed", "rollback_completed", "paused", "rollback_paused") else None

        wait_until(finished, 600, "the rolling update finishes", 2)
        during = len(load.done)
    stack.timings["rolling update of 2 inference replicas"] = round(time.monotonic() - started, 1)
    assert finished() == "completed", docker("service", "ps", stack.service("inference")).stdout
    assert load.failures == []
    assert during > 8, f"only {during} streams ran across the update"
    after = set(stack.containers("inference"))
    assert len(after) == 2 and not after & before, "the update did not replace both replicas"


def test_a_killed_replica_is_rescheduled_and_its_streams_resume_with_the_same_tokens(stack):
    wait_until(lambda: len(stack.healthy("inference")) == 2, 300, "two healthy inference replicas", 1)
    long_references = {prompt: stack.generate(prompt, 160)[0] for prompt in PROMPTS}
    results: dict[str, list[int] | str] = {}

    def stream(prompt: str) -> None:
        try:
            results[prompt] = stack.generate(prompt, 160)[0]
        except grpc.RpcError as error:
            results[prompt] = f"{error.code().name}: {error.details()}"

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    busy: list[str] = []

    def a_replica_is_busy() -> bool:
        busy[:] = [c for c in stack.containers("inference") if stack.metric(c, "meshserve_num_requests_running") > 0]
        return bool(busy)

    wait_until(a_replica_is_busy, 60, "a replica runs some of the streams", 0.2)
    victim = busy[0]
    killed_at = time.monotonic()
    docker("kill", victim)
    for thread in threads:
        thread.join(timeout=300)
    assert results == long_references, "a stream failed or changed when its replica was killed"
    wait_until(
        lambda: len(stack.healthy("inference")) == 2 and victim not in stack.containers("inference"),
        300,
        "Swarm rescheduled the killed replica",
        1,
    )
    stack.timings["kill until rescheduled and healthy"] = round(time.monotonic() - killed_at, 1)


def test_swarm_rm_leaves_nothing_behind(stack):
    removed = helper("rm", "--stack", stack.name, "--volumes")
    assert removed.returncode == 0, removed.stderr
    assert stack_resources(stack.name) == {}
