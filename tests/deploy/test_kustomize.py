"""Kubernetes manifests: every overlay builds with `kubectl kustomize` (kustomize v5) and each object
validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail);
then the wiring: probes on the conventions' ports, drain timing, resources, Services, autoscaling."""

from __future__ import annotations

import os
import re
from functools import cache

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, conventions_processes, load_yaml_documents, run, tool

K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# the newest schemas, and the oldest Kubernetes still supported upstream when this was written
KUBERNETES_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
MESHSERVE_WORKLOADS = ("router", "tokenizer", "inference")


@cache
def build(overlay: str) -> tuple[dict, ...]:
    result = run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, result.stderr
    return tuple(load_yaml_documents(result.stdout))


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in build(overlay) if o["kind"] == kind}


def workloads(overlay: str) -> dict[str, dict]:
    return {**objects(overlay, "Deployment"), **objects(overlay, "StatefulSet")}


def container(workload: dict) -> dict:
    [main] = workload["spec"]["template"]["spec"]["containers"]
    return main


def flag(args: list[str], name: str) -> list[str]:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    values += [args[i + 1] for i, a in enumerate(args) if a == name]
    return values


def test_overlays_are_cpu_and_gpu():
    assert OVERLAYS == ["cpu", "gpu"]


def test_kubectl_has_kustomize_v5():
    result = run([tool("kubectl"), "version", "--client"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"Kustomize Version: v5\.", result.stdout), result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates(overlay: str, version: str):
    documents = build(overlay)
    assert {
        "Namespace",
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    } <= {d["kind"] for d in documents}
    failures = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{document['kind']}/{document['metadata']['name']}: {error.path}: {error.message}")
    assert failures == []


def test_validation_rejects_mistakes():
    deployment = yaml.safe_load(yaml.safe_dump(objects("cpu", "Deployment")["router"]))
    container(deployment)["readinessProbe"]["grpc"]["prot"] = 1  # a typo is an unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_one_namespace(overlay: str):
    namespaces = {d["metadata"].get("namespace") for d in build(overlay) if d["kind"] != "Namespace"}
    assert namespaces == {"meshserve"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_probe_grpc_health_on_their_conventions_port(overlay: str):
    processes = conventions_processes()
    for name in MESHSERVE_WORKLOADS:
        main = container(workloads(overlay)[name])
        port = processes[name].grpc_port
        assert main["command"] == ["meshserve"] and main["args"][0] == f"serve-{name}"
        assert flag(main["args"], "--port") == [str(port)]
        assert flag(main["args"], "--metrics-port") == [str(processes[name].metrics_port)]
        assert flag(main["args"], "--host") == ["0.0.0.0"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"]["port"] == port, f"{name} {probe}"
        assert {p["containerPort"] for p in main["ports"]} == {port, processes[name].metrics_port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_args_parse_with_the_real_cli(overlay: str):
    from services.cli.main import build_parser

    for name in MESHSERVE_WORKLOADS:
        args = build_parser().parse_args(container(workloads(overlay)[name])["args"])
        assert args.command == f"serve-{name}" and args.shutdown_grace_s == 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(overlay: str):
    for name, workload in workloads(overlay).items():
        if name in ("jaeger", "redis", "alertmanager"):  # not meshserve processes: nothing to drain
            continue
        spec = workload["spec"]["template"]["spec"]
        main = container(workload)
        pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
        if pre_stop[0] == "sleep":
            pre_stop_s = float(pre_stop[1])
        else:  # envoy: drain_listeners, then time.sleep(N)
            pre_stop_s = float(re.search(r"time\.sleep\((\d+)\)", pre_stop[-1]).group(1))
        args = main.get("args", [])
        if name == "envoy":
            assert float(flag(args, "--drain-time-s")[0]) <= pre_stop_s
            drain_s = 0.0  # drained in preStop; SIGTERM then stops it at once
        else:
            [grace] = flag(args, "--shutdown-grace-s") or pytest.fail(f"{name} must state its grace period")
            notice = float((flag(args, "--drain-notice-s") or ["0"])[0])
            # in-flight streams get up to the grace to finish, and the gRPC server as long again before it
            # cancels what is left (services/common/server.py): the pod must outlive both
            drain_s = notice + 2 * float(grace)
        assert spec["terminationGracePeriodSeconds"] > pre_stop_s + drain_s, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_runs_as_non_root(overlay: str):
    for name, workload in workloads(overlay).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpu_overlay_puts_tensorrt_inference_on_a_gpu():
    inference = container(workloads("gpu")["inference"])
    assert inference["image"].split(":")[0].endswith("meshserve-gpu")
    assert flag(inference["args"], "--backend") == ["tensorrt"]
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    for name in ("envoy", "router", "tokenizer"):
        assert "nvidia.com/gpu" not in container(workloads("gpu")[name])["resources"]["limits"]
        assert container(workloads("gpu")[name])["image"].split(":")[0].endswith("meshserve")
    [metric] = objects("gpu", "HorizontalPodAutoscaler")["inference"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "meshserve_num_requests_waiting"


def test_cpu_overlay_runs_onnxruntime_without_gpus():
    for name, workload in workloads("cpu").items():
        assert "nvidia.com/gpu" not in container(workload)["resources"]["limits"], name
    inference = container(workloads("cpu")["inference"])
    assert flag(inference["args"], "--backend") == ["onnxruntime"]
    others = ("jaeger", "redis", "alertmanager")
    assert {container(w)["image"] for n, w in workloads("cpu").items() if n not in others} == {"meshserve:0.1.0"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_targets_every_inference_pod_the_autoscaler_may_create(overlay: str):
    hpa = objects(overlay, "HorizontalPodAutoscaler")["inference"]["spec"]
    target = hpa["scaleTargetRef"]
    inference = workloads(overlay)[target["name"]]
    assert inference["kind"] == target["kind"] == "StatefulSet"
    service = inference["spec"]["serviceName"]
    port = conventions_processes()["inference"].grpc_port
    router_args = container(workloads(overlay)["router"])["args"]
    expected = [f"{target['name']}-{i}.{service}:{port}" for i in range(hpa["maxReplicas"])]
    assert flag(router_args, "--inference-target") == expected
    assert objects(overlay, "Service")[service]["spec"]["clusterIP"] == "None"
    [tokenizer] = flag(router_args, "--tokenizer-target")
    host, tokenizer_port = tokenizer.split(":")
    assert host in objects(overlay, "Service") and int(tokenizer_port) == conventions_processes()["tokenizer"].grpc_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_gets_the_validated_config_and_finds_routers_through_a_headless_service(overlay: str):
    [config_map] = [c for n, c in objects(overlay, "ConfigMap").items() if n.startswith("envoy-config")]
    base_config = (K8S / "base" / "envoy.yaml").read_text()
    assert config_map["data"]["envoy.yaml"] == base_config
    envoy = workloads(overlay)["envoy"]
    volumes = {v["name"]: v for v in envoy["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(envoy)["volumeMounts"]}
    [(volume, path)] = mounts.items()
    assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"]
    assert container(envoy)["args"][:2] == ["-c", f"{path}/envoy.yaml"]

    services = objects(overlay, "Service")
    for cluster in yaml.safe_load(base_config)["static_resources"]["clusters"]:
        socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        service = services[socket["address"]]
        assert socket["port_value"] in {p["port"] for p in service["spec"]["ports"]}, cluster["name"]
        if cluster["name"] in ("router", "openai"):
            assert cluster["type"] == "STRICT_DNS" and service["spec"]["clusterIP"] == "None", cluster["name"]
    ports = {p["port"] for p in services["envoy"]["spec"]["ports"]}
    assert ports == {conventions_processes()["envoy"].grpc_port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_export_traces_to_jaeger(overlay: str):
    [env] = [c for n, c in objects(overlay, "ConfigMap").items() if n.startswith("meshserve-env")]
    assert env["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert 4317 in {p["port"] for p in objects(overlay, "Service")["jaeger"]["spec"]["ports"]}
    for name in (*MESHSERVE_WORKLOADS, "openai"):
        main = container(workloads(overlay)[name])
        assert [e["configMapRef"]["name"] for e in main["envFrom"]] == [env["metadata"]["name"]]
        assert {"name": "OTEL_SERVICE_NAME", "value": f"meshserve-{name}"} in main["env"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pods(overlay: str):
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(overlay).values()]

    def selects(selector: dict) -> int:
        return sum(all(labels.get(k) == v for k, v in selector.items()) for labels in pods)

    for name, service in objects(overlay, "Service").items():
        assert selects(service["spec"]["selector"]) == 1, f"Service {name}"
    budgets = objects(overlay, "PodDisruptionBudget")
    assert {"router", "tokenizer", "inference", "envoy"} <= set(budgets)
    for name, budget in budgets.items():
        assert selects(budget["spec"]["selector"]["matchLabels"]) == 1, f"PodDisruptionBudget {name}"
    for name, workload in workloads(overlay).items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert all(workload["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()), name


def test_base_is_not_an_overlay():
    """The base leaves images unpinned (`meshserve`): only overlays set the tags that get deployed."""
    result = run([tool("kubectl"), "kustomize", str(K8S / "base")])
    assert result.returncode == 0, result.stderr
    images = {
        c["image"]
        for d in load_yaml_documents(result.stdout)
        if d["kind"] in {"Deployment", "StatefulSet"}
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert "meshserve" in images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_serves_the_precision_its_image_prepares(overlay: str):
    """The image bakes in one precision's model; serve-inference must ask for that one, or the pod exits at
    start-up with 'no prepared model'."""
    from services.cli.main import build_parser
    from tests.deploy.conftest import model_precision

    main = container(workloads(overlay)["inference"])
    dockerfile = "Dockerfile.gpu" if main["image"].split(":")[0].endswith("meshserve-gpu") else "Dockerfile"
    args = build_parser().parse_args(main["args"])
    assert args.precision == model_precision(DEPLOY / "docker" / dockerfile), (overlay, dockerfile)


# -- NetworkPolicy: who reaches whom ------------------------------------------------------------------

PROMETHEUS = ({"app.kubernetes.io/name": "prometheus"}, "monitoring")  # labels, namespace
STRANGER = ({"app.kubernetes.io/name": "debug-shell"}, "meshserve")  # any other pod, even in the namespace
OUTSIDE = ({}, "default")


def _selects(selector: dict | None, labels: dict) -> bool:
    selector = selector or {}
    assert not selector.get("matchExpressions"), "the evaluator below reads matchLabels only"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(peer: dict, policy_namespace: str, labels: dict, namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pods are matched by selectors here
    if "namespaceSelector" in peer:
        namespace_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
    else:
        namespace_ok = namespace == policy_namespace
    return namespace_ok and _selects(peer.get("podSelector"), labels)


def reachable(policies: list[dict], workload: dict, port_name: str, source: tuple[dict, str]) -> bool:
    """NetworkPolicy semantics for ingress: a pod no policy selects takes everything; a selected pod takes a
    connection when some selecting policy has a rule whose peers (none: anyone) and ports (none: all) match."""
    pod = workload["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
    labels, namespace = source
    selecting = [
        p for p in policies if _selects(p["spec"]["podSelector"], pod) and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers_ok = not rule.get("from") or any(
                _peer_matches(peer, policy["metadata"]["namespace"], labels, namespace) for peer in rule["from"]
            )
            ports_ok = not rule.get("ports") or any(p["port"] in (port_name, ports[port_name]) for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_envoy_reaches_routers_and_only_routers_reach_tokenizer_and_inference(overlay: str):
    policies = list(objects(overlay, "NetworkPolicy").values())
    pods = workloads(overlay)

    def pod(name: str) -> tuple[dict, str]:
        return pods[name]["spec"]["template"]["metadata"]["labels"], "meshserve"

    everyone = {
        "envoy": pod("envoy"),
        "openai": pod("openai"),
        "router": pod("router"),
        "tokenizer": pod("tokenizer"),
        "inference": pod("inference"),
        "redis": pod("redis"),
        "jaeger": pod("jaeger"),
        "alertmanager": pod("alertmanager"),
        "stranger": STRANGER,
        "outside": OUTSIDE,
        "prometheus": PROMETHEUS,
    }
    allowed = {  # (target, port name): the sources that may connect
        ("envoy", "grpc"): set(everyone),  # the public endpoint
        ("envoy", "admin"): {"prometheus"},
        ("openai", "http"): {"envoy"},  # it trusts Envoy's tenant headers
        ("openai", "metrics"): {"prometheus"},
        ("router", "grpc"): {"envoy", "openai"},
        ("redis", "redis"): {"router"},
        ("tokenizer", "grpc"): {"router"},
        ("inference", "grpc"): {"router"},
        ("router", "metrics"): {"prometheus"},
        ("tokenizer", "metrics"): {"prometheus"},
        ("inference", "metrics"): {"prometheus"},
        ("jaeger", "otlp-grpc"): {
            "envoy",
            "openai",
            "router",
            "tokenizer",
            "inference",
            "redis",
            "jaeger",
            "alertmanager",
        },
        ("alertmanager", "web"): {"prometheus"},  # alerts come from Prometheus only
    }
    for (target, port), sources in allowed.items():
        for source, identity in everyone.items():
            assert reachable(policies, pods[target], port, identity) == (source in sources), (
                f"{source} -> {target}:{port} should be {'allowed' if source in sources else 'refused'}"
            )


def test_the_reachability_check_sees_an_open_namespace():
    """Without the policies every pod reaches the routers: the matrix above is the policies' doing."""
    pods = workloads("cpu")
    assert reachable([], pods["router"], "grpc", STRANGER)
    assert reachable(
        [], pods["inference"], "grpc", (pods["envoy"]["spec"]["template"]["metadata"]["labels"], "meshserve")
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_openai_service_reaches_only_routers_jaeger_and_dns(overlay: str):
    """Egress of the OpenAI-compatible service: the routers' gRPC port, Jaeger's OTLP ports and DNS, nothing else
    (not the tokenizer, inference or Redis directly)."""
    pods = workloads(overlay)
    selecting = [
        p
        for p in objects(overlay, "NetworkPolicy").values()
        if "Egress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], pods["openai"]["spec"]["template"]["metadata"]["labels"])
    ]
    assert selecting, "no egress policy selects the openai pods: they could reach anything"
    allowed: set[tuple[str, int]] = set()
    for policy in selecting:
        for rule in policy["spec"]["egress"]:
            ports = {p["port"] for p in rule["ports"]}
            if not rule.get("to"):
                assert ports == {53}, f"egress to anywhere on {ports}: only DNS may go anywhere"
                continue
            for peer in rule["to"]:
                for name, workload in pods.items():
                    if _peer_matches(
                        peer, "meshserve", workload["spec"]["template"]["metadata"]["labels"], "meshserve"
                    ):
                        allowed |= {(name, port) for port in ports}
    router_port = {p["name"]: p["containerPort"] for p in container(pods["router"])["ports"]}["grpc"]
    assert allowed == {("router", router_port), ("jaeger", 4317), ("jaeger", 4318)}, allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_openai_service_probes_health_and_routers_share_the_redis_cache(overlay: str):
    from services.cli.main import build_parser

    pods = workloads(overlay)
    openai = container(pods["openai"])
    args = build_parser().parse_args(openai["args"])
    assert args.command == "serve-openai" and args.host == "0.0.0.0" and args.shutdown_grace_s == 30
    assert args.router_targets == [f"router:{conventions_processes()['router'].grpc_port}"]
    http = {p["name"]: p["containerPort"] for p in openai["ports"]}["http"]
    assert http == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert openai[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    router = build_parser().parse_args(container(pods["router"])["args"])
    redis_port = objects(overlay, "Service")["redis"]["spec"]["ports"][0]["port"]
    assert router.result_cache_redis == f"redis://redis:{redis_port}/0"
    assert router.result_cache_mb > 0  # the Redis tier needs the memory tier
    redis = container(pods["redis"])
    assert redis["image"].split("/")[-1].startswith("meshserve-redis:")
    assert "--save" in redis["args"] and redis["args"][redis["args"].index("--save") + 1] == ""


def test_alertmanager_gets_the_one_alertmanager_config():
    """deploy/k8s/base/alertmanager.yml is a copy (kustomize loads nothing from outside the base) of the file
    compose, Swarm and tests/deploy/test_alertmanager.py use: they must not drift apart."""
    copy, source = K8S / "base" / "alertmanager.yml", K8S.parent / "alertmanager" / "alertmanager.yml"
    assert copy.read_text() == source.read_text(), f"cp {source} {copy}"
    for overlay in OVERLAYS:
        [config] = [c for name, c in objects(overlay, "ConfigMap").items() if name.startswith("alertmanager-config")]
        assert config["data"]["alertmanager.yml"] == source.read_text()
        pod = workloads(overlay)["alertmanager"]["spec"]["template"]["spec"]
        assert pod["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
        assert container(workloads(overlay)["alertmanager"])["image"] == "meshserve-alertmanager:0.1.0"


def test_the_pinned_inference_component_makes_guaranteed_pods_with_whole_cpus(tmp_path):
    """The CPU manager's static policy pins a container only in a Guaranteed pod (requests == limits for every
    container) that asks for a whole number of CPUs; the component must produce exactly that, and only for
    inference."""
    overlay, component = (
        os.path.relpath(K8S / part, tmp_path) for part in ("overlays/cpu", "components/pinned-inference")
    )
    (tmp_path / "kustomization.yaml").write_text(  # kustomize takes relative roots only
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{overlay}]\ncomponents: [{component}]\n"
    )
    result = run([tool("kubectl"), "kustomize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    built = {d["metadata"]["name"]: d for d in load_yaml_documents(result.stdout) if d["kind"] == "StatefulSet"}
    [inference] = built["inference"]["spec"]["template"]["spec"]["containers"]
    resources = inference["resources"]
    assert resources["requests"] == resources["limits"], "not Guaranteed: the static policy would not pin it"
    assert str(resources["limits"]["cpu"]).isdigit(), "a fractional CPU is never given exclusive cores"
    assert container(workloads("cpu")["inference"])["resources"]["requests"] != resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_router_pod_keeps_its_disk_cache_in_a_bounded_empty_dir(overlay: str):
    """One file per pod (no shared volume across nodes), kept across container restarts, with room for the
    bound plus the write-ahead log: kubelet evicts a pod whose emptyDir outgrows its sizeLimit."""
    from pathlib import Path

    from services.cli.main import build_parser

    pod = workloads(overlay)["router"]
    router = build_parser().parse_args(container(pod)["args"])
    directory = str(Path(router.result_cache_disk).parent)
    [mount] = [m for m in container(pod).get("volumeMounts", []) if m["mountPath"] == directory]
    [volume] = [v for v in pod["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Mi") and int(limit[:-2]) > router.result_cache_disk_mb + 4  # + the WAL's 4 MiB


def test_the_rollout_component_serves_two_versions_and_keeps_the_admin_port_internal(tmp_path):
    """components/rollout in the cpu overlay: a green StatefulSet beside blue, every router serving both by
    pod name with the weights the CLI accepts, and the admin port reachable by an operator's pod only."""
    from services.cli.main import build_parser
    from services.common.config_flags import config_from_args
    from services.router.config import RouterConfig

    kustomization = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    kustomization["resources"] = [os.path.relpath(K8S / "base", tmp_path)]
    kustomization["components"] = [os.path.relpath(K8S / "components" / "rollout", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = run([tool("kubectl"), "kustomize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    documents = list(load_yaml_documents(result.stdout))
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)
    assert {d["metadata"].get("namespace") for d in documents if d["kind"] != "Namespace"} == {"meshserve"}
    built = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    blue, green = (container(built["StatefulSet", name]) for name in ("inference", "inference-green"))
    assert green["image"] == blue["image"] == "meshserve:0.1.0"
    for main, version in ((blue, "blue"), (green, "green")):
        assert build_parser().parse_args(main["args"]).model_version == version
    assert built["Service", "inference-green"]["spec"]["clusterIP"] == "None"
    router = container(built["Deployment", "router"])
    config = config_from_args(RouterConfig, build_parser().parse_args(router["args"]))
    assert config.version_targets() == {
        "blue": tuple(f"inference-{i}.inference:50053" for i in range(4)),
        "green": tuple(f"inference-green-{i}.inference-green:50053" for i in range(2)),
    }
    assert config.rollout().weights == {"blue": 95, "green": 5} and config.admin_port == 50061
    assert {"name": "admin", "containerPort": 50061} in router["ports"]
    assert built["Service", "router-admin"]["spec"]["clusterIP"] == "None"  # resolves to every router
    # the admin port: only meshserve-admin pods; the base's router policy still admits Envoy to grpc only
    [rule] = built["NetworkPolicy", "router-admin"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "meshserve-admin"}}}]
    assert rule["ports"] == [{"port": "admin", "protocol": "TCP"}]
    for rule in built["NetworkPolicy", "router"]["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= {"grpc", "metrics"}
    [to_green, _] = built["NetworkPolicy", "inference-green"]["spec"]["ingress"]
    assert to_green["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "router"}}}]
