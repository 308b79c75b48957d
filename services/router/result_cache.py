"""A cache of whole answers, for deterministic requests only (greedy, or sampled with a seed).

Up to three tiers: an in-process LRU bounded in bytes (every router has its own); optionally a local disk
tier (`result_cache_disk.py`: SQLite, bounded in bytes, a TTL, kept across restarts); and optionally
Redis, shared by every router, with a TTL. A lookup tries memory, then disk (local and cheap), then
Redis; what a lower tier had is kept in memory, and what Redis had on disk too. A store writes every tier
(the disk's in the background).

The key covers everything the answer depends on: the tenant (one tenant never reads another's answers),
the model's revision and precision, the prompt (its text, or its token ids) and every sampling field; it
is known before tokenizing, so the router looks an answer up before admission and before the tokenizer.
Only complete, successful generations are stored. Redis down or slow never fails a request: each call has
a short timeout, and after a failure Redis is left alone for a while (logged once), so the router serves
from memory and the replicas; the disk tier fails the same way. A value a tier returns that does not
decode is a miss (and is dropped), never an error.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from prometheus_client import Counter, Gauge

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from services.common.finish import FinishReason
from services.router.convert import GenerationRequest, ModelLimits
from services.router.result_cache_disk import DiskStore, DiskTier

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 0.1
"""A Redis call slower than this counts as a failure: the answer is generated instead."""
REDIS_RETRY_AFTER_S = 5.0
"""After a Redis failure, this long without trying it again."""
KEY_PREFIX = "meshserve:result:v2:"
"""v2: prompts keyed by their text (v1 keyed token ids), so a shared Redis never mixes the two."""


@dataclasses.dataclass(frozen=True)
class CachedDelta:
    text: str
    token_ids: list[int]
    logprobs: list[inference_pb.TokenLogprob]


@dataclasses.dataclass(frozen=True)
class CachedAnswer:
    """What a generation streamed, to stream it again: the deltas, then how it completed."""

    deltas: list[CachedDelta]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[inference_pb.TokenLogprob]
    model: str

    def encode(self) -> bytes:
        def logprobs(items: list[inference_pb.TokenLogprob]) -> list[dict[str, Any]]:
            return [json_format.MessageToDict(item, preserving_proto_field_name=True) for item in items]

        return json.dumps(
            {
                "deltas": [
                    {"text": d.text, "token_ids": d.token_ids, "logprobs": logprobs(d.logprobs)} for d in self.deltas
                ],
                "finish_reason": self.finish_reason.value,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "prompt_logprobs": logprobs(self.prompt_logprobs),
                "model": self.model,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        value = json.loads(data)

        def logprobs(items: list[dict[str, Any]]) -> list[inference_pb.TokenLogprob]:
            return [json_format.ParseDict(item, inference_pb.TokenLogprob()) for item in items]

        return cls(
            [CachedDelta(d["text"], d["token_ids"], logprobs(d["logprobs"])) for d in value["deltas"]],
            FinishReason(value["finish_reason"]),
            value["prompt_tokens"],
            value["completion_tokens"],
            logprobs(value["prompt_logprobs"]),
            value["model"],
        )


def cache_key(request: GenerationRequest, limits: ModelLimits, version: str = "") -> str | None:
    """The key of a deterministic request's answer, or None when it may not be cached (sampled
    without a seed: every call is meant to differ; or the client said no_cache).

    It is known before the prompt is tokenized: a prompt or chat is keyed by its text, token ids by the
    ids. Tokenization is a function of the text and the model's revision (the tokenizer and the
    replicas serve the same prepared model), so two requests tokenized differently never share a key;
    a prompt and the token ids it encodes to have different keys, which costs a miss, never a wrong
    answer. `version` is the model version serving it (a rollout's): one version never answers another's."""
    s = request.sampling
    if request.no_cache or (not s.greedy and s.seed is None):
        return None
    if request.token_ids is not None:
        prompt: dict[str, Any] = {"token_ids": request.token_ids}
    elif request.chat is not None:
        prompt = {"chat": [[role, content] for role, content in request.chat]}
    else:
        prompt = {"text": request.prompt}
    described = {
        "tenant": request.tenant,
        "model": limits.model_name,
        "revision": limits.revision,
        "precision": limits.precision,
        "prompt": prompt,
        "sampling": dataclasses.asdict(s),
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
    }
    if version:  # only then: the unnamed version's keys stay what they were
        described["version"] = version
    return KEY_PREFIX + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """The memory tier (LRU in bytes), the optional disk tier and the optional Redis tier."""

    def __init__(
        self,
        model_name: str,
        max_bytes: int,
        redis_url: str | None = None,
        ttl_s: int = 3600,
        disk: DiskStore | None = None,
    ) -> None:
        """`disk`: the disk tier's store, opened by `open()`."""
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.bytes = 0
        self._redis: Any = None
        self._redis_down_until = 0.0
        self.disk = DiskTier(disk) if disk is not None else None
        if redis_url:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                retry_on_timeout=False,
            )
        labels = ["model_name"]
        self.hits = Counter("meshserve_result_cache_hits", "Answers served from the result cache.", labels + ["tier"])
        self.misses = Counter(
            "meshserve_result_cache_misses", "Cacheable requests not in the result cache.", labels
        ).labels(model_name)
        self.evictions = Counter(
            "meshserve_result_cache_evictions", "Answers evicted from the memory tier.", labels
        ).labels(model_name)
        Gauge("meshserve_result_cache_bytes", "Bytes of answers in the memory tier.", labels).labels(
            model_name
        ).set_function(lambda: self.bytes)
        if self.disk is not None:
            disk_tier = self.disk
            Gauge(
                "meshserve_result_cache_disk_bytes",
                "Bytes of the disk tier's database in use (answers, keys, indexes).",
                labels,
            ).labels(model_name).set_function(lambda: disk_tier.used_bytes)
        self._model_name = model_name

    async def open(self) -> None:
        """Opens the disk tier, if there is one (a file it cannot use is moved aside or leaves it off)."""
        if self.disk is not None:
            await self.disk.open()

    async def get(self, key: str, count_miss: bool = True) -> tuple[CachedAnswer, str] | None:
        """The answer stored under `key` and the tier that had it ("memory", "disk" or "redis"), or None
        (counted as a miss unless `count_miss` is false: the caller counts it once it knows)."""
        found = await self._lookup(key)
        if found is not None:
            data, tier = found
            try:
                answer = CachedAnswer.decode(data)
            except (ValueError, KeyError, TypeError, json_format.Error) as error:
                # another version's encoding, or a foreign value: a miss, and gone from memory and disk
                log.warning("result cache: an answer from the %s tier does not decode (%s); dropped it", tier, error)
                self._forget(key)
                if self.disk is not None:
                    self.disk.discard(key)
            else:
                self.hits.labels(self._model_name, tier).inc()
                return answer, tier
        if count_miss:
            self.misses.inc()
        return None

    async def _lookup(self, key: str) -> tuple[bytes, str] | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
            return data, "memory"
        if self.disk is not None:
            data = await self.disk.get(key)
            if data is not None:
                self._remember(key, data)
                return data, "disk"
        data = await self._redis_call("GET", lambda redis: redis.get(key))
        if data is not None:
            self._remember(key, data)
            if self.disk is not None:  # the local copy: after a restart this router has it without Redis
                self.disk.put(key, data)
            return data, "redis"
        return None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        data = answer.encode()
        self._remember(key, data)
        if self.disk is not None:
            self.disk.put(key, data)
        await self._redis_call("SET", lambda redis: redis.set(key, data, ex=self.ttl_s))

    def _forget(self, key: str) -> None:
        data = self._entries.pop(key, None)
        if data is not None:
            self.bytes -= len(data)

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= len(self._entries.pop(key))
        self._entries[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)
            self.evictions.inc()

    async def _redis_call(self, command: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        try:
            return await call(self._redis)
        except Exception as error:
            self._redis_down_until = time.monotonic() + REDIS_RETRY_AFTER_S
            log.warning(
                "result cache: Redis %s failed (%s); using the memory tier alone for %.0f s",
                command,
                type(error).__name__,
                REDIS_RETRY_AFTER_S,
            )
            return None

    async def close(self) -> None:
        if self.disk is not None:
            await self.disk.close()
        if self._redis is not None:
            await self._redis.aclose()
