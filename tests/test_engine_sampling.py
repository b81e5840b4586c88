"""Sampling engine: schedules, solvers (vs diffusers and vs an exact Gaussian flow), guidance masks/combination,
noise seeds."""

import math

import numpy as np
import pytest
import torch

from engine.errors import MusubiInputError
from engine.sampling import (GuidanceConfig, GuidedVelocity, cfg_step_mask, make_noise, make_solver,
                             run_sampler, shift_sigmas, slg_step_mask)

# --- schedules ---------------------------------------------------------------------------------------------------


def test_shift_formula_hand_values():
    s = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    # S=3: 3·0.5/(1+2·0.5) = 0.75
    assert shift_sigmas(s, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])
    assert shift_sigmas(s, 1.0).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_schedules_match_reference_definitions():
    n, shift = 4, 5.0
    unipc = make_solver("unipc", n, shift)
    # official Wan: σ_max read back from a float32 tensor, linspace/shift/×1000 in float64, truncated to int64
    base = np.linspace(float(np.float32(0.999)), 0, n + 1)[:n]
    expected = shift * base / (1 + (shift - 1) * base)
    assert unipc.sigmas[:n].numpy() == pytest.approx(expected)
    assert float(unipc.sigmas[-1]) == 0.0
    assert unipc.timesteps.dtype == torch.int64
    assert unipc.timesteps.tolist() == [int(v * 1000) for v in expected]

    dpm = make_solver("dpm++", n, shift)
    assert float(dpm.sigmas[0]) == 1.0 and float(dpm.sigmas[-1]) == 0.0 and len(dpm.sigmas) == n + 1
    assert dpm.timesteps[0].item() == 1000

    euler = make_solver("vanilla", n, shift)
    lin = np.linspace(1, 0, n + 1)
    assert euler.sigmas.numpy() == pytest.approx(shift * lin / (1 + (shift - 1) * lin))
    assert euler.timesteps.dtype == torch.float32


def test_unipc_sigma_max_is_float32_whatever_the_default_dtype():
    """The official scheduler reads σ_max back from a float32 tensor: int64(σ·1000) is 666, not float64's 665."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        solver = make_solver("unipc", 3, 1.0)
    finally:
        torch.set_default_dtype(before)
    assert solver.timesteps.tolist() == [999, 666, 333]
    assert float(solver.sigmas[0]) == float(np.float32(0.999))


@pytest.mark.parametrize("n,shift", [(4, 5.0), (7, 3.0), (20, 8.0)])
def test_dpmpp_schedule_matches_closed_form_and_diffusers(n, shift):
    """The DPM++ schedule from outside the pack: Wan's closed form, and diffusers' own flow-sigma construction."""
    from diffusers import DPMSolverMultistepScheduler

    dpm = make_solver("dpm++", n, shift)
    # Wan (get_sampling_sigmas): σ_i = S·u/(1 + (S−1)·u), u = 1 − i/N, i < N; final σ 0; timesteps int64(σ·1000)
    u = 1.0 - np.arange(n) / n
    closed = shift * u / (1 + (shift - 1) * u)
    assert dpm.sigmas.numpy() == pytest.approx(np.append(closed, 0.0), abs=1e-12)
    assert dpm.timesteps.dtype == torch.int64 and dpm.timesteps.tolist() == [int(v * 1000) for v in closed]

    # diffusers builds the same shifted line from σ_max = 0.999 instead of 1: undo its shift, rescale the line to
    # start at 1 and shift again; that is exactly our schedule (the shift itself is not taken from the pack)
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                      flow_shift=shift, final_sigmas_type="zero")
    sch.set_timesteps(n)
    theirs = sch.sigmas.double().numpy()
    assert theirs[-1] == 0.0 and len(theirs) == n + 1
    unshifted = theirs[:n] / (shift - (shift - 1) * theirs[:n])
    line = unshifted / unshifted[0]
    assert dpm.sigmas[:n].numpy() == pytest.approx(shift * line / (1 + (shift - 1) * line), abs=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_steps_rejected(bad):
    with pytest.raises(MusubiInputError) as e:
        make_solver("unipc", bad, 5.0)
    assert str(e.value) == f"steps: got {bad!r}; expected an integer >= 1"


def test_bad_solver_and_shift_rejected():
    with pytest.raises(MusubiInputError) as e:
        make_solver("ddim", 10, 5.0)
    assert str(e.value) == "solver: got 'ddim'; expected one of ['dpm++', 'euler', 'unipc'] (or 'vanilla' for euler)"
    with pytest.raises(MusubiInputError) as e:
        make_solver("euler", 10, 0.0)
    assert str(e.value) == "shift: got 0.0; expected a number > 0 (flow shift, e.g. 5.0)"


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_one_step_lands_on_the_data_point_and_a_further_step_is_refused(name):
    """One data point x0: the exact velocity ε − x0 is constant, so a single step (the smallest valid count) from any
    σ lands on x0, and the x0 estimate used for previews is x0 at every σ."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    solver = make_solver(name, 1, 3.0)
    s0 = float(solver.sigmas[0])
    x = (1 - s0) * x0 + s0 * eps
    assert torch.allclose(solver.denoised(eps - x0, 0, x), x0, atol=1e-6)
    out = solver.step(eps - x0, 0, x)
    assert torch.allclose(out, x0, atol=1e-6)
    with pytest.raises(RuntimeError, match="expected step 1 of 1"):
        solver.step(eps - x0, 1, out)


