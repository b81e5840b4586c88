"""Wan 2.1 / 2.2 generation: T2V, T2I, I2V, FLF2V, Fun-Control and one-frame inference on in-memory models.

Flow: `WanGenerateRequest` (per-task defaults of the official release) -> `resolve()` fills the defaults ->
`validate_request(model, request)` (every user mistake raises MusubiInputError before any model call) -> noise ->
the generic loop (`engine.sampling`) with CFG / CFG skip / SLG -> latents [B, C, F_lat, H/s, W/s]: C = 16, s = 8
(Wan 2.1 VAE: 2.1 models and the 2.2 A14B experts) or C = 48, s = 16 (Wan 2.2 VAE: TI2V-5B).

Only the conditioning layout is Wan specific; it is built by the `prepare_*` helpers from VAE-encoded frames:
* I2V:      y = [mask(4), VAE([image, zeros × (F−1)])(16)], mask 1 on latent frame 0 (the 4 mask channels are the
            4 pixel frames folded into a latent frame; frame 0 stands for all four).
* FLF2V:    y = [mask, VAE([first, zeros × (F−2), last])] in one pass; mask 1 on latent frame 0 and on the last
            mask channel of the last latent frame (the last pixel frame).
* Fun-Control: y = [control latents(16), image latents(16)] (image: first latent frame of the I2V encode, rest 0;
            zeros without an image). No mask channels.
* One-frame: latent frames are the sorted [control indices + target index]; each control image and a mid-gray
            "black" target (all zeros in [−1, 1]) encoded alone; mask 1 on control slots; RoPE frame positions =
            those indices. Only the target frame is returned. CLIP: every control image's 257 tokens, in the order
            of the control images; an I2V model takes the first image's, an FLF2V model (intermediate frames, two
            controls) both (514), as in Musubi Tuner (`one_frame_clip`).
* Wan 2.2 I2V A14B: the 2.1 I2V y (mask + image latents) without CLIP (the experts have no image cross-attention).
* Wan 2.2 TI2V-5B I2V ("ti2v" conditioning): no y; latent frame 0 is the image's clean latent [48, 1, h, w],
            its tokens run at t = 0 (per-token timesteps) and it is put back after every solver step (official
            `textimage2video.py`). T2V on the 5B is the plain loop (one t for all tokens).
All images/videos are [3, H, W] / [3, F, H, W] (or with a leading batch of 1) in [−1, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...errors import invalid
from ...lora.adapters import eval_mode
from ...memory.placement import execution_device
from ...sampling import GuidanceConfig, GuidedVelocity, make_noise, make_solver, run_sampler
from ...sampling.inputs import SIZE_MULTIPLE, as_video, check_frames, encode, latent_frames
from ...sampling.noise import NOISE_DEVICES, check_seed
from ...sampling.solvers import ALIASES, SOLVERS
from .detect import TI2V_CHANNELS, model_kind
from .experts import ExpertRunner, WanExperts, reference, resolve_for_experts

TASKS = ("t2v", "t2i", "i2v", "flf2v", "fun_control", "one_frame")
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)           # time, height, width (Wan 2.1 VAE; a model's own: `config.vae_stride`)
MASK_CHANNELS = 4
CLIP_TOKENS = 257
I2V_480P_SIZES = ((832, 480), (480, 832))
TI2V_SIZE = (1280, 704)          # TI2V-5B native width x height (704x1280 portrait), 121 frames at 24 fps
TI2V_FRAMES = 121

Progress = Callable[[int, int, "torch.Tensor | None"], None]


# ---------------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class WanConditioning:
    """What the `prepare_*` helpers produce; `generate` concatenates `y` to the noisy latents on channels."""
    kind: str                                   # "i2v" | "flf2v" | "fun_control" | "one_frame" | "ti2v"
    y: torch.Tensor | None                      # [C_y, F_lat, H/8, W/8]: 20 (4 mask + 16) or 32 (16 control + 16
                                                # image); None for "ti2v"
    frame_indices: tuple[int, ...] | None = None  # one-frame: RoPE frame position of each latent frame
    target_slot: int | None = None              # one-frame: latent frame returned as the result
    has_image: bool = True                      # Fun-Control: False when no start image was given
    extra_latent_frames: int = 0                # I2V + end image (non-FLF2V model): 1 appended latent frame
    first_frame: torch.Tensor | None = None     # "ti2v": the image's clean latent [48, 1, H/16, W/16]


def _i2v_latents(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """VAE([image, zeros × (F−1)]) -> [16, F_lat, h, w]. Zeros are mid-gray in [−1, 1]."""
    img = as_video(image, "image", frames_axis=False)
    video = torch.cat([img, img.new_zeros(1, 3, frames - 1, *img.shape[-2:])], dim=2)
    return encode(vae, video)


def prepare_i2v(vae, image: torch.Tensor, frames: int, end_image: torch.Tensor | None = None) -> WanConditioning:
    """With `end_image` (Musubi's unofficial end frame for a plain I2V model): the end image is encoded alone and
    appended as one extra latent frame with all 4 mask channels set, so the result is 4 frames longer (decode and
    trim the tail frames)."""
    check_frames(frames, longest=81)
    start_hw = tuple(as_video(image, "image", frames_axis=False).shape[-2:])
    end = None if end_image is None else as_video(end_image, "end_image", frames_axis=False)
    if end is not None and tuple(end.shape[-2:]) != start_hw:
        raise invalid("end_image size", tuple(end.shape[-2:]), f"the start image's size {start_hw}")
    lat = _i2v_latents(vae, image, frames)                       # [16, F_lat, h, w]
    extra = 0
    if end is not None:
        lat = torch.cat([lat, encode(vae, end)], dim=1)         # [16, F_lat + 1, h, w]
        extra = 1
    mask = torch.zeros(MASK_CHANNELS, *lat.shape[1:])
    mask[:, 0] = 1.0
    if extra:
        mask[:, -1] = 1.0
    return WanConditioning("i2v", torch.cat([mask, lat]), extra_latent_frames=extra)


def prepare_flf2v(vae, first: torch.Tensor, last: torch.Tensor, frames: int) -> WanConditioning:
    check_frames(frames, longest=81)
    if frames < 5:
        raise invalid("frames", frames, "at least 5 for first/last-frame video (1 frame cannot hold two images)")
    a = as_video(first, "image", frames_axis=False)
    b = as_video(last, "end_image", frames_axis=False)
    if a.shape != b.shape:
        raise invalid("end_image size", tuple(b.shape[-2:]), f"the start image's size {tuple(a.shape[-2:])}")
    video = torch.cat([a, a.new_zeros(1, 3, frames - 2, *a.shape[-2:]), b], dim=2)
    lat = encode(vae, video)
    mask = torch.zeros(MASK_CHANNELS, *lat.shape[1:])
    mask[:, 0] = 1.0
    mask[-1, -1] = 1.0          # the last latent frame folds pixel frames F−4..F−1; only the last one is given
    return WanConditioning("flf2v", torch.cat([mask, lat]))


def prepare_fun_control(vae, control_video: torch.Tensor, frames: int,
                        image: torch.Tensor | None = None) -> WanConditioning:
    """control_video [3, F', H, W] with F' ≥ frames (the first `frames` are used)."""
    check_frames(frames, longest=81)
    ctrl = as_video(control_video, "control_video", frames_axis=True)
    if ctrl.shape[2] < frames:
        raise invalid("control_video frames", ctrl.shape[2], f"at least {frames} (the requested frame count)")
    control = encode(vae, ctrl[:, :, :frames])                 # [16, F_lat, h, w]
    image_lat = torch.zeros_like(control)
    if image is not None:
        img = as_video(image, "image", frames_axis=False)
        if img.shape[-2:] != ctrl.shape[-2:]:
            raise invalid("image size", tuple(img.shape[-2:]), f"the control video's size {tuple(ctrl.shape[-2:])}")
        image_lat[:, :1] = _i2v_latents(vae, image, frames)[:, :1]   # VideoX-Fun keeps only the first frame
    return WanConditioning("fun_control", torch.cat([control, image_lat]), has_image=image is not None)


def prepare_one_frame(vae, control_images: Sequence[torch.Tensor], control_indices: Sequence[int],
                      target_index: int = 0) -> WanConditioning:
    """One latent frame per index (controls + target), positioned on the RoPE time axis by its index."""
    if not 1 <= len(control_indices) <= 2:
        raise invalid("control_index", list(control_indices), "one or two control frame indices (e.g. 0 or 0;2)")
    if len(control_images) != len(control_indices):
        raise invalid("control images", len(control_images), f"{len(control_indices)} (one per control index)")
    indices = [int(i) for i in control_indices] + [int(target_index)]
    if min(indices) < 0 or len(set(indices)) != len(indices):
        raise invalid("one-frame indices", indices, "distinct non-negative frame indices (target not a control)")
    images = [as_video(im, f"control_image[{k}]", frames_axis=False) for k, im in enumerate(control_images)]
    size = images[0].shape[-2:]
    if any(im.shape[-2:] != size for im in images):
        raise invalid("control image sizes", [tuple(im.shape[-2:]) for im in images], "all the same size")
    target = images[0].new_zeros(1, 3, 1, *size)                  # "black" target: zeros = mid-gray
    by_index = dict(zip(indices, images + [target]))
    order = sorted(indices)
    lat = torch.cat([encode(vae, by_index[i]) for i in order], dim=1)   # [16, n, h, w], each a 1-frame encode
    mask = torch.zeros(MASK_CHANNELS, *lat.shape[1:])
    for slot, i in enumerate(order):
        if i != target_index:
            mask[:, slot] = 1.0
    return WanConditioning("one_frame", torch.cat([mask, lat]), frame_indices=tuple(order),
                           target_slot=order.index(int(target_index)))


def prepare_ti2v(vae, image: torch.Tensor) -> WanConditioning:
    """TI2V-5B image-to-video: the image encoded alone (one latent frame) with the Wan 2.2 VAE."""
    return WanConditioning("ti2v", None, first_frame=encode(vae, as_video(image, "image", frames_axis=False)))


def first_frame_timesteps(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """t [B] -> per-token t [B, f*h*w] that is 0 on the tokens of latent frame 0 (tokens in f, h, w order), as the
    official TI2V: the frame mask times t, flattened."""
    f, h, w = grid
    keep = torch.ones(f, h, w, device=t.device, dtype=t.dtype)
    keep[0] = 0
    return t.reshape(-1, 1) * keep.flatten()


class _FirstFrameKept:
    """A solver whose steps (and x0 previews) put the clean latent back on latent frame 0, as the official TI2V does
    after each scheduler step. Solver updates are elementwise, so what a solver keeps of frame 0 never reaches the
    other frames."""

    def __init__(self, solver, first_frame: torch.Tensor):
        self._solver, self._first = solver, first_frame      # [B, C, 1, h, w] float32

    def __getattr__(self, name):
        return getattr(self._solver, name)

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._first.to(x.dtype), x[:, :, 1:]], dim=2)

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        return self._kept(self._solver.step(velocity, index, sample))

    def denoised(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        return self._kept(self._solver.denoised(velocity, index, sample))


# ---------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------

# The official Wan 2.1 default negative prompt (used when the negative prompt is left empty, as the release does).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                   "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass
class WanGenerateRequest:
    task: str                                    # one of TASKS
    context: torch.Tensor                        # [L, text_dim] prompt embeddings (umT5, trimmed)
    negative_context: torch.Tensor               # [L', text_dim]: Wan always runs a negative prompt
    width: int | None = None                     # None: 832 (TI2V-5B: 1280)
    height: int | None = None                    # None: 480 (TI2V-5B: 704)
    frames: int | None = None                    # None: 81, TI2V-5B 121 (1 for t2i / one_frame, where it must be 1)
    steps: int | None = None                     # None: 50 T2V/T2I/T2V-Fun-Control/TI2V-5B, 40 I2V/FLF2V/one-frame
    shift: float | None = None                   # None: 5.0; 3.0 for I2V-type tasks at 832x480 / 480x832 (2.1)
    guidance_scale: float | None = None          # None: 5.0
    solver: str = "unipc"                        # unipc | dpm++ | euler (vanilla)
    seed: int = 0
    batch_size: int = 1                          # sample b uses seed + b
    noise_device: str = "cpu"                    # "cpu": same noise on any machine; "gpu": generator on the device
    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None
    slg_layers: tuple[int, ...] = ()
    slg_mode: str = "original"
    slg_scale: float = 3.0
    slg_start: float = 0.0
    slg_end: float = 0.3
    batch_cfg: bool = True                       # cond + uncond in one B=2 forward (faster, more memory)
    conditioning: WanConditioning | None = None  # from a prepare_* helper (I2V/FLF2V/Fun-Control/one-frame)
    clip_fea: torch.Tensor | None = None         # [257, clip_dim] (FLF2V: [514, clip_dim]: first then last image;
                                                 # one-frame: 257 per control image, see one_frame_clip)
    device: torch.device | str | None = None     # None: the device of the model's patch embedding
    guidance_scale_high: float | None = None     # Wan 2.2 A14B pair: the high-noise steps' scale (None: per kind)

    def resolve(self, config=None) -> "WanGenerateRequest":
        """A copy with the per-task defaults filled in (the official release's values); `config` (the DiT's) picks
        the TI2V-5B ones (wan/configs/wan_ti2v_5B.py: 1280x704, 121 frames, 50 steps, shift 5, guidance 5)."""
        r = dataclasses.replace(self)
        ti2v = config is not None and model_kind(config) == "ti2v"
        if r.width is None:
            r.width = TI2V_SIZE[0] if ti2v else 832
        if r.height is None:
            r.height = TI2V_SIZE[1] if ti2v else 480
        if r.frames is None:
            r.frames = 1 if r.task in ("t2i", "one_frame") else (TI2V_FRAMES if ti2v else 81)
        if ti2v:
            r.steps = 50 if r.steps is None else r.steps
            r.shift = 5.0 if r.shift is None else r.shift
        i2v_like = r.task in ("i2v", "one_frame") or (
            r.task == "fun_control" and r.conditioning is not None and r.conditioning.has_image)
        if r.steps is None:
            r.steps = 40 if r.task in ("i2v", "flf2v", "one_frame") or i2v_like else 50
        if r.shift is None:
            r.shift = 3.0 if i2v_like and (r.width, r.height) in I2V_480P_SIZES else 5.0
        if r.guidance_scale is None:
            r.guidance_scale = 5.0
        return r

    def guidance(self) -> GuidanceConfig:
        return GuidanceConfig(scale=float(self.guidance_scale), cfg_skip_mode=self.cfg_skip_mode,
                              cfg_apply_ratio=self.cfg_apply_ratio, slg_layers=tuple(self.slg_layers),
                              slg_mode=self.slg_mode, slg_scale=self.slg_scale, slg_start=self.slg_start,
                              slg_end=self.slg_end, batch_cfg=self.batch_cfg)


def model_task_kind(config) -> str:
    """What a loaded Wan DiT can do: "t2v" (in_dim 16), "i2v"/"flf2v" (36), "fun_control" (48), "ti2v" (2.2 5B)."""
    return model_kind(config)


def one_frame_clip(config, clip_fea: torch.Tensor | None) -> torch.Tensor | None:
    """The one-frame CLIP tokens a model takes from those of every control image (257 each, first control first,
    [..., n·257, clip_dim]): an FLF2V model both images' 514, an I2V model the first image's 257. Inference and
    training both go through here, so their conditioning is the same."""
    if clip_fea is None or not getattr(config, "has_image_input", False):
        return clip_fea
    want, have = int(config.image_tokens), int(clip_fea.shape[-2])
    if have > want and have % CLIP_TOKENS == 0:
        return clip_fea[..., :want, :]
    return clip_fea


# which model kinds each task runs on; one-frame uses an I2V (or, for intermediate frames, an FLF2V) model; the
# TI2V-5B runs T2V/T2I and I2V (with its own conditioning)
_TASK_MODELS = {"t2v": ("t2v", "ti2v"), "t2i": ("t2v", "ti2v"), "i2v": ("i2v", "ti2v"), "flf2v": ("flf2v",),
                "fun_control": ("fun_control",), "one_frame": ("i2v", "flf2v")}
_TASK_CONDITIONING = {"i2v": "i2v", "flf2v": "flf2v", "fun_control": "fun_control", "one_frame": "one_frame"}


def _wanted_conditioning(kind: str, task: str) -> str | None:
    return "ti2v" if kind == "ti2v" and task == "i2v" else _TASK_CONDITIONING.get(task)


def size_multiple(config) -> int:
    """Pixels per DiT token side: VAE stride x patch (16 for the Wan 2.1 VAE, 32 for TI2V-5B's 16x VAE)."""
    return int(config.vae_stride[1]) * int(config.patch_size[1])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_request(model, r: WanGenerateRequest) -> None:
    """Raise MusubiInputError for anything that would fail (or silently misbehave) later. `r` is resolved."""
    cfg = model.config
    if r.task not in TASKS:
        raise invalid("task", r.task, f"one of {TASKS}")
    kind = model_task_kind(cfg)
    if kind not in _TASK_MODELS[r.task]:
        raise invalid("task", r.task, f"a task the loaded {cfg.variant} model ({kind}, in_dim={cfg.in_dim}) runs: "
                      f"{[t for t, kinds in _TASK_MODELS.items() if kind in kinds]}")
    # sizes
    multiple = max(SIZE_MULTIPLE, size_multiple(cfg))
    for name, v in (("width", r.width), ("height", r.height)):
        if not _is_int(v) or v < multiple or v % multiple:
            why = f" (VAE stride {cfg.vae_stride[1]} x patch {cfg.patch_size[1]} of {cfg.variant})" \
                if multiple != SIZE_MULTIPLE else ""
            raise invalid(name, v, f"a positive multiple of {multiple} pixels{why}")
    check_frames(r.frames, longest=TI2V_FRAMES if kind == "ti2v" else 81)
    if r.task in ("t2i", "one_frame") and r.frames != 1:
        raise invalid("frames", r.frames, f"1 for task {r.task}")
    if not _is_int(r.steps) or r.steps < 1:
        raise invalid("steps", r.steps, "an integer >= 1")
    if not _is_int(r.batch_size) or r.batch_size < 1:
        raise invalid("batch_size", r.batch_size, "an integer >= 1")
    if not isinstance(r.shift, (int, float)) or not r.shift > 0:
        raise invalid("shift", r.shift, "a number > 0")
    key = ALIASES.get(str(r.solver).lower(), str(r.solver).lower())
    if key not in SOLVERS:
        raise invalid("solver", r.solver, f"one of {sorted(SOLVERS)} (or 'vanilla' for euler)")
    check_seed(r.seed)
    if r.noise_device not in NOISE_DEVICES:
        raise invalid("noise_device", r.noise_device, f"one of {NOISE_DEVICES}")
    r.guidance().validate(num_blocks=cfg.num_layers)
    # prompts
    for name, ctx in (("prompt embeddings", r.context), ("negative prompt embeddings", r.negative_context)):
        if not isinstance(ctx, torch.Tensor) or ctx.ndim != 2 or ctx.shape[1] != cfg.text_dim \
                or not 1 <= ctx.shape[0] <= cfg.text_len:
            shown = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else ctx
            raise invalid(name, shown, f"[tokens (1..{cfg.text_len}), {cfg.text_dim}] text embeddings "
                          f"for {cfg.variant}")
    _validate_conditioning(cfg, r)


def _validate_conditioning(cfg, r: WanGenerateRequest) -> None:
    cond = r.conditioning
    wanted = _wanted_conditioning(model_kind(cfg), r.task)
    if r.clip_fea is not None and not cfg.has_image_input:
        # refused rather than ignored: a 2.1 I2V workflow moved to 2.2 would otherwise encode CLIP for nothing
        raise invalid("clip_fea", f"CLIP vision features {tuple(getattr(r.clip_fea, 'shape', ()))}",
                      f"none for the loaded {cfg.variant} model: it has no image cross-attention (Wan 2.2 takes the "
                      "image through the latents only); disconnect the CLIP vision encoder")
    if wanted is None:
        if cond is not None:
            raise invalid("conditioning", cond.kind, f"none for task {r.task} (text only)")
        return
    if cond is None:
        what = {"i2v": "a start image", "flf2v": "a start and an end image", "fun_control": "a control video",
                "one_frame": "control images"}[r.task]
        raise invalid("conditioning", None, f"{what} for task {r.task} (prepare it with prepare_{wanted})")
    if cond.kind != wanted:
        extra = " (an end image is required)" if r.task == "flf2v" else ""
        model = f" on the {cfg.variant} model" if "ti2v" in (wanted, cond.kind) else ""
        raise invalid("conditioning", cond.kind, f"{wanted} conditioning for task {r.task}{model}{extra} "
                                                 f"(prepare it with prepare_{wanted})")
    stride = cfg.vae_stride
    if wanted == "ti2v":
        _validate_first_frame(cfg, r, cond.first_frame)
        return
    f_lat = _latent_frame_count(r)
    shape = (cfg.in_dim - cfg.out_dim, f_lat, r.height // stride[1], r.width // stride[2])
    if not isinstance(cond.y, torch.Tensor) or cond.y.ndim != 4 or cond.y.shape[0] != shape[0]:
        raise invalid("conditioning y", tuple(getattr(cond.y, "shape", ())),
                      f"{shape[0]} channels for {cfg.variant} (made from {_vae_name(cfg)} latents: re-prepare it "
                      "with that VAE)")
    if tuple(cond.y.shape) != shape:
        raise invalid("conditioning y", tuple(cond.y.shape), f"{list(shape)} for {r.width}x{r.height}, "
                      f"{r.frames} frames (re-prepare it with the request's size and frame count)")
    needs_clip = cfg.has_image_input and (r.task in ("i2v", "flf2v", "one_frame") or
                                          (r.task == "fun_control" and cond.has_image))
    if r.clip_fea is None:
        if needs_clip:
            raise invalid("clip_fea", None, f"CLIP vision features of the image(s) for task {r.task}")
        return
    tokens = CLIP_TOKENS * (2 if cfg.has_flf_pos_emb else 1)
    clip_fea = _request_clip(cfg, r)
    if r.task == "one_frame" and cfg.has_flf_pos_emb and (clip_fea.ndim != 2 or clip_fea.shape[0] != tokens):
        raise invalid("control images", f"{clip_fea.shape[0] // CLIP_TOKENS if clip_fea.ndim == 2 else '?'} "
                      f"(CLIP tokens {tuple(clip_fea.shape)})",
                      f"two control images for the FLF2V model {cfg.variant} (intermediate-frame one-frame "
                      "inference, e.g. control_indices '0;2' and target_index 1; their CLIP features make its "
                      f"{tokens} image tokens)")
    if clip_fea.ndim != 2 or tuple(clip_fea.shape) != (tokens, cfg.clip_dim):
        raise invalid("clip_fea", tuple(clip_fea.shape), f"[{tokens}, {cfg.clip_dim}] for {cfg.variant}")


def _vae_name(cfg) -> str:
    return "48-channel Wan 2.2 VAE" if cfg.out_dim == TI2V_CHANNELS else "16-channel Wan 2.1 VAE"


def _validate_first_frame(cfg, r: WanGenerateRequest, lat) -> None:
    """The TI2V clean first-frame latent: [48, 1, H/16, W/16] from the Wan 2.2 VAE."""
    shape = (cfg.out_dim, 1, r.height // cfg.vae_stride[1], r.width // cfg.vae_stride[2])
    got = tuple(lat.shape) if isinstance(lat, torch.Tensor) else lat
    if not isinstance(lat, torch.Tensor) or lat.ndim != 4 or lat.shape[0] != shape[0]:
        raise invalid("conditioning first_frame", got, f"a {list(shape)} image latent from the {_vae_name(cfg)} "
                      f"for {cfg.variant} (re-encode the image with that VAE)")
    if got != shape:
        raise invalid("conditioning first_frame", got, f"{list(shape)} for {r.width}x{r.height} (re-prepare it "
                      "with the request's size)")


def _request_clip(cfg, r: WanGenerateRequest) -> torch.Tensor | None:
    """The CLIP tokens the model gets: one-frame requests hold every control image's (`one_frame_clip`)."""
    return one_frame_clip(cfg, r.clip_fea) if r.task == "one_frame" else r.clip_fea


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

def _latent_frame_count(r: WanGenerateRequest) -> int:
    cond = r.conditioning
    if r.task == "one_frame":
        return len(cond.frame_indices)
    return latent_frames(r.frames) + (cond.extra_latent_frames if cond is not None else 0)


def _wan_predict(model, frame_indices, first_frame_clean: bool = False):
    """The family-specific forward for the generic guidance: cond = {"context": [..], "clip_fea", "y"}.
    `first_frame_clean` (TI2V I2V): per-token t, 0 on the tokens of latent frame 0."""

    def predict(x, t, cond, skip_blocks):
        if first_frame_clean:
            pt, ph, pw = model.config.patch_size
            t = first_frame_timesteps(t, (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw))
        return model(x, t, cond["context"], clip_fea=cond["clip_fea"], y=cond["y"],
                     skip_blocks=set(skip_blocks) if skip_blocks else None, frame_indices=frame_indices)
    return predict


def _merge(conds: Sequence[dict]) -> dict:
    """Stack conditionings on the batch axis (the DiT takes a list of per-sample text embeddings)."""
    cat = lambda key: None if conds[0][key] is None else torch.cat([c[key] for c in conds])  # noqa: E731
    return {"context": [ctx for c in conds for ctx in c["context"]], "clip_fea": cat("clip_fea"), "y": cat("y")}


def resolve_request(model, request: WanGenerateRequest) -> WanGenerateRequest:
    """The request with every default filled in for `model`, a DiT or an A14B pair (whose defaults come first, after
    the pair is checked)."""
    if isinstance(model, WanExperts):
        return resolve_for_experts(model, request).resolve(reference(model).config)
    return request.resolve(model.config)


@torch.no_grad()
def generate(model, request: WanGenerateRequest, progress: Progress | None = None) -> torch.Tensor:
    """-> float32 latents [B, C, F_lat, H/s, W/s] (C, s: 16, 8 or TI2V-5B 48, 16) on the model device (one-frame:
    the target frame only; TI2V I2V: frame 0 is the image latent exactly).

    `progress(step, total, x0_estimate)` runs after every step; it may raise (ComfyUI interrupt) to cancel.
    `model` may be a Wan 2.2 A14B pair (`experts.WanExperts`): its experts take turns by the step's timestep."""
    experts = model if isinstance(model, WanExperts) else None
    r = resolve_request(model, request)
    if experts is not None:
        model = reference(experts)
    validate_request(model, r)
    solver = make_solver(r.solver, r.steps, r.shift)
    runner = None if experts is None else ExpertRunner(experts, solver.timesteps)
    # adapter dropout never applies to samples, whatever mode a trainer left the model in (a pair's runner sets
    # each expert's eval mode); the runner's `with` also covers its start, which may load a lazy expert
    with eval_mode(model) if runner is None else runner:
        latents = _sample(model, r, solver, runner, progress)
    if r.task == "one_frame":
        slot = r.conditioning.target_slot
        latents = latents[:, :, slot:slot + 1]
    return latents


def _sample(model, r: WanGenerateRequest, solver, runner: ExpertRunner | None, progress) -> torch.Tensor:
    """The body of `generate`: noise, conditioning, the guided sampler loop -> latents (all frames)."""
    cfg = model.config
    on = execution_device(model) if runner is None else runner.start()   # (a pair places its first expert)
    device = torch.device(r.device) if r.device is not None else on
    b = r.batch_size
    cond_in = r.conditioning
    f_lat = _latent_frame_count(r)
    shape = (cfg.out_dim, f_lat, r.height // cfg.vae_stride[1], r.width // cfg.vae_stride[2])
    noise = make_noise(shape, r.seed, b, r.noise_device, device)           # [B, C, F_lat, h, w]

    y = None if cond_in is None or cond_in.y is None else \
        cond_in.y.to(device, torch.float32)[None].expand(b, *cond_in.y.shape)
    clip_fea = _request_clip(model.config, r)
    clip = None if clip_fea is None else clip_fea.to(device)[None].expand(b, *clip_fea.shape)
    cond = {"context": [r.context.to(device)] * b, "clip_fea": clip, "y": y}
    uncond = {"context": [r.negative_context.to(device)] * b, "clip_fea": clip, "y": y}
    frame_indices = None
    if cond_in is not None and cond_in.frame_indices is not None:
        frame_indices = torch.tensor(cond_in.frame_indices, dtype=torch.long, device=device)

    kept = cond_in is not None and cond_in.kind == "ti2v"
    if kept:   # TI2V I2V: the image latent replaces frame 0 of the noise and is put back after every step
        first = cond_in.first_frame.to(device, torch.float32)[None].expand(b, *cond_in.first_frame.shape)
        noise = torch.cat([first, noise[:, :, 1:]], dim=2)
        solver = _FirstFrameKept(solver, first)

    def guided_by(module, guidance: GuidanceConfig) -> GuidedVelocity:
        return GuidedVelocity(_wan_predict(module, frame_indices, kept), cond, uncond, guidance, r.steps,
                              merge=_merge)

    if runner is None:
        velocity = guided_by(model, r.guidance())
    else:   # each expert with its phase's guidance scale
        velocity = runner.velocity(r.guidance(), r.guidance_scale_high, guided_by)
    return run_sampler(solver, noise, velocity, progress)


# ---------------------------------------------------------------------------------------------------------------
# Live preview
# ---------------------------------------------------------------------------------------------------------------

# ComfyUI's Wan 2.1 latent→RGB linear map (comfy/latent_formats.py, Wan21.latent_rgb_factors / _bias), applied to
# the normalized latents the sampler works on; [16 channels][R, G, B].
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def latent_to_rgb_preview(latents: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """latents [B, 16, F, h, w] or [16, F, h, w] -> float32 RGB [h, w, 3] in [0, 1] of sample 0, latent `frame`
    (a cheap approximation at 1/8 resolution; no VAE). 48-channel (TI2V-5B) latents: the Wan 2.2 factors."""
    if latents.shape[-4] == TI2V_CHANNELS:
        from .vae22 import latent_to_rgb_preview22

        return latent_to_rgb_preview22(latents, frame)
    if latents.ndim == 5:
        latents = latents[0]
    if latents.ndim != 4 or latents.shape[0] != LATENT_CHANNELS:
        raise invalid("latents", tuple(latents.shape), "[B, 16, F, h, w] or [16, F, h, w] Wan latents")
    x = latents[:, frame].float().movedim(0, -1)                               # [h, w, 16]
    w = torch.tensor(WAN21_RGB_FACTORS, device=x.device)                        # [16, 3]
    rgb = x @ w + torch.tensor(WAN21_RGB_BIAS, device=x.device)                 # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


# ---------------------------------------------------------------------------------------------------------------
# What the nodes read of a result
# ---------------------------------------------------------------------------------------------------------------

FPS, TI2V_FPS = 16.0, 24.0      # Wan 2.1 and the A14B experts; TI2V-5B


def fps_of(config) -> float:
    return TI2V_FPS if model_kind(config) == "ti2v" else FPS


def latent_format_of(config) -> str:
    """ComfyUI's latent format (live previews) of a DiT's latents."""
    return "Wan22" if model_kind(config) == "ti2v" else "Wan21"


def raw_latents(latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents -> ComfyUI's LATENT (the VAE's raw latents) of their VAE (2.2 for 48 channels)."""
    from . import vae, vae22

    return (vae22 if latents.shape[1] == TI2V_CHANNELS else vae).to_raw_latents(latents)


def normalized_latents(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LATENT -> the normalized latents the DiT and VAE decode take (2.2 for 48 channels)."""
    from . import vae, vae22

    return (vae22 if raw.shape[1] == TI2V_CHANNELS else vae).from_raw_latents(raw)
