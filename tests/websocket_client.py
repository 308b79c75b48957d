"""Client-side helpers of the WebSocket tests (tests/service, tests/e2e): reading a socket to its close, and the
server-sent events of the same request to compare with."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed


async def read_to_close(socket: ClientConnection, *, parse: bool = False) -> list[Any]:
    """Every frame until the server closes; with `parse`, JSON parsed but the `[DONE]` sentinel."""
    frames: list[Any] = []
    try:
        async for frame in socket:
            frames.append(json.loads(frame) if parse and frame != "[DONE]" else frame)
    except ConnectionClosed:
        pass
    return frames


async def sse_payloads(url: str, body: dict[str, Any], timeout_s: float) -> list[str]:
    """The `data:` payloads of the streaming POST of `body` to `url`, `[DONE]` last."""
    request = urllib.request.Request(
        url, data=json.dumps({**body, "stream": True}).encode(), headers={"content-type": "application/json"}
    )
    sse = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=timeout_s).read().decode())
    return [line.removeprefix("data: ") for line in sse.split("\n\n") if line]