# --- solvers vs diffusers (independent implementation) ------------------------------------------------------------

def _toy_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=g) * 0.3

    def velocity(x, t):          # deterministic, nonlinear in x and dependent on t
        return torch.tanh(x @ w) + (float(t) / 1000.0) * x
    return velocity


def _diffusers_trajectory(name, n, shift, x, velocity, our_sigmas):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    if name == "unipc":
        sch = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                      use_flow_sigmas=True, flow_shift=shift, solver_type="bh2", predict_x0=True,
                                      lower_order_final=True)
        sch.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, n + 1)[:n])     # shifted inside, final 0 appended
    elif name == "dpm++":
        sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++",
                                          solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
        sch.set_timesteps(n)
        # diffusers' DPM builds its flow sigmas from 0.999; Wan/Musubi's start at 1.0: hand it the same schedule
        sch.sigmas = our_sigmas.float().clone()
        sch.timesteps = (our_sigmas[:n] * 1000).long()
    else:
        sch = FlowMatchEulerDiscreteScheduler(shift=shift)
        sch.set_timesteps(sigmas=np.linspace(1, 0, n + 1)[:n])
    xs = [x]
    for t in sch.timesteps:
        x = sch.step(velocity(x, t), t, x, return_dict=False)[0]
        xs.append(x)
    return sch, xs


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("n,shift", [(12, 5.0), (20, 3.0), (3, 1.0)])
def test_solver_trajectory_matches_diffusers(name, n, shift):
    velocity = _toy_model()
    x0 = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    solver = make_solver(name, n, shift)
    sch, ref = _diffusers_trajectory(name, n, shift, x0.clone(), velocity, solver.sigmas)
    assert torch.allclose(sch.sigmas.double(), solver.sigmas, atol=1e-6)
    # diffusers truncates float32 products (332 for 0.333·1000): allow one unit on the int schedules
    assert torch.allclose(sch.timesteps.double(), solver.timesteps.double(), atol=1.0 if name != "euler" else 1e-3)
    x = x0.clone()
    for i in range(n):
        x = solver.step(velocity(x, solver.timesteps[i]), i, x)
        assert torch.allclose(x, ref[i + 1], atol=2e-5, rtol=1e-5), (name, i, (x - ref[i + 1]).abs().max())


def test_multistep_solver_refuses_out_of_order_steps():
    solver = make_solver("unipc", 4, 5.0)
    x = torch.zeros(1, 2)
    solver.step(torch.ones(1, 2), 0, x)
    with pytest.raises(RuntimeError, match="expected step 1"):
        solver.step(torch.ones(1, 2), 2, x)


# --- solvers vs the exact flow of a Gaussian ----------------------------------------------------------------------

MU, STD = 1.5, 0.4


def _gaussian_velocity(x, t):
    """Exact E[ε − x0 | x_σ] for x0 ~ N(MU, STD²), x_σ = (1 − σ)x0 + σε."""
    s = t.double().reshape(-1, *([1] * (x.dim() - 1))) / 1000.0
    a = 1.0 - s
    var = a * a * STD**2 + s * s
    centred = x.double() - a * MU
    e_x0 = MU + a * STD**2 / var * centred
    e_eps = s / var * centred
    return (e_eps - e_x0).float()


