"""Timestep sampling: distributions against closed forms, bounds, stratification, determinism, loss weights."""

import math

import pytest
import torch

from engine.errors import MusubiInputError
from engine.training.timesteps import TimestepConfig, TimestepSampler, sample_timesteps

N = 20000
PS = [0.05, 0.25, 0.5, 0.75, 0.95]
LATENT = (1, 16, 1, 64, 64)  # h = w = 64 latent -> (h/2)(w/2) = 1024 tokens


def draw(cfg, n=N, seed=0, shape=LATENT):
    return sample_timesteps(cfg, n, shape, torch.Generator().manual_seed(seed))


def phi_inv(p):
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logit(t):
    return math.log(t / (1 - t))


def shift(t, s):
    return s * t / (1 + (s - 1) * t)


def check_quantiles(t, expected_fn, tol=0.012):
    for p in PS:
        got = torch.quantile(t.double(), p).item()
        assert abs(got - expected_fn(p)) < tol, (p, got, expected_fn(p))


def test_uniform_quantiles_and_model_timestep():
    s = draw(TimestepConfig("uniform"))
    check_quantiles(s.t, lambda p: p)
    assert torch.allclose(s.model_t, s.t * 1000)  # 1000·t, not Musubi's 1000·t + 1
    assert s.weight is None


def test_sigmoid_quantiles_follow_sigmoid_of_scaled_normal():
    s = draw(TimestepConfig("sigmoid", sigmoid_scale=1.7))
    check_quantiles(s.t, lambda p: sigmoid(1.7 * phi_inv(p)))


def test_shift_quantiles_follow_shift_mapping():
    s = draw(TimestepConfig("shift", discrete_flow_shift=3.0))
    check_quantiles(s.t, lambda p: shift(sigmoid(phi_inv(p)), 3.0))
    assert s.t.median() > 0.7  # a shift of 3 pushes the median of 0.5 to 0.75


@pytest.mark.parametrize("mode,tokens,line", [
    ("flux_shift", 32 * 32, ((256, 0.5), (4096, 1.15))),
    ("flux2_shift", 64 * 64, ((256, 0.5), (4096, 1.15))),
    ("qwen_shift", 32 * 32, ((256, 0.5), (8192, 0.9))),
    ("krea2_shift", 32 * 32, ((256, 0.5), (6400, 1.15))),
])
def test_resolution_dependent_shift(mode, tokens, line):
    (x0, y0), (x1, y1) = line
    mu = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    s = draw(TimestepConfig(mode))
    check_quantiles(s.t, lambda p: shift(sigmoid(phi_inv(p)), math.exp(mu)))


def test_resolution_shift_grows_with_resolution():
    small = draw(TimestepConfig("flux_shift"), shape=(1, 16, 1, 16, 16)).t.median()
    large = draw(TimestepConfig("flux_shift"), shape=(1, 16, 1, 128, 128)).t.median()
    assert large > small + 0.1


def test_logsnr_quantiles():
    cfg = TimestepConfig("logsnr", logit_mean=-6.0, logit_std=2.0)
    # t = sigmoid(-logSNR/2) decreases in logSNR: the p-quantile of t comes from the (1-p)-quantile of logSNR
    check_quantiles(draw(cfg).t, lambda p: sigmoid(-(-6.0 + 2.0 * phi_inv(1 - p)) / 2))


def test_qinglong_flux_is_the_stated_mixture():
    cfg = TimestepConfig("qinglong_flux", logit_mean=-3.0, logit_std=1.5)
    t = draw(cfg, n=40000).t.double()
    mu = 0.5 + 0.65 * (1024 - 256) / 3840
    S = math.exp(mu)

    def cdf_shift(x):
        x0 = x / (S - (S - 1) * x)  # inverse of the shift mapping
        return phi(logit(x0))

    def cdf_logsnr(x, m, sd):
        return 1 - phi((-2 * logit(x) - m) / sd)

    for x in (0.05, 0.2, 0.5, 0.8, 0.95):
        expected = 0.79 * cdf_shift(x) + 0.11 * cdf_logsnr(x, -3.0, 1.5) + 0.10 * cdf_logsnr(x, 5.36, 1.0)
        got = (t <= x).double().mean().item()
        assert abs(got - expected) < 0.012, (x, got, expected)


def test_qinglong_qwen_uses_95_5_split():
    t = draw(TimestepConfig("qinglong_qwen"), n=40000).t.double()
    # logsnr2 ~ N(5.36, 1) puts its mass below t = sigmoid(-(5.36 - 3)/2) ≈ 0.235; qwen_shift has ~5 % there too
    mu = 0.5 + 0.4 * (1024 - 256) / (8192 - 256)
    S = math.exp(mu)
    x = 0.05
    expected = 0.95 * phi(logit(x / (S - (S - 1) * x))) + 0.05 * (1 - phi((-2 * logit(x) - 5.36) / 1.0))
    assert abs((t <= x).double().mean().item() - expected) < 0.01


def test_sigma_mode_is_a_discrete_1000_step_table():
    s = draw(TimestepConfig("sigma"))
    ts = s.model_t
    assert torch.allclose(ts, ts.round(), atol=1e-3)
    assert ts.min() >= 1 and ts.max() <= 1000
    check_quantiles(s.t, lambda p: p, tol=0.015)


