"""FramePack section caches in Musubi Tuner's layout (`fpack_cache_latents.py`), so either tool reads the other's.

A video clip becomes one file per section, numbered by time index (`section_file_name`):

    <stem>_<start:05d>-<frames:03d>-<section:04d>_<W:04d>x<H:04d>_fp.safetensors   (W, H: original size)

and a one-frame item one file `<stem>_<W:04d>x<H:04d>_fp.safetensors`. Tensors (F, h, w = the *target* latent's
frames and size, also in the clean latents' key names; indices int64; everything else in the latent dtype):

    latents_{F}x{h}x{w}_{dt}           [16, lws, h, w] ground-truth section (one-frame: [16, 1, h, w] target)
    latent_indices_int64               [lws] (one-frame: [1] target index)
    latents_clean_{F}x{h}x{w}_{dt}     [16, 2, h, w] start + post/1x (one-frame: controls (+ zero post))
    clean_latent_indices_int64         [2] (one-frame: control indices (+ 1 + lws))
    latents_clean_2x_{F}x{h}x{w}_{dt}  [16, 2, h, w]   (video only; one-frame: zeros made at training time)
    clean_latent_2x_indices_int64      [2]             (absent with one-frame no_2x)
    latents_clean_4x_{F}x{h}x{w}_{dt}  [16, 16, h, w]  (video only)
    clean_latent_4x_indices_int64      [16]            (absent with one-frame no_4x)
    image_embeddings_{dt}              [729, 1152] SigLIP last hidden state of the first frame / first control

Latents are the DiT's (VAE output x 0.476986), stored so; the clean latents come from the clip's own ground truth,
emulating inference (`sections.original_schedule` / `f1_schedule`, whose index layouts they share). Metadata:
architecture "framepack", width / height (original size), format_version "1.0.1", frame_count (video: the clip's
frame count before trimming to whole sections).

The VAE and the SigLIP encoder are injected callables: `vae_encode([1, 3, F, H, W] in [-1, 1]) -> [1, 16, F_lat, h, w]`
DiT latents, `image_encode([H, W, 3] uint8) -> [729, 1152]` (or [1, 729, 1152]).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ...atomic import save_safetensors_atomic
from ...data.cache import load_cache_file
from ...data.encoding import (DTYPE_NAMES, Clip, OneFrameSpec, dtype_name, encoder_identity, pixels_to_video,
                              weights_placement)
from ...errors import invalid
from . import sections as S

ARCH = "fp"                  # Musubi's short name (file names)
ARCH_FULL = "framepack"      # Musubi's metadata name
FORMAT_VERSION = "1.0.1"
LATENT_CHANNELS = 16
IMAGE_TOKENS, IMAGE_DIM = 729, 1152

VaeEncode = Callable[[torch.Tensor], torch.Tensor]
ImageEncode = Callable[[np.ndarray], torch.Tensor]


# --- lengths and names ----------------------------------------------------------------------------------------------

def aligned_frames(frame_count: int, latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE) -> tuple[int, int]:
    """A clip of `frame_count` pixel frames -> (sections, pixel frames kept): sections = (latent frames - 1) // lws,
    kept = sections * lws * 4 + 1 (37, 73, 109... for 9); Musubi trims the rest before encoding."""
    lws = S._check_lws(latent_window_size)
    sections = ((int(frame_count) - 1) // 4) // lws
    if sections < 1:
        raise invalid("FramePack clip length", f"{frame_count} frames",
                      f"at least {lws * 4 + 1} frames (one section of latent_window_size {lws}; target_frames)")
    return sections, sections * lws * 4 + 1


_SECTION_NAME = re.compile(r"^(?P<stem>.+)_(?P<start>\d+)-(?P<frames>\d+)(?:-(?P<section>\d+))?_(?P<w>\d+)x(?P<h>\d+)_"
                           + ARCH + r"\.safetensors$")


def section_file_name(clip_file: str, section: int) -> str:
    """`<stem>_00000-073_0640x0480_fp.safetensors` -> `<stem>_00000-073-0001_0640x0480_fp.safetensors` (Musubi
    appends the section to the third `_` token from the end)."""
    m = _SECTION_NAME.match(clip_file)
    if m is None or m.group("section") is not None:
        raise invalid("FramePack clip cache name", clip_file,
                      f"<stem>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_{ARCH}.safetensors")
    tokens = clip_file.split("_")
    tokens[-3] = f"{tokens[-3]}-{int(section):04d}"
    return "_".join(tokens)


def parse_section_file_name(name: str) -> dict:
    """Section cache name -> {stem, start, frames, section, width, height} (section None for a clip name)."""
    m = _SECTION_NAME.match(Path(name).name)
    if m is None:
        raise invalid("FramePack cache name", name,
                      f"<stem>_<start>-<frames>-<section>_<W>x<H>_{ARCH}.safetensors")
    return {"stem": m.group("stem"), "start": int(m.group("start")), "frames": int(m.group("frames")),
            "section": None if m.group("section") is None else int(m.group("section")),
            "width": int(m.group("w")), "height": int(m.group("h"))}


# --- tensors of one file --------------------------------------------------------------------------------------------

def _entry(latent: torch.Tensor, latent_indices, clean: torch.Tensor, clean_indices, clean_2x, indices_2x, clean_4x,
           indices_4x, image_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Musubi's key names: every latent key carries the *target's* F x h x w; indices are int64."""
    _, f, h, w = latent.shape
    dt, shape = dtype_name(latent.dtype), f"{f}x{h}x{w}"

    def idx(v):
        return torch.tensor(list(v), dtype=torch.int64)

    out = {f"latents_{shape}_{dt}": latent.contiguous(),
           f"image_embeddings_{dt}": image_embeddings.to(latent.dtype).contiguous(),
           "latent_indices_int64": idx(latent_indices),
           "clean_latent_indices_int64": idx(clean_indices),
           f"latents_clean_{shape}_{dt}": clean.to(latent.dtype).contiguous()}
    if indices_2x is not None:
        out["clean_latent_2x_indices_int64"] = idx(indices_2x)
    if clean_2x is not None:
        out[f"latents_clean_2x_{shape}_{dt}"] = clean_2x.to(latent.dtype).contiguous()
    if indices_4x is not None:
        out["clean_latent_4x_indices_int64"] = idx(indices_4x)
    if clean_4x is not None:
        out[f"latents_clean_4x_{shape}_{dt}"] = clean_4x.to(latent.dtype).contiguous()
    return out