@pytest.mark.parametrize("name,steps,tol", [("unipc", 30, 0.03), ("dpm++", 30, 0.03), ("euler", 200, 0.04)])
def test_samples_follow_exact_gaussian_flow(name, steps, tol):
    # The probability-flow ODE of a Gaussian maps noise ε to MU + STD·ε exactly (it preserves the standardized
    # value), so every sample, not just the moments, is known. The tolerance is dominated by the last step, which
    # (in every flow solver, official Wan included) jumps to the posterior mean E[x0 | x_σ] — shrunk towards MU by a
    # factor ≈ 1 − σ²/(2·STD²) at the last nonzero σ.
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(3))
    solver = make_solver(name, steps, 3.0)
    if name == "unipc":      # starts at σ = 0.999·(shift): the exact latent there is a mix, not pure noise
        s0 = float(solver.sigmas[0])
        sd0 = math.sqrt((1 - s0) ** 2 * STD**2 + s0**2)
        start = (1 - s0) * MU + sd0 * noise
    else:
        start = noise
    # the exact velocity at the solver's σ (Wan's int64 timesteps would add their own truncation error)
    out = run_sampler(solver, start, lambda x, t, i: _gaussian_velocity(x, solver.sigmas[i] * 1000))
    assert (out - (MU + STD * noise)).abs().max().item() < tol
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(STD, abs=0.02)


def test_run_sampler_progress_and_cancel():
    calls = []
    solver = make_solver("euler", 5, 1.0)
    run_sampler(solver, torch.zeros(1, 2), lambda x, t, i: torch.ones_like(x),
                progress=lambda s, n, x0: calls.append((s, n, tuple(x0.shape))))
    assert calls == [(i, 5, (1, 2)) for i in range(1, 6)]

    class Interrupt(BaseException):
        pass

    def cancel(step, total, x0):
        if step == 2:
            raise Interrupt()
    seen = []
    with pytest.raises(Interrupt):
        run_sampler(make_solver("unipc", 6, 5.0), torch.zeros(1, 2),
                    lambda x, t, i: seen.append(i) or torch.ones_like(x), progress=cancel)
    assert seen == [0, 1]


# --- guidance -----------------------------------------------------------------------------------------------------

def test_cfg_masks_hand_computed():
    n = 10
    A, S = True, False
    # a = floor(10·0.4) = 4
    assert cfg_step_mask(n, "early", 0.4) == [S] * 6 + [A] * 4
    assert cfg_step_mask(n, "late", 0.4) == [A] * 4 + [S] * 6
    assert cfg_step_mask(n, "early_late", 0.4) == [S, S, S, A, A, A, A, S, S, S]
    # skip n − a = 6 steps starting at (n − 6)//2 = 2
    assert cfg_step_mask(n, "middle", 0.4) == [A, A, S, S, S, S, S, S, A, A]
    # accumulate 0.4: .4 .8 1.2→A(.2) .6 1.0→A(0) .4 .8 1.2→A(.2) .6 1.0→A
    assert cfg_step_mask(n, "alternate", 0.4) == [S, S, A, S, A, S, S, A, S, A]
    assert cfg_step_mask(n, "none", 0.4) == [A] * n
    assert cfg_step_mask(n, "early", None) == [A] * n
    # a = floor(7·0.5) = 3
    assert cfg_step_mask(7, "early_late", 0.5) == [S, S, A, A, A, S, S]
    assert cfg_step_mask(7, "middle", 0.5) == [A, S, S, S, S, A, A]


def test_slg_mask_hand_computed():
    # floor(0.1·10)=1 .. floor(0.35·10)=3 → steps 1, 2
    assert slg_step_mask(10, 0.1, 0.35) == [False, True, True] + [False] * 7
    assert slg_step_mask(10, 0.0, 0.3) == [True] * 3 + [False] * 7


class _Recorder:
    """Fake model: velocity depends on which conditioning and which skipped blocks were used."""

    VALUES = {"c": 2.0, "u": 0.5}

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, skip):
        self.calls.append((tuple(cond) if isinstance(cond, list) else cond, skip, x.shape[0]))
        skip_shift = 0.25 * len(skip) if skip else 0.0
        if isinstance(cond, list):      # merged batch: one sample per conditioning
            vals = [self.VALUES[c] + skip_shift for c in cond]
            return torch.stack([torch.full_like(x[0], v) for v in vals])
        return torch.full_like(x, self.VALUES[cond] + skip_shift)


def _guided(cfg, steps=4, merge=None):
    rec = _Recorder()
    return rec, GuidedVelocity(rec, "c", "u", cfg, steps, merge=merge)


