"""LoRA training nodes: LoRA Config, Optimizer Config, Init Training, Train Steps, Validation Prompt, Validate, Save
Trained LoRA, Resume Training, and the all-in-one Train LoRA.

The session is trained on a *LoRA view* of the loaded DiT (see nodes/lora.py): new module objects that share every
weight with the loader's model, carrying the training adapter's hooks. The loader's model therefore never gets an
adapter (graphs without training stay clean), the view is what the Sampler receives to generate with the LoRA still
in memory, and replacing a session drops its view: adapters can never stack.

Sessions live in the pack's `SESSIONS` registry, keyed by (node kind, node id, model, dataset content, configs):
ComfyUI may evict node outputs and re-run Init Training; the same inputs then return the session already in memory
(training continues) and changed inputs replace this node's previous session. Train Steps nodes remember, per
(node, steps, upstream session handle), the step they must reach: a re-execution caused by eviction trains nothing
more, and re-queueing after a cancel continues to the same target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
from pathlib import Path

import torch

from . import comfy_compat as compat
from . import checks
from .paths import check_write_path, folder_problem, resolve_write_folder
from . import types as T
from .video import decode_video, video_to_image
from .placement import RESIDENCY, check_blocks_to_swap
from .registry import SESSIONS
from ..engine.errors import MusubiInputError, invalid

log = logging.getLogger("ComfyUI-Musubi")
CATEGORY = "Musubi/training"
LOSS_MAP = "LOSS_MAP"  # core ComfyUI type: {"loss": [floats]}
NETWORK_KINDS = ["lora", "loha", "lokr"]
OPTIMIZERS = ["AdamW", "AdamW8bit", "Adafactor", "Prodigy", "custom"]
MIXED_PRECISION = ["bf16", "fp16", "no"]
CHECKPOINT_DTYPES = ["compute", "float32"]   # engine.training.config.CHECKPOINT_DTYPES
SAVE_FORMATS = ["comfyui", "musubi", "diffusers", "musubi-other"]
SAVE_DTYPES = ["fp32", "bf16", "fp16"]
TRAIN_ATTENTION = ["model", "sdpa", "flash", "xformers", "sdpa_split"]  # sage has no backward pass
_SERIAL = itertools.count(1)
CONTINUE_INPUT = ("BOOLEAN", {"default": True, "tooltip": (
    "Continue from the training state saved under this output name (NAME-state in the output folder: an earlier "
    "run, or the one before a ComfyUI restart) when there is no session in memory. Off: start from step 0; the "
    "saved state is kept, and while this run is behind it, this run saves to NAME-run<id>-state instead.")})
SAVE_MINUTES_INPUT = ("FLOAT", {"default": 10.0, "min": 0.0, "max": 100_000.0, "step": 1.0, "round": False,
                                "tooltip": (
    "Also save the training state (NAME-state) after this many minutes of training since the last save, so a crash "
    "or power cut loses at most that much; continue_saved_state picks it up after a restart. 0 = off.")})


def _schedulers() -> list[str]:
    from ..engine.training import SCHEDULERS

    return list(SCHEDULERS)


def _sampling_modes() -> list[str]:
    from ..engine.training.timesteps import SAMPLING_MODES

    return list(SAMPLING_MODES)


def _weighting_schemes() -> list[str]:
    from ..engine.training.timesteps import WEIGHTING_SCHEMES

    return list(WEIGHTING_SCHEMES)


# --- small parsers ---------------------------------------------------------------------------------------------------
def split_kwargs(text: str) -> list[str]:
    """'weight_decay=0.01 betas=(0.9, 0.99)' -> ['weight_decay=0.01', 'betas=(0.9, 0.99)'].

    Entries are separated by spaces, commas, semicolons or new lines outside brackets and quotes; spaces around '='
    are allowed."""
    tokens, cur, depth, quote = [], "", 0, None
    for ch in text or "":
        if quote:
            cur += ch
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            cur += ch
        elif ch in "([{":
            depth += 1
            cur += ch
        elif ch in ")]}":
            depth -= 1
            cur += ch
        elif depth == 0 and (ch.isspace() or ch in ",;"):
            if cur:
                tokens.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        tokens.append(cur)
    merged: list[str] = []
    for tok in tokens:
        if merged and (tok.startswith("=") or merged[-1].endswith("=")):
            merged[-1] += tok
        else:
            merged.append(tok)
    return merged


def _kwargs(text: str, name: str) -> dict:
    from ..engine.training import parse_kwargs

    return parse_kwargs(split_kwargs(text), name)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _steps_value(text, name: str):
    """'0' / '100' -> int, '0.1' -> float fraction, '10%' stays a string (the engine resolves all three)."""
    s = str(text).strip()
    if not s:
        return 0
    if s.endswith("%"):
        return s
    try:
        v = float(s)
    except ValueError:
        raise invalid(name, text, 'a step count, a fraction < 1 of the total steps, or "N%"') from None
    return int(v) if v.is_integer() else v


def _regexes(text: str, name: str) -> list[str]:
    out = _lines(text)
    for r in out:
        try:
            re.compile(r)
        except re.error as e:
            raise invalid(name, r, f"a valid regular expression ({e})") from None
    return out


def _plain_key(obj) -> str:
    from ..engine.training.config import to_plain

    return json.dumps(to_plain(obj), sort_keys=True, default=str)


TRAINED_LORA_SUBFOLDER = "musubi"


def default_lora_dir(output_dir_text: str) -> str | None:
    """With the default output_dir, LoRA files go to <first models/loras folder>/musubi, where ComfyUI's LoRA pickers
    (core and the pack's) list them right after training; the states stay in <output>/musubi_training (their .pt
    files would show up in those pickers). An explicit output_dir keeps LoRAs and states together."""
    if (output_dir_text or "").strip():
        return None
    folders = compat.model_folders("loras")
    if not folders:
        return None
    return str(check_write_path(Path(folders[0]) / TRAINED_LORA_SUBFOLDER, "output_dir"))


def resolve_output_dir(text: str) -> str:
    """Empty: <ComfyUI output>/musubi_training; relative: inside ComfyUI's output folder; absolute: as given, if
    inside ComfyUI's folders (nodes/paths.py)."""
    base = Path(compat.output_directory())
    return str(resolve_write_folder(text, "output_dir", base / "musubi_training", base))


# --- dataset adapter -------------------------------------------------------------------------------------------------
def dataset_config(dataset):
    """The engine DatasetConfig inside a DATASET socket value (nodes/data.py), whatever wrapper carries it."""
    def is_config(obj) -> bool:  # duck-typed: engine.data.DatasetConfig (a list of dataset blueprints)
        return isinstance(getattr(obj, "datasets", None), list) and hasattr(obj, "general")

    if is_config(dataset):
        return dataset
    for attr in ("config", "dataset_config", "dataset"):
        value = dataset.get(attr) if isinstance(dataset, dict) else getattr(dataset, attr, None)
        if is_config(value):
            return value
    raise invalid("dataset", type(dataset).__name__, "a DATASET from the Musubi dataset nodes (cached latents and "
                                                     "text embeddings)")


def cache_requirements(model):
    """What the DiT needs from a cache (its family decides)."""
    from ..engine.families import family_of

    return family_of(model).cache_requirements(model)


def dataset_loader(dataset, model, seed: int):
    """(CachedBatchLoader, content identity) for a cached DATASET; refuses a dataset not cached for this model."""
    from ..engine.data import CachedBatchLoader, check_cache_for_model, manifest_path

    config = dataset_config(dataset)
    if callable(getattr(dataset, "cached_datasets", None)):  # nodes/data.py's MusubiDataset: checks its encoders too
        cached = dataset.cached_datasets(text_dim=model.config.text_dim)
    else:
        cached = check_cache_for_model(config, cache_requirements(model))
    h = hashlib.sha1()
    for ds, c in zip(config.datasets, cached):
        h.update(str(c.cache_dir).encode())
        h.update(f"{c.batch_size}/{c.num_repeats}/{len(c.samples)}".encode())
        for arch in (c.arch, c.text_arch):   # latents, and captions when they live in another manifest
            m = manifest_path(c.cache_dir, arch) if arch else None
            if m is not None and m.is_file():
                h.update(m.read_bytes())
    return CachedBatchLoader(cached, seed=seed), h.hexdigest()[:16]


# --- the object on the TRAINING_SESSION socket ----------------------------------------------------------------------
# A session lives in SESSIONS as an engine HostedSession (engine/training/hosted.py: the trainer on a LoRA view of the
# loader's model, placed by the pack's Residency); the socket carries it with the point of the graph it comes from.
@dataclasses.dataclass(frozen=True)
class SessionOutput:
    """TRAINING_SESSION socket value: the hosted session and a token naming the point of the graph it comes from."""

    run: "HostedSession"
    token: tuple

    @property
    def session(self):
        return self.run.session


def _session_output(value, field: str = "session") -> SessionOutput:
    if not isinstance(value, SessionOutput):
        raise invalid(field, type(value).__name__, "a TRAINING_SESSION from Musubi Init Training / Resume Training")
    return value


def _dit(model):
    return T.handle(model, "model", "a DiT from a Musubi DiT loader node")


# --- two timestep experts (Wan 2.2 A14B) -----------------------------------------------------------------------------
# The training nodes take a DiT or a family's expert pair (Musubi Wan 2.2 Experts): the pair trains both experts in
# one session (engine/training/experts.py); its boundary and memory mode come from the pair, the LoRA layout from
# expert_layout. One expert alone trains from its DiT with train_expert + expert_boundary (its side of the boundary).
MODEL_TYPES = f"{T.DIT},{T.WAN_EXPERTS}"
EXPERT_LAYOUTS = ["auto", "separate", "shared"]
TRAIN_EXPERTS = ["none", "high", "low"]
PAIR_MODES = ("both", "offload")
PAIR_EXPECTED = "a DiT from a Musubi DiT loader node, or a pair from Musubi Wan 2.2 Experts"


