"""LoRA training engine: timestep sampling, flow-matching loss, optimizers, schedulers, the training session,
state/resume, logging and sampling during training. Pure PyTorch (never imports ComfyUI)."""

from .batches import InMemoryBatchLoader
from .config import NetworkConfig, TrainingConfig
from .evaluation import EvalConfig, held_out_loss
from .logging import LossHistory, loss_curve_image, status_text
from .loss import flow_matching_loss, noisy_latents, velocity_target
from .optimizers import OptimizerConfig, build_optimizer, parse_kwargs
from .schedulers import SCHEDULERS, build_scheduler
from .state import read_state
from .timesteps import SAMPLING_MODES, TimestepConfig, TimestepSampler, sample_timesteps
from .trainer import StepInfo, TrainingSession
from .validation import ValidationConfig, ValidationPrompt, run_validation

__all__ = [
    "EvalConfig", "held_out_loss", "InMemoryBatchLoader", "NetworkConfig", "TrainingConfig", "OptimizerConfig", "TimestepConfig", "LossHistory",
    "loss_curve_image", "status_text", "flow_matching_loss", "noisy_latents", "velocity_target", "build_optimizer",
    "parse_kwargs", "SCHEDULERS", "build_scheduler", "read_state", "SAMPLING_MODES", "TimestepSampler",
    "sample_timesteps", "StepInfo", "TrainingSession", "ValidationConfig", "ValidationPrompt", "run_validation",
]
