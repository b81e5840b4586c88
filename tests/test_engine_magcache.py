"""MagCache (engine/sampling/magcache.py): the skip pattern on a fixed calibration vs a hand computation, the reused
residual, calibration records, ratio resampling and bad settings."""

import pytest
import torch

from engine.families.hunyuan.pipeline import MAGCACHE_RATIOS as DEFAULT_MAG_RATIOS
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
    with pytest.raises(Exception, match="at most the 8 steps"):
        cache.run(x, _blocks(calls))


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


@pytest.mark.parametrize("kwargs,name", [
    ({"mag_ratios": []}, "mag_ratios"), ({"mag_ratios": [1.0, -1.0]}, "mag_ratios"),
    ({"retention_ratio": 1.5}, "retention_ratio"), ({"threshold": -0.1}, "threshold"),
    ({"max_skips": 0}, "max_skips"),
])
def test_bad_settings_are_refused(kwargs, name):
    with pytest.raises(Exception, match=name):
        MagCache(MagCacheConfig(**{"mag_ratios": [1.0], **kwargs}), steps=10)
    with pytest.raises(Exception, match="steps"):
        MagCache(MagCacheConfig([1.0]), steps=0)
    with pytest.raises(Exception, match="mag_ratios"):   # no table and no calibration run
        MagCache(MagCacheConfig(), steps=10)