def test_cfg_combination_and_uncond_runs_at_scale_one():
    x, t = torch.zeros(1, 3), torch.zeros(1)
    rec, g = _guided(GuidanceConfig(scale=1.0, batch_cfg=False))
    out = g(x, t, 0)
    assert torch.allclose(out, torch.full_like(x, 2.0))
    assert [c[0] for c in rec.calls] == ["c", "u"]           # uncond pass even at g = 1
    rec, g = _guided(GuidanceConfig(scale=5.0, batch_cfg=False))
    assert torch.allclose(g(x, t, 0), torch.full_like(x, 0.5 + 5.0 * 1.5))


def test_cfg_batched_equals_sequential():
    x, t = torch.zeros(1, 3), torch.zeros(1)
    merge = lambda conds: [conds[0], conds[1]]  # noqa: E731
    rec, g = _guided(GuidanceConfig(scale=4.0, batch_cfg=True), merge=merge)
    out = g(x, t, 0)
    assert rec.calls == [(("c", "u"), None, 2)] and g.forwards == 1
    assert torch.allclose(out, torch.full_like(x, 0.5 + 4.0 * 1.5))


def test_cfg_skip_runs_cond_only():
    x, t = torch.zeros(1, 3), torch.zeros(1)
    rec, g = _guided(GuidanceConfig(scale=5.0, cfg_skip_mode="late", cfg_apply_ratio=0.5, batch_cfg=False))
    outs = [g(x, t, i)[0, 0].item() for i in range(4)]
    assert outs == [8.0, 8.0, 2.0, 2.0]
    assert [c[0] for c in rec.calls] == ["c", "u", "c", "u", "c", "c"]


def test_slg_original_and_uncond_modes():
    x, t = torch.zeros(1, 3), torch.zeros(1)
    base = dict(scale=3.0, slg_layers=(1, 2), slg_scale=2.0, slg_start=0.0, slg_end=0.5, batch_cfg=True)
    merge = lambda conds: list(conds)  # noqa: E731
    rec, g = _guided(GuidanceConfig(slg_mode="original", **base), merge=merge)
    # step 0: SLG active; skip pass = uncond with 2 blocks skipped → 0.5 + 0.5 = 1.0
    out0 = g(x, t, 0)[0, 0].item()
    assert out0 == pytest.approx(0.5 + 3.0 * 1.5 + 2.0 * (2.0 - 1.0))
    assert rec.calls[-1] == ("u", frozenset({1, 2}), 1)
    out3 = g(x, t, 3)[0, 0].item()                 # outside the window: plain CFG
    assert out3 == pytest.approx(0.5 + 3.0 * 1.5)

    rec, g = _guided(GuidanceConfig(slg_mode="uncond", **base), merge=merge)
    out0 = g(x, t, 0)[0, 0].item()                 # uncond replaced by the skipped-layer uncond (1.0)
    assert out0 == pytest.approx(1.0 + 3.0 * (2.0 - 1.0))
    assert rec.calls == [("c", None, 1), ("u", frozenset({1, 2}), 1)]


def test_defaults_cfg_on_every_step_and_one_float32_noise_sample():
    assert cfg_step_mask(4, ratio=0.5) == [True] * 4           # mode defaults to "none"
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = make_noise((3, 2), 5)
    finally:
        torch.set_default_dtype(before)
    assert noise.shape == (1, 3, 2) and noise.dtype == torch.float32   # whatever the default dtype
    assert torch.equal(noise[0], torch.randn(3, 2, generator=torch.Generator().manual_seed(5)))


def test_cfg_mask_rounding_edges():
    # a = floor(10·0.3) = 3, window start (10 − 3)//2 = 3 (integer division, not 3.5)
    assert cfg_step_mask(10, "early_late", 0.3) == [False] * 3 + [True] * 3 + [False] * 4
    # accumulating 0.5 reaches exactly 1.0 every second step: applied at ≥ 1, then 1 is taken off
    assert cfg_step_mask(4, "alternate", 0.5) == [False, True, False, True]