def is_pair(value) -> bool:
    """A family's expert pair on the model socket (`low`, `high`, `mode`, `resolved_boundary()`)."""
    return callable(getattr(value, "resolved_boundary", None)) and hasattr(value, "low") and hasattr(value, "high")


def trained_models(model, expert_layout: str = "auto"):
    """(the DiT's handle — a pair's low-noise expert —, `HostedExperts` or None) of a training node's model input;
    every mistake refused naming the input."""
    from ..engine.training.hosted import HostedExperts

    if expert_layout not in EXPERT_LAYOUTS:
        raise invalid("expert_layout", expert_layout, f"one of {EXPERT_LAYOUTS}")
    if not is_pair(model):
        if expert_layout != "auto":
            raise invalid("expert_layout", expert_layout, "auto for a single DiT (the layout is for a pair of "
                                                          "experts from Musubi Wan 2.2 Experts)")
        return T.handle(model, "model", PAIR_EXPECTED), None
    if model.high is None:
        raise invalid("model", "a pair without a high-noise expert", "both experts of the pair")
    low = T.handle(model.low, "model (low-noise expert)", "a DiT from a Musubi DiT loader node")
    high = T.handle(model.high, "model (high-noise expert)", "a DiT from a Musubi DiT loader node")
    if model.mode not in PAIR_MODES:
        raise invalid("model (the pair's memory_mode)", model.mode, f"one of {PAIR_MODES} for training")
    layout = "separate" if expert_layout == "auto" else expert_layout
    return low, HostedExperts(high, model.resolved_boundary(), layout, model.mode)


def one_expert_timesteps(config, handle, experts, train_expert: str, expert_boundary: float):
    """Init Training's train_expert / expert_boundary: the config's timesteps restricted to one expert's side of
    the boundary (a single DiT), or checked unused."""
    from ..engine.training.experts import expert_timesteps

    if train_expert not in TRAIN_EXPERTS:
        raise invalid("train_expert", train_expert, f"one of {TRAIN_EXPERTS}")
    if train_expert == "none":
        if expert_boundary:
            raise invalid("expert_boundary", expert_boundary, "0 unless train_expert is high or low (a pair's "
                                                              "boundary comes from Musubi Wan 2.2 Experts)")
        return config
    if experts is not None:
        raise invalid("train_expert", train_expert, "none for a pair (both experts train; to train one expert "
                                                    "alone connect its DiT)")
    if not expert_boundary:
        raise invalid("expert_boundary", expert_boundary, f"the pair's boundary for train_expert={train_expert}: "
                                                          "0.875 (Wan 2.2 T2V A14B), 0.9 (I2V A14B), or a timestep "
                                                          "such as 875")
    named = getattr(getattr(handle.module, "config", None), "expert", None)   # from the file name, if it says
    if named not in (None, train_expert):
        raise invalid("train_expert", train_expert, f"{named} (the model's file is the {named}-noise expert)")
    return dataclasses.replace(config, timesteps=expert_timesteps(config.timesteps, train_expert, expert_boundary))


def open_run(kind: str, node_id, model, dataset, network, optimizer, config, resume_from=None,
             continue_saved: bool = False, experts=None, devices=None, prompt=None):
    """The session of this node for these inputs: the one in memory (following the loaders' current run options),
    or a new one replacing this node's old one (which saves its unsaved steps first). `continue_saved`: a new
    session continues from the state saved under the output name, when there is one the network fits.
    `experts` (`HostedExperts`): `model` is the low-noise expert of a pair trained in one session.
    `devices` (nodes/distributed.py `parse_devices`): this process is rank 0 of a data-parallel run whose other
    ranks are worker processes (engine/training/workers.py); `prompt`: the graph (their model's loader inputs).

    Everything a user can get wrong is checked before ComfyUI's models are evicted or a weight moves."""
    from ..engine.training.experts import TimestepExperts, check_experts
    from ..engine.training.hosted import host_session
    from ..engine.training.trainer import check_attention

    handle = _dit(model)
    node_id = str(node_id)
    loader, ds_identity = dataset_loader(dataset, handle.module, config.seed)
    pair_key = None if experts is None else (id(experts.high.module), experts.boundary, experts.layout, experts.mode)
    key = (kind, node_id, id(handle.module), ds_identity, _plain_key(network), _plain_key(optimizer),
           _plain_key(config), str(resume_from) if resume_from else "", bool(continue_saved), pair_key,
           tuple(devices or ()))
    existing = SESSIONS.get(key)
    if existing is not None:
        existing.set_options(handle.options, experts.high.options if experts is not None else None)
        return existing
    config.validate()
    network.validate()
    optimizer.validate()
    for h in [handle] + ([experts.high] if experts is not None else []):
        check_attention(h.module, config, h.options.attention)
        check_blocks_to_swap(h)
    if experts is not None:   # mismatched experts, one model twice, a bad boundary or layout
        check_experts(handle.module, TimestepExperts(experts.high.module, experts.boundary, experts.layout,
                                                     experts.mode))

    worker_config = None
    if devices:
        from .distributed import loader_inputs, pair_loader_inputs, run_config

        loaders = loader_inputs(prompt, node_id) if experts is None else pair_loader_inputs(prompt, node_id)
        worker_config = run_config(handle, dataset, network, optimizer, config, continue_saved, loaders,
                                   resume_from=resume_from, experts=experts)

    stale = [k for k in SESSIONS.keys() if isinstance(k, tuple) and k[:2] == (kind, node_id) and k != key]
    for k in stale:   # their steps on disk before anything else (a new session may continue from them)
        old = SESSIONS.get(k)
        if old is not None:
            old.session.save_progress()
    compat.free_all()
    workers = None
    if devices:   # an older session of this node may hold the process group and its workers
        SESSIONS.release(lambda k: k in stale)
        stale = []
        from ..engine.training.workers import WorkerGroup

        workers = WorkerGroup.start(worker_config, devices, Path(config.output_dir), config.output_name,
                                    compat.torch_device(), interrupt=compat.check_interrupt)
    try:
        with compat.training_context():  # adapter and optimizer tensors must be normal (autograd) tensors
            run = host_session(handle, loader, network, optimizer, config, residency=RESIDENCY,
                               device=compat.torch_device(), resume_from=resume_from, continue_saved=continue_saved,
                               key=key, node=node_id, experts=experts,
                               parallel=workers.parallel if workers is not None else None)
            if workers is not None:
                workers.parallel.check_same_start(run.session.step)
                run.workers = workers
    except BaseException:
        if workers is not None:
            workers.close()
        raise
    # only now that the new session exists (a bad config fails above and leaves the old one intact) is this
    # node's previous session replaced
    if stale:
        SESSIONS.release(lambda k: k in stale)
    SESSIONS.put(key, run)
    return run


