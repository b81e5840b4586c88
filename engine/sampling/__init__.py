"""Flow-matching sampling: schedules, solvers, guidance, noise and the generic loop (see each module)."""

from .guidance import CFG_SKIP_MODES, SLG_MODES, GuidanceConfig, GuidedVelocity, cfg_step_mask, slg_step_mask
from .loop import run_sampler
from .noise import NOISE_DEVICES, check_seed, make_noise
from .schedule import FlowSchedule, dpmpp_schedule, euler_schedule, shift_sigmas, unipc_schedule
from .solvers import DPMPP2MSolver, EulerSolver, FlowSolver, UniPCSolver, make_solver

__all__ = [
    "CFG_SKIP_MODES", "SLG_MODES", "GuidanceConfig", "GuidedVelocity", "cfg_step_mask", "slg_step_mask",
    "run_sampler", "NOISE_DEVICES", "check_seed", "make_noise", "FlowSchedule", "dpmpp_schedule", "euler_schedule",
    "shift_sigmas", "unipc_schedule", "DPMPP2MSolver", "EulerSolver", "FlowSolver", "UniPCSolver", "make_solver",
]
