"""Token selection from logits: penalties, temperature, top-k, top-p, min-p with a seeded
generator, and the log-probabilities a client asked for. Pure numpy, one request row at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.common.contract import SamplingParams


@dataclass
class TokenLogprob:
    """The log-probability of a chosen token under the model, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def apply_logit_bias(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """`logits` with the request's logit_bias added (a new array; the same one when there is none)."""
    if not params.logit_bias:
        return logits
    biased = logits.astype(np.float32, copy=True)
    tokens = np.fromiter((t for t, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
    biased[tokens] += np.fromiter((b for _, b in params.logit_bias), dtype=np.float32, count=len(params.logit_bias))
    return biased


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_ids: list[int], output_ids: list[int], stop_ids: frozenset[int]
) -> np.ndarray:
    """Returns logits adjusted for repetition/presence/frequency penalties and min_tokens."""
    if not params.needs_history and len(output_ids) >= params.min_tokens:
        return logits
    logits = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0:
        seen = np.fromiter(set(prompt_ids) | set(output_ids), dtype=np.int64)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        tokens, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        logits[tokens] -= params.presence_penalty + params.frequency_penalty * counts
    if len(output_ids) < params.min_tokens and stop_ids:
        logits[np.fromiter(stop_ids, dtype=np.int64)] = -np.inf
    return logits


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Picks one token id from float32 logits [vocab] (already penalized)."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    candidates = None  # token ids still allowed, most likely first
    if params.top_k > 0 and params.top_k < probs.shape[0]:
        top = np.argpartition(-probs, params.top_k - 1)[: params.top_k]
        candidates = top[np.argsort(-probs[top], kind="stable")]
    if params.top_p < 1.0 or params.min_p > 0.0:
        if candidates is None:
            candidates = np.argsort(-probs, kind="stable")
        kept = probs[candidates]
        keep = len(candidates)
        if params.top_p < 1.0:
            # the smallest prefix whose mass reaches top_p (always at least one token)
            keep = min(keep, int(np.searchsorted(np.cumsum(kept) / kept.sum(), params.top_p) + 1))
        if params.min_p > 0.0:
            keep = min(keep, max(1, int((kept >= params.min_p * kept[0]).sum())))
        candidates = candidates[:keep]
    if candidates is None:
        return int(rng.choice(probs.shape[0], p=probs))
    kept = probs[candidates] / probs[candidates].sum()
    return int(candidates[rng.choice(len(candidates), p=kept)])


def token_logprob(raw_logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """Log-probabilities under the model's own distribution (before sampling adjustments)."""
    return token_logprobs(raw_logits[None], [token], top_n)[0]


def token_logprobs(raw_logits: np.ndarray, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """`token_logprob` for each row of raw_logits [n, vocab] and its token, with one log-softmax."""
    logprobs = log_softmax(raw_logits)
    out = []
    for row, token in zip(logprobs, tokens):
        top: list[tuple[int, float]] = []
        if top_n > 0:
            best = np.argpartition(-row, top_n - 1)[:top_n]
            best = best[np.argsort(-row[best], kind="stable")]
            top = [(int(t), float(row[t])) for t in best]
        out.append(TokenLogprob(token, float(row[token]), top))
    return out