def train_to(run, target: int, node_id) -> list[float]:
    """Train `run` until step `target` with a per-step progress bar, text status and a loss-curve preview; cancel
    stops within one step (the engine saves a resumable state and re-raises)."""
    from PIL import Image

    from ..engine.training import loss_curve_image

    s = run.session
    todo = min(target, s.total_steps) - s.step
    if todo <= 0:
        return []
    compat.free_all()
    start = s.step
    bar = compat.Progress(todo, node_id)
    every = max(1, todo // 10)

    def progress(step, total, info):
        done = step - start
        preview = None
        if done % every == 0 or done >= todo:
            h = s.history
            img = loss_curve_image(h.losses, 384, 192, eval_points=list(zip(h.eval_steps, h.eval_losses)))[0]
            preview = Image.fromarray((img.numpy() * 255).astype("uint8"))
        bar.update(done, preview=preview, text=info.get("status"))

    run.listener = ValidationListener(bar, node_id, start)
    try:
        with compat.training_context():
            return run.train_to(target, compat.torch_device(), progress, interrupt=compat.check_interrupt)
    finally:
        run.listener = None
        if run.workers is not None and run.workers.closed:   # a lost or failed rank: the next queue starts afresh
            SESSIONS.release(lambda k: k == run.key)


# --- sampling during training (the session's ValidationConfig) -------------------------------------------------------
def _first_frame_pil(video: torch.Tensor):
    """[B, 3, F, H, W] in [-1, 1] -> PIL image of the first frame of the first sample."""
    from PIL import Image

    frame = ((video[0, :, 0].float().cpu() + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0)
    return Image.fromarray((frame.numpy() * 255).round().astype("uint8"))


class ValidationListener:
    """What the running Train Steps node shows while the session samples its validation prompts: a progress text
    per denoising step (which is also a cancel point) and each decoded sample's first frame as the node's preview."""

    def __init__(self, bar, node_id, start: int):
        self.bar, self.node_id, self.start = bar, node_id, start
        self.step, self.index = None, 0

    def _sample_index(self, step: int) -> int:
        if step != self.step:
            self.step, self.index = step, 0
        return self.index + 1

    def sampling(self, session, step: int, total: int) -> None:
        compat.check_interrupt()
        n = len(session.validation.prompts) if session.validation is not None else 1
        compat.send_text(self.node_id, f"step {session.step}/{session.total_steps} | validation sample "
                                       f"{self._sample_index(session.step)}/{n}: denoising {step}/{total}")

    def decoded(self, session, video: torch.Tensor) -> None:
        n = len(session.validation.prompts) if session.validation is not None else 1
        k = self._sample_index(session.step)
        self.index += 1
        self.bar.update(session.step - self.start, preview=_first_frame_pil(video),
                        text=f"step {session.step}/{session.total_steps} | validation sample {k}/{n} decoded")


class _ValidationVAE:
    """The VAE as the session's validation sees it (`decode(latents) -> [B, 3, F, H, W]` in [-1, 1]): decoded on the
    compute device, then shown on the running Train Steps node."""

    def __init__(self, vae, run):
        self.vae, self.run = vae, run

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = decode_video(self.vae, latents)
        listener = self.run.listener
        if listener is not None:
            listener.decoded(self.run.session, video)
        return video


def _validation_sample_fn(run):
    """The family's sampler with the running Train Steps node's progress text and cancel check."""
    def sample(model, request, progress=None):
        from ..engine.families import family_of

        def step_progress(step, total, x0=None):
            listener = run.listener
            if listener is not None:
                listener.sampling(run.session, step, total)
            if progress is not None:
                progress(step, total, x0)

        return family_of(run.model).sample(model, request, step_progress)   # (model: a pair for two experts)
    return sample


def check_validation_inputs(model, prompts, vae, every_n_steps, at_start) -> bool:
    """Init Training's validation inputs, checked before any session exists; True when validation is on."""
    from ..engine.families import family_of
    from ..engine.training import ValidationPrompt
    from ..engine.training.validation import build_request

    every_n_steps = int(every_n_steps or 0)
    if every_n_steps < 0:
        raise invalid("validate_every_n_steps", every_n_steps, "an integer ≥ 0 (0 = no sampling during training)")
    if prompts is not None and (not isinstance(prompts, (list, tuple))
                                or not all(isinstance(p, ValidationPrompt) for p in prompts)):
        raise invalid("validation_prompts", type(prompts).__name__, "VALIDATION_PROMPTS from Musubi Validation Prompt")
    enabled = every_n_steps > 0 or bool(at_start)
    if not enabled:
        return False
    why = f"validate_every_n_steps={every_n_steps}" if every_n_steps > 0 else "validate_at_start"
    if not prompts:
        raise invalid("validation_prompts", None, f"at least one prompt from Musubi Validation Prompt (connected) "
                                                  f"when {why} is set")
    if vae is None:
        raise invalid("validation_vae", None, f"a VAE (the model family's VAE loader) to decode the samples when "
                                              f"{why} is set")
    vae = T.handle(vae, "validation_vae", "a VAE from a Musubi VAE loader node")
    if not callable(getattr(vae.module, "decode", None)):
        raise invalid("validation_vae", type(vae.module).__name__, "a VAE from a Musubi VAE loader node")
    _check_vae_family(vae, model, "validation_vae")
    for i, p in enumerate(prompts):
        try:
            family_of(model).check_sampling(model, build_request(model, p))
        except Exception as e:  # noqa: BLE001 - restate it as an input error naming the prompt
            raise invalid(f"validation_prompts[{i}]", f"{p.width}x{p.height}x{p.frames}",
                          f"a prompt the loaded model can sample: {e}") from e
    return True


def _check_vae_family(vae, model, field: str) -> None:
    """A VAE of another family than the DiT's decodes garbage: refused naming the input."""
    from ..engine.families import family_of, get_family

    family = family_of(model)
    if vae.family is not None and vae.family != family.name:
        raise invalid(field, f"a {get_family(vae.family).display_name} VAE", f"the {family.display_name} VAE (the "
                                                                              "model's family)")


def validation_config(run, prompts, vae, every_n_steps, at_start):
    from ..engine.training import ValidationConfig

    cfg = ValidationConfig(prompts=list(prompts), every_n_steps=int(every_n_steps) or None, at_first=bool(at_start),
                           vae=_ValidationVAE(vae, run), sample_fn=_validation_sample_fn(run))
    cfg.validate()
    return cfg


def samples_image(run) -> torch.Tensor:
    """The session's latest validation samples as one IMAGE (every prompt's frames one after another, resized to
    the first prompt's size), or a 1×64×64 black image before the first validation."""
    videos = [v for v in (run.session.last_samples or []) if isinstance(v, torch.Tensor) and v.ndim == 5
              and v.shape[1] == 3]
    if not videos:
        return torch.zeros(1, 64, 64, 3)
    images = [video_to_image(v) for v in videos]
    h, w = images[0].shape[1:3]
    same = [im if tuple(im.shape[1:3]) == (h, w) else torch.nn.functional.interpolate(
        im.movedim(-1, 1), size=(h, w), mode="bilinear", align_corners=False).movedim(1, -1).clamp(0, 1)
        for im in images]
    return torch.cat(same)


def status_of(run) -> str:
    s = run.session
    if s.last_info is not None:
        text = s.last_info.status
    else:
        last = s.history.losses[-1] if s.history.losses else None
        text = f"step {s.step}/{s.total_steps}" + (f" | loss {last:.4f}" if last is not None else "")
    if s.finished:
        text += " | training finished (max_train_steps reached)"
    return text


def _loss_image(run) -> torch.Tensor:
    from ..engine.training import loss_curve_image

    h = run.session.history
    return loss_curve_image(h.losses, eval_points=list(zip(h.eval_steps, h.eval_losses)))


# --- shared input specs ----------------------------------------------------------------------------------------------
def _timestep_inputs() -> dict:
    return {
        "timestep_sampling": (_sampling_modes(), {"default": "shift",
                              "tooltip": "How training timesteps are drawn (Musubi --timestep_sampling). 'shift' with "
                                         "discrete_flow_shift 3.0 is the usual Wan choice."}),
        "discrete_flow_shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Shift of the timestep distribution (shift / sigma modes)."}),
        "sigmoid_scale": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01,
                          "tooltip": "Scale of the logistic draw (sigmoid / shift modes)."}),
        "weighting_scheme": (_weighting_schemes(), {"default": "none",
                             "tooltip": "Per-timestep loss weighting (none = plain MSE)."}),
        "min_timestep": ("INT", {"default": 0, "min": 0, "max": 999,
                         "tooltip": "Lowest timestep trained (0..999)."}),
        "max_timestep": ("INT", {"default": 1000, "min": 1, "max": 1000,
                         "tooltip": "Highest timestep trained (1..1000)."}),
    }


def _advanced_training_inputs() -> dict:
    """Init Training's optional schedule and timestep options (Musubi's less common flags)."""
    return {
        "max_train_epochs": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                             "tooltip": "Train for this many epochs instead of max_train_steps (0 = use "
                                        "max_train_steps). One epoch = every batch of the dataset once."}),
        "save_every_n_epochs": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                "tooltip": "Also save the LoRA at the end of every N-th epoch (0 = off)."}),
        "logit_mean": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.01,
                       "tooltip": "Mean of the logit-normal timestep draw (weighting_scheme logit_normal, and "
                                  "timestep_sampling logsnr/qinglong)."}),
        "logit_std": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 10.0, "step": 0.01,
                      "tooltip": "Standard deviation of the logit-normal timestep draw."}),
        "mode_scale": ("FLOAT", {"default": 1.29, "min": 0.0, "max": 10.0, "step": 0.01,
                       "tooltip": "Scale of the 'mode' weighting scheme."}),
        "preserve_distribution_shape": ("BOOLEAN", {"default": False,
                                        "tooltip": "With min/max_timestep: redraw timesteps outside the range "
                                                   "(keeps the distribution's shape) instead of rescaling them into "
                                                   "it."}),
        "num_timestep_buckets": ("INT", {"default": 0, "min": 0, "max": 1000,
                                 "tooltip": "Stratified timesteps: every N draws cover N equal buckets of the "
                                            "range once each (lower loss noise). 0 = off; at least 2 to use."}),
        "checkpoint_dtype": (CHECKPOINT_DTYPES, {"default": "compute",
                             "tooltip": "What gradient checkpointing keeps of each block input (and activation "
                                        "offload moves): 'compute' = the mixed-precision dtype, half the memory "
                                        "(LoRA gradients within ~0.5 %, see docs/memory.md); 'float32' = exact."}),
        "offload_optimizer_state": ("BOOLEAN", {"default": False,
                                    "tooltip": "Keep the optimizer's state (AdamW: two float32 values per LoRA "
                                               "weight) in CPU RAM except during the optimizer step. Same results; "
                                               "~1.2 GB less GPU memory for Wan 14B at rank 32, one copy each way "
                                               "per step."}),
    }


def _devices_input():
    from .distributed import DEVICES_INPUT

    return DEVICES_INPUT


def _expert_inputs() -> dict:
    """Init Training's optional inputs for Wan 2.2 A14B timestep experts."""
    return {
        "expert_layout": (EXPERT_LAYOUTS, {"default": "auto", "tooltip": (
            "With a pair from Musubi Wan 2.2 Experts: separate = one LoRA per expert (NAME_high_noise / "
            "NAME_low_noise, for ComfyUI's two model loaders; what auto means), shared = one LoRA trained on both "
            "(Musubi Tuner's layout). Must be auto for a single DiT.")}),
        "train_expert": (TRAIN_EXPERTS, {"default": "none", "tooltip": (
            "Train one Wan 2.2 A14B expert alone from its DiT (no pair needed): high / low = only timesteps on that "
            "expert's side of expert_boundary (the distribution's shape kept, min/max_timestep intersected). "
            "none = every timestep (or both experts, with a pair).")}),
        "expert_boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 999.0, "step": 0.005, "tooltip": (
            "With train_expert high/low: the pair's boundary, 0.875 (T2V A14B) or 0.9 (I2V A14B), or a timestep "
            "(875). 0 otherwise: a pair's boundary comes from Musubi Wan 2.2 Experts.")}),
    }


