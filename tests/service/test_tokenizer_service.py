"""The tokenizer servicer over a real gRPC channel."""

from __future__ import annotations

import grpc
import pytest

from meshserve.tokenizer.v1 import tokenizer_service_pb2 as pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as pb_grpc
from services.tokenizer.core import TokenizerCore
from services.tokenizer.servicer import TokenizerServicer


@pytest.fixture
async def stub(model_dir):
    server = grpc.aio.server()
    pb_grpc.add_TokenizerServiceServicer_to_server(TokenizerServicer(TokenizerCore(model_dir)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.TokenizerServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def test_encode_then_stream_decode_round_trips(stub):
    text = "Streaming 😀 text, 世界!"
    ids = list((await stub.Encode(pb.EncodeRequest(text=text))).ids)
    call = stub.DecodeStream()
    pieces = []
    for token in ids:
        await call.write(pb.DecodeStreamRequest(ids=[token]))
        pieces.append((await call.read()).text)
    await call.done_writing()
    assert "".join(pieces) == text
    assert (await stub.Decode(pb.DecodeRequest(ids=ids, skip_special_tokens=True))).text == text


async def test_chat_encoding_and_info(stub):
    response = await stub.Encode(
        pb.EncodeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")]))
    )
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert response.ids[0] == 1 and info.vocab_size == 49152 and list(info.eos_token_ids) == [2]


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.EncodeRequest(), "input"),
        (pb.EncodeRequest(text=""), "text"),
        (pb.EncodeRequest(chat=pb.ChatMessages()), "chat.messages"),
    ],
)
async def test_bad_encode_requests_are_invalid_argument(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


async def test_out_of_vocabulary_ids_end_the_decode_stream_with_invalid_argument(stub):
    call = stub.DecodeStream()
    await call.write(pb.DecodeStreamRequest(ids=[10**7]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