def test_sigma_logit_normal_density():
    s = draw(TimestepConfig("sigma", weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0))
    # symmetric density: the table direction does not matter; discretization adds at most 1/1000
    check_quantiles(s.t, lambda p: sigmoid(phi_inv(p)), tol=0.015)


def test_sigma_mode_honours_flow_shift():  # Musubi ignores it (quirk 1); this pack applies it
    plain = draw(TimestepConfig("sigma")).t
    shifted = draw(TimestepConfig("sigma", discrete_flow_shift=3.0)).t
    assert torch.allclose(shifted, shift(plain, 3.0), atol=1e-5)


def test_sigma_min_max_bound_timesteps_not_inverted():
    s = draw(TimestepConfig("sigma", min_timestep=500, max_timestep=1000))
    assert s.model_t.min() >= 501 - 1e-3 and s.model_t.max() <= 1000 + 1e-3  # Musubi would give ≈1..500


def test_min_max_rescale_default():
    s = draw(TimestepConfig("uniform", min_timestep=200, max_timestep=600))
    assert s.t.min() >= 0.2 and s.t.max() <= 0.6
    check_quantiles(s.t, lambda p: 0.2 + 0.4 * p)


def test_preserve_distribution_shape_truncates():
    cfg = TimestepConfig("sigmoid", min_timestep=400, max_timestep=700, preserve_distribution_shape=True)
    t = draw(cfg).t
    assert t.min() >= 0.4 and t.max() <= 0.7
    lo, hi = phi(logit(0.4)), phi(logit(0.7))
    check_quantiles(t, lambda p: sigmoid(phi_inv(lo + p * (hi - lo))))


def test_preserve_fallback_stays_in_range():
    # t ≈ sigmoid(-5) ≈ 0.007 always: rejection can never land in [0.9, 1]; the fallback must still be in range
    cfg = TimestepConfig("logsnr", logit_mean=10.0, logit_std=0.05, min_timestep=900, max_timestep=1000,
                         preserve_distribution_shape=True)
    t = draw(cfg, n=8).t
    assert t.min() >= 0.9 and t.max() <= 1.0


def test_buckets_are_stratified():
    sampler = TimestepSampler(TimestepConfig("uniform", num_timestep_buckets=4))
    g = torch.Generator().manual_seed(3)
    draws = torch.cat([sampler.sample(3, LATENT, g).t for _ in range(12)])  # 36 = 9 pool refills of 4
    buckets = (draws * 4).floor().long().clamp(max=3)
    assert torch.bincount(buckets, minlength=4).tolist() == [9, 9, 9, 9]
    for i in range(0, 36, 4):
        assert sorted(buckets[i:i + 4].tolist()) == [0, 1, 2, 3]


def test_bucket_pool_state_roundtrip():
    cfg = TimestepConfig("shift", discrete_flow_shift=2.0, num_timestep_buckets=5)
    a, g = TimestepSampler(cfg), torch.Generator().manual_seed(1)
    a.sample(3, LATENT, g)
    state, gstate = a.state_dict(), g.get_state()
    expected = a.sample(4, LATENT, g).t
    b = TimestepSampler(cfg)
    b.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(gstate)
    assert torch.equal(b.sample(4, LATENT, g2).t, expected)


def test_determinism_from_generator():
    cfg = TimestepConfig("qinglong_flux")
    assert torch.equal(draw(cfg, 64, seed=5).t, draw(cfg, 64, seed=5).t)
    assert not torch.equal(draw(cfg, 64, seed=5).t, draw(cfg, 64, seed=6).t)


def test_loss_weights():
    s = draw(TimestepConfig("uniform", weighting_scheme="sigma_sqrt"), n=100)
    assert torch.allclose(s.weight, s.t.clamp(min=1e-3) ** -2)
    c = draw(TimestepConfig("uniform", weighting_scheme="cosmap"), n=100)
    assert torch.allclose(c.weight, 2 / (math.pi * (1 - 2 * c.t + 2 * c.t ** 2)))
    assert draw(TimestepConfig("uniform", weighting_scheme="logit_normal"), n=4).weight is None


def test_mode_weighting_shapes_sigma_sampler():
    cfg = TimestepConfig("sigma", weighting_scheme="mode", mode_scale=1.29)
    t = draw(cfg).t
    # u' = 1 − u − m(cos²(πu/2) − 1 + u) falls from 1 to 0 (m = 1.29); t ≈ 1 − u' rises with u
    for p in PS:
        u = p
        up = 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
        assert abs(torch.quantile(t.double(), p).item() - (1 - up)) < 0.015


@pytest.mark.parametrize("kwargs,field", [
    ({"timestep_sampling": "banana"}, "timestep_sampling"),
    ({"weighting_scheme": "x"}, "weighting_scheme"),
    ({"min_timestep": 700, "max_timestep": 300}, "min_timestep/max_timestep"),
    ({"max_timestep": 1001}, "max_timestep"),
    ({"discrete_flow_shift": 0}, "discrete_flow_shift"),
])
def test_bad_config_raises(kwargs, field):
    with pytest.raises(MusubiInputError, match=field.replace("/", ".")):
        TimestepConfig(**kwargs).validate()