def _training_config(*, seed, max_train_steps, mixed_precision, gradient_checkpointing, gradient_accumulation_steps,
                     timestep_sampling, discrete_flow_shift, sigmoid_scale, weighting_scheme, min_timestep,
                     max_timestep, save_every_n_steps, keep_last_n_saves, output_dir, output_name, save_state,
                     attention_backend, save_format="comfyui", save_state_every_minutes=10.0, max_train_epochs=0,
                     save_every_n_epochs=0, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                     preserve_distribution_shape=False, num_timestep_buckets=0, checkpoint_dtype="compute",
                     offload_optimizer_state=False):
    from ..engine.training import TimestepConfig, TrainingConfig

    if int(num_timestep_buckets) == 1:
        raise invalid("num_timestep_buckets", 1, "0 (off) or at least 2 buckets")
    ts = TimestepConfig(timestep_sampling=timestep_sampling, sigmoid_scale=float(sigmoid_scale),
                        discrete_flow_shift=float(discrete_flow_shift), weighting_scheme=weighting_scheme,
                        min_timestep=int(min_timestep) or None,
                        max_timestep=None if int(max_timestep) == 1000 else int(max_timestep),
                        logit_mean=float(logit_mean), logit_std=float(logit_std), mode_scale=float(mode_scale),
                        preserve_distribution_shape=bool(preserve_distribution_shape),
                        num_timestep_buckets=int(num_timestep_buckets) or None)
    return TrainingConfig(
        output_dir=resolve_output_dir(output_dir), output_name=(output_name or "").strip(),
        lora_dir=default_lora_dir(output_dir),
        max_train_steps=int(max_train_steps), gradient_accumulation_steps=int(gradient_accumulation_steps),
        mixed_precision=mixed_precision, gradient_checkpointing=bool(gradient_checkpointing),
        attention_backend=None if attention_backend in ("model", "", None) else attention_backend,
        seed=int(seed), timesteps=ts, save_every_n_steps=int(save_every_n_steps) or None,
        keep_last_n_saves=int(keep_last_n_saves) or None, save_state=bool(save_state),
        keep_last_n_states=int(keep_last_n_saves) or None, save_format=save_format,
        save_state_every_minutes=float(save_state_every_minutes) or None,
        max_train_epochs=int(max_train_epochs) or None, save_every_n_epochs=int(save_every_n_epochs) or None,
        checkpoint_dtype=checkpoint_dtype, offload_optimizer_state=bool(offload_optimizer_state))


def network_config(network_kind, rank, alpha, dropout, rank_dropout, module_dropout, include_patterns="",
                   exclude_patterns="", lokr_factor=-1, network_weights=""):
    """The LoRA Config node's inputs -> a validated engine NetworkConfig (Train LoRA builds one too)."""
    from ..engine.training import NetworkConfig

    if network_kind not in NETWORK_KINDS:
        raise invalid("network_kind", network_kind, f"one of {NETWORK_KINDS}")
    cfg = NetworkConfig(kind=network_kind, rank=int(rank), alpha=float(alpha) or None,
                        dropout=float(dropout) or None, rank_dropout=float(rank_dropout) or None,
                        module_dropout=float(module_dropout) or None, lokr_factor=int(lokr_factor),
                        include=_regexes(include_patterns, "include_patterns"),
                        exclude=_regexes(exclude_patterns, "exclude_patterns"),
                        network_weights=(network_weights or "").strip() or None)
    cfg.validate()
    cfg.adapter_config().validate()
    return cfg


def optimizer_config(optimizer_type, learning_rate, max_grad_norm, lr_scheduler, lr_warmup_steps, optimizer_args="",
                     custom_optimizer="", lr_scheduler_args="", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                     lr_scheduler_min_lr_ratio=0.0, lr_decay_steps="0", loraplus_lr_ratio=0.0):
    """The Optimizer Config node's inputs -> a validated engine OptimizerConfig (Train LoRA builds one too)."""
    from ..engine.training import OptimizerConfig

    kind = optimizer_type
    if optimizer_type == "custom":
        kind = (custom_optimizer or "").strip()
        if not kind:
            raise invalid("custom_optimizer", custom_optimizer, "an optimizer class path such as torch.optim.SGD "
                                                                "when optimizer_type is 'custom'")
    cfg = OptimizerConfig(optimizer_type=kind, learning_rate=float(learning_rate),
                          optimizer_args=_kwargs(optimizer_args, "optimizer_args"),
                          max_grad_norm=float(max_grad_norm), lr_scheduler=lr_scheduler,
                          lr_warmup_steps=_steps_value(lr_warmup_steps, "lr_warmup_steps"),
                          lr_scheduler_num_cycles=int(lr_scheduler_num_cycles),
                          lr_scheduler_power=float(lr_scheduler_power),
                          lr_scheduler_min_lr_ratio=float(lr_scheduler_min_lr_ratio) or None,
                          lr_scheduler_args=_kwargs(lr_scheduler_args, "lr_scheduler_args"),
                          lr_decay_steps=_steps_value(lr_decay_steps, "lr_decay_steps"),
                          loraplus_lr_ratio=float(loraplus_lr_ratio) or None)
    cfg.validate()
    if kind.lower() not in ("adamw", "adamw8bit", "adafactor", "prodigy"):
        from ..engine.training.optimizers import import_class

        cls = import_class(kind, "custom_optimizer")
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise invalid("custom_optimizer", kind, "a torch.optim.Optimizer subclass")
    return cfg


# --- nodes -----------------------------------------------------------------------------------------------------------
class MusubiLoRAConfig:
    DESCRIPTION = ("The adapter to train: LoRA, LoHa or LoKr with rank, alpha, dropouts and which layers to adapt "
                   "(Musubi Tuner's --network_* options; defaults: Musubi Tuner's targets for the model family).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (T.LORA_CONFIG,)
    RETURN_NAMES = ("lora_config",)
    OUTPUT_TOOLTIPS = ("The network configuration for Musubi Init Training / Train LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "network_kind": (NETWORK_KINDS, {"default": "lora",
                             "tooltip": "lora: low-rank pair; loha: Hadamard product (LyCORIS); lokr: Kronecker "
                                        "product (LyCORIS)."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024,
                     "tooltip": "Network dimension (network_dim), an integer ≥ 1. Higher = more capacity and size."}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                      "tooltip": "network_alpha: the adapter is scaled by alpha/rank. 0 = alpha equals rank."}),
            "dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                        "tooltip": "Neuron dropout on the rank activations during training (0 = off)."}),
            "rank_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                             "tooltip": "Randomly drop ranks during training (0 = off)."}),
            "module_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                               "tooltip": "Skip whole adapted layers with this probability during training (0 = off)."}),
        }, "optional": {
            "include_patterns": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "Regexes (one per line) re-admitting layers the default exclusion drops."}),
            "exclude_patterns": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "Regexes (one per line) of module names not to adapt, e.g. 'cross_attn'."}),
            "lokr_factor": ("INT", {"default": -1, "min": -1, "max": 1024,
                            "tooltip": "LoKr Kronecker factor (-1 = balanced). Ignored by lora/loha."}),
            "network_weights": ("STRING", {"default": "",
                                "tooltip": "Optional LoRA file (full path) to start from instead of a fresh adapter; "
                                           "same kind and rank."}),
        }}

    def build(self, network_kind, rank, alpha, dropout, rank_dropout, module_dropout, include_patterns="",
              exclude_patterns="", lokr_factor=-1, network_weights=""):
        return (network_config(network_kind, rank, alpha, dropout, rank_dropout, module_dropout,
                               include_patterns, exclude_patterns, lokr_factor, network_weights),)


