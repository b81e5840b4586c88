"""Dataset configuration: Musubi Tuner's TOML (or JSON) schema as dataclasses.

    [general]                         # only the "ascendable" keys (GENERAL_KEYS)
    resolution = [960, 544]
    [[datasets]]                      # video dataset: has video_directory or video_jsonl_file
    video_directory = "clips"
    target_frames = [1, 25, 45]

Each key is looked up dataset -> [general] -> built-in default. Unknown keys, keys of the other dataset type and
wrong types are refused with a `MusubiInputError` naming the file, the dataset index and the key.

Deliberate differences from Musubi Tuner:
* `source_fps = 30` (an int) is accepted, not only `30.0`.
* Relative paths are resolved against the folder of the TOML file (Musubi uses the working directory, which in
  ComfyUI is meaningless). A TOML given as text resolves against `base_dir` (default: the working directory).
* `enable_bucket` / `bucket_no_upscale` are honoured for video datasets too (Musubi always buckets videos at cache
  time, then batches with the configured setting).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import invalid
from .frames import FRAME_EXTRACTION_MODES, normalize_target_frames, round_down_4k1

# tomllib is 3.11+; ComfyUI installs on 3.10 get the same parser from the `tomli` backport (a dependency there).
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the 3.10 check in tests/test_packaging.py
    import tomli as tomllib

DEFAULT_RESOLUTION = (960, 544)

# Keys allowed in [general]; datasets may override each of them.
GENERAL_KEYS = ("resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale")
DEPRECATED_ALIASES = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}


@dataclass
class InMemoryItem:
    """One item of an in-graph dataset: frames [F, H, W, 3] uint8 (F = 1 for an image) and its caption."""

    name: str
    frames: Any  # numpy uint8 [F, H, W, 3]
    caption: str


@dataclass
class GeneralConfig:
    resolution: tuple[int, int] = DEFAULT_RESOLUTION  # (W, H)
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False


@dataclass
class _CommonDatasetConfig:
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    cache_directory: str | None = None
    control_directory: str | None = None
    fp_latent_window_size: int = 9
    # Not TOML keys: items of an in-graph dataset ("Dataset from Images"), and where the config came from.
    in_memory: list[InMemoryItem] | None = field(default=None, repr=False)
    index: int = 0


@dataclass
class ImageDatasetConfig(_CommonDatasetConfig):
    image_directory: str | None = None
    image_jsonl_file: str | None = None
    fp_1f_clean_indices: list[int] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None
    multiple_target: bool = False

    kind = "image"

    @property
    def source(self) -> str | None:
        return self.image_directory or self.image_jsonl_file


@dataclass
class VideoDatasetConfig(_CommonDatasetConfig):
    video_directory: str | None = None
    video_jsonl_file: str | None = None
    target_frames: list[int] = field(default_factory=lambda: [1])
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None

    kind = "video"

    @property
    def source(self) -> str | None:
        return self.video_directory or self.video_jsonl_file


@dataclass
class DatasetConfig:
    general: GeneralConfig
    datasets: list[ImageDatasetConfig | VideoDatasetConfig]
    source: str = "<dataset config>"  # file name (or "<toml text>") used in messages


# --- type checkers: each returns the normalized value or raises ValueError(expected) -------------------------------

def _int(v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"an integer >= {minimum}")
    return v


def _nonneg_int(v):
    return _int(v, 0)


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _str(v):
    if not isinstance(v, str) or not v:
        raise ValueError("a non-empty string")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError("a positive number (e.g. 30.0)")
    return float(v)


def _resolution(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 16:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 16
                                                            for x in v):
        return (v[0], v[1])
    raise ValueError("an integer >= 16 or [width, height]")


def _int_list(v):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                             for x in v):
        raise ValueError("a non-empty list of integers >= 0")
    return list(v)


def _target_frames(v):
    return _int_list(v)


def _extraction(v):
    if v not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"one of {list(FRAME_EXTRACTION_MODES)}")
    return v


_COMMON: dict[str, Callable] = {
    "resolution": _resolution, "caption_extension": _str, "batch_size": _int, "num_repeats": _int,
    "enable_bucket": _bool, "bucket_no_upscale": _bool, "cache_directory": _str, "control_directory": _str,
    "fp_latent_window_size": _int,
}
IMAGE_KEYS: dict[str, Callable] = {
    **_COMMON, "image_directory": _str, "image_jsonl_file": _str, "fp_1f_clean_indices": _int_list,
    "fp_1f_target_index": _nonneg_int, "fp_1f_no_post": _bool, "no_resize_control": _bool,
    "control_resolution": _resolution, "multiple_target": _bool,
}
VIDEO_KEYS: dict[str, Callable] = {
    **_COMMON, "video_directory": _str, "video_jsonl_file": _str, "target_frames": _target_frames,
    "frame_extraction": _extraction, "frame_stride": _int, "frame_sample": _int, "max_frames": _int,
    "source_fps": _float,
}
_PATH_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file", "cache_directory",
              "control_directory")


def load_dataset_config(path_or_text: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> DatasetConfig:
    """Parse a dataset config from a .toml/.json file path or from TOML text.

    Paths inside are resolved against the file's folder (or `base_dir` for text)."""
    text, source, folder = _read_source(path_or_text, base_dir)
    if source.lower().endswith(".json"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise invalid(f"dataset config {source}", "invalid JSON", f"a JSON object ({e})") from e
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise invalid(f"dataset config {source}", "invalid TOML", f"valid TOML ({e})") from e
    return parse_dataset_config(raw, source, folder)


def _read_source(path_or_text, base_dir) -> tuple[str, str, Path]:
    s = str(path_or_text)
    looks_like_path = isinstance(path_or_text, os.PathLike) or ("\n" not in s and s.lower().endswith((".toml", ".json")))
    if looks_like_path:
        p = Path(s).expanduser()
        if not p.is_file():
            raise invalid("dataset config", s, "an existing .toml or .json file")
        from .items import read_text_file  # late: items imports this module

        return read_text_file(p, "dataset config"), str(p), p.resolve().parent
    return s, "<toml text>", Path(base_dir or os.getcwd()).resolve()


def parse_dataset_config(raw: dict, source: str = "<dataset config>", folder: Path | None = None) -> DatasetConfig:
    """Validate an already-parsed TOML/JSON object (see module docstring)."""
    folder = Path(folder or os.getcwd())
    if not isinstance(raw, dict):
        raise invalid(f"dataset config {source}", type(raw).__name__, "a table with [general] and [[datasets]]")
    extra = set(raw) - {"general", "datasets"}
    if extra:
        raise invalid(f"dataset config {source}", sorted(extra), "only the tables [general] and [[datasets]]")
    general_raw = raw.get("general", {})
    if not isinstance(general_raw, dict):
        raise invalid(f"dataset config {source} [general]", general_raw, "a table")
    general_vals = {}
    for key, value in general_raw.items():
        if key not in GENERAL_KEYS:
            raise invalid(f"dataset config {source} [general] key {key!r}", value,
                          f"one of the keys allowed in [general]: {list(GENERAL_KEYS)} (others go into [[datasets]])")
        general_vals[key] = _check(_COMMON[key], value, f"dataset config {source} [general] key {key!r}")
    general = GeneralConfig(**general_vals)

    datasets_raw = raw.get("datasets")
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise invalid(f"dataset config {source}", datasets_raw, "at least one [[datasets]] entry")
    datasets = [_parse_dataset(d, i, general, source, folder) for i, d in enumerate(datasets_raw)]
    _check_unique_cache_dirs(datasets, source)
    return DatasetConfig(general, datasets, source)


def _check(checker, value, where: str):
    try:
        return checker(value)
    except ValueError as e:
        raise invalid(where, value, str(e)) from None


def _parse_dataset(d, index: int, general: GeneralConfig, source: str, folder: Path):
    where = f"dataset config {source} [[datasets]] #{index}"
    if not isinstance(d, dict):
        raise invalid(where, d, "a table")
    d = dict(d)
    for old, new in DEPRECATED_ALIASES.items():
        if old in d:
            warnings.warn(f"{where}: key {old!r} is deprecated; use {new!r}", stacklevel=3)
            value = d.pop(old)
            d.setdefault(new, value)  # the new name wins when both are given
    is_video = "video_directory" in d or "video_jsonl_file" in d
    schema, cls = (VIDEO_KEYS, VideoDatasetConfig) if is_video else (IMAGE_KEYS, ImageDatasetConfig)
    other = IMAGE_KEYS if is_video else VIDEO_KEYS
    values: dict[str, Any] = {}
    for key, value in d.items():
        if key not in schema:
            kind = "video" if is_video else "image"
            hint = (f"a key of {'image' if is_video else 'video'} datasets, not allowed in a {kind} dataset"
                    if key in other else f"one of the {kind} dataset keys {sorted(schema)}")
            raise invalid(f"{where} key {key!r}", value, hint)
        values[key] = _check(schema[key], value, f"{where} key {key!r}")

    sources = [k for k in (("video_directory", "video_jsonl_file") if is_video else ("image_directory", "image_jsonl_file"))
               if k in values]
    if len(sources) != 1:
        kind = "video" if is_video else "image"
        raise invalid(where, sources or "no source", f"exactly one of {kind}_directory / {kind}_jsonl_file")
    if sources[0].endswith("jsonl_file") and "cache_directory" not in values:
        raise invalid(f"{where} key 'cache_directory'", None, "a cache_directory (required with a JSONL file)")
    for key in _PATH_KEYS:
        if key in values:
            values[key] = str((folder / Path(values[key]).expanduser()).resolve())
    # Lookup order: dataset -> general -> default (the dataclass default).
    for key in GENERAL_KEYS:
        if key not in values:
            values[key] = getattr(general, key)
    if is_video:
        if "target_frames" in values:
            values["target_frames"] = normalize_target_frames(values["target_frames"], where=f"{where} key 'target_frames'")
    if "cache_directory" not in values:
        values["cache_directory"] = values[sources[0]]
    return cls(index=index, **values)


def _check_unique_cache_dirs(datasets, source: str) -> None:
    seen: dict[str, int] = {}
    for ds in datasets:
        key = os.path.normcase(ds.cache_directory or "")
        if key in seen:
            raise invalid(f"dataset config {source} [[datasets]] #{ds.index} key 'cache_directory'", ds.cache_directory,
                          f"a folder not used by dataset #{seen[key]} (each dataset needs its own cache directory)")
        seen[key] = ds.index


# --- builders for the in-graph nodes ---------------------------------------------------------------------------------

def dataset_from_folder(folder: str | os.PathLike, *, kind: str = "auto", caption_extension: str = ".txt",
                        resolution: int | tuple[int, int] = DEFAULT_RESOLUTION, batch_size: int = 1,
                        num_repeats: int = 1, enable_bucket: bool = True, bucket_no_upscale: bool = False,
                        cache_directory: str | None = None, **video_options) -> DatasetConfig:
    """One image or video dataset from a folder ("Dataset from Folder" node); same validation as the TOML path.

    `kind="auto"` picks video when the folder holds any video file. `video_options` are the video keys
    (target_frames, frame_extraction, ...)."""
    from .media import VIDEO_EXTENSIONS

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise invalid("dataset folder", str(folder), "an existing folder")
    if kind == "auto":
        kind = "video" if any(p.suffix.lower() in VIDEO_EXTENSIONS for p in folder.iterdir()) else "image"
    if kind not in ("image", "video"):
        raise invalid("dataset kind", kind, "'auto', 'image' or 'video'")
    entry: dict[str, Any] = {f"{kind}_directory": str(folder), "caption_extension": caption_extension,
                             "resolution": list(resolution) if isinstance(resolution, tuple) else resolution,
                             "batch_size": batch_size, "num_repeats": num_repeats, "enable_bucket": enable_bucket,
                             "bucket_no_upscale": bucket_no_upscale, **video_options}
    if cache_directory:
        entry["cache_directory"] = str(cache_directory)
    return parse_dataset_config({"datasets": [entry]}, f"<folder {folder}>", folder)


def dataset_from_tensors(frames, captions: list[str], cache_directory: str | os.PathLike, *,
                         resolution: int | tuple[int, int] = DEFAULT_RESOLUTION, batch_size: int = 1,
                         num_repeats: int = 1, enable_bucket: bool = True, bucket_no_upscale: bool = False,
                         fp_latent_window_size: int = 9) -> DatasetConfig:
    """An in-memory dataset ("Dataset from Images" node).

    `frames`: a float tensor [N, H, W, 3] in 0..1 (N images, one caption each), or a list of clips, each
    [F, H, W, 3] (one caption per clip; each clip is used whole, trimmed to 4k+1 frames)."""
    import numpy as np
    import torch

    clips = list(frames) if isinstance(frames, (list, tuple)) else None
    images = frames if clips is None else None
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise invalid("images", getattr(images, "shape", type(images).__name__), "a tensor [N, H, W, 3] in 0..1")
        clips = [images[i:i + 1] for i in range(images.shape[0])]
    if len(captions) != len(clips):
        raise invalid("captions", f"{len(captions)} captions for {len(clips)} {'images' if images is not None else 'clips'}",
                      "one caption each")
    items = []
    for i, (clip, caption) in enumerate(zip(clips, captions)):
        if not isinstance(clip, torch.Tensor) or clip.ndim != 4 or clip.shape[-1] not in (3, 4) or clip.shape[0] < 1:
            raise invalid(f"clip #{i}", getattr(clip, "shape", type(clip).__name__), "a tensor [F, H, W, 3] in 0..1")
        if not isinstance(caption, str):
            raise invalid(f"caption #{i}", caption, "a string")
        if images is None and round_down_4k1(clip.shape[0]) != clip.shape[0]:
            warnings.warn(f"clip #{i}: {clip.shape[0]} frames is not 4k+1; using the first "
                          f"{round_down_4k1(clip.shape[0])}", stacklevel=2)
        arr = (clip[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        items.append(InMemoryItem(name=f"item{i:05d}", frames=np.ascontiguousarray(arr), caption=caption))
    res = _check(_resolution, list(resolution) if isinstance(resolution, tuple) else resolution, "resolution")
    common = dict(resolution=res, batch_size=_check(_int, batch_size, "batch_size"),
                  num_repeats=_check(_int, num_repeats, "num_repeats"), enable_bucket=enable_bucket,
                  bucket_no_upscale=bucket_no_upscale, cache_directory=str(Path(cache_directory).resolve()),
                  in_memory=items, fp_latent_window_size=_check(_int, fp_latent_window_size, "fp_latent_window_size"))
    if images is not None:
        ds = ImageDatasetConfig(**common)
    else:
        ds = VideoDatasetConfig(**common, frame_extraction="full", max_frames=max(c.frames.shape[0] for c in items))
    return DatasetConfig(GeneralConfig(), [ds], "<in-memory dataset>")


def settings_for_cache(ds: ImageDatasetConfig | VideoDatasetConfig) -> dict:
    """The dataset settings that change cached latents (manifest field; a change recomputes latents)."""
    out = {"resolution": list(ds.resolution), "enable_bucket": ds.enable_bucket,
           "bucket_no_upscale": ds.bucket_no_upscale, "kind": ds.kind}
    if isinstance(ds, VideoDatasetConfig):
        out.update(target_frames=list(ds.target_frames), frame_extraction=ds.frame_extraction,
                   frame_stride=ds.frame_stride, frame_sample=ds.frame_sample, max_frames=ds.max_frames,
                   source_fps=ds.source_fps)
    return out


__all__ = ["DatasetConfig", "GeneralConfig", "ImageDatasetConfig", "VideoDatasetConfig", "InMemoryItem",
           "load_dataset_config", "parse_dataset_config", "dataset_from_folder", "dataset_from_tensors",
           "settings_for_cache"]
