"""gRPC servicer of meshserve.tokenizer.v1.TokenizerService: converts messages and calls TokenizerCore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from meshserve.tokenizer.v1 import tokenizer_service_pb2 as pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgumentError
from services.common.grpc_status import grpc_errors
from services.tokenizer.core import ChatMessage, TokenizerCore


class TokenizerServicer(pb_grpc.TokenizerServiceServicer):
    def __init__(self, core: TokenizerCore) -> None:
        self.core = core

    @grpc_errors
    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        kind = request.WhichOneof("input")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        # off the event loop: a long prompt must not stall the detokenization streams of running requests
        if kind == "text":
            ids = await asyncio.to_thread(self.core.encode_text, request.text, max_tokens)
        elif kind == "chat":
            messages = [ChatMessage(m.role, m.content) for m in request.chat.messages]
            ids = await asyncio.to_thread(self.core.encode_chat, messages, max_tokens)
        else:
            raise InvalidArgumentError("input", "set text or chat")
        return pb.EncodeResponse(ids=ids)

    @grpc_errors
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        return pb.DecodeResponse(text=self.core.decode(list(request.ids), request.skip_special_tokens))

    @grpc_errors
    async def DecodeStream(
        self, requests: AsyncIterator[pb.DecodeStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        decoder = self.core.incremental_decoder()
        async for request in requests:
            yield pb.DecodeStreamResponse(text=decoder.push(list(request.ids)))

    @grpc_errors
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        return pb.GetInfoResponse(
            vocab_size=self.core.vocab_size,
            eos_token_ids=self.core.eos_token_ids,
            bos_token_id=self.core.bos_token_id,
            max_token_bytes=self.core.max_token_bytes,
        )