class MusubiOptimizerConfig:
    DESCRIPTION = ("Optimizer and learning-rate schedule for training (Musubi Tuner's --optimizer_type, "
                   "--optimizer_args, --lr_scheduler...). 'custom' takes any optimizer class by import path.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (T.OPTIMIZER_CONFIG,)
    RETURN_NAMES = ("optimizer_config",)
    OUTPUT_TOOLTIPS = ("The optimizer configuration for Musubi Init Training.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "optimizer_type": (OPTIMIZERS, {"default": "AdamW",
                               "tooltip": "AdamW (torch), AdamW8bit (bitsandbytes), Adafactor (transformers), "
                                          "Prodigy (prodigyopt), or custom: the class in custom_optimizer."}),
            "learning_rate": ("FLOAT", {"default": 2e-4, "min": 1e-8, "max": 10.0, "step": 1e-6, "round": False,
                              "tooltip": "Base learning rate (> 0). Typical Wan LoRA: 1e-4 to 3e-4; Prodigy: 1.0."}),
            "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                              "tooltip": "Clip the gradient norm to this value (0 = no clipping)."}),
            "lr_scheduler": (_schedulers(), {"default": "constant",
                             "tooltip": "Learning-rate schedule over max_train_steps (Init Training)."}),
            "lr_warmup_steps": ("STRING", {"default": "0",
                                "tooltip": "Warm-up: a step count, a fraction < 1 of the total steps, or 'N%'."}),
        }, "optional": {
            "optimizer_args": ("STRING", {"default": "", "multiline": True,
                               "tooltip": "Extra optimizer arguments as k=v, e.g. 'weight_decay=0.01 "
                                          "betas=(0.9,0.99)'."}),
            "custom_optimizer": ("STRING", {"default": "",
                                 "tooltip": "With optimizer_type 'custom': a class by import path, e.g. "
                                            "torch.optim.SGD or bitsandbytes.optim.AdEMAMix8bit."}),
            "lr_scheduler_args": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "Extra scheduler arguments as k=v (for a scheduler given by import path)."}),
            "lr_scheduler_num_cycles": ("INT", {"default": 1, "min": 1, "max": 1000,
                                        "tooltip": "Restarts of cosine_with_restarts."}),
            "lr_scheduler_power": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                   "tooltip": "Power of the polynomial schedule."}),
            "lr_scheduler_min_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Floor of cosine_with_min_lr / warmup_stable_decay, as a "
                                                     "fraction of the learning rate."}),
            "lr_decay_steps": ("STRING", {"default": "0",
                               "tooltip": "warmup_stable_decay: length of the final decay phase, as a step count, "
                                          "a fraction < 1 of the total steps, or 'N%' (0 = no decay phase)."}),
            "loraplus_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.5,
                                  "tooltip": "LoRA+: the up (B) matrices learn at learning_rate × this ratio "
                                             "(e.g. 4 or 16). 0 = off (one learning rate)."}),
        }}

    def build(self, optimizer_type, learning_rate, max_grad_norm, lr_scheduler, lr_warmup_steps, optimizer_args="",
              custom_optimizer="", lr_scheduler_args="", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
              lr_scheduler_min_lr_ratio=0.0, lr_decay_steps="0", loraplus_lr_ratio=0.0):
        return (optimizer_config(optimizer_type, learning_rate, max_grad_norm, lr_scheduler, lr_warmup_steps,
                                 optimizer_args, custom_optimizer, lr_scheduler_args, lr_scheduler_num_cycles,
                                 lr_scheduler_power, lr_scheduler_min_lr_ratio, lr_decay_steps,
                                 loraplus_lr_ratio),)


class MusubiInitTraining:
    DESCRIPTION = ("Start a LoRA training session on a loaded DiT (Wan, HunyuanVideo) with a cached dataset. "
                   "Everything is checked before any step (rank, learning rate, attention, dataset cached for this "
                   "model, output folder writable); ComfyUI's models are evicted first. The adapter lives on a "
                   "view of the model sharing its weights, so the loader's model stays clean. Re-queueing the same graph continues the same "
                   "session (even if ComfyUI evicted this node's output); changing an input here starts a new "
                   "session that replaces this node's previous one (never two adapters), except the validation and "
                   "tensorboard inputs, which apply to the running session. Optional: sample validation prompts "
                   "every N steps (shown on Train Steps) and write TensorBoard logs to <output_dir>/logs. Wan 2.2 "
                   "A14B: connect the pair from Musubi Wan 2.2 Experts to train both experts in one run (its "
                   "boundary and memory mode; expert_layout: one LoRA per expert or one shared), or one expert's "
                   "DiT with train_expert and expert_boundary to train that expert alone.")
    CATEGORY = CATEGORY
    FUNCTION = "init"
    RETURN_TYPES = (T.TRAINING_SESSION, MODEL_TYPES)
    RETURN_NAMES = ("session", "model")
    OUTPUT_TOOLTIPS = ("The training session (connect Musubi Train Steps, Validate, Save Trained LoRA).",
                       "The model with the session's adapter attached (what the Sampler should use to generate "
                       "with the LoRA as trained so far); for a pair of experts, the pair with each expert's "
                       "adapter.")

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None, output_dir=None):
        return checks.validate_inputs(cls, {"output_name": checks.plain_file_name, "output_dir": folder_problem},
                                      output_name=output_name, output_dir=output_dir)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPES, {"tooltip": "The DiT to train a LoRA for (from a Musubi DiT loader), or a Wan 2.2 "
                                               "A14B pair from Musubi Wan 2.2 Experts (both experts train: each "
                                               "batch trains the expert whose side of the boundary its timesteps "
                                               "fall on, as Musubi Tuner)."}),
            "dataset": (T.DATASET, {"tooltip": "A dataset with cached latents and text embeddings for this model."}),
            "lora_config": (T.LORA_CONFIG, {"tooltip": "The adapter to train (Musubi LoRA Config)."}),
            "optimizer_config": (T.OPTIMIZER_CONFIG, {"tooltip": "Optimizer and LR schedule (Musubi Optimizer Config)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                     "tooltip": "Seed of adapter init, noise, timesteps and data order (same seed = same run)."}),
            "max_train_steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000,
                                "tooltip": "Total optimizer steps of the session: the LR schedule spans them and "
                                           "training stops there (the final LoRA is saved then)."}),
            "mixed_precision": (MIXED_PRECISION, {"default": "bf16",
                                "tooltip": "Autocast precision of the forward pass; adapter weights stay fp32."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                       "tooltip": "Recompute activations in the backward pass (much less memory)."}),
            "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024,
                                            "tooltip": "Micro-batches per optimizer step."}),
            **_timestep_inputs(),
            "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 10_000_000,
                                   "tooltip": "Also save the LoRA every N steps while training (0 = only at the end)."}),
            "keep_last_n_saves": ("INT", {"default": 0, "min": 0, "max": 10_000,
                                  "tooltip": "Keep only the newest N periodic saves (0 = keep all)."}),
            "output_dir": ("STRING", {"default": "",
                           "tooltip": "Folder for LoRA files and training states. Empty = LoRA files in "
                                      "models/loras/musubi (listed by the LoRA loaders), states in <ComfyUI "
                                      "output>/musubi_training; a relative path is inside ComfyUI's output folder; "
                                      "paths outside ComfyUI's folders are refused (see README)."}),
            "output_name": ("STRING", {"default": "my_wan_lora",
                            "tooltip": "Base file name (NAME.safetensors, NAME-stepXXXXXXXX.safetensors, "
                                       "NAME-state/ for resuming)."}),
            "save_state": ("BOOLEAN", {"default": False,
                           "tooltip": "Also write a resumable state folder at every periodic save (a state is "
                                      "always written on cancel, error and at the end)."}),
            "attention_backend": (TRAIN_ATTENTION, {"default": "model",
                                  "tooltip": "Attention kernel for training; 'model' keeps the loader's choice. Sage "
                                             "has no backward pass and is refused."}),
        }, "optional": {
            "save_format": (SAVE_FORMATS, {"default": "comfyui",
                            "tooltip": "Format of the LoRA files written during and at the end of training."}),
            "validation_prompts": (T.VALIDATION_PROMPTS, {
                "tooltip": "Prompts to sample during training (Musubi Validation Prompt, chained for several). Used "
                           "when validate_every_n_steps > 0 or validate_at_start is on."}),
            "validation_vae": (T.VAE, {"tooltip": "The VAE of the DiT's family, decoding the validation samples (required "
                                                      "when validation is on)."}),
            "validate_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 10_000_000,
                                       "tooltip": "Sample the validation prompts every N steps with the model and "
                                                  "adapter as trained so far; shown as Train Steps' preview and "
                                                  "'samples' output. 0 = off. Never changes the training results."}),
            "validate_at_start": ("BOOLEAN", {"default": False,
                                  "tooltip": "Also sample the validation prompts before the first step (the model "
                                             "without training, to compare against)."}),
            "tensorboard": ("BOOLEAN", {"default": False,
                            "tooltip": "Write TensorBoard event files (loss, average loss, learning rate, speed, "
                                       "timesteps) to <output_dir>/logs; view with `tensorboard --logdir` there."}),
            "continue_saved_state": CONTINUE_INPUT,
            "save_state_every_minutes": SAVE_MINUTES_INPUT,
            "eval_dataset": (T.DATASET, {"tooltip": (
                "Held-out clips (a second cached dataset the run never trains on): their loss at fixed timesteps "
                "and fixed noise is measured every eval_every_n_steps, shown beside the training loss (status, "
                "loss curve in orange, LOSS_MAP 'eval_loss', TensorBoard loss/eval). Falling then rising = "
                "overfitting.")}),
            "eval_every_n_steps": ("INT", {"default": 100, "min": 1, "max": 1_000_000,
                                   "tooltip": "Steps between two eval-loss measurements (with eval_dataset)."}),
            **_advanced_training_inputs(),
            **_expert_inputs(),
            "devices": _devices_input(),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def init(self, model, dataset, lora_config, optimizer_config, seed, max_train_steps, mixed_precision,
             gradient_checkpointing, gradient_accumulation_steps, timestep_sampling, discrete_flow_shift,
             sigmoid_scale, weighting_scheme, min_timestep, max_timestep, save_every_n_steps, keep_last_n_saves,
             output_dir, output_name, save_state, attention_backend, save_format="comfyui", validation_prompts=None,
             validation_vae=None, validate_every_n_steps=0, validate_at_start=False, tensorboard=False,
             continue_saved_state=True, save_state_every_minutes=10.0, eval_dataset=None, eval_every_n_steps=100,
             max_train_epochs=0, save_every_n_epochs=0, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
             preserve_distribution_shape=False, num_timestep_buckets=0, checkpoint_dtype="compute",
             offload_optimizer_state=False, expert_layout="auto", train_expert="none", expert_boundary=0.0,
             devices="", unique_id=None, prompt=None):
        dit, experts = trained_models(model, expert_layout)
        from .distributed import parse_devices

        device_list = parse_devices(devices, compat.torch_device())
        config = _training_config(
            seed=seed, max_train_steps=max_train_steps, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, gradient_accumulation_steps=gradient_accumulation_steps,
            timestep_sampling=timestep_sampling, discrete_flow_shift=discrete_flow_shift, sigmoid_scale=sigmoid_scale,
            weighting_scheme=weighting_scheme, min_timestep=min_timestep, max_timestep=max_timestep,
            save_every_n_steps=save_every_n_steps, keep_last_n_saves=keep_last_n_saves, output_dir=output_dir,
            output_name=output_name, save_state=save_state, attention_backend=attention_backend,
            save_format=save_format, save_state_every_minutes=save_state_every_minutes,
            max_train_epochs=max_train_epochs, save_every_n_epochs=save_every_n_epochs, logit_mean=logit_mean,
            logit_std=logit_std, mode_scale=mode_scale, preserve_distribution_shape=preserve_distribution_shape,
            num_timestep_buckets=num_timestep_buckets, checkpoint_dtype=checkpoint_dtype,
            offload_optimizer_state=offload_optimizer_state)
        config = one_expert_timesteps(config, dit, experts, train_expert, expert_boundary)
        network, optimizer = _network_config(lora_config), _optimizer_config(optimizer_config)
        validate = check_validation_inputs(dit.module, validation_prompts, validation_vae, validate_every_n_steps,
                                           validate_at_start)
        logging_dir = tensorboard_dir(config.output_dir) if tensorboard else None
        if experts is not None and eval_dataset is not None:
            raise invalid("eval_dataset", "connected", "no held-out evaluation while training a pair of experts (not "
                                                       "supported): disconnect it")
        held_out = held_out_loader(eval_dataset, dit.module, config.seed) if eval_dataset is not None else None
        run = open_run("init", unique_id, dit, dataset, dataclasses.replace(network),
                       dataclasses.replace(optimizer), config, continue_saved=bool(continue_saved_state),
                       experts=experts, devices=device_list, prompt=prompt)
        # validation and TensorBoard apply to the session in memory: changing them never restarts training
        run.session.validation = validation_config(run, validation_prompts, validation_vae, validate_every_n_steps,
                                                   validate_at_start) if validate else None
        run.session.evaluation = eval_config(held_out, eval_every_n_steps, config.seed, run.session.evaluation)
        set_logging_dir(run, logging_dir)
        return (SessionOutput(run, ("init",) + run.key[1:]), run.trained_model())


