"""Dataset nodes: a dataset from a Musubi Tuner TOML, a folder or an in-graph IMAGE batch; latent and text-encoder
caching; a debug preview.

The `DATASET` socket carries a `MusubiDataset`: the validated dataset config (engine `DatasetConfig`) plus what the
caching nodes built for it (encoder identities and options). The training nodes get what they need from it:

    dataset.requirements(text_dim=...)      -> engine `CacheRequirements` matching the caches that were built
    dataset.cached_datasets(text_dim=...)   -> `check_cache_for_model(...)`: the validated `CachedDataset` list
    dataset.batch_loader(seed, text_dim=...) -> a `CachedBatchLoader` over them

Where caches go:
* Dataset from TOML: the TOML's `cache_directory` (default: the media folder, as Musubi Tuner).
* Dataset from Folder: the `cache_directory` input; empty = `<ComfyUI output>/musubi_cache/<folder name>-<hash of
  the folder's absolute path>` (output, not temp: ComfyUI empties temp at every start and caches are expensive).
* Dataset from Images: the `cache_directory` input; empty = `<ComfyUI output>/musubi_cache/images-<hash of the
  pixels>` (the same images share one cache from any workflow; changing the images starts a new folder).

ComfyUI only re-runs a node whose inputs changed. The source nodes' `IS_CHANGED` returns a fingerprint of the media
and caption files (names, sizes, mtimes, caption hashes), so editing a caption or adding a video re-runs the graph;
the on-disk cache manifest then re-encodes only what changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import comfy_compat as compat
from . import checks
from . import types as T
from .paths import folder_problem, resolve_write_folder
from .placement import on_compute_device
from ..engine.data import (CachedBatchLoader, CacheRequirements, DatasetConfig, build_cache, check_cache_for_model,
                           dataset_from_folder, dataset_from_tensors, list_items, load_dataset_config, read_manifest)
from ..engine.families import families, get_family
from ..engine.data.cache import prepare_item
from ..engine.data.frames import FRAME_EXTRACTION_MODES
from ..engine.data.preview import render_clip_grid
from ..engine.errors import invalid

log = logging.getLogger("ComfyUI-Musubi")

CATEGORY = "Musubi/data"
TASKS = ["t2v", "i2v", "fun_control", "f1"]   # the pipeline's task names (each family takes some)
# one-frame caches: which downsampled clean-history latents an item keeps (Musubi --one_frame_no_2x / _no_4x)
ONE_FRAME_HISTORY = {"2x and 4x": {}, "4x only": {"one_frame_no_2x": True}, "2x only": {"one_frame_no_4x": True},
                     "none": {"one_frame_no_2x": True, "one_frame_no_4x": True}}
KINDS = ["auto", "image", "video"]


# --- the DATASET object ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MusubiDataset:
    """What travels on a DATASET socket. Immutable: the caching nodes return a new object."""

    config: DatasetConfig
    family: str = dataclasses.field(default_factory=lambda: families()[0].name)   # set by the caching nodes
    latent: dict | None = None   # Cache Latents: {"vae", "clip"?, "task", "i2v", "control", "dtype"}
    text: dict | None = None     # Cache Text Embeddings: {"text_encoder", "dtype"}
    history: tuple = ()          # summaries of the caching steps, oldest first

    @property
    def datasets(self):
        return self.config.datasets

    @property
    def cache_directories(self) -> list[str]:
        return [ds.cache_directory for ds in self.config.datasets]

    def requirements(self, text_dim: int | None = None) -> CacheRequirements:
        """What a model needs from this dataset's caches (for `check_cache_for_model`); `text_dim` None = not checked."""
        return get_family(self.family).described_cache_requirements(self.latent, self.text, text_dim)

    def cached_datasets(self, text_dim: int | None = None):
        """The validated caches (engine `CachedDataset` list); raises naming what is missing or out of date."""
        if self.latent is None:
            raise invalid("dataset", "no latent cache", "a dataset that went through Musubi Cache Latents")
        if self.text is None:
            raise invalid("dataset", "no text-encoder cache", "a dataset that went through Musubi Cache Text Embeddings")
        return check_cache_for_model(self.config, self.requirements(text_dim))

    def batch_loader(self, seed: int = 0, shuffle: bool = True, text_dim: int | None = None) -> CachedBatchLoader:
        return CachedBatchLoader(self.cached_datasets(text_dim), seed=seed, shuffle=shuffle)

    def with_cache(self, **changes) -> "MusubiDataset":
        return dataclasses.replace(self, **changes)