class _TimedRecorder(_Recorder):
    """_Recorder that also records the timesteps each pass received."""

    def __init__(self):
        super().__init__()
        self.ts = []

    def __call__(self, x, t, cond, skip):
        self.ts.append(t.clone())
        if isinstance(cond, list):   # a merged batch: one block of rows per conditioning, shaped like x
            skip_shift = 0.25 * len(skip) if skip else 0.0
            self.calls.append((tuple(cond), skip, x.shape[0]))
            rows = x.shape[0] // len(cond)
            return torch.cat([torch.full_like(x[:rows], self.VALUES[c] + skip_shift) for c in cond])
        return super().__call__(x, t, cond, skip)


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_every_pass_gets_the_step_timesteps_and_is_counted(batch_cfg):
    """Batch 3 (a batched pass has 6 rows), one SLG layer, a CFG-skipped step: every forward sees the step's t (both
    halves of a batched pass) and `forwards` counts each model call once."""
    x, t = torch.zeros(3, 2), torch.tensor([0.7, 0.7, 0.7])
    rec = _TimedRecorder()
    cfg = GuidanceConfig(scale=2.0, slg_layers=(3,), slg_scale=1.5, slg_end=0.25, batch_cfg=batch_cfg,
                         cfg_skip_mode="late", cfg_apply_ratio=0.5)
    g = GuidedVelocity(rec, "c", "u", cfg, 4, merge=lambda conds: list(conds))
    out0 = g(x, t, 0)      # CFG + SLG (one skipped block: uncond 0.5 + 0.25)
    assert torch.allclose(out0, torch.full_like(x, 0.5 + 2.0 * 1.5 + 1.5 * (2.0 - 0.75)))
    out3 = g(x, t, 3)      # CFG skipped: cond only
    assert torch.allclose(out3, torch.full_like(x, 2.0))
    calls = 1 + (1 if batch_cfg else 2) + 1
    assert g.forwards == len(rec.calls) == calls
    assert rec.calls[calls - 2] == ("u", frozenset({3}), 3)
    for ts in rec.ts:
        assert torch.equal(ts, torch.cat([t, t]) if ts.shape[0] == 6 else t)
    assert [ts.shape[0] for ts in rec.ts] == ([6] if batch_cfg else [3, 3]) + [3, 3]


def test_guidance_config_edges_are_valid():
    for cfg in (GuidanceConfig(cfg_apply_ratio=0.0), GuidanceConfig(cfg_apply_ratio=1.0),
                GuidanceConfig(slg_start=0.4, slg_end=0.4), GuidanceConfig(slg_start=0.0, slg_end=1.0),
                GuidanceConfig(slg_layers=(0, 3)), GuidanceConfig(scale=0)):
        cfg.validate(num_blocks=4)
    GuidanceConfig(slg_layers=(40,)).validate()          # no block count known: any index ≥ 0


@pytest.mark.parametrize("kw,message", [
    ({"scale": float("nan")}, "guidance_scale: got nan; expected a number (5.0 is a common default)"),
    ({"scale": "5"}, "guidance_scale: got '5'; expected a number (5.0 is a common default)"),
    ({"cfg_skip_mode": "sometimes"},
     "cfg_skip_mode: got 'sometimes'; expected one of ('none', 'early', 'late', 'middle', 'early_late', 'alternate')"),
    ({"cfg_apply_ratio": -0.1}, "cfg_apply_ratio: got -0.1; expected a fraction between 0 and 1"),
    ({"cfg_apply_ratio": 1.5}, "cfg_apply_ratio: got 1.5; expected a fraction between 0 and 1"),
    ({"slg_mode": "both"}, "slg_mode: got 'both'; expected one of ('original', 'uncond')"),
    ({"slg_start": 0.5, "slg_end": 0.4}, "slg_start/slg_end: got (0.5, 0.4); expected 0 <= start <= end <= 1"),
    ({"slg_end": 1.5}, "slg_start/slg_end: got (0.0, 1.5); expected 0 <= start <= end <= 1"),
    ({"slg_layers": (-1,)}, "slg_layers: got [-1]; expected block indices 0 <= i < 4"),
    ({"slg_layers": (1, 4)}, "slg_layers: got [1, 4]; expected block indices 0 <= i < 4"),
    ({"slg_layers": (1.0,)}, "slg_layers: got [1.0]; expected block indices 0 <= i < 4"),
])
def test_guidance_config_messages(kw, message):
    with pytest.raises(MusubiInputError) as e:
        GuidanceConfig(**kw).validate(num_blocks=4)
    assert str(e.value) == message