def _embedding(image_embeddings: torch.Tensor) -> torch.Tensor:
    emb = image_embeddings.detach().to("cpu")
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2:
        raise invalid("image embeddings", tuple(emb.shape), f"[{IMAGE_TOKENS}, {IMAGE_DIM}] (SigLIP last hidden state)")
    return emb


def _check_dtype(dtype) -> None:
    if dtype not in DTYPE_NAMES or not dtype.is_floating_point:
        raise invalid("cache dtype", dtype, "float16 (Musubi's), bfloat16 or float32")


def video_section_entries(latents: torch.Tensor, image_embeddings: torch.Tensor,
                          latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE, *, f1: bool = False,
                          dtype: torch.dtype = torch.float16) -> dict[int, dict[str, torch.Tensor]]:
    """DiT latents of a trimmed clip [16, sections * lws + 1, h, w] -> {time index: stored tensors}.

    Clean latents per section (ground truth standing in for what inference would have generated):
    original: start = frame 0, post / 2x / 4x = the 1 / 2 / 16 frames right after the section (zeros past the end);
    F1: start = frame 0, 4x / 2x / 1x = the 19 frames right before the section (zeros before frame 0)."""
    _check_dtype(dtype)
    lws = S._check_lws(latent_window_size)
    if latents.dim() != 4 or latents.shape[0] != LATENT_CHANNELS:
        raise invalid("FramePack latents", tuple(latents.shape), f"[{LATENT_CHANNELS}, F, h, w]")
    n_frames = latents.shape[1]
    sections = (n_frames - 1) // lws
    if sections < 1 or n_frames != sections * lws + 1:
        raise invalid("FramePack latents frames", n_frames,
                      f"sections * {lws} + 1 latent frames (trim the clip with `aligned_frames` before encoding)")
    lat = latents.detach().to("cpu", dtype)
    zero = torch.zeros_like(lat[:, :1])

    def gather(sources) -> torch.Tensor:                 # [16, len(sources), h, w]
        return torch.cat([lat[:, s:s + 1] if isinstance(s, int) else zero for s in sources], dim=1)

    emb = _embedding(image_embeddings)
    out = {}
    for plan in S.schedule(sections, lws, f1=f1):
        lo = 1 + plan.index * lws                          # the target frames, without the start latent
        clean = torch.cat([lat[:, :1], gather(plan.clean_sources[1:])], dim=1)
        out[plan.index] = _entry(lat[:, lo:lo + lws], plan.latent_indices, clean, plan.clean_latent_indices,
                                 gather(plan.sources_2x), plan.clean_latent_2x_indices, gather(plan.sources_4x),
                                 plan.clean_latent_4x_indices, emb)
    return dict(sorted(out.items()))


