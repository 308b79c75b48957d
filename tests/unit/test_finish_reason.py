"""services/common/finish.py: one finish reason, converted the same way at every gRPC boundary."""

from __future__ import annotations

import json

import pytest

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.v1 import generation_service_pb2 as public_pb
from services.common.finish import FinishReason, from_inference_proto, to_inference_proto, to_public_proto


@pytest.mark.parametrize("reason", [FinishReason.STOP, FinishReason.LENGTH])
def test_a_completing_reason_survives_the_inference_wire_and_reaches_the_client_by_name(reason: FinishReason) -> None:
    value = to_inference_proto(reason)
    assert inference_pb.FinishReason.Name(value) == f"FINISH_REASON_{reason.name}"
    assert from_inference_proto(value) is reason
    assert public_pb.FinishReason.Name(to_public_proto(reason)) == f"FINISH_REASON_{reason.name}"


def test_a_request_that_goes_on_is_unspecified_on_the_wire() -> None:
    assert to_inference_proto(None) == inference_pb.FINISH_REASON_UNSPECIFIED
    assert from_inference_proto(inference_pb.FINISH_REASON_UNSPECIFIED) is None


@pytest.mark.parametrize("reason", [FinishReason.ABORT, FinishReason.ERROR])
def test_reasons_that_end_with_a_status_have_no_proto_value(reason: FinishReason) -> None:
    assert not reason.completes
    with pytest.raises(ValueError, match="gRPC status"):
        to_inference_proto(reason)
    with pytest.raises(ValueError, match="gRPC status"):
        to_public_proto(reason)


def test_an_unknown_inference_value_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        from_inference_proto(99)


def test_every_proto_value_but_unspecified_has_a_domain_reason() -> None:
    # a value added to either proto without a mapping here fails this test
    for enum in (inference_pb.FinishReason, public_pb.FinishReason):
        names = {name for name in enum.keys() if name != "FINISH_REASON_UNSPECIFIED"}  # noqa: SIM118 -- a proto enum, not a dict
        assert names == {f"FINISH_REASON_{r.name}" for r in FinishReason if r.completes}


def test_the_reason_reads_as_its_openai_name_in_json_and_text() -> None:
    assert json.dumps({"finish_reason": FinishReason.LENGTH}) == '{"finish_reason": "length"}'
    assert str(FinishReason.STOP) == "stop" and f"{FinishReason.STOP}" == "stop"
    assert FinishReason("stop") is FinishReason.STOP
