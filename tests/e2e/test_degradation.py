"""Degrading under pressure with real processes: a fallback tier serves LOW/NORMAL requests the main tier
cannot take while HIGH ones stay on the main tier, LOW is shed after utilisation stays high, and a cached
answer is replayed whatever the tiers' load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.gateway.credentials import mint_token
from tests.conftest import wait_until
from tests.e2e.conftest import launch_mesh, metric_value, secured_envoy

MODEL = "SmolLM2-135M-Instruct"
SHED_AFTER_S = 3


@pytest.fixture(scope="module")
def tiered(model_dir, otlp_receiver, tmp_path_factory):
    """Main tier: one replica of 2 slots; fallback tier: one replica of 4 slots; neither queues. A JWT
    Envoy in front of the router, so a tenant can be allowed HIGH."""
    up = [
        "--fallback-replicas=1",
        "--fallback-precision=int8",
        "--fallback-arg=--num-slots=4",
        "--fallback-arg=--max-waiting=0",
    ]
    router = [f"--shed-low-after-s={SHED_AFTER_S}", "--shed-utilisation=0.9"]
    with (
        launch_mesh(
            otlp_receiver, inference_args=["--num-slots=2", "--max-waiting=0"], router_args=router, up_args=up
        ) as mesh,
        secured_envoy(mesh, tmp_path_factory.mktemp("tiers")) as envoy,
    ):
        yield mesh, envoy.target, envoy.credentials


def auth(credentials, tenant: str, **claims):
    return (("authorization", f"Bearer {mint_token(credentials, tenant, **claims)}"),)


def request(
    priority: int, max_tokens: int = 16, prompt: str = "Write about the sea.", **sampling
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        priority=priority,
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, **sampling),
    )


def test_normal_goes_to_the_fallback_high_stays_on_main_and_low_is_shed_under_sustained_load(tiered):
    mesh, target, credentials = tiered
    vip, plain = auth(credentials, "vip", max_priority="high"), auth(credentials, "plain")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # 0. an answer the result cache now holds
        faq = request(pb.PRIORITY_HIGH, prompt="What is the capital of France?")
        generated = list(stub.Generate(faq, metadata=vip, timeout=60))
        assert not generated[-1].complete.cached
        # 1. two long HIGH streams fill the main tier's two slots
        held = [stub.Generate(request(pb.PRIORITY_HIGH, 1000, min_tokens=1000), metadata=vip) for _ in range(2)]
        try:
            for call in held:
                assert next(call).HasField("chunk")
            # 2. NORMAL requests meanwhile: all served, by the fallback tier
            with ThreadPoolExecutor(3) as pool:
                answers = list(
                    pool.map(
                        lambda _: (
                            list(stub.Generate(request(pb.PRIORITY_NORMAL), metadata=plain, timeout=60))[-1].complete
                        ),
                        range(3),
                    )
                )
            assert [a.model for a in answers] == [f"{MODEL}:int8"] * 3
            reason = metric_value(
                mesh.metrics("router"), "meshserve_fallback_requests_total", reason="main_at_capacity"
            )
            assert reason >= 3
            # 3. HIGH is never degraded: with the main tier full it is refused, with retry advice
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request(pb.PRIORITY_HIGH), metadata=vip, timeout=60))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # 3b. ...but a cached answer needs no slot: the full tier does not refuse its replay
            replayed = list(stub.Generate(faq, metadata=vip, timeout=60))
            assert replayed[-1].complete.cached and replayed[-1].complete.model == MODEL
            assert [r.chunk.text for r in replayed[:-1]] == [r.chunk.text for r in generated[:-1]]
            # 4. utilisation has stayed above 90%: LOW is shed, though the fallback tier has room
            wait_until(
                lambda: metric_value(mesh.metrics("router"), "meshserve_router_shedding_low") == 1.0,
                SHED_AFTER_S + 5,
                "the router sheds LOW requests",
            )
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request(pb.PRIORITY_LOW), metadata=plain, timeout=60))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "shed" in caught.value.details()
        finally:
            for call in held:
                call.cancel()
        # 5. the pressure gone, shedding stops and the main tier serves again, under its own name
        deadline = time.monotonic() + 10
        while metric_value(mesh.metrics("router"), "meshserve_router_shedding_low") != 0.0:
            assert time.monotonic() < deadline, "shedding did not stop"
            time.sleep(0.2)
        complete = list(stub.Generate(request(pb.PRIORITY_LOW), metadata=plain, timeout=60))[-1].complete
        assert complete.model == MODEL