def one_frame_entry(control_latents: torch.Tensor, target_latent: torch.Tensor, image_embeddings: torch.Tensor, *,
                    clean_indices: Sequence[int] | None, target_index: int | None,
                    latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE, no_post: bool = False,
                    no_2x: bool = False, no_4x: bool = False,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One-frame training tensors: control latents [16, n, h, w] (already masked) and target [16, 1, h, w].

    clean indices = `fp_1f_clean_indices` (unset: [0], Musubi's fallback) + [1 + lws] unless no_post (a zero
    latent is appended to the controls for it); 2x indices lws+2, lws+3 unless no_2x, 4x lws+4..lws+19 unless
    no_4x; no 2x/4x latents are stored (the trainer uses zeros)."""
    _check_dtype(dtype)
    lws = S._check_lws(latent_window_size)
    if target_index is None:
        raise invalid("fp_1f_target_index", None, "the target frame index (e.g. 9; Musubi has no default)")
    clean = [0] if not clean_indices else [int(i) for i in clean_indices]
    if control_latents.dim() != 4 or control_latents.shape[1] != len(clean):
        raise invalid("fp_1f_clean_indices", clean, f"one index per control latent ({tuple(control_latents.shape)})")
    if target_latent.dim() != 4 or target_latent.shape[1] != 1 or target_latent.shape[2:] != control_latents.shape[2:]:
        raise invalid("one-frame target latent", tuple(target_latent.shape), "[16, 1, h, w] like the controls")
    ctrl = control_latents.detach().to("cpu", dtype)
    if not no_post:
        clean = clean + [1 + lws]
        ctrl = torch.cat([ctrl, torch.zeros_like(ctrl[:, :1])], dim=1)
    opts = S.OneFrameOptions(target_index=int(target_index), no_post=no_post, no_2x=no_2x, no_4x=no_4x)
    idx = S.one_frame_indices(opts, lws, 1)               # 2x / 4x positions (independent of the controls)
    return _entry(target_latent.detach().to("cpu", dtype), (int(target_index),), ctrl, clean, None,
                  idx.clean_latent_2x_indices, None, idx.clean_latent_4x_indices, _embedding(image_embeddings))


# --- encoding (injected encoders) -----------------------------------------------------------------------------------

def _encode(vae_encode: VaeEncode, frames: np.ndarray) -> torch.Tensor:
    lat = vae_encode(pixels_to_video(frames, "cpu", torch.float32))      # [1, 16, F_lat, h, w]
    if lat.dim() != 5 or lat.shape[:2] != (1, LATENT_CHANNELS):
        raise invalid("VAE encode output", tuple(lat.shape), f"[1, {LATENT_CHANNELS}, F, h, w]")
    return lat[0].detach().to("cpu", torch.float32)


@torch.no_grad()
def encode_video_sections(frames: np.ndarray, vae_encode: VaeEncode, image_encode: ImageEncode,
                          latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE, *, f1: bool = False,
                          dtype: torch.dtype = torch.float16) -> dict[int, dict[str, torch.Tensor]]:
    """A bucketed clip [T, H, W, 3] uint8 -> {time index: stored tensors}: trimmed to whole sections, encoded in one
    VAE pass; SigLIP sees the first frame."""
    _, keep = aligned_frames(len(frames), latent_window_size)
    frames = np.asarray(frames)[:keep, ..., :3]
    latents = _encode(vae_encode, frames)
    return video_section_entries(latents, image_encode(frames[0]), latent_window_size, f1=f1, dtype=dtype)


@torch.no_grad()
def encode_one_frame(target: np.ndarray, controls: Sequence[np.ndarray], vae_encode: VaeEncode,
                     image_encode: ImageEncode, *, clean_indices: Sequence[int] | None, target_index: int | None,
                     latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE, no_post: bool = False,
                     no_2x: bool = False, no_4x: bool = False,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A one-frame item: target and control images [H, W, 3 or 4] uint8 (bucketed, same size), each encoded alone
    (the causal VAE compresses later frames 4x); an RGBA image's alpha (`sections.latent_mask`, size H/8 x W/8)
    multiplies its latent — the target's too, as Musubi. SigLIP sees the first control (RGB)."""
    if not controls:
        raise invalid("one-frame control images", 0, "at least one control image per item")
    images = list(controls) + [target]
    if any(np.asarray(im).shape[:2] != np.asarray(target).shape[:2] for im in images):
        raise invalid("one-frame image sizes", [tuple(np.asarray(im).shape[:2]) for im in images],
                      "controls the size of the target (H, W)")
    lats = []
    for im in images:
        im = np.asarray(im)
        lat = _encode(vae_encode, im[None, ..., :3])                     # [16, 1, h, w]
        alpha = S.alpha_mask(im)
        if alpha is not None:
            lat = lat * S.latent_mask(alpha, (im.shape[0] // 8, im.shape[1] // 8))[0, 0]
        lats.append(lat)
    emb = image_encode(np.ascontiguousarray(np.asarray(controls[0])[..., :3]))
    return one_frame_entry(torch.cat(lats[:-1], dim=1), lats[-1], emb, clean_indices=clean_indices,
                           target_index=target_index, latent_window_size=latent_window_size, no_post=no_post,
                           no_2x=no_2x, no_4x=no_4x, dtype=dtype)


# --- files ----------------------------------------------------------------------------------------------------------

def file_metadata(width: int, height: int, frame_count: int | None = None) -> dict[str, str]:
    """Musubi's latent-file metadata (width / height: the source's original size)."""
    meta = {"architecture": ARCH_FULL, "width": str(int(width)), "height": str(int(height)),
            "format_version": FORMAT_VERSION}
    if frame_count is not None:
        meta["frame_count"] = str(int(frame_count))
    return meta


def write_cache_file(path: str | Path, tensors: dict[str, torch.Tensor], *, width: int, height: int,
                     frame_count: int | None = None) -> None:
    """One section / one-frame file, atomically. Non-finite values are refused (Musubi silently zeroes NaNs)."""
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise invalid(f"FramePack cache tensor {k}", "non-finite values", "finite encoder outputs")
    save_safetensors_atomic(tensors, path, metadata=file_metadata(width, height, frame_count))


def write_video_sections(cache_dir: str | Path, clip_file: str, entries: dict[int, dict[str, torch.Tensor]], *,
                         width: int, height: int, frame_count: int) -> list[str]:
    """Every section of one clip (`clip_file`: the clip's non-section name) -> the file names written."""
    names = []
    for section, tensors in sorted(entries.items()):
        name = section_file_name(clip_file, section)
        write_cache_file(Path(cache_dir) / name, tensors, width=width, height=height, frame_count=frame_count)
        names.append(name)
    return names


def read_cache_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A section / one-frame file -> batch names (`latents`, `latent_indices`, `latents_clean`,
    `clean_latent_indices`, `latents_clean_2x`, `clean_latent_2x_indices`, ..., `image_embeddings`)."""
    out = load_cache_file(path)            # refuses unreadable files naming them
    for need in ("latents", "latent_indices", "latents_clean", "clean_latent_indices", "image_embeddings"):
        if need not in out:
            raise invalid(f"FramePack cache file {path}", f"no {need!r} tensor (has {sorted(out)})",
                          "a FramePack section or one-frame cache (fpack_cache_latents layout)")
    return out


def section_inputs(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Loaded tensors of one sample -> the DiT's clean-latent inputs (no batch dim): 2x / 4x latents are zeros when
    their indices are stored without latents (one-frame caches) and None when the indices are absent (no_2x /
    no_4x), as Musubi's trainer."""
    lat = sample["latents"]
    out = {"latent_indices": sample["latent_indices"], "clean_latents": sample["latents_clean"],
           "clean_latent_indices": sample["clean_latent_indices"], "image_embeddings": sample["image_embeddings"]}
    for tag, n in (("2x", S.N_2X), ("4x", S.N_4X)):
        idx = sample.get(f"clean_latent_{tag}_indices")
        clean = sample.get(f"latents_clean_{tag}")
        if idx is not None and clean is None:
            clean = torch.zeros(lat.shape[0], n, *lat.shape[2:], dtype=lat.dtype)
        out[f"clean_latent_{tag}_indices"] = idx
        out[f"clean_latents_{tag}"] = clean if idx is not None else None
    return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
    """Loaded samples -> batch: latents [B, 16, F, h, w] (already the DiT's), the `section_inputs` stacked on a new
    batch dim (indices [B, n] int64), and the text tensors (`llama_vec`, `llama_attention_mask`, `clip_l_pooler`) when
    every sample has them. Samples batch together only with equal layouts (Musubi's bucket: size, frames, window,
    #controls, no_post)."""
    inputs = [section_inputs(s) for s in samples]
    batch: dict = {"latents": torch.stack([s["latents"] for s in samples])}
    for k in inputs[0]:
        vals = [i[k] for i in inputs]
        if any((v is None) != (vals[0] is None) for v in vals):
            raise invalid(f"FramePack batch {k}", "present in some samples only", "one cache layout per batch")
        batch[k] = None if vals[0] is None else torch.stack([v.long() if "indices" in k else v for v in vals])
    for k in ("llama_vec", "llama_attention_mask", "clip_l_pooler"):
        if all(k in s for s in samples):
            batch[k] = torch.stack([s[k] for s in samples])
    return batch


# --- the family's cache adapter (the generic builder calls it) --------------------------------------------------------

TEXT_TOKENS = 512            # Musubi pads the LLM states (at most 256 real tokens) to 512


def one_frame_spec(ds) -> OneFrameSpec | None:
    """An image dataset with control images is a one-frame dataset: `fp_1f_target_index` is required (Musubi fails
    without it), `fp_1f_clean_indices` defaults to [0] (Musubi's fallback), `fp_1f_no_post` is honoured."""
    if getattr(ds, "kind", None) != "image":
        return None
    target, clean = getattr(ds, "fp_1f_target_index", None), getattr(ds, "fp_1f_clean_indices", None)
    if target is None:
        raise invalid(f"dataset #{ds.index} ({ds.source or 'in-memory'}) fp_1f_target_index", None,
                      "the target frame index of one-frame training (e.g. 9, or 1 with fp_1f_clean_indices = [0, 10] "
                      "for kisekaeichi)")
    return OneFrameSpec(tuple(int(i) for i in clean) if clean else (0,), int(target),
                        bool(getattr(ds, "fp_1f_no_post", False)))


def one_frame_control(path, ds, bucket: tuple[int, int]) -> np.ndarray:
    """A control image in the target's bucket, [H, W, 4] uint8 when it has an alpha channel (its mask)."""
    from PIL import Image

    from ...data.buckets import resize_and_crop
    from ...data.media import load_image

    rgb = resize_and_crop(load_image(path), bucket)
    with Image.open(path) as im:
        if "A" not in im.getbands():
            return rgb
        alpha = np.asarray(im.getchannel("A"))
    alpha = resize_and_crop(np.repeat(alpha[..., None], 3, axis=2), bucket)[..., :1]
    return np.concatenate([rgb, alpha], axis=2)


class FramePackCacheAdapter:
    """Encoders are loaded objects with an `identity`: `vae.encode([B,3,F,H,W] in [-1,1]) -> DiT latents` (the
    HunyuanVideo VAE), `image_encoder.encode([B,3,H,W] in [-1,1]) -> [B, 729, 1152]` (SigLIP), `text_encoder` the
    HunyuanVideo pair (`..hunyuan.text.HunyuanTextEncoders`). `f1`: FramePack-F1's section layout;
    `one_frame_no_2x` / `_no_4x`: Musubi's `--one_frame_no_2x/4x` caching flags."""

    arch = ARCH
    target_fps = 30.0            # Musubi's FramePack frame rate

    def __init__(self, vae=None, image_encoder=None, text_encoder=None, *, f1: bool = False,
                 one_frame_no_2x: bool = False, one_frame_no_4x: bool = False, dtype: torch.dtype = torch.float16,
                 text_dtype: torch.dtype = torch.float16):
        _check_dtype(dtype)
        _check_dtype(text_dtype)
        if vae is not None and image_encoder is None:
            raise invalid("image encoder", None, "the SigLIP image encoder: every FramePack section cache holds the "
                                                 "start image's embedding (connect it as clip_vision)")
        self.vae, self.image_encoder, self.text_encoder = vae, image_encoder, text_encoder
        self.f1, self.no_2x, self.no_4x = bool(f1), bool(one_frame_no_2x), bool(one_frame_no_4x)
        self.dtype, self.text_dtype = dtype, text_dtype

    def latent_description(self) -> dict | None:
        if self.vae is None:
            return None
        return {"vae": encoder_identity(self.vae, "VAE"),
                "image_encoder": encoder_identity(self.image_encoder, "SigLIP image encoder"),
                "dtype": dtype_name(self.dtype), "f1": self.f1, "no_2x": self.no_2x, "no_4x": self.no_4x}

    def dataset_latent_description(self, ds) -> dict:
        return {"latent_window_size": int(getattr(ds, "fp_latent_window_size", S.DEFAULT_LATENT_WINDOW_SIZE))}

    def text_description(self) -> dict | None:
        if self.text_encoder is None:
            return None
        return {"text_encoder": encoder_identity(self.text_encoder, "HunyuanVideo text encoders"),
                "dtype": dtype_name(self.text_dtype)}

    # the generic builder asks these for image datasets with control images
    one_frame_spec = staticmethod(one_frame_spec)
    one_frame_control = staticmethod(one_frame_control)

    def _vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        device, dtype = weights_placement(self.vae)
        return self.vae.encode(video.to(device, dtype)).float()

    def _image_encode(self, image: np.ndarray) -> torch.Tensor:
        device, dtype = weights_placement(self.image_encoder)
        pixels = pixels_to_video(np.asarray(image)[None, ..., :3], device, dtype)[:, :, 0]   # [1, 3, H, W]
        return self.image_encoder.encode(pixels)[0].float().cpu()

    @torch.no_grad()
    def encode_clip_files(self, file: str, clip: Clip, ds) -> dict[str, dict[str, torch.Tensor]]:
        if self.vae is None:
            raise invalid("FramePack cache", "no VAE", "the HunyuanVideo VAE to encode latents")
        lws = int(getattr(ds, "fp_latent_window_size", S.DEFAULT_LATENT_WINDOW_SIZE))
        if clip.one_frame is not None:
            spec = clip.one_frame
            entry = encode_one_frame(clip.frames[0], clip.controls, self._vae_encode, self._image_encode,
                                     clean_indices=spec.clean_indices, target_index=spec.target_index,
                                     latent_window_size=lws, no_post=spec.no_post, no_2x=self.no_2x,
                                     no_4x=self.no_4x, dtype=self.dtype)
            return {file: entry}
        if clip.control is not None or len(clip.frames) == 1:
            raise invalid(f"FramePack cache item {file}", "an image or a control video",
                          "video datasets (one file per section), or image datasets with control images and "
                          "fp_1f_target_index (one-frame training)")
        entries = encode_video_sections(clip.frames, self._vae_encode, self._image_encode, lws, f1=self.f1,
                                        dtype=self.dtype)
        return {section_file_name(file, i): t for i, t in entries.items()}

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        if self.text_encoder is None:
            raise invalid("FramePack cache", "no text encoders", "the HunyuanVideo text encoders (LLaMA + CLIP-L)")
        out = self.text_encoder.encode(list(captions))          # states [B, L<=256, D], mask, pooled [B, 768]
        states, mask, pooled = out["states"], out["mask"], out["pooled"]
        if states.shape[1] > TEXT_TOKENS:
            raise invalid("LLM text states", tuple(states.shape), f"at most {TEXT_TOKENS} tokens")
        td = dtype_name(self.text_dtype)
        rows = []
        for i in range(len(captions)):
            vec = states.new_zeros(TEXT_TOKENS, states.shape[-1])
            keep = mask[i].bool()
            n = int(keep.sum())
            vec[:n] = states[i][keep]                           # real tokens first, then zeros (Musubi's layout)
            m = torch.zeros(TEXT_TOKENS, dtype=torch.bool)
            m[:n] = True
            rows.append({f"llama_vec_{td}": vec.to("cpu", self.text_dtype).clone(), "llama_attention_mask": m,
                         f"clip_l_pooler_{td}": pooled[i].to("cpu", self.text_dtype).clone()})
        return rows


def family_collate(samples: list[dict[str, torch.Tensor]]) -> dict:
    """`collate` plus the text under the names the trainer and the DiT use (`text_states`, `text_mask`, `pooled`)."""
    batch = collate(samples)
    if "llama_vec" in batch:
        batch["text_states"] = batch.pop("llama_vec")
        batch["text_mask"] = batch.pop("llama_attention_mask").bool()
    if "clip_l_pooler" in batch:
        batch["pooled"] = batch.pop("clip_l_pooler").reshape(len(samples), -1)
    return batch


__all__ = ["ARCH", "ARCH_FULL", "FORMAT_VERSION", "aligned_frames", "section_file_name", "parse_section_file_name",
           "video_section_entries", "one_frame_entry", "encode_video_sections", "encode_one_frame", "file_metadata",
           "write_cache_file", "write_video_sections", "read_cache_file", "section_inputs", "collate",
           "FramePackCacheAdapter", "family_collate", "one_frame_spec", "one_frame_control"]
