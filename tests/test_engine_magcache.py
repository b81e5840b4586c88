"""MagCache (engine/sampling/magcache.py): the skip pattern on a fixed calibration vs a hand computation, the reused
residual, calibration records, ratio resampling and bad settings."""

import pytest
import torch

from engine.families.hunyuan.pipeline import MAGCACHE_RATIOS as DEFAULT_MAG_RATIOS
from engine.errors import MusubiInputError
from engine.sampling.magcache import MagCache, MagCacheConfig, resample_ratios


def _blocks(calls):
    """Stand-in for a DiT's blocks: x -> x + a residual that changes every call; records the calls."""
    def run(x):
        calls.append(x.clone())
        return x * 1.5 + len(calls)
    return run


def test_skip_pattern_matches_a_hand_computation():
    # steps 8, retention 0.25 -> steps 0, 1 always run; threshold 0.15, at most 2 skips in a row; step 7 (last) runs.
    # step 2: ratio 1.0,               error 0.0           skips 1 -> skip
    # step 3: ratio 0.95,              error 0.05          skips 2 -> skip
    # step 4: ratio 0.95·1.02 = 0.969, error 0.05 + 0.031  skips 3 > 2 -> run, reset
    # step 5: ratio 1.0,               error 0.0           skips 1 -> skip
    # step 6: ratio 1.3,               error 0.3 > 0.15            -> run, reset
    cfg = MagCacheConfig(mag_ratios=[1.0, 1.1, 1.0, 0.95, 1.02, 1.0, 1.3, 1.0], retention_ratio=0.25,
                         threshold=0.15, max_skips=2)
    cache, calls = MagCache(cfg, steps=8), []
    x = torch.ones(1, 3, 4)
    outs = [cache.run(x * (s + 1), _blocks(calls)) for s in range(8)]
    assert cache.skipped == [2, 3, 5]
    assert len(calls) == 5
    # a skipped step adds the residual of the last step that ran
    residual_1 = outs[1] - x * 2
    torch.testing.assert_close(outs[2], x * 3 + residual_1)
    torch.testing.assert_close(outs[3], x * 4 + residual_1)
    residual_4 = outs[4] - x * 5
    torch.testing.assert_close(outs[5], x * 6 + residual_4)
    with pytest.raises(MusubiInputError) as e:
        cache.run(x, _blocks(calls))
    assert str(e.value) == "magcache step: got 9; expected at most the 8 steps it was set up for"


def test_ratios_multiply_and_errors_add_up_while_skipping():
    """The accumulated ratio is the product of the table since the last run, the error the sum of |1 − ratio|, and
    the count of skips in a row restarts at 0 after a run. Steps 8, retention 0 (step 1 may skip), threshold 0.35,
    at most 3 skips in a row:
    step 1: ratio 0.75,             error 0.25                 skips 1 -> skip
    step 2: ratio 0.75·1.25=0.9375, error 0.25+0.0625=0.3125   skips 2 -> skip
    step 3: ratio 0.9375,           error 0.375 > 0.35                 -> run, reset
    steps 4, 5, 6: ratio 1, error 0, skips 1, 2, 3                     -> skip; step 7 (the last) runs."""
    done = []
    cfg = MagCacheConfig([1.0, 0.75, 1.25, 1.0, 1.0, 1.0, 1.0, 1.0], retention_ratio=0.0, threshold=0.35,
                         max_skips=3, on_done=done.append)
    cache = MagCache(cfg, steps=8)
    assert cache.first_skippable == 1
    for s in range(8):
        assert done == []                       # called once, after the last step, with the cache
        cache.run(torch.full((1, 2), float(s)), lambda t: t * 2 + 1)
    assert cache.skipped == [1, 2, 4, 5, 6]
    assert done == [cache]

    # threshold 0: a flat table still skips (its error is exactly 0), one in a row
    flat = MagCache(MagCacheConfig([1.0], retention_ratio=0.0, threshold=0.0, max_skips=1), steps=4)
    for s in range(4):
        flat.run(torch.zeros(1, 2), lambda t: t + 1)
    assert flat.skipped == [1]


def test_defaults_retention_and_last_step():
    """The HunyuanVideo table at 25 steps: steps 0-4 (20 %) and 24 always run; Musubi's 0.24 / K 6."""
    cache = MagCache(MagCacheConfig(DEFAULT_MAG_RATIOS), steps=25)
    assert cache.first_skippable == 5
    x = torch.zeros(1, 2, 2)
    for _ in range(25):
        cache.run(x, lambda t: t + 1)
    assert cache.skipped and min(cache.skipped) >= 5 and 24 not in cache.skipped
    runs = 0
    for s in range(25):                      # never more than 6 skips in a row
        runs = runs + 1 if s in cache.skipped else 0
        assert runs <= 6