def held_out_loader(eval_dataset, model, seed: int):
    """(loader, identity) of the held-out set, checked cached for this model (cheap: no batch is read)."""
    try:
        loader, identity = dataset_loader(eval_dataset, model, seed)
    except MusubiInputError as e:
        raise invalid("eval_dataset", type(eval_dataset).__name__, f"a dataset cached for this model ({e})") from e
    return loader, identity


def eval_config(held_out, every_n_steps, seed: int, current=None):
    """The held-out batches in a fixed order, read once: a session that already evaluates the same cache keeps them."""
    from ..engine.training import EvalConfig

    if held_out is None:
        return None
    loader, identity = held_out
    if current is not None and current.source == identity and current.seed == int(seed):
        cfg = dataclasses.replace(current, every_n_steps=int(every_n_steps))
    else:
        loader.shuffle = False
        batches = [loader.load_batch(loader.datasets[d], samples) for d, samples in loader.epoch_batches(0)]
        cfg = EvalConfig(batches=batches, every_n_steps=int(every_n_steps), seed=int(seed), source=identity)
    cfg.validate()
    return cfg


def tensorboard_dir(output_dir: str) -> str:
    """<output_dir>/logs, checked writable and tensorboardX importable (before any session exists)."""
    from ..engine.training.config import check_writable

    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise invalid("tensorboard", True, "the tensorboardX package installed (pip install tensorboardX), or "
                                           "tensorboard off") from None
    return str(check_writable(Path(output_dir) / "logs", "output_dir"))


def set_logging_dir(run, logging_dir: str | None) -> None:
    """Turn the session's TensorBoard logging on (event files appear at the next step) or off."""
    s = run.session
    if (s.config.logging_dir or None) == logging_dir:
        return
    s.close(save=False)  # closes the TensorBoard writer; the next step opens a new one if logging is on
    s.config.logging_dir = logging_dir


def _network_config(value):
    from ..engine.training import NetworkConfig

    if not isinstance(value, NetworkConfig):
        raise invalid("lora_config", type(value).__name__, "a LORA_CONFIG from Musubi LoRA Config")
    return value


def _optimizer_config(value):
    from ..engine.training import OptimizerConfig

    if not isinstance(value, OptimizerConfig):
        raise invalid("optimizer_config", type(value).__name__, "an OPTIMIZER_CONFIG from Musubi Optimizer Config")
    return value


class MusubiTrainSteps:
    DESCRIPTION = ("Run N more optimizer steps on a training session each time this node executes. ComfyUI executes "
                   "it again only when its inputs (or anything upstream) change, so re-queueing an unchanged graph "
                   "trains nothing more; turn on train_on_every_queue for 'N more steps per Queue'. Chain several "
                   "Train Steps (with Validate / Save between them) to build a schedule. Cancel stops within one "
                   "step and writes a resumable state; re-queueing continues to this node's target. Shows step, "
                   "loss, lr, it/s, ETA and memory as progress text, and the loss curve as preview.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (T.TRAINING_SESSION, "IMAGE", LOSS_MAP, "STRING", MODEL_TYPES, "IMAGE")
    RETURN_NAMES = ("session", "loss_curve", "loss_map", "status", "model", "samples")
    OUTPUT_TOOLTIPS = ("The same session, trained further (chain another Train Steps, Validate or Save).",
                       "Loss curve of the whole session so far (raw and smoothed).",
                       "Loss per step of the whole session, core LOSS_MAP {'loss': [...]}.",
                       "Status: step, loss, learning rate, speed, ETA, memory.",
                       "The model with the adapter as trained so far (connect to the family's Musubi sampler); "
                       "for a pair of experts, the pair with each expert's adapter (Musubi Wan Sampler).",
                       "The latest validation samples (Init Training's validation prompts; every prompt's frames "
                       "one after another), or a 64x64 black image before the first validation.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": (T.TRAINING_SESSION, {"tooltip": "The training session (Init Training, Resume, or a previous "
                                                        "Train Steps)."}),
            "steps": ("INT", {"default": 100, "min": 1, "max": 10_000_000,
                      "tooltip": "Optimizer steps to run each time this node executes (stops early at "
                                 "max_train_steps)."}),
        }, "optional": {
            "train_on_every_queue": ("BOOLEAN", {"default": False,
                                     "tooltip": "Execute on every Queue even when nothing changed: each queue then "
                                                "trains N more steps."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, train_on_every_queue=False, **kwargs):
        return float("nan") if train_on_every_queue else ""

    def train(self, session, steps, train_on_every_queue=False, unique_id=None):
        out = _session_output(session)
        if not isinstance(steps, int) or steps < 1:
            raise invalid("steps", steps, "an integer ≥ 1")
        run = out.run
        token = (str(unique_id), int(steps), out.token)
        if train_on_every_queue:
            token += (next(_SERIAL),)
        target = run.targets.get(token)
        if target is None:
            target = run.targets[token] = run.session.step + steps
        train_to(run, target, unique_id)
        return (SessionOutput(run, token), _loss_image(run), run.session.loss_map(), status_of(run),
                run.trained_model(), samples_image(run))


def _image_conditioning(image_embeds, width, height, frames) -> tuple:
    """(task, conditioning, clip_fea) of an IMAGE_EMBEDS value for a prompt of this size; Nones without one."""
    if image_embeds is None:
        return None, None, None
    if not isinstance(image_embeds, dict) or "conditioning" not in image_embeds:
        raise invalid("image_embeds", type(image_embeds).__name__, "conditioning from a Musubi ... Encode node")
    size = (image_embeds.get("width"), image_embeds.get("height"), image_embeds.get("frames"))
    # a conditioning that fixes no frame count (a start image the sampler extends by sections) says frames None
    if any(s is not None and s != want for s, want in zip(size, (width, height, frames))):
        raise invalid("image_embeds", size, f"this prompt's width/height/frames {(width, height, frames)}")
    return image_embeds.get("task"), image_embeds["conditioning"], image_embeds.get("clip_fea")


def _prompt_embeds(embeds) -> dict:
    """The ValidationPrompt fields an EMBEDS value gives: the prompt's and negative prompt's text states, and the
    pooled vectors of families that take one (HunyuanVideo's CLIP-L)."""
    if not isinstance(embeds, dict) or not isinstance(embeds.get("context"), torch.Tensor):
        raise invalid("embeds", type(embeds).__name__, "prompt embeddings from a Musubi Text Encode node")
    out = {}
    for key in ("context", "negative_context", "pooled", "negative_pooled"):
        value = embeds.get(key)
        out[key] = None if value is None else compat.unwrap_inference_tensor(value)
    return out


GUIDANCE_SCALE_INPUT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                        "tooltip": "Classifier-free guidance scale (1 = no negative pass, faster); 0 = the family's "
                                   "default (Wan 5.0; HunyuanVideo 1.0: the distilled model uses embedded_guidance)."})
EMBEDDED_GUIDANCE_INPUT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                           "tooltip": "Guidance-distilled models (HunyuanVideo): the embedded guidance scale; 0 = "
                                      "the model's default (6.0 for HunyuanVideo). Ignored by models without one."})


