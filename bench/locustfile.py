"""Locust load test of the OpenAI-compatible endpoint: streamed chat completions (three quarters of the
traffic, as chat clients send it) and non-streamed completions, over the prompts `meshserve bench` uses.

    .venv/bin/locust -f bench/locustfile.py --host http://localhost:8080 --headless -u 8 -r 2 -t 60s

Besides each request's total time, Locust reports the streamed requests' time to first token as the
request type "TTFT" (a failed stream counts as a failure of its request, not of TTFT). Settings from the
environment: MESHSERVE_MODEL (default SmolLM2-135M-Instruct), MESHSERVE_MAX_TOKENS (default 64),
MESHSERVE_TOKEN (a bearer token, e.g. from `meshserve mint-token`, for a mesh run with --auth jwt).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

from services.bench.prompts import DEFAULT_PROMPTS

MODEL = os.environ.get("MESHSERVE_MODEL", "SmolLM2-135M-Instruct")
MAX_TOKENS = int(os.environ.get("MESHSERVE_MAX_TOKENS", "64"))
TOKEN = os.environ.get("MESHSERVE_TOKEN")


class OpenAIUser(HttpUser):
    """One client of the OpenAI API; a short think time between requests. Its requests cycle through one
    completion and three streamed chats, so even a run of a few seconds exercises both."""

    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        self.client.headers["content-type"] = "application/json"
        if TOKEN:
            self.client.headers["authorization"] = f"Bearer {TOKEN}"
        self.sent = 0

    @task
    def next_request(self) -> None:
        self.sent += 1
        if self.sent % 4 == 1:
            self.completion()
        else:
            self.chat_stream()

    def chat_stream(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": random.choice(DEFAULT_PROMPTS)}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            stream=True,
            catch_response=True,
            name="/v1/chat/completions (stream)",
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            first_token_at = None
            usage = None
            done = False
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(f"error event: {event['error'].get('message')}")
                    return
                if first_token_at is None and any(c["delta"].get("content") for c in event["choices"]):
                    first_token_at = time.perf_counter()
                usage = event.get("usage") or usage
            if not done or first_token_at is None or not usage or not usage["completion_tokens"]:
                response.failure("the stream ended without tokens, usage or [DONE]")
                return
            response.success()
        self.environment.events.request.fire(
            request_type="TTFT",
            name="/v1/chat/completions (stream)",
            response_time=(first_token_at - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )

    def completion(self) -> None:
        body = {"model": MODEL, "prompt": random.choice(DEFAULT_PROMPTS), "max_tokens": MAX_TOKENS}
        with self.client.post("/v1/completions", data=json.dumps(body), catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.json()["usage"]["completion_tokens"]:
                response.failure("no tokens generated")
            else:
                response.success()
