import numpy as np
import pytest

from services.inference.sampling import SamplingParams, sample_token


def _logits(values):
    return np.array(values, dtype=np.float32)


def test_greedy_takes_the_argmax():
    logits = _logits([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, SamplingParams(temperature=0.0), np.random.default_rng(0)) == 1


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    run = lambda seed: [sample_token(logits, params, rng) for rng in [np.random.default_rng(seed)] for _ in range(50)]  # noqa: E731
    assert run(42) == run(42)
    assert run(42) != run(43)


def test_top_p_keeps_only_the_nucleus():
    # probabilities ~ [0.62, 0.23, 0.08, ...]: top_p=0.5 leaves only the first token
    logits = _logits([3.0, 2.0, 1.0, 0.0, -1.0])
    rng = np.random.default_rng(0)
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert picks == {0}
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), rng) for _ in range(400)}
    assert picks == {0, 1}


def test_low_temperature_concentrates_mass():
    logits = _logits([1.0, 0.9, 0.8])
    rng = np.random.default_rng(0)
    cold = [sample_token(logits, SamplingParams(temperature=0.01), rng) for _ in range(100)]
    hot = [sample_token(logits, SamplingParams(temperature=5.0), rng) for _ in range(300)]
    assert set(cold) == {0}
    assert set(hot) == {0, 1, 2}


def test_top_k_and_min_p_limit_the_candidates():
    logits = _logits([3.0, 2.9, 2.8, 0.0, -1.0])
    rng = np.random.default_rng(0)
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(300)} == {0, 1}
    # min_p=0.5: only tokens at least half as likely as the best (0, 1, 2) survive
    assert {sample_token(logits, SamplingParams(temperature=1.0, min_p=0.5), rng) for _ in range(500)} == {0, 1, 2}


def test_penalties_push_down_repeated_tokens():
    from services.inference.sampling import apply_penalties

    logits = _logits([2.0, 1.9, -1.0])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, repetition_penalty=2.0)
    adjusted = apply_penalties(logits, params, prompt_ids=[2], output_ids=[0, 0], stop_ids=frozenset())
    assert adjusted[0] == pytest.approx(2.0 / 2.0 - 1.0) and adjusted[1] == pytest.approx(1.9)
    assert adjusted[2] == pytest.approx(-2.0)  # negative logits are multiplied
    assert np.argmax(adjusted) == 1
    suppressed = apply_penalties(logits, SamplingParams(min_tokens=3), [], [0], frozenset({0}))
    assert suppressed[0] == -np.inf