def test_guidance_messages_without_a_block_count_and_for_the_mask():
    with pytest.raises(MusubiInputError) as e:
        GuidanceConfig(slg_layers=(-2,)).validate()
    assert str(e.value) == "slg_layers: got [-2]; expected block indices 0 <= i"
    with pytest.raises(MusubiInputError) as e:
        cfg_step_mask(4, "often", 0.5)
    assert str(e.value) == ("cfg_skip_mode: got 'often'; expected one of "
                            "('none', 'early', 'late', 'middle', 'early_late', 'alternate')")


def test_slg_layer_beyond_model_rejected():
    with pytest.raises(MusubiInputError, match="slg_layers"):
        GuidanceConfig(slg_layers=(7,)).validate(num_blocks=4)


# --- noise --------------------------------------------------------------------------------------------------------

def test_noise_seeded_and_per_sample():
    a = make_noise([16, 2, 4, 4], seed=42, batch=2)
    b = make_noise([16, 2, 4, 4], seed=42, batch=2)
    assert a.dtype == torch.float32 and a.shape == (2, 16, 2, 4, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # sample 1 of seed 42 == sample 0 of seed 43 (regenerable alone)
    assert torch.equal(a[1], make_noise([16, 2, 4, 4], seed=43)[0])
    # cpu noise is exactly torch's CPU generator stream, whatever the target device
    ref = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a[0], ref)
    assert not torch.equal(a, make_noise([16, 2, 4, 4], seed=41, batch=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to compare devices")
def test_cpu_noise_identical_on_gpu_target():
    cpu = make_noise([16, 1, 8, 8], seed=7)
    gpu = make_noise([16, 1, 8, 8], seed=7, device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3"])
def test_bad_seed_rejected(seed):
    with pytest.raises(MusubiInputError, match="seed"):
        make_noise([16, 1, 2, 2], seed=seed)


def test_largest_seed_is_valid_and_the_batch_wraps_to_zero():
    from engine.sampling.noise import MAX_SEED
    noise = make_noise((3, 2), MAX_SEED, batch=2)
    assert torch.equal(noise[0], torch.randn(3, 2, generator=torch.Generator().manual_seed(MAX_SEED)))
    assert torch.equal(noise[1], torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    for bad in (MAX_SEED + 1, -1):
        with pytest.raises(MusubiInputError) as e:
            make_noise((3, 2), bad)
        assert str(e.value) == f"seed: got {bad}; expected an integer between 0 and {MAX_SEED}"
    with pytest.raises(MusubiInputError) as e:
        make_noise((3, 2), 1, noise_device="tpu")
    assert str(e.value) == "noise_device: got 'tpu'; expected one of ('cpu', 'gpu')"


def test_bad_noise_device_rejected():
    with pytest.raises(MusubiInputError, match="noise_device"):
        make_noise([16, 1, 2, 2], seed=0, noise_device="tpu")


# --- details the tests above do not pin (mutation testing, #21 item 9) ------------------------------------------

def test_noise_is_moved_to_the_requested_device_and_gpu_noise_is_drawn_there():
    """cpu noise: drawn by a CPU generator (the same numbers), then moved to `device` (here meta, the one non-CPU
    device every machine has). gpu noise: the generator lives on the target device itself, so a device with no
    generator (meta) is refused instead of silently drawing on the CPU."""
    moved = make_noise((3, 2), 5, batch=2, device="meta")
    assert moved.device.type == "meta" and moved.shape == (2, 3, 2) and moved.dtype == torch.float32
    with pytest.raises(RuntimeError, match="(?i)meta"):
        make_noise((3, 2), 5, noise_device="gpu", device="meta")
    # on a CPU model device, gpu noise is the same CPU generator stream
    assert torch.equal(make_noise((3, 2), 5, noise_device="gpu"), make_noise((3, 2), 5))


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_run_steps_keeps_the_end_of_the_schedule(name):
    """run_steps = k: the last k steps of the full schedule (sigmas from index N − k, timesteps likewise)."""
    full = make_solver(name, 5, 3.0)
    for k in (1, 3, 5):
        part = make_solver(name, 5, 3.0, run_steps=k)
        assert part.steps == k
        assert torch.equal(part.sigmas, full.sigmas[5 - k:]) and torch.equal(part.timesteps, full.timesteps[5 - k:])
        assert len(part.sigmas) == k + 1 and float(part.sigmas[-1]) == 0.0


@pytest.mark.parametrize("bad", [0, 6, -1, 2.0, True])
def test_run_steps_out_of_range_refused(bad, raises_input):
    with raises_input("steps to run", bad, "an integer between 1 and 5"):
        make_solver("euler", 5, 3.0, run_steps=bad)
