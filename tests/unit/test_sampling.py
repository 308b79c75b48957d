import numpy as np

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