def test_resampling_is_nearest_index():
    assert resample_ratios([1, 2, 3, 4, 5], 3) == [1.0, 3.0, 5.0]
    assert resample_ratios([1, 2, 3], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]   # i·0.5: round(0.5) = 0, round(1.5) = 2 (to even)
    assert resample_ratios([1, 2, 3], 1) == [3.0]
    r25 = resample_ratios(DEFAULT_MAG_RATIOS, 25)                         # index round(i·49/24)
    assert r25[:3] == [1.0, DEFAULT_MAG_RATIOS[2], DEFAULT_MAG_RATIOS[4]] and r25[-1] == DEFAULT_MAG_RATIOS[49]
    assert len(DEFAULT_MAG_RATIOS) == 50 and MagCache(MagCacheConfig(DEFAULT_MAG_RATIOS), 50).ratios == list(DEFAULT_MAG_RATIOS)
    assert MagCache(MagCacheConfig(DEFAULT_MAG_RATIOS), 25).ratios == r25     # a table of another length: resampled


def test_calibration_runs_every_step_and_records_the_ratios():
    cache = MagCache(MagCacheConfig(calibrate=True), steps=4)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    scales = [1.0, 2.0, 1.0, 4.0]
    for s in scales:
        cache.run(x, lambda t, s=s: t + s * x)   # residual s·x: norm ratio s_t / s_{t-1} for every token
    assert cache.skipped == []
    assert cache.calibration.norm_ratio == pytest.approx([2.0, 0.5, 4.0])
    assert cache.calibration.norm_std == pytest.approx([0, 0, 0], abs=1e-5)
    assert cache.calibration.cosine_distance == pytest.approx([0, 0, 0], abs=1e-5)
    assert cache.calibration.mag_ratios() == pytest.approx([1.0, 2.0, 0.5, 4.0])


def test_calibration_statistics_are_per_token():
    """Norm ratio and cosine distance per token (over channels), then mean / std over the tokens, 5 decimals.
    Residuals [B=1, L=2, D=2], small (norm products < 1, so the cosine's eps matters if it is wrong):
    token 0: (0.1, 0) -> (0.1, 0.1): ratio √2, cosine distance 1 − 1/√2; token 1: (0, 0.1) -> (0, 0.2): ratio 2, 0."""
    previous = torch.tensor([[[0.1, 0.0], [0.0, 0.1]]])
    current = torch.tensor([[[0.1, 0.1], [0.0, 0.2]]])
    cache = MagCache(MagCacheConfig(calibrate=True), steps=2)
    x = torch.zeros(1, 2, 2)
    cache.run(x, lambda t: t + previous)
    cache.run(x, lambda t: t + current)
    ratios = torch.tensor([2 ** 0.5, 2.0])
    assert cache.calibration.norm_ratio == [round(ratios.mean().item(), 5)] == [1.70711]
    assert cache.calibration.norm_std == [round(ratios.std().item(), 5)] == [0.41421]
    assert cache.calibration.cosine_distance == [round((1 - 2 ** -0.5) / 2, 5)] == [0.14645]


@pytest.mark.parametrize("kwargs,message", [
    ({"mag_ratios": []}, "magcache mag_ratios: got []; expected a list of positive numbers (a calibration)"),
    ({"mag_ratios": [1.0, 0.0]}, "magcache mag_ratios: got [1.0, 0.0]; expected a list of positive numbers"),
    ({"retention_ratio": 1.5}, "magcache retention_ratio: got 1.5; expected a fraction from 0 to 1"),
    ({"retention_ratio": -0.1}, "magcache retention_ratio: got -0.1; expected a fraction from 0 to 1"),
    ({"threshold": -0.1}, "magcache threshold: got -0.1; expected a number ≥ 0 (0.24 is the default)"),
    ({"max_skips": 0}, "magcache max_skips: got 0; expected an integer ≥ 1 (6 is the default)"),
    ({"max_skips": True}, "magcache max_skips: got True; expected an integer ≥ 1"),
    ({"max_skips": 2.0}, "magcache max_skips: got 2.0; expected an integer ≥ 1"),
])
def test_bad_settings_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(MusubiInputError) as e:
        MagCache(MagCacheConfig(**{"mag_ratios": [1.0], **kwargs}), steps=10)
    assert str(e.value).startswith(message)


def test_bad_step_counts_and_a_missing_table_are_refused():
    for steps in (0, True, 2.0):
        with pytest.raises(MusubiInputError) as e:
            MagCache(MagCacheConfig([1.0]), steps=steps)
        assert str(e.value) == f"magcache steps: got {steps!r}; expected the number of sampling steps (≥ 1)"
    with pytest.raises(MusubiInputError) as e:   # no table and no calibration run
        MagCache(MagCacheConfig(), steps=10)
    assert str(e.value) == ("magcache mag_ratios: got None; expected a calibration (the model's table or a "
                            "calibration run's)")


def test_the_edges_of_the_settings_are_accepted():
    """Retention 0 and 1, threshold 0, one skip, one step: all valid."""
    for kwargs in ({"retention_ratio": 0.0}, {"retention_ratio": 1.0}, {"threshold": 0.0}, {"max_skips": 1}):
        MagCache(MagCacheConfig(**{"mag_ratios": [1.0], **kwargs}), steps=10)
    assert MagCache(MagCacheConfig([1.0, 2.0]), steps=1).ratios == [2.0]
