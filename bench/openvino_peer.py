"""The strongest CPU peer: OpenVINO GenAI's own continuous-batching pipeline, in process, on the same model,
the same prompts and the same report as `meshserve bench` / `python -m services.bench.engine`.

OpenVINO is NOT a dependency of meshserve. Run it from a venv of its own that also sees meshserve's packages
(the prompts and the report come from services.bench):

    python3 -m venv /tmp/ov-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ov-venv/lib/python3.11/site-packages/meshserve.pth
    /tmp/ov-venv/bin/pip install "openvino-genai==2026.4.*" "openvino-tokenizers==2026.4.*" optimum-intel nncf
    # the HF directory from the same GGUF (transformers reads it), then OpenVINO IR with int8 weights
    /tmp/ov-venv/bin/python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; \
        d, f = 'models/.cache', 'SmolLM2-135M-Instruct.Q4_1.gguf'; \
        M.from_pretrained(d, gguf_file=f).save_pretrained('/tmp/smol-hf'); \
        T.from_pretrained(d, gguf_file=f).save_pretrained('/tmp/smol-hf')"
    /tmp/ov-venv/bin/optimum-cli export openvino --model /tmp/smol-hf --task text-generation-with-past \
        --weight-format int8 /tmp/smol-ov-int8
    PYTHONPATH=$PWD /tmp/ov-venv/bin/python bench/openvino_peer.py /tmp/smol-ov-int8 --concurrency 32 --json

Requests go in with `add_request` (chat-templated token ids, greedy, `--max-tokens` new tokens, EOS may end
them as in the mesh) and the pipeline is stepped until they finish; `--concurrency` are in flight at once, a
new one joins when one ends. Prefix caching is off, as the mesh's result cache is in its runs. TTFT and ITL
are taken as each step's new tokens are read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from services.bench.prompts import load_prompts
from services.bench.report import RequestResult, format_table, summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an OpenVINO IR directory (optimum-cli export openvino)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, help="requests in all (default: two per stream, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cache-gb", type=float, default=2.0, help="the pipeline's KV cache size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoded = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for p in load_prompts(None)
    ]
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = max(1, int(args.cache_gb))
    scheduler.enable_prefix_caching = False
    scheduler.max_num_seqs = max(args.concurrency, 1)
    pipe = ov_genai.ContinuousBatchingPipeline(str(args.model), scheduler, "CPU")
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = args.max_tokens
    config.do_sample = False
    config.set_eos_token_id(tokenizer.eos_token_id)

    def run(total: int, max_tokens: int) -> tuple[list[RequestResult], float]:
        config.max_new_tokens = max_tokens
        in_flight: dict[int, dict] = {}
        results: list[RequestResult] = []
        sent = 0

        def send() -> None:
            nonlocal sent
            ids = encoded[sent % len(encoded)]
            handle = pipe.add_request(sent, ov.Tensor(np.array([ids], np.int64)), config)
            in_flight[sent] = {"handle": handle, "start": time.perf_counter(), "times": [], "prompt": len(ids)}
            sent += 1

        started = time.perf_counter()
        while sent < min(args.concurrency, total):
            send()
        while in_flight:
            pipe.step()
            now = time.perf_counter()
            for key, state in list(in_flight.items()):
                handle = state["handle"]
                if handle.can_read():
                    for output in handle.read().values():
                        state["times"] += [now] * len(output.generated_ids)
                if handle.get_status() != ov_genai.GenerationStatus.RUNNING and not handle.can_read():
                    times, start = state["times"], state["start"]
                    ttft = times[0] - start if times else None
                    itl = [b - a for a, b in itertools.pairwise(times)]
                    results.append(RequestResult(True, "OK", len(times), ttft, itl, now - start, state["prompt"]))
                    del in_flight[key]
                    if sent < total:
                        send()
        return results, time.perf_counter() - started

    run(args.concurrency, 8)  # warm-up wave, not reported
    results, wall = run(args.requests or max(8, 2 * args.concurrency), args.max_tokens)
    report = summarize(results, wall) | {
        "target": "openvino-genai ContinuousBatchingPipeline",
        "model": str(args.model),
    }
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