class MusubiValidationPrompt:
    DESCRIPTION = ("One prompt to sample during training (Musubi Init Training's validation_prompts) with its size, "
                   "length, seed, steps and guidance. Chain several: connect a previous Validation Prompt to "
                   "validation_prompts to build a list.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (T.VALIDATION_PROMPTS,)
    RETURN_NAMES = ("validation_prompts",)
    OUTPUT_TOOLTIPS = ("The prompts so far (the connected ones, then this one), for Musubi Init Training or another "
                       "Validation Prompt.",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from the family's Text Encode (its negative prompt is "
                                             "used for guidance)."}),
            **checks.size_inputs(256, 256, 1),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                     "tooltip": "Noise seed (fixed, so samples at different steps are comparable)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "guidance_scale": GUIDANCE_SCALE_INPUT,
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                      "tooltip": "Flow shift; 0 = the task default."}),
        }, "optional": {
            "validation_prompts": (T.VALIDATION_PROMPTS, {"tooltip": "Earlier prompts to add this one to (chain "
                                                                     "Validation Prompt nodes)."}),
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "I2V/FLF2V or Fun-Control conditioning (Musubi Wan ... "
                                                         "Encode), SkyReels I2V or V2V conditioning (Musubi "
                                                         "HunyuanVideo ... Encode), or a FramePack start image "
                                                         "(Musubi FramePack Image Encode) with the same "
                                                         "width/height/frames, for training an image-to-video "
                                                         "model."}),
            "embedded_guidance": EMBEDDED_GUIDANCE_INPUT,
        }}

    def build(self, embeds, width, height, frames, seed, steps, guidance_scale, shift, validation_prompts=None,
              image_embeds=None, embedded_guidance=0.0):
        from ..engine.training import ValidationPrompt

        text = _prompt_embeds(embeds)
        if width % 16 or height % 16:
            raise invalid("width/height", (width, height), "multiples of 16")
        if (frames - 1) % 4:
            raise invalid("frames", frames, "a frame count of the form 4k+1 (1, 5, 9, ..., 81)")
        previous = [] if validation_prompts is None else validation_prompts
        if not isinstance(previous, (list, tuple)) or not all(isinstance(p, ValidationPrompt) for p in previous):
            raise invalid("validation_prompts", type(previous).__name__, "VALIDATION_PROMPTS from Musubi Validation "
                                                                         "Prompt")
        task, conditioning, clip_fea = _image_conditioning(image_embeds, width, height, frames)
        prompt = ValidationPrompt(
            **text, embedded_guidance=float(embedded_guidance) or None, width=int(width), height=int(height),
            frames=int(frames), seed=int(seed), steps=int(steps), guidance_scale=float(guidance_scale) or None,
            shift=float(shift) or None, task=task, clip_fea=clip_fea, conditioning=conditioning)
        return (list(previous) + [prompt],)


class MusubiValidate:
    DESCRIPTION = ("Sample a prompt with the session's model and adapter as trained so far (the in-memory weights, "
                   "no file), decode it with the VAE and output the frames. Sampling never changes the training's "
                   "random stream.")
    CATEGORY = CATEGORY
    FUNCTION = "validate"
    RETURN_TYPES = ("IMAGE", T.TRAINING_SESSION)
    RETURN_NAMES = ("images", "session")
    OUTPUT_TOOLTIPS = ("Decoded frames [frames, height, width, 3].",
                       "The session, unchanged (chain it to order Validate before the next Train Steps).")

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": (T.TRAINING_SESSION, {"tooltip": "The training session to sample with."}),
            "vae": (T.VAE, {"tooltip": "The VAE of the DiT's family, to decode the samples."}),
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from the family's Musubi Text Encode."}),
            **checks.size_inputs(256, 256, 1),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "guidance_scale": GUIDANCE_SCALE_INPUT,
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                      "tooltip": "Flow shift; 0 = the task default."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                     "tooltip": "Noise seed."}),
        }, "optional": {
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "I2V/FLF2V, Fun-Control or one-frame conditioning (Musubi "
                                                         "Wan ... Encode; HunyuanVideo: SkyReels I2V or V2V; "
                                                         "FramePack: a start image) with the same "
                                                         "width/height/frames, for a session training an "
                                                         "image-conditioned model."}),
            "embedded_guidance": EMBEDDED_GUIDANCE_INPUT,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def validate(self, session, vae, embeds, width, height, frames, steps, guidance_scale, shift, seed,
                 image_embeds=None, embedded_guidance=0.0, unique_id=None):
        from ..engine.training import ValidationPrompt

        out = _session_output(session)
        vae = T.handle(vae, "vae", "a VAE from a Musubi VAE loader node")
        if width % 16 or height % 16:
            raise invalid("width/height", (width, height), "multiples of 16")
        text = _prompt_embeds(embeds)
        task, conditioning, clip_fea = _image_conditioning(image_embeds, width, height, frames)
        run = out.run
        _check_vae_family(vae, run.model, "vae")
        prompt = ValidationPrompt(**text, embedded_guidance=float(embedded_guidance) or None, width=width,
                                  height=height, frames=frames, seed=int(seed), steps=steps,
                                  guidance_scale=float(guidance_scale) or None, shift=shift or None, task=task,
                                  clip_fea=clip_fea, conditioning=conditioning)
        from ..engine.families import family_of
        from ..engine.training.validation import build_request

        family_of(run.model).check_sampling(run.model, build_request(run.model, prompt))   # before any move
        run.activate(compat.torch_device())
        bar = compat.Progress(steps, unique_id)
        # (a pair of experts samples through both, each with its adapter)
        (latents,) = run.session.sample_prompts([prompt], progress=lambda step, total, x0: bar.update(step))
        return (video_to_image(decode_video(vae, latents)), out)


class MusubiSaveTrainedLoRA:
    DESCRIPTION = ("Save the session's adapter as trained so far as a .safetensors LoRA (comfyui format loads in "
                   "core Load LoRA; musubi = Musubi Tuner/kohya names; diffusers = PEFT names), numbered like "
                   "ComfyUI's savers, with Musubi's training metadata. A pair of Wan 2.2 experts (separate "
                   "layout) writes PREFIX_high_noise_NNNNN_ and PREFIX_low_noise_NNNNN_ (one counter), for "
                   "ComfyUI's two model loaders.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = (T.LORA, "STRING", T.LORA, "STRING")
    RETURN_NAMES = ("lora", "path", "low_noise_lora", "low_noise_path")
    OUTPUT_TOOLTIPS = ("The saved LoRA, read back (for Musubi Apply LoRA / LoRA Info); for a pair of experts "
                       "(separate layout) the high-noise expert's.",
                       "Full path of the saved file (a pair: the high-noise expert's).",
                       "A pair of experts (separate layout): the low-noise expert's LoRA; otherwise the same as lora.",
                       "A pair of experts (separate layout): the low-noise expert's file; otherwise the same as path.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return checks.validate_inputs(cls, {"filename_prefix": checks.relative_name}, filename_prefix=filename_prefix)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": (T.TRAINING_SESSION, {"tooltip": "The training session whose adapter is saved."}),
            "format": (SAVE_FORMATS, {"default": "comfyui",
                       "tooltip": "comfyui: diffusion_model.* keys; musubi: lora_unet_* keys; diffusers: PEFT keys "
                                  "(plain LoRA only)."}),
            "filename_prefix": ("STRING", {"default": "musubi/musubi_trained",
                                "tooltip": "File name prefix (subfolders allowed); a counter and .safetensors are "
                                           "appended."}),
            "dtype": (SAVE_DTYPES, {"default": "bf16", "tooltip": "Precision of the saved tensors."}),
            "save_to": (["output", "models/loras"], {"default": "models/loras",
                        "tooltip": "models/loras: the first loras folder, so the LoRA loaders list the file right "
                                   "away; output: ComfyUI's output folder."}),
        }}

    def save(self, session, format, filename_prefix, dtype, save_to):
        from ..engine.checkpoint import same_tensors
        from ..engine.lora import read_lora
        from .lora import numbered_file, previous_numbered

        run = _session_output(session).run
        if format not in SAVE_FORMATS:
            raise invalid("format", format, f"one of {SAVE_FORMATS}")
        pair = run.pair is not None and run.pair.layout == "separate"
        path = (_numbered_pair(save_to, filename_prefix) if pair
                else numbered_file(save_to, "loras", filename_prefix, "filename_prefix"))
        (path[next(iter(path))] if pair else path).parent.mkdir(parents=True, exist_ok=True)
        cfg = run.session.config
        old = (cfg.save_format, cfg.save_precision)
        cfg.save_format, cfg.save_precision = format, dtype
        try:
            run.session.save_lora(path)
        finally:
            cfg.save_format, cfg.save_precision = old
        saved = list(run.session.saved_loras)   # [file], or [high-noise, low-noise]
        # ComfyUI re-runs this node when its cached output was evicted: the same adapter is not saved twice
        previous = [previous_numbered(f) for f in saved]
        if all(p is not None and same_tensors(p, f) for p, f in zip(previous, saved)):
            for f in saved:
                f.unlink()
            saved = previous
        loras = [read_lora(f) for f in saved]
        return {"ui": {"text": [str(f) for f in saved]},
                "result": (loras[0], str(saved[0]), loras[-1], str(saved[-1]))}


def _numbered_pair(save_to: str, prefix: str) -> dict:
    """{expert: `<prefix>_high_noise_NNNNN_.safetensors` / `..._low_noise_...`}: one counter, free for both."""
    from ..engine.training.experts import EXPERTS, SUFFIX
    from .lora import numbered_file

    first = {e: numbered_file(save_to, "loras", prefix + SUFFIX[e], "filename_prefix") for e in EXPERTS}
    n = max(int(re.search(r"_(\d+)_\.safetensors$", p.name).group(1)) for p in first.values())
    return {e: p.with_name(re.sub(r"_\d+_\.safetensors$", f"_{n:05}_.safetensors", p.name)) for e, p in first.items()}


