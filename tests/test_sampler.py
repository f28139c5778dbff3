"""Sampler filters on hand-built distributions; defaults by mode; seeds; greedy."""

import numpy as np
import pytest

from qwen3cli.sampler import (Sampler, SamplingParams, apply_penalties, default_params, log_softmax, min_p, token_logprob,
                              top_k, top_p)

# probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 as logits
PROBS = np.array([0.0625, 0.5, 0.125, 0.0625, 0.25])
LOGITS = np.log(PROBS)
IDS = np.arange(5)


def kept(f, *a):
    ids, _ = f(IDS, LOGITS, *a)
    return sorted(ids.tolist())


def test_top_k():
    assert kept(top_k, 1) == [1]
    assert kept(top_k, 2) == [1, 4]
    assert kept(top_k, 0) == [0, 1, 2, 3, 4]  # off
    assert kept(top_k, 99) == [0, 1, 2, 3, 4]


def test_top_p():
    assert kept(top_p, 0.5) == [1]  # 0.5 reaches 0.5
    assert kept(top_p, 0.6) == [1, 4]
    assert kept(top_p, 0.8) == [1, 2, 4]  # 0.875 >= 0.8
    assert kept(top_p, 1.0) == [0, 1, 2, 3, 4]
    assert kept(top_p, 1e-9) == [1]  # never empty


def test_min_p():
    assert kept(min_p, 0.5) == [1, 4]  # >= 0.25
    assert kept(min_p, 0.2) == [1, 2, 4]  # >= 0.1
    assert kept(min_p, 0.0) == [0, 1, 2, 3, 4]
    assert kept(min_p, 1.0) == [1]


def test_penalties():
    x = np.array([2.0, -2.0, 1.0, 0.5])
    np.testing.assert_allclose(apply_penalties(x, [0, 1, 1], 0.0, 2.0, 64), [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_allclose(apply_penalties(x, [0, 1, 1], 1.5, 1.0, 64), [0.5, -3.5, 1.0, 0.5])
    np.testing.assert_allclose(apply_penalties(x, [0, 2], 0.0, 2.0, 1), [2.0, -2.0, 0.5, 0.5])  # window of 1
    assert apply_penalties(x, [], 1.5, 2.0, 64) is x


def test_greedy_at_temperature_zero():
    s = Sampler(SamplingParams(temperature=0, seed=1))
    assert all(s(LOGITS, []) == 1 for _ in range(20))


def test_sampling_frequencies_follow_the_filters():
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=0))
    draws = np.bincount([s(LOGITS, []) for _ in range(4000)], minlength=5) / 4000
    assert draws[0] == draws[3] == 0
    np.testing.assert_allclose(draws[[1, 2, 4]], np.array([0.5, 0.125, 0.25]) / 0.875, atol=0.03)


def test_seed_reproducible():
    logits = np.random.default_rng(0).standard_normal(1000)
    a = [Sampler(SamplingParams(seed=7, top_k=0, top_p=1.0))(logits, []) for _ in range(3)]
    s1, s2 = Sampler(SamplingParams(seed=7, top_k=0, top_p=1.0)), Sampler(SamplingParams(seed=7, top_k=0, top_p=1.0))
    assert [s1(logits, []) for _ in range(50)] == [s2(logits, []) for _ in range(50)]
    assert len(set(a)) == 1
    s3 = Sampler(SamplingParams(seed=8, top_k=0, top_p=1.0))
    assert [s3(logits, []) for _ in range(50)] != [s2(logits, []) for _ in range(50)]


def test_defaults_by_mode_file_then_user():
    t, n = default_params(True), default_params(False)
    assert (t.temperature, t.top_p, t.top_k, t.min_p) == (0.6, 0.95, 20, 0.0)
    assert (n.temperature, n.top_p, n.top_k, n.min_p) == (0.7, 0.8, 20, 0.0)
    md = {"general.sampling.temp": np.float32(0.5), "general.sampling.top_k": np.int32(40)}
    f = default_params(True, md)
    assert f.temperature == pytest.approx(0.5) and f.top_k == 40 and f.top_p == 0.95
    u = default_params(True, md, temperature=0.0, top_k=None)
    assert u.temperature == 0.0 and u.top_k == 40
    # the file's keys describe the model's default mode; the other mode keeps Qwen's values
    assert default_params(False, md, file_mode=False) == n


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1)])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        default_params(True, **bad)


def test_token_logprob_on_a_hand_built_distribution():
    # float64 through: probabilities that sum to 1 within 1e-12, a 1e-30 one kept to 5 digits
    logits = np.array([0.0, np.log(3.0), np.log(3.0), -69.0776], np.float32)
    lp = log_softmax(logits)
    assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-12) and lp.dtype == np.float64
    t = token_logprob(lp, 3, 3)
    assert t.id == 3 and t.logprob == pytest.approx(np.log(1e-30 / 7), rel=1e-5)
    assert [i for i, _ in t.top] == [1, 2, 0]  # most likely first, a tie by id
    assert [v for _, v in t.top] == pytest.approx([np.log(3 / 7), np.log(3 / 7), np.log(1 / 7)], abs=1e-6)
    assert len(token_logprob(lp, 0, 20).top) == 4 and token_logprob(lp, 0, 0).top == ()
    rows = log_softmax(np.stack([logits, logits[::-1]]))  # row by row
    assert rows[1, 0] == lp[3]