def _dataset(value, field: str = "dataset") -> MusubiDataset:
    if not (hasattr(value, "config") and hasattr(value, "with_cache")):
        raise invalid(field, type(value).__name__, "a DATASET from a Musubi dataset node")
    return value


def _family_of(handle, dataset: MusubiDataset, field: str):
    """The family an encoder was loaded for; a dataset's caches are all for one family."""
    if handle.family is None:
        raise invalid(field, type(handle.module).__name__, "an encoder from a Musubi loader node (it names the model "
                                                           "family the cache is for)")
    family = get_family(handle.family)
    if (dataset.latent or dataset.text) and family.name != dataset.family:
        raise invalid(field, f"an encoder for {family.display_name}", f"an encoder for {get_family(dataset.family).display_name}, "
                                                                       "the family this dataset's other cache is for")
    return family


# --- helpers ---------------------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(compat.output_directory()) / "musubi_cache"


def _short_hash(text: str | bytes) -> str:
    return hashlib.sha1(text if isinstance(text, bytes) else text.encode("utf-8")).hexdigest()[:10]


@contextlib.contextmanager
def _collect_warnings(into: list[str]):
    """Record engine DatasetWarnings (skipped items...) to show them on the node, and log them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = str(w.message)
        into.append(msg)
        log.warning("%s", msg)


def _list_all(config: DatasetConfig) -> tuple[list[list], list[str]]:
    """Items of every dataset (validates sources and captions early) and the warnings raised while listing."""
    notes: list[str] = []
    with _collect_warnings(notes):
        items = [list_items(ds) for ds in config.datasets]
    return items, notes


def _fingerprint(config: DatasetConfig, extra: str = "") -> str:
    """Names + sizes + mtimes of the media, and caption hashes, of every item (what IS_CHANGED compares)."""
    h = hashlib.sha1(extra.encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ds in config.datasets:
            for it in list_items(ds):
                h.update(json.dumps([it.key, str(it.path), it.fingerprint(), it.caption_hash()]).encode())
    return h.hexdigest()


def _source_result(dataset: MusubiDataset, unique_id=None, notes: list[str] | None = None) -> dict:
    """What a source node returns: the dataset, and its summary (items listed now, so bad sources fail here).

    `notes`: warnings raised while the config was built (frame counts rounded to 4k+1...)."""
    items, listed = _list_all(dataset.config)
    return _shown(unique_id, _source_summary(dataset, items, (notes or []) + listed), (dataset,))


def _shown(unique_id, text: str, result: tuple) -> dict:
    """The node's summary (with its warnings) as progress text on the node, where users see it, and as ui text."""
    compat.send_text(unique_id, text)
    return {"ui": {"text": [text]}, "result": result}


def _with_warnings(summary: str, notes: list[str]) -> str:
    return "\n".join([summary] + [f"warning: {n}" for n in dict.fromkeys(notes)])


def _source_summary(dataset: MusubiDataset, items: list[list], notes: list[str]) -> str:
    lines = []
    for ds, its in zip(dataset.datasets, items):
        lines.append(f"dataset #{ds.index}: {len(its)} {ds.kind} item(s) from {ds.source or 'the graph'}, "
                     f"resolution {ds.resolution[0]}x{ds.resolution[1]}, batch {ds.batch_size}, repeats "
                     f"{ds.num_repeats}, bucketing {'on' if ds.enable_bucket else 'off'}; cache {ds.cache_directory}")
    lines += [f"warning: {n}" for n in notes]
    return "\n".join(lines)


def _check_cache_folder(cache: str) -> None:
    """The cache folder can be created (checked on the nearest existing folder) but is not created here: the caching
    node creates it when it writes the first file, so a dataset that fails leaves no empty folder behind."""
    p = Path(cache)
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise invalid("cache_directory", cache, f"a folder that can be created and written ({p} is not writable)")


