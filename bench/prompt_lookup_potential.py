"""What prompt-lookup (n-gram) speculation could give one stream, measured on the backend alone
before it is built: greedy answers of the benchmark's chat prompts (decode steps, as served), then

1. acceptance: at each step a draft of up to k tokens is taken after the latest earlier occurrence
   of the context's last n tokens (n from 3 down to `min_n`, over prompt + answer so far), and the
   tokens the step would yield counted (its own token plus the drafts greedy would have confirmed);
2. cost: one row's step time by new tokens (a step verifying k drafts runs k + 1 tokens);
3. projection: tokens a second with speculation over tokens a second without, if it were free of
   any other cost, from 1 and 2;
4. exactness: the answers' positions recomputed by verifying steps of k + 1 tokens, and how many
   of their argmax differ from the decode steps' tokens (a verified draft must give exactly the
   token the decode step would have).

    .venv/bin/python bench/prompt_lookup_potential.py models/smollm2-135m-instruct/*-int8-v5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from services.bench.engine import encode_prompts
from services.bench.prompts import DEFAULT_PROMPTS
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.evaluate import greedy
from services.modelstore.decoder_contract import StepBatch
from services.modelstore.layout import ModelDirectory


def draft(context: list[int], k: int, min_n: int, max_n: int = 3) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


def acceptance(answers: list[tuple[list[int], list[int]]], k: int, min_n: int) -> tuple[float, float, float]:
    """(tokens per step, share of steps with a draft, mean draft length) over all answers."""
    steps = tokens = drafted = drafted_tokens = 0
    for prompt, answer in answers:
        i = 1  # answer[0] comes from the prefill; step i feeds answer[i - 1] and yields answer[i]
        while i < len(answer):
            proposal = draft(prompt + answer[:i], k, min_n)
            accepted = 0
            while (
                accepted < len(proposal) and i + accepted < len(answer) and answer[i + accepted] == proposal[accepted]
            ):
                accepted += 1
            yielded = min(1 + accepted, len(answer) - i)
            steps, tokens = steps + 1, tokens + yielded
            drafted, drafted_tokens = drafted + bool(proposal), drafted_tokens + len(proposal)
            i += yielded
    return tokens / steps, drafted / steps, drafted_tokens / max(drafted, 1)


def step_ms(backend: OnnxRuntimeBackend, new: int, cached: int = 150, repeats: int = 30) -> float:
    tokens = list(range(1000, 1000 + new))
    batch = StepBatch.one_row(tokens, cached=cached, all_logits=True)
    for _ in range(3):
        backend.forward(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        backend.forward(batch)
    return (time.perf_counter() - started) / repeats * 1000


def disagreements(backend: OnnxRuntimeBackend, answers: list[tuple[list[int], list[int]]], k: int) -> tuple[int, int]:
    """(positions whose verifying-step argmax differs from the decode step's token, positions checked)."""
    differ = checked = 0
    for prompt, answer in answers:
        backend.forward(StepBatch.one_row(prompt))
        for start in range(0, len(answer) - 1, k + 1):
            chunk = answer[start : start + k + 1]
            if len(chunk) < 2:
                break
            logits = backend.forward(StepBatch.one_row(chunk, cached=len(prompt) + start, all_logits=True))[0]
            expected = answer[start + 1 : start + 1 + len(chunk)]
            predicted = logits[: len(expected)].argmax(-1)
            differ += int((predicted != np.array(expected)).sum())
            checked += len(expected)
    return differ, checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    model = ModelDirectory(args.model)
    backend = OnnxRuntimeBackend(model, 1, 2048)
    stop = frozenset(model.eos_token_ids)
    prompts = encode_prompts(model, list(DEFAULT_PROMPTS), True)
    answers = [(p, greedy(backend, p, args.max_tokens, stop)) for p in prompts]
    print(f"{len(answers)} greedy answers, {sum(len(a) for _, a in answers)} tokens")
    costs = {new: step_ms(backend, new) for new in range(1, 8)}
    print(
        "one row's step (150 cached tokens), ms by new tokens: "
        + ", ".join(f"{n}: {ms:.1f}" for n, ms in costs.items())
    )
    print(f"{'k':>2} {'min n':>5}  tokens/step  steps with a draft  mean draft  projected speed-up")
    for k in (2, 4, 6):
        for min_n in (1, 2):
            per_step, share, mean_draft = acceptance(answers, k, min_n)
            # a step with a draft of d tokens costs a (d + 1)-token step; without one, a decode step
            mean_ms = (1 - share) * costs[1] + share * costs[min(7, round(mean_draft) + 1)]
            speedup = per_step * costs[1] / mean_ms
            print(f"{k:>2} {min_n:>5}  {per_step:11.2f}  {share:17.0%}  {mean_draft:10.1f}  {speedup:17.2f}x")
    for k in (1, 3):
        differ, checked = disagreements(backend, answers, k)
        print(
            f"verifying steps of {k + 1} tokens: {differ} of {checked} positions' argmax differ from the decode steps'"
        )


if __name__ == "__main__":
    main()
