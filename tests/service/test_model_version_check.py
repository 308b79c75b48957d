"""A router checks that a version's replicas serve that version: a real inference servicer (the real model on
ONNX Runtime) reports its --model-version in GetModelInfo, and a ReplicaSet that expects another version
sends it no work, while one that expects its own does."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.metrics import EngineMetrics
from services.inference.async_engine import AsyncEngine
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.engine import Engine, EngineConfig
from services.inference.main import model_version
from services.inference.servicer import InferenceServicer
from services.router.replicas import ReplicaSet


@pytest.fixture
async def green_replica(model_dir):
    config = EngineConfig(num_slots=1, max_context=128, max_new_tokens=16, max_waiting=0)
    async_engine = AsyncEngine(EngineMetrics("test-model", "green"))
    async_engine.attach(Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config))
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(async_engine, config, model_dir, "onnxruntime", "green"), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        async_engine.engine.stop()
        for collector in list(REGISTRY._collector_to_names):  # metrics are process globals; leave none behind
            if any(n.startswith("meshserve_") for n in REGISTRY._collector_to_names[collector]):
                REGISTRY.unregister(collector)


async def test_a_replica_of_another_version_gets_no_work_and_one_of_its_own_does(green_replica):
    expecting_blue = ReplicaSet((green_replica,), model_version="blue")
    expecting_green = ReplicaSet((green_replica,), model_version="green")
    unnamed = ReplicaSet((green_replica,))
    try:
        for replicas in (expecting_blue, expecting_green, unnamed):
            await replicas.poll_once()
        assert expecting_blue.healthy == [] and expecting_blue.replicas[0].wrong_version
        assert [r.info.model_version for r in expecting_green.healthy] == ["green"]
        assert len(unnamed.healthy) == 1  # without a rollout any version serves
    finally:
        for replicas in (expecting_blue, expecting_green, unnamed):
            await replicas.close()


def test_a_replica_without_a_version_name_reports_its_revision_and_precision(model_dir):
    assert model_version(None, model_dir) == f"{model_dir.revision[:12]}-{model_dir.precision}"
    assert model_version("green", model_dir) == "green"
    with pytest.raises(SystemExit, match="--model-version: 'Green!' is not a version name"):
        model_version("Green!", model_dir)