class MusubiResumeTraining:
    DESCRIPTION = ("Continue a training session from a state folder (NAME-state, written on cancel, on error, at "
                   "the end and optionally at every save): adapter, optimizer, scheduler, RNGs and data position "
                   "are restored, so training continues exactly as if it had never stopped. The network, optimizer "
                   "and training options are those saved in the state unless configs are connected.")
    CATEGORY = CATEGORY
    FUNCTION = "resume"
    RETURN_TYPES = (T.TRAINING_SESSION, MODEL_TYPES)
    RETURN_NAMES = ("session", "model")
    OUTPUT_TOOLTIPS = ("The resumed training session.", "The model with the resumed adapter attached (a pair of "
                                                        "experts: the pair with each expert's adapter).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPES, {"tooltip": "The same DiT the state was trained on (a pair of experts: the same "
                                               "pair from Musubi Wan 2.2 Experts; the LoRA layout is the saved "
                                               "one)."}),
            "dataset": (T.DATASET, {"tooltip": "The same cached dataset (same seed) the state was trained on."}),
            "state_path": ("STRING", {"default": "",
                           "tooltip": "The state folder (…/NAME-state) or its training_state.pt; a relative path is "
                                      "inside ComfyUI's output folder."}),
        }, "optional": {
            "lora_config": (T.LORA_CONFIG, {"tooltip": "Override the saved network config (must keep kind and rank)."}),
            "optimizer_config": (T.OPTIMIZER_CONFIG, {"tooltip": "Override the saved optimizer config."}),
            "max_train_steps": ("INT", {"default": 0, "min": 0, "max": 10_000_000,
                                "tooltip": "0 = as saved; otherwise a new total (changes the LR schedule)."}),
            "devices": _devices_input(),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def resume(self, model, dataset, state_path, lora_config=None, optimizer_config=None, max_train_steps=0,
               devices="", unique_id=None, prompt=None):
        from ..engine.training import NetworkConfig, OptimizerConfig, read_state
        from .distributed import parse_devices

        device_list = parse_devices(devices, compat.torch_device())

        text = (state_path or "").strip()
        if not text:
            raise invalid("state_path", state_path, "a training state folder (…/NAME-state)")
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            path = Path(compat.output_directory()) / path
        saved = read_state(path).get("config", {})
        pair = saved.get("experts")
        if bool(pair) != is_pair(model):
            raise invalid("model", "a pair of experts" if is_pair(model) else "a single DiT",
                          f"a pair from Musubi Wan 2.2 Experts (the state trained two experts: {pair})" if pair
                          else "the single DiT the state was trained on")
        dit, experts = trained_models(model, pair["layout"] if pair else "auto")
        network = _network_config(lora_config) if lora_config is not None else _from_plain(
            NetworkConfig, saved.get("network", {}))
        optimizer = _optimizer_config(optimizer_config) if optimizer_config is not None else _from_plain(
            OptimizerConfig, saved.get("optimizer", {}))
        config = _training_config_from_plain(saved.get("training", {}))
        check_write_path(config.output_dir, "state_path (its saved output_dir)")
        if config.lora_dir:
            check_write_path(config.lora_dir, "state_path (its saved lora_dir)")
        if max_train_steps:
            config.max_train_steps = int(max_train_steps)
        run = open_run("resume", unique_id, dit, dataset, dataclasses.replace(network),
                       dataclasses.replace(optimizer), config, resume_from=str(path), experts=experts,
                       devices=device_list, prompt=prompt)
        return (SessionOutput(run, ("resume",) + run.key[1:]), run.trained_model())


def _from_plain(cls, plain: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in plain.items() if k in names})


def _training_config_from_plain(plain: dict):
    from ..engine.training import TimestepConfig, TrainingConfig

    plain = dict(plain)
    ts = _from_plain(TimestepConfig, plain.pop("timesteps", {}) or {})
    cfg = _from_plain(TrainingConfig, plain)
    cfg.timesteps = ts
    return cfg


class MusubiTrainLoRA:
    DESCRIPTION = ("All-in-one LoRA training for simple graphs: train `steps` steps on a cached dataset and save "
                   "NAME.safetensors, then output the model with the trained adapter attached (connect it to the "
                   "Sampler). Idempotent: re-queueing the same inputs trains nothing more; changing an input starts "
                   "a new run that replaces this node's previous one. Cancel writes a resumable state; re-queueing "
                   "continues it.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (T.DIT, "IMAGE", "STRING")
    RETURN_NAMES = ("model", "loss_curve", "lora_path")
    OUTPUT_TOOLTIPS = ("The model with the trained adapter attached (shares the loader's weights).",
                       "Loss curve of the training.", "Full path of the saved LoRA file.")

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None, output_dir=None):
        return checks.validate_inputs(cls, {"output_name": checks.plain_file_name, "output_dir": folder_problem},
                                      output_name=output_name, output_dir=output_dir)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The DiT to train a LoRA for."}),
            "dataset": (T.DATASET, {"tooltip": "A dataset with cached latents and text embeddings for this model."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000, "tooltip": "Total optimizer steps."}),
            "network_kind": (NETWORK_KINDS, {"default": "lora", "tooltip": "lora, loha or lokr."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "Network dimension, an integer ≥ 1."}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                      "tooltip": "network_alpha (scale alpha/rank); 0 = alpha equals rank."}),
            "optimizer_type": (OPTIMIZERS[:-1], {"default": "AdamW", "tooltip": "The optimizer."}),
            "learning_rate": ("FLOAT", {"default": 2e-4, "min": 1e-8, "max": 10.0, "step": 1e-6, "round": False,
                              "tooltip": "Learning rate (> 0)."}),
            "lr_scheduler": (_schedulers(), {"default": "constant", "tooltip": "Learning-rate schedule over the steps."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                     "tooltip": "Training seed."}),
            "mixed_precision": (MIXED_PRECISION, {"default": "bf16", "tooltip": "Autocast precision."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Trade compute for memory."}),
            "timestep_sampling": (_sampling_modes(), {"default": "shift", "tooltip": "Timestep distribution."}),
            "discrete_flow_shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                    "tooltip": "Shift of the timestep distribution."}),
            "output_name": ("STRING", {"default": "my_wan_lora", "tooltip": "Base name of the saved LoRA file."}),
            "save_format": (SAVE_FORMATS, {"default": "comfyui", "tooltip": "Format of the saved LoRA."}),
        }, "optional": {
            "output_dir": ("STRING", {"default": "", "tooltip": "Folder for the LoRA and state; empty = the LoRA in "
                                                               "models/loras/musubi, the state in <ComfyUI "
                                                               "output>/musubi_training."}),
            "continue_saved_state": CONTINUE_INPUT,
            "save_state_every_minutes": SAVE_MINUTES_INPUT,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, dataset, steps, network_kind, rank, alpha, optimizer_type, learning_rate, lr_scheduler,
              seed, mixed_precision, gradient_checkpointing, timestep_sampling, discrete_flow_shift, output_name,
              save_format, output_dir="", continue_saved_state=True, save_state_every_minutes=10.0, unique_id=None):
        from ..engine.training.state import lora_path

        network = network_config(network_kind, rank, alpha, 0.0, 0.0, 0.0)
        optimizer = optimizer_config(optimizer_type, learning_rate, 1.0, lr_scheduler, "0")
        config = _training_config(
            seed=seed, max_train_steps=steps, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, gradient_accumulation_steps=1,
            timestep_sampling=timestep_sampling, discrete_flow_shift=discrete_flow_shift, sigmoid_scale=1.0,
            weighting_scheme="none", min_timestep=0, max_timestep=1000, save_every_n_steps=0, keep_last_n_saves=0,
            output_dir=output_dir, output_name=output_name, save_state=False, attention_backend="model",
            save_format=save_format, save_state_every_minutes=save_state_every_minutes)
        run = open_run("train_lora", unique_id, model, dataset, network, optimizer, config,
                       continue_saved=bool(continue_saved_state))
        train_to(run, run.session.total_steps, unique_id)
        path = lora_path(Path(config.lora_dir or config.output_dir), config.output_name)
        if not path.is_file():
            path = run.session.save_lora(path)
        return {"ui": {"text": [status_of(run), str(path)]}, "result": (run.handle(), _loss_image(run), str(path))}


NODE_CLASS_MAPPINGS = {
    "MusubiLoRAConfig": MusubiLoRAConfig,
    "MusubiOptimizerConfig": MusubiOptimizerConfig,
    "MusubiInitTraining": MusubiInitTraining,
    "MusubiTrainSteps": MusubiTrainSteps,
    "MusubiValidationPrompt": MusubiValidationPrompt,
    "MusubiValidate": MusubiValidate,
    "MusubiSaveTrainedLoRA": MusubiSaveTrainedLoRA,
    "MusubiResumeTraining": MusubiResumeTraining,
    "MusubiTrainLoRA": MusubiTrainLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiLoRAConfig": "Musubi LoRA Config",
    "MusubiOptimizerConfig": "Musubi Optimizer Config",
    "MusubiInitTraining": "Musubi Init Training",
    "MusubiTrainSteps": "Musubi Train Steps",
    "MusubiValidationPrompt": "Musubi Validation Prompt",
    "MusubiValidate": "Musubi Validate (sample during training)",
    "MusubiSaveTrainedLoRA": "Musubi Save Trained LoRA",
    "MusubiResumeTraining": "Musubi Resume Training",
    "MusubiTrainLoRA": "Musubi Train LoRA (all-in-one)",
}