def _parse_int_list(text: str, field: str) -> list[int]:
    try:
        values = [int(s) for s in str(text).replace(" ", "").replace(";", ",").split(",") if s]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise invalid(field, text, "comma-separated frame counts >= 1, e.g. '1,17,33' (4k+1)")
    return values


def _resolution(width: int, height: int) -> tuple[int, int]:
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise invalid("width/height", (width, height), "multiples of 16 (at least 16)")
    return (int(width), int(height))


# --- source nodes ----------------------------------------------------------------------------------------------------
class MusubiDatasetFromTOML:
    DESCRIPTION = ("A dataset from a Musubi Tuner dataset config (.toml, or .json): [general] and [[datasets]] with "
                   "image/video directories or JSONL files, captions, buckets, target frames, cache_directory. "
                   "Relative paths inside are resolved against the TOML's folder; caches go to each dataset's "
                   "cache_directory (default: its media folder). Editing media or captions re-runs the graph.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (T.DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset (config + cache state), not cached yet: connect Musubi Cache Latents.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "toml_path": ("STRING", {"default": "", "tooltip": "Full path of a Musubi Tuner dataset .toml (or .json) file."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, toml_path="", **_):
        try:
            path = Path(str(toml_path).strip()).expanduser()
            return _fingerprint(load_dataset_config(path), path.read_text(encoding="utf-8"))
        except Exception:  # let the node run and raise its named error
            return float("nan")

    def load(self, toml_path, unique_id=None):
        path = str(toml_path).strip()
        if not path:
            raise invalid("toml_path", toml_path, "the full path of a Musubi Tuner dataset .toml file")
        p = Path(path).expanduser()
        if not p.is_file():
            raise invalid("toml_path", path, "an existing dataset config file (.toml or .json)")
        if p.suffix.lower() not in (".toml", ".json"):
            raise invalid("toml_path", path, "a .toml or .json dataset config")
        notes: list[str] = []
        with _collect_warnings(notes):
            dataset = MusubiDataset(load_dataset_config(p))
        return _source_result(dataset, unique_id, notes)


class MusubiDatasetFromFolder:
    DESCRIPTION = ("A dataset from one folder of images or videos with a caption file next to each (the same "
                   "options as a Musubi Tuner [[datasets]] entry). Video folders may also hold folders of frames. "
                   "Empty cache_directory: <ComfyUI output>/musubi_cache/<folder name>-<path hash>. Editing media or "
                   "captions re-runs the graph.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (T.DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset (config + cache state), not cached yet: connect Musubi Cache Latents.",)

    @classmethod
    def VALIDATE_INPUTS(cls, cache_directory=None, width=None, height=None):
        return checks.validate_inputs(cls, {"cache_directory": folder_problem, **checks.VIDEO_SIZE},
                                      cache_directory=cache_directory, width=width, height=height)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Full path of the folder with the images or videos and their captions."}),
            "kind": (KINDS, {"default": "auto", "tooltip": "auto: video if the folder holds any video file, else image."}),
            "caption_extension": ("STRING", {"default": ".txt", "tooltip": "Extension of the caption files (image.png -> image.txt)."}),
            "width": ("INT", {"default": 960, "min": 16, "max": 4096, "step": 16,
                      "tooltip": "Training resolution width (the bucket area is width x height)."}),
            "height": ("INT", {"default": 544, "min": 16, "max": 4096, "step": 16, "tooltip": "Training resolution height."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Samples per training batch."}),
            "num_repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "How many times each item is seen per epoch."}),
            "enable_bucket": ("BOOLEAN", {"default": True,
                              "tooltip": "Aspect-ratio buckets of about width x height (else everything is cropped to width x height)."}),
            "bucket_no_upscale": ("BOOLEAN", {"default": False,
                                  "tooltip": "Media smaller than the bucket area keep their own size (no upscaling)."}),
            "target_frames": ("STRING", {"default": "1,25,45",
                              "tooltip": "Video clip lengths in frames, comma-separated (4k+1, e.g. 1,17,33). Ignored for images."}),
            "frame_extraction": (list(FRAME_EXTRACTION_MODES), {"default": "head",
                                 "tooltip": "How clips are cut from each video: head, chunk, slide (frame_stride), "
                                            "uniform (frame_sample clips), full (whole video up to max_frames)."}),
            "frame_stride": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "slide: frames between clip starts."}),
            "frame_sample": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "uniform: clips per video."}),
            "max_frames": ("INT", {"default": 129, "min": 1, "max": 10000, "tooltip": "full: longest clip in frames."}),
            "source_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.001,
                           "tooltip": "Frame rate of the videos; frames are dropped to Wan's 16 fps. 0 = use every frame."}),
            "cache_directory": ("STRING", {"default": "",
                                "tooltip": "Where the latent/text caches go. Empty: <ComfyUI output>/musubi_cache/<folder name>-<path hash>."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        try:
            return _fingerprint(cls._config(**kwargs), json.dumps(kwargs, sort_keys=True, default=str))
        except Exception:
            return float("nan")

    @staticmethod
    def _config(folder, kind, caption_extension, width, height, batch_size, num_repeats, enable_bucket,
                bucket_no_upscale, target_frames, frame_extraction, frame_stride, frame_sample, max_frames,
                source_fps, cache_directory, **_) -> DatasetConfig:
        folder_s = str(folder).strip()
        if not folder_s or not Path(folder_s).expanduser().is_dir():
            raise invalid("folder", folder, "an existing folder with images or videos and their caption files")
        root = Path(folder_s).expanduser().resolve()
        ext = str(caption_extension).strip() or ".txt"
        if not ext.startswith("."):
            raise invalid("caption_extension", caption_extension, "an extension starting with '.', e.g. '.txt'")
        cache = str(resolve_write_folder(cache_directory, "cache_directory",
                                         _cache_root() / f"{root.name}-{_short_hash(str(root))}"))
        common = dict(caption_extension=ext, resolution=_resolution(width, height), batch_size=batch_size,
                      num_repeats=num_repeats, enable_bucket=enable_bucket, bucket_no_upscale=bucket_no_upscale,
                      cache_directory=cache)
        config = dataset_from_folder(root, kind=kind, **common)
        if config.datasets[0].kind == "video":
            video = dict(target_frames=_parse_int_list(target_frames, "target_frames"),
                         frame_extraction=frame_extraction, frame_stride=frame_stride, frame_sample=frame_sample,
                         max_frames=max_frames)
            if source_fps:
                video["source_fps"] = float(source_fps)
            config = dataset_from_folder(root, kind="video", **common, **video)
        return config

    def load(self, unique_id=None, **kwargs):
        notes: list[str] = []
        with _collect_warnings(notes):
            dataset = MusubiDataset(self._config(**kwargs))
        _check_cache_folder(dataset.config.datasets[0].cache_directory)
        return _source_result(dataset, unique_id, notes)


class MusubiDatasetFromImages:
    DESCRIPTION = ("A dataset from an IMAGE batch made in the graph (Load Image, a video loader's frames...): each "
                   "image is an item, or the whole batch is one video clip ('as_video'). Captions: one line per "
                   "image, or one line for all. Empty cache_directory: <ComfyUI output>/musubi_cache/images-<hash of "
                   "the pixels>.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (T.DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset (config + cache state), not cached yet: connect Musubi Cache Latents.",)

    @classmethod
    def VALIDATE_INPUTS(cls, cache_directory=None, width=None, height=None):
        return checks.validate_inputs(cls, {"cache_directory": folder_problem, **checks.VIDEO_SIZE},
                                      cache_directory=cache_directory, width=width, height=height)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images (or the frames of one video when 'as_video' is on)."}),
            "captions": ("STRING", {"multiline": True, "default": "",
                         "tooltip": "One caption per line, in the order of the images; a single line applies to "
                                    "every image. With 'as_video' the whole text is the clip's caption."}),
            "width": ("INT", {"default": 960, "min": 16, "max": 4096, "step": 16,
                      "tooltip": "Training resolution width (the bucket area is width x height)."}),
            "height": ("INT", {"default": 544, "min": 16, "max": 4096, "step": 16, "tooltip": "Training resolution height."}),
            "num_repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "How many times each item is seen per epoch."}),
            "as_video": ("BOOLEAN", {"default": False,
                         "tooltip": "Treat the batch as the frames of one video clip (trimmed to 4k+1 frames)."}),
            "cache_directory": ("STRING", {"default": "",
                                "tooltip": "Where the latent/text caches go. Empty: <ComfyUI output>/musubi_cache/images-<pixel hash>."}),
        }, "optional": {
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Samples per training batch."}),
            "frames_per_clip": ("INT", {"default": 0, "min": 0, "max": 4096,
                                "tooltip": "0: off. N: the batch is several video clips of N frames each, one after "
                                           "the other (e.g. Musubi Demo Shape Clips), one caption line per clip."}),
            "fp_latent_window_size": ("INT", {"default": 9, "min": 1, "max": 64,
                                      "tooltip": "FramePack section caches only: latent frames per section "
                                                 "(Musubi's fp_latent_window_size; 9 = 36 frames after the start "
                                                 "frame). Other families ignore it."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def load(self, images, captions, width, height, num_repeats, as_video, cache_directory, batch_size=1,
             frames_per_clip=0, fp_latent_window_size=9, unique_id=None):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise invalid("images", getattr(images, "shape", type(images).__name__), "an IMAGE [batch, height, width, 3]")
        if images.shape[1] < 16 or images.shape[2] < 16:
            raise invalid("images", f"{images.shape[2]}x{images.shape[1]} pixels", "images of at least 16x16 pixels")
        images = compat.unwrap_inference_tensor(images[..., :3]).float().cpu().contiguous()
        lines = [ln.strip() for ln in str(captions).splitlines() if ln.strip()]  # blank lines are ignored
        if frames_per_clip:
            n = images.shape[0]
            if n % frames_per_clip:
                raise invalid("frames_per_clip", frames_per_clip, f"a divisor of the {n} images of the batch")
            frames = list(images.split(frames_per_clip))
            if len(lines) == 1:
                lines = lines * len(frames)
            if len(lines) != len(frames):
                raise invalid("captions", f"{len(lines)} non-empty line(s) for {len(frames)} clip(s)",
                              f"{len(frames)} lines (one caption per clip) or a single line for all")
            caps = lines
        elif as_video:
            if not lines:
                raise invalid("captions", captions, "a caption for the clip")
            frames, caps = [images], [" ".join(lines)]
        else:
            n = images.shape[0]
            if len(lines) == 1:
                lines = lines * n
            if len(lines) != n:
                raise invalid("captions", f"{len(lines)} non-empty line(s) for {n} image(s)",
                              f"{n} lines (one caption per image) or a single line for all")
            frames, caps = images, lines
        cache = str(cache_directory).strip()
        if not cache:
            digest = hashlib.sha1(images.numpy().tobytes())
            digest.update(f"{tuple(images.shape)}|{as_video}|{frames_per_clip}".encode())
            cache = str(_cache_root() / f"images-{digest.hexdigest()[:10]}")
        cache = str(resolve_write_folder(cache, "cache_directory", Path(cache)))
        _check_cache_folder(cache)
        notes: list[str] = []
        with _collect_warnings(notes):
            config = dataset_from_tensors(frames, caps, cache, resolution=_resolution(width, height),
                                          batch_size=batch_size, num_repeats=num_repeats,
                                          fp_latent_window_size=fp_latent_window_size)
        return _source_result(MusubiDataset(config), unique_id, notes)


# --- caching nodes ---------------------------------------------------------------------------------------------------
def _progress(unique_id, what: str):
    bar = compat.Progress(1, unique_id)
    bar.update(0)  # a cancel pressed before the node started stops here

    def progress(done: int, total: int):
        bar.total = max(int(total), 1)
        bar.update(done, text=f"{what} {done}/{total}")
    return progress


def _cache_summary(what: str, encoded: list, items: int, removed: list, dataset: MusubiDataset, extra: str = "") -> str:
    text = (f"{what}: {len(encoded)} encoded, {items - len(set(encoded))} reused, {len(removed)} removed "
            f"({items} item(s){extra}) in {', '.join(dataset.cache_directories)}")
    if encoded:
        text += "\nencoded: " + ", ".join(encoded[:12]) + (" ..." if len(encoded) > 12 else "")
    if removed:
        text += "\nremoved: " + ", ".join(removed[:12]) + (" ..." if len(removed) > 12 else "")
    return text


class MusubiCacheLatents:
    DESCRIPTION = ("Encode every item of the dataset with the model family's VAE (and CLIP vision for Wan I2V) into "
                   "the cache directory, as Musubi Tuner's wan_cache_latents / cache_latents. Incremental: items whose media, settings and "
                   "encoders did not change are reused; cancel keeps everything finished and the next run resumes.")
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # a graph that only caches (or previews) can be queued
    FUNCTION = "cache"
    RETURN_TYPES = (T.DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset with its latent cache recorded (connect Musubi Cache Text Embeddings next).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (T.DATASET, {"tooltip": "The dataset to cache."}),
            "vae": (T.VAE, {"tooltip": "The VAE of the model family (the one the model was trained with): its "
                                       "loader names the family the cache is for."}),
            "task": (TASKS, {"default": "t2v",
                     "tooltip": "t2v: latents only (HunyuanVideo always: SkyReels I2V trains from it too); "
                                "i2v (Wan): + first-frame conditioning and CLIP features (needs clip_vision for "
                                "Wan 2.1; without it for the Wan 2.2 I2V A14B experts, which take none; "
                                "also one-frame datasets, for I2V or FLF2V intermediate-frame training); fun_control: + control-video latents (needs control files), with "
                                "clip_vision connected also the start image and its CLIP features (I2V "
                                "Fun-Control). FramePack: i2v (section caches of the original schedule) or f1 "
                                "(FramePack-F1's), both with the SigLIP image encoder as clip_vision. Wan 2.2 VAE "
                                "(TI2V-5B): t2v, or i2v (each clip's first frame given; no clip_vision)."}),
            "keep_cache": ("BOOLEAN", {"default": False,
                           "tooltip": "Keep cache files of items no longer in the dataset (off: they are deleted)."}),
            "workers": ("INT", {"default": 2, "min": 0, "max": 32,
                        "tooltip": "Threads decoding media ahead of the VAE (0 = decode in the main thread)."}),
        }, "optional": {
            "clip_vision": (T.CLIP_VISION, {"tooltip": "CLIP ViT-H/14 for Wan 2.1 I2V (required for task i2v; "
                                                       "none for Wan 2.2 I2V A14B; with fun_control: I2V Fun-Control); "
                                                       "FramePack: the SigLIP image encoder (always required)."}),
            "one_frame_history": (list(ONE_FRAME_HISTORY), {
                "default": "2x and 4x", "tooltip": "FramePack one-frame datasets: the downsampled clean-history "
                "latents each item keeps (Musubi --one_frame_no_2x / --one_frame_no_4x); kisekaeichi: none."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def cache(self, dataset, vae, task, keep_cache, workers, clip_vision=None, one_frame_history="2x and 4x",
              unique_id=None):
        dataset = _dataset(dataset)
        vae = T.handle(vae, "vae", "a VAE from a Musubi VAE loader node")
        if clip_vision is not None:
            clip_vision = T.handle(clip_vision, "clip_vision", "an image encoder from a Musubi loader node")
        if task not in TASKS:
            raise invalid("task", task, f"one of {TASKS}")
        if one_frame_history not in ONE_FRAME_HISTORY:
            raise invalid("one_frame_history", one_frame_history, f"one of {list(ONE_FRAME_HISTORY)}")
        family = _family_of(vae, dataset, "vae")
        # the family's rules: which tasks it caches, whether it takes CLIP vision features and the history options
        adapter = family.latent_cache_adapter(vae.module, task,
                                              clip_vision.module if clip_vision is not None else None,
                                              **ONE_FRAME_HISTORY[one_frame_history])
        progress = _progress(unique_id, "latents")
        notes: list[str] = []
        with on_compute_device(vae), (on_compute_device(clip_vision) if clip_vision is not None
                                      else contextlib.nullcontext()), _collect_warnings(notes):
            report = build_cache(dataset.config, adapter, keep_cache=keep_cache, num_workers=workers,
                                 progress=progress)
        latent = {**adapter.latent_description(), "task": task}
        summary = _cache_summary("latents", report.latents_encoded, report.items, report.removed_files, dataset,
                                 f", {report.clips_written} clip(s) written")
        out = dataset.with_cache(family=family.name, latent=latent, history=dataset.history + (summary,))
        return _shown(unique_id, _with_warnings(summary, notes), (out,))


class MusubiCacheTextEmbeddings:
    DESCRIPTION = ("Encode every caption of the dataset with the model family's text encoder(s) (Wan: umT5; "
                   "HunyuanVideo: LLaVA-LLaMA-3 + CLIP-L) into the cache directory, as Musubi Tuner's "
                   "*_cache_text_encoder_outputs. Only new or edited captions (or another encoder) are encoded; "
                   "cancel keeps everything finished.")
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # a graph that only caches (or previews) can be queued
    FUNCTION = "cache"
    RETURN_TYPES = (T.DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset with its text cache recorded (ready for training once latents are cached too).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (T.DATASET, {"tooltip": "The dataset whose captions to encode."}),
            "text_encoder": (T.TEXT_ENCODER, {"tooltip": "The text encoder from the model family's loader (Wan: "
                                                         "umT5; HunyuanVideo: the LLaVA-LLaMA-3 + CLIP-L pair)."}),
            "keep_cache": ("BOOLEAN", {"default": False,
                           "tooltip": "Keep cache files of items no longer in the dataset (off: they are deleted)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def cache(self, dataset, text_encoder, keep_cache, unique_id=None):
        dataset = _dataset(dataset)
        text_encoder = T.handle(text_encoder, "text_encoder", "a text encoder from a Musubi text encoder loader node")
        family = _family_of(text_encoder, dataset, "text_encoder")
        adapter = family.cache_adapter(text_encoder=text_encoder.module)
        progress = _progress(unique_id, "captions")
        notes: list[str] = []
        with on_compute_device(text_encoder), _collect_warnings(notes):
            # One caption per step: every item is a cancel point and results never depend on batch padding.
            report = build_cache(dataset.config, adapter, keep_cache=keep_cache, text_batch_size=1, progress=progress)
        summary = _cache_summary("text", report.texts_encoded, report.items, report.removed_files, dataset)
        out = dataset.with_cache(family=family.name, text=adapter.text_description(),
                                 history=dataset.history + (summary,))
        return _shown(unique_id, _with_warnings(summary, notes), (out,))


# --- preview ---------------------------------------------------------------------------------------------------------
class MusubiDatasetPreview:
    DESCRIPTION = ("Show what training will see, like Musubi Tuner's debug mode: the first items bucketed and "
                   "cropped, a few frames of each clip with its bucket and caption, and a summary (items and clips "
                   "per bucket, frame counts, skipped items, missing captions, cache state).")
    CATEGORY = CATEGORY
    OUTPUT_NODE = True  # a graph that only caches (or previews) can be queued
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "summary")
    OUTPUT_TOOLTIPS = ("One image: a row per clip (frames in their bucket) with key, bucket and caption drawn.",
                       "Text summary of the dataset and its caches.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (T.DATASET, {"tooltip": "The dataset to inspect (before or after caching)."}),
            "max_items": ("INT", {"default": 8, "min": 1, "max": 256,
                          "tooltip": "Items decoded per dataset (their clips are drawn and counted per bucket)."}),
            "frames_per_clip": ("INT", {"default": 4, "min": 1, "max": 16, "tooltip": "Frames shown per clip (evenly spaced)."}),
            "tile_size": ("INT", {"default": 160, "min": 32, "max": 1024, "step": 16,
                          "tooltip": "Longest side of each frame in the grid, in pixels."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def preview(self, dataset, max_items, frames_per_clip, tile_size, unique_id=None):
        dataset = _dataset(dataset)
        items, notes = _list_all(dataset.config)
        todo = [(ds, it) for ds, its in zip(dataset.datasets, items) for it in its[:max_items]]
        bar = compat.Progress(len(todo), unique_id)
        bar.update(0)
        rows, buckets, lines = [], {}, []
        family = get_family(dataset.family)
        # no encoders: only the clip planning (target fps, buckets, one-frame rules) of the caches the dataset has
        plan = getattr(family, "planning_adapter", None)   # optional: a family whose caches plan clips differently
        adapter = plan(dataset.latent) if plan is not None else family.cache_adapter()
        requirements = dataset.requirements()
        with _collect_warnings(notes):
            for n, (ds, it) in enumerate(todo):
                for pc in prepare_item(it, ds, adapter.target_fps, requirements.arch, adapter):
                    key = (ds.index, pc.bucket[0], pc.bucket[1], pc.frames)
                    buckets[key] = buckets.get(key, 0) + 1
                    rows.append({"frames": pc.clip.frames, "caption": it.caption,
                                 "label": f"#{ds.index} {it.key}  {pc.bucket[0]}x{pc.bucket[1]}  {pc.frames} frame(s)"
                                          + (f" from {pc.start}" if it.kind == "video" else "")})
                bar.update(n + 1)
        for ds, its in zip(dataset.datasets, items):
            analysed = min(len(its), max_items)
            lines.append(f"dataset #{ds.index} ({ds.kind}, {ds.source or 'in-graph images'}): {len(its)} item(s), "
                         f"resolution {ds.resolution[0]}x{ds.resolution[1]}, bucketing "
                         f"{'on' if ds.enable_bucket else 'off'}{', no upscale' if ds.bucket_no_upscale else ''}, "
                         f"batch {ds.batch_size}, repeats {ds.num_repeats}")
            if ds.kind == "video":
                lines.append(f"  frames: target {ds.target_frames}, extraction {ds.frame_extraction}, "
                             f"max {ds.max_frames}, source fps {ds.source_fps or 'as is'}")
            per = {k[1:]: v for k, v in buckets.items() if k[0] == ds.index}
            clips = sum(per.values())
            lines.append(f"  buckets ({clips} clip(s) from {analysed} analysed item(s)"
                         f"{'' if analysed == len(its) else f'; raise max_items to analyse all {len(its)}'}): "
                         + (", ".join(f"{w}x{h}x{t}f: {c}" for (w, h, t), c in sorted(per.items())) or "none"))
            empty = [it.key for it in its if not it.caption.strip()]
            lines.append(f"  empty captions: {len(empty)}" + (f" ({', '.join(empty[:6])})" if empty else ""))
            lines.append("  " + _cache_state(ds, its, requirements))
        missing = [n for n in notes if "no caption file" in n]
        lines.append(f"missing caption files (items skipped): {len(missing)}")
        lines += [f"warning: {n}" for n in notes]
        lines.append(f"cached for training: latents {'yes' if dataset.latent else 'no'}"
                     f" ({(dataset.latent or {}).get('task', '-')}), text {'yes' if dataset.text else 'no'}")
        summary = "\n".join(lines)
        grid = render_clip_grid(rows[: max(1, max_items) * max(1, len(dataset.datasets))], frames_per_clip, tile_size)
        image = torch.from_numpy(grid.astype(np.float32) / 255.0)[None]
        return {"ui": {"text": [summary]}, "result": (image, summary)}


def _cache_state(ds, items, requirements) -> str:
    folder = Path(ds.cache_directory)
    manifests = {kind: read_manifest(folder, arch) if folder.is_dir() else None for kind, arch in
                 (("latents", requirements.arch), ("text", requirements.text_arch or requirements.arch))}
    if not any(manifests.values()):
        return f"cache {ds.cache_directory}: none yet"
    done = {kind: sum(1 for it in items if kind in (m or {}).get("items", {}).get(it.key, {}))
            for kind, m in manifests.items()}
    return f"cache {ds.cache_directory}: latents for {done['latents']}/{len(items)} item(s), text for " \
           f"{done['text']}/{len(items)}"


NODE_CLASS_MAPPINGS = {
    "MusubiDatasetFromTOML": MusubiDatasetFromTOML,
    "MusubiDatasetFromFolder": MusubiDatasetFromFolder,
    "MusubiDatasetFromImages": MusubiDatasetFromImages,
    "MusubiCacheLatents": MusubiCacheLatents,
    "MusubiCacheTextEmbeddings": MusubiCacheTextEmbeddings,
    "MusubiDatasetPreview": MusubiDatasetPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiDatasetFromTOML": "Musubi Dataset from TOML",
    "MusubiDatasetFromFolder": "Musubi Dataset from Folder",
    "MusubiDatasetFromImages": "Musubi Dataset from Images",
    "MusubiCacheLatents": "Musubi Cache Latents",
    "MusubiCacheTextEmbeddings": "Musubi Cache Text Embeddings",
    "MusubiDatasetPreview": "Musubi Dataset Preview",
}
