"""Latent and text caches on disk: build (incrementally, resumably), validate for a model, read memory-mapped.

Layout of a dataset's cache directory (names follow Musubi Tuner; `<key>` is the file stem,
made unique with a short path hash when two JSONL entries share a stem):

    <key>_<W:04d>x<H:04d>_<arch>.safetensors                       image latents (W, H = original size)
    <key>_<start:05d>-<T:03d>_<W:04d>x<H:04d>_<arch>.safetensors     one video clip's latents
    <key>_<arch>_te.safetensors                                    text encoder output (one per item)
    musubi_cache_<arch>.json                                       the manifest (this module's own addition)

The manifest records, per part, a description of what produced it (encoder identities, options, dataset settings)
and per item the source fingerprint (file size + mtime, or a content hash for in-memory frames), the caption hash
and the files written. An item's latents are recomputed when its media, the latent encoders or the dataset settings
change; its text cache only when its caption or the text encoder changes. The manifest is rewritten (atomically)
after every item, so an interrupted run keeps everything finished so far and the next run resumes. Files that no
longer belong to the dataset are deleted at the end of a complete run unless `keep_cache=True` (only files whose
names end in `_<arch>.safetensors` / `_<arch>_te.safetensors`: the cache directory may be the media folder).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..atomic import save_safetensors_atomic, write_json_atomic
from ..errors import invalid
from .encoding import CacheAdapter, CacheRequirements, Clip, OneFrameSpec, collate_for, strip_key
from .buckets import STEP, resize_and_crop, select_bucket
from .config import DatasetConfig, settings_for_cache
from .frames import extract_clips, frames_needed
from .items import DatasetWarning, SourceItem, list_items
from .media import image_size, load_image, read_video, video_first_frame_size

MANIFEST_VERSION = 1
FORMAT_VERSION = "1.0.1"  # Musubi's latent-file metadata version

Progress = Callable[[int, int], None]


def manifest_path(cache_dir: str | Path, arch: str) -> Path:
    return Path(cache_dir) / f"musubi_cache_{arch}.json"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --- preparing clips (runs in worker threads) ------------------------------------------------------------------------

@dataclass
class PreparedClip:
    file: str                  # cache file name
    start: int
    frames: int                # T (pixel frames)
    bucket: tuple[int, int]    # (W, H)
    clip: Clip


def cache_settings(ds) -> dict:
    """`settings_for_cache` plus the one-frame settings of image datasets that use them (manifest field)."""
    out = settings_for_cache(ds)
    if getattr(ds, "kind", None) == "image":
        res = getattr(ds, "control_resolution", None)
        extra = {"fp_1f_clean_indices": getattr(ds, "fp_1f_clean_indices", None),
                 "fp_1f_target_index": getattr(ds, "fp_1f_target_index", None),
                 "no_resize_control": getattr(ds, "no_resize_control", False),
                 "control_resolution": None if res is None else list(res)}
        if extra["fp_1f_target_index"] is not None or extra["fp_1f_clean_indices"] is not None:
            out["one_frame"] = _jsonable(extra)  # only then: other datasets keep their existing cache keys
    return out


def prepare_item(item: SourceItem, ds, target_fps: float, arch: str, adapter=None) -> list[PreparedClip]:
    """Decode one item, extract its clips, put each into its bucket. Pure CPU work (thread-pool safe).

    One-frame datasets (the adapter's `one_frame_spec`, a family rule) give one clip whose `Clip.controls` holds the
    control images, each sized by the adapter's `one_frame_control`."""
    if item.frames is not None:
        video = item.frames
    elif item.kind == "image":
        video = load_image(item.path)[None]
    else:
        need = frames_needed(ds.frame_extraction, ds.target_frames, ds.max_frames)
        video = read_video(item.path, max_frames=need, source_fps=ds.source_fps, target_fps=target_fps)
    H, W = video.shape[1:3]                                          # original size (names the files)
    bucket = select_bucket((W, H), ds.resolution, ds.enable_bucket, ds.bucket_no_upscale,
                           step=getattr(adapter, "bucket_step", STEP))
    if item.kind == "image":
        spans = [(0, 1)]
    else:
        spans = extract_clips(len(video), ds.frame_extraction, ds.target_frames, ds.frame_stride, ds.frame_sample,
                              ds.max_frames)
        if not spans:
            warnings.warn(f"dataset #{ds.index}: video {item.path or item.key} has {len(video)} frames, fewer than "
                          f"every target_frames {ds.target_frames}; skipped", DatasetWarning, stacklevel=2)
        elif ds.frame_extraction == "full" and spans[0][1] != min(len(video), ds.max_frames):
            warnings.warn(f"dataset #{ds.index}: video {item.path or item.key}: {min(len(video), ds.max_frames)} "
                          f"frames is not 4k+1; using the first {spans[0][1]}", DatasetWarning, stacklevel=2)
    spec = _one_frame_spec(adapter, ds) if item.control_paths else None
    if spec is not None:
        if len(item.control_paths) != len(spec.clean_indices):
            raise invalid(f"dataset #{ds.index} image {item.path or item.key} fp_1f_clean_indices",
                          list(spec.clean_indices), f"one index per control image ({len(item.control_paths)} found: "
                          f"{[p.name for p in item.control_paths]})")
        frames = resize_and_crop(video[:1], bucket)
        controls = [adapter.one_frame_control(p, ds, bucket) for p in item.control_paths]
        name = f"{item.key}_{W:04d}x{H:04d}_{arch}.safetensors"
        return [PreparedClip(name, 0, 1, bucket, Clip(frames, None, controls, spec))]
    control = _load_control(item, ds, bucket, len(video), target_fps) if item.control_paths else None
    out = []
    for start, T in spans:
        frames = resize_and_crop(video[start:start + T], bucket)
        ctrl = control[start:start + T] if control is not None else None
        if item.kind == "image":
            name = f"{item.key}_{W:04d}x{H:04d}_{arch}.safetensors"
        else:
            name = f"{item.key}_{start:05d}-{T:03d}_{W:04d}x{H:04d}_{arch}.safetensors"
        out.append(PreparedClip(name, start, T, bucket, Clip(frames, ctrl)))
    return out


def _one_frame_spec(adapter, ds) -> OneFrameSpec | None:
    rule = getattr(adapter, "one_frame_spec", None)
    return rule(ds) if rule is not None else None


def _load_control(item: SourceItem, ds, bucket, length: int, target_fps: float) -> np.ndarray:
    """Control frames in the same bucket, truncated or padded (last frame repeated) to the video's length."""
    p = item.control_paths[0]
    if item.kind == "image":
        ctrl = load_image(p)[None]
    else:
        ctrl = read_video(p, max_frames=length, source_fps=getattr(ds, "source_fps", None), target_fps=target_fps)
    ctrl = resize_and_crop(ctrl, bucket)
    if len(ctrl) < length:
        ctrl = np.concatenate([ctrl, np.repeat(ctrl[-1:], length - len(ctrl), axis=0)])
    return ctrl[:length]


def _probe(item: SourceItem) -> None:
    """Cheap check that an item's media can be read at all and is big enough (before any encoder runs)."""
    if item.frames is not None:
        w, h = item.frames.shape[2], item.frames.shape[1]
    elif item.kind == "image":
        w, h = image_size(item.path)
    else:
        w, h = video_first_frame_size(item.path)
    if w < STEP or h < STEP:
        raise invalid(f"{item.kind} {item.path or item.key}", f"{w}x{h} pixels", f"at least {STEP}x{STEP} pixels")


# --- building ----------------------------------------------------------------------------------------------------------

@dataclass
class CacheReport:
    latents_encoded: list[str] = field(default_factory=list)   # item keys whose latents were (re)computed
    texts_encoded: list[str] = field(default_factory=list)     # item keys whose text cache was (re)computed
    clips_written: int = 0
    removed_files: list[str] = field(default_factory=list)
    items: int = 0


def build_cache(config: DatasetConfig, adapter: CacheAdapter, *, keep_cache: bool = False, num_workers: int = 2,
                text_batch_size: int = 8, progress: Progress | None = None) -> CacheReport:
    """Bring every dataset's cache up to date for `adapter` (see module docstring).

    `progress(done, total)` is called after each unit of work (one item's latents or one text batch's items); it
    may raise to cancel: whatever was finished stays valid and the next call resumes."""
    report = CacheReport()
    plans = [_plan_dataset(ds, adapter) for ds in config.datasets]      # validates everything before heavy work
    total = sum(len(p.latent_todo) + len(p.text_todo) for p in plans)
    done = [0]

    def tick(n: int = 1):
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    for plan in plans:
        report.items += len(plan.items)
        _run_latents(plan, adapter, num_workers, report, tick)
        _run_texts(plan, adapter, text_batch_size, report, tick)
        _finish(plan, adapter, keep_cache, report)
    return report


@dataclass
class _Plan:
    ds: object
    cache_dir: Path
    items: list[SourceItem]
    manifest: dict
    latent_desc: dict | None
    text_desc: dict | None
    latent_todo: list[SourceItem]
    text_todo: list[SourceItem]


def read_manifest(cache_dir: Path, arch: str) -> dict | None:
    path = manifest_path(cache_dir, arch)
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if m.get("version") != MANIFEST_VERSION or m.get("arch") != arch or not isinstance(m.get("items"), dict):
            raise ValueError("unknown manifest version")
        return m
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"cache manifest {path} unreadable ({e}); the cache is rebuilt", DatasetWarning, stacklevel=3)
        return None


def _plan_dataset(ds, adapter: CacheAdapter) -> _Plan:
    cache_dir = Path(ds.cache_directory)
    items = list_items(ds)
    manifest = read_manifest(cache_dir, adapter.arch) or {"version": MANIFEST_VERSION, "arch": adapter.arch,
                                                          "items": {}}
    latent_desc = adapter.latent_description()
    if latent_desc is not None:
        per_dataset = getattr(adapter, "dataset_latent_description", None)   # optional: what this dataset adds
        latent_desc = {**latent_desc, **(per_dataset(ds) if per_dataset is not None else {}),
                       "settings": cache_settings(ds), "target_fps": adapter.target_fps}
        latent_desc["key"] = _digest(latent_desc)
    text_desc = adapter.text_description()
    if text_desc is not None:
        text_desc = {**text_desc, "key": _digest(text_desc)}
    latent_todo, text_todo = [], []
    for it in items:
        entry = manifest["items"].get(it.key, {})
        if latent_desc is not None and not _latents_valid(entry.get("latents"), it, latent_desc["key"], cache_dir):
            latent_todo.append(it)
        if text_desc is not None and not _text_valid(entry.get("text"), it, text_desc["key"], cache_dir):
            text_todo.append(it)
    if latent_desc is not None and items and any(it.control_paths for it in items):
        _one_frame_spec(adapter, ds)  # refuse bad one-frame keys before any encoding
    for it in latent_todo:
        _probe(it)
    return _Plan(ds, cache_dir, items, manifest, latent_desc, text_desc, latent_todo, text_todo)


def _latents_valid(entry: dict | None, item: SourceItem, key: str, cache_dir: Path) -> bool:
    return (bool(entry) and entry.get("key") == key and entry.get("fingerprint") == _jsonable(item.fingerprint())
            and all((cache_dir / c["file"]).is_file() for c in entry.get("clips", [])))


def _text_valid(entry: dict | None, item: SourceItem, key: str, cache_dir: Path) -> bool:
    return (bool(entry) and entry.get("key") == key and entry.get("caption_hash") == item.caption_hash()
            and (cache_dir / entry.get("file", "")).is_file())


def _jsonable(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists, so it compares equal to what was read back


def _write_manifest(plan: _Plan) -> None:
    write_json_atomic(manifest_path(plan.cache_dir, plan.manifest["arch"]), plan.manifest)


def _prefetch(fn, items: list, workers: int) -> Iterator:
    """Yield fn(item) in order while up to 2*workers later items are prepared in background threads."""
    if workers <= 0:
        for it in items:
            yield it, fn(it)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="musubi-decode")
    try:
        window = 2 * workers
        futures = [pool.submit(fn, it) for it in items[:window]]
        for i, it in enumerate(items):
            if i + window < len(items):
                futures.append(pool.submit(fn, items[i + window]))
            yield it, futures[i].result()  # re-raises the worker's exception (named MusubiInputError)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_latents(plan: _Plan, adapter: CacheAdapter, workers: int, report: CacheReport, tick) -> None:
    if plan.latent_desc is None:
        return
    plan.manifest["latent"] = {k: v for k, v in plan.latent_desc.items()}
    ds = plan.ds
    prepare = lambda it: prepare_item(it, ds, adapter.target_fps, adapter.arch, adapter)  # noqa: E731
    for item, clips in _prefetch(prepare, plan.latent_todo, workers):
        records = []
        for pc in clips:
            split = getattr(adapter, "encode_clip_files", None)   # a family that stores a clip as several files
            files = split(pc.file, pc.clip, ds) if split is not None else {pc.file: adapter.encode_clip(pc.clip)}
            for name, tensors in files.items():
                _check_finite(tensors, f"latents of {item.path or item.key}")
                meta = {"architecture": adapter.arch, "width": str(pc.bucket[0]), "height": str(pc.bucket[1]),
                        "format_version": FORMAT_VERSION}
                if item.kind == "video":
                    meta["frame_count"] = str(pc.frames)
                save_safetensors_atomic(tensors, plan.cache_dir / name, metadata=meta)
                records.append({"file": name, "start": pc.start, "frames": pc.frames, "bucket": list(pc.bucket)})
                report.clips_written += 1
        entry = plan.manifest["items"].setdefault(item.key, {})
        entry["latents"] = {"key": plan.latent_desc["key"], "fingerprint": _jsonable(item.fingerprint()),
                            "clips": records}
        _write_manifest(plan)
        report.latents_encoded.append(item.key)
        tick()


def _run_texts(plan: _Plan, adapter: CacheAdapter, batch_size: int, report: CacheReport, tick) -> None:
    if plan.text_desc is None:
        return
    plan.manifest["text"] = dict(plan.text_desc)
    todo = plan.text_todo
    for i in range(0, len(todo), max(1, batch_size)):
        chunk = todo[i:i + batch_size]
        outputs = adapter.encode_texts([it.caption for it in chunk])
        for item, tensors in zip(chunk, outputs):
            _check_finite(tensors, f"text encoding of {item.path or item.key}")
            name = f"{item.key}_{adapter.arch}_te.safetensors"
            save_safetensors_atomic(tensors, plan.cache_dir / name,
                                    metadata={"architecture": adapter.arch, "caption1": item.caption,
                                              "format_version": FORMAT_VERSION})
            plan.manifest["items"].setdefault(item.key, {})["text"] = {
                "key": plan.text_desc["key"], "caption_hash": item.caption_hash(), "file": name}
            report.texts_encoded.append(item.key)
        _write_manifest(plan)
        tick(len(chunk))


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    # Musubi silently replaces NaNs by 0; a NaN here means a broken encoder (e.g. fp16 overflow): say so.
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise invalid(what, f"non-finite values in {k}", "finite encoder outputs (try another VAE/encoder dtype)")


def _finish(plan: _Plan, adapter: CacheAdapter, keep_cache: bool, report: CacheReport) -> None:
    """After a complete run: drop entries and files that no longer belong to the dataset (unless keep_cache)."""
    current = {it.key for it in plan.items}
    if not keep_cache:
        for key in [k for k in plan.manifest["items"] if k not in current]:
            del plan.manifest["items"][key]
    _write_manifest(plan)
    if keep_cache:
        return
    referenced = set()
    for entry in plan.manifest["items"].values():
        referenced.update(c["file"] for c in entry.get("latents", {}).get("clips", []))
        if "text" in entry:
            referenced.add(entry["text"]["file"])
    ours = (f"_{adapter.arch}.safetensors", f"_{adapter.arch}_te.safetensors")
    for p in plan.cache_dir.iterdir():
        leftover_tmp = p.name.startswith(".") and p.name.endswith(".tmp") and any(s in p.name for s in ours)
        if (p.is_file() and p.name.endswith(ours) and p.name not in referenced) or leftover_tmp:
            p.unlink()
            report.removed_files.append(p.name)


# --- reading -----------------------------------------------------------------------------------------------------------

def load_cache_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one cache file under their batch names (memory-mapped read through safe_open)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {strip_key(k): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # OSError, or safetensors' raises its own error types for corrupt files
        raise invalid(f"cache file {path}", f"unreadable ({type(e).__name__}: {e})",
                      "a complete cache file (build the cache again)") from e


@dataclass
class CachedSample:
    key: str
    latent_file: Path
    text_file: Path | None
    bucket: tuple[int, int, int]   # (W, H, T): samples batch together only with equal buckets

    def load(self) -> dict[str, torch.Tensor]:
        out = load_cache_file(self.latent_file)
        if self.text_file is not None:
            out.update(load_cache_file(self.text_file))
        return out


@dataclass
class CachedDataset:
    """A dataset's validated cache: what the trainer's loader iterates over."""

    arch: str
    samples: list[CachedSample]
    batch_size: int
    num_repeats: int
    cache_dir: Path
    text_arch: str | None = None           # the manifest of its text cache when not `arch`'s own

    @property
    def collate(self):
        return collate_for(self.arch)


def check_cache_for_model(config: DatasetConfig, req: CacheRequirements) -> list[CachedDataset]:
    """Refuse (MusubiInputError, with what to do) a dataset whose cache does not fit the model; else index it.

    Checks per dataset: a manifest for `req.arch`; encoder identities (where `req.identities` names them); every
    current item cached with the current media/caption/settings; the channels / text dim of the stored tensors."""
    out = []
    for ds in config.datasets:
        where = f"dataset #{ds.index} ({ds.source or 'in-memory'}) cache {ds.cache_directory}"
        cache_dir = Path(ds.cache_directory)
        m = read_manifest(cache_dir, req.arch)
        if m is None or "latent" not in m:
            raise invalid(where, "no latent cache", f"a {req.arch} cache: run the cache step for this dataset first"
                          + _other_caches(cache_dir, req.arch))
        # the text part: in the latent manifest, or in the one of `req.text_arch` (shared by several latent arches)
        tm = m if req.text_arch in (None, req.arch) else read_manifest(cache_dir, req.text_arch) or {}
        if "text" not in tm:
            raise invalid(where, "no text-encoder cache",
                          f"a {req.text_arch or req.arch} text cache: run the text caching step")
        for name, ident in (req.identities or {}).items():
            found = m["latent"].get(name, tm["text"].get(name))
            if found != ident:
                raise invalid(f"{where} encoder {name!r}", found, f"{ident} (the model's encoder; re-run caching)")
        if cache_settings(ds) != m["latent"].get("settings"):
            raise invalid(where, f"built with {m['latent'].get('settings')}",
                          f"the dataset's current settings {cache_settings(ds)} (re-run caching)")
        samples = []
        stale = []
        for it in list_items(ds):
            entry, text = m["items"].get(it.key, {}), tm["items"].get(it.key, {}).get("text")
            if not (_latents_valid(entry.get("latents"), it, m["latent"]["key"], cache_dir)
                    and _text_valid(text, it, tm["text"]["key"], cache_dir)):
                stale.append(it.key)
                continue
            text_file = cache_dir / text["file"]
            for c in entry["latents"]["clips"]:
                samples.append(CachedSample(it.key, cache_dir / c["file"], text_file, (*c["bucket"], c["frames"])))
        if stale:
            raise invalid(where, f"{len(stale)} items missing or out of date (e.g. {stale[:3]})",
                          "a cache built from the current files and captions (re-run caching)")
        if not samples:
            raise invalid(where, "no cached clips", "at least one clip (are the videos shorter than target_frames?)")
        _check_sample_shapes(samples[0], req, where)
        out.append(CachedDataset(req.arch, samples, ds.batch_size, ds.num_repeats, cache_dir,
                                 req.text_arch if req.text_arch not in (None, req.arch) else None))
    return out


def _other_caches(cache_dir: Path, arch: str) -> str:
    """` (found: wan22_5b)` when the folder holds caches of other architectures (made with another VAE)."""
    found = sorted(p.name[len("musubi_cache_"):-len(".json")] for p in cache_dir.glob("musubi_cache_*.json"))
    found = [a for a in found if a != arch]
    return f" (this folder holds {', '.join(found)} caches: made with another VAE)" if found else ""


def _check_sample_shapes(sample: CachedSample, req: CacheRequirements, where: str) -> None:
    tensors = sample.load()
    for name in req.required:
        if name not in tensors:
            raise invalid(f"{where} file {sample.latent_file.name}", f"no {name!r} tensor (has {sorted(tensors)})",
                          f"a cache with {name!r} (re-run caching with the model's options, e.g. I2V/CLIP/control)")
    if tensors["latents"].shape[0] != req.latent_channels:
        raise invalid(f"{where} latents", tuple(tensors["latents"].shape), f"{req.latent_channels} latent channels")
    for name, ch in (req.channels or {}).items():
        if name in req.required and tensors[name].shape[0] != ch:
            raise invalid(f"{where} {name}", tuple(tensors[name].shape), f"{ch} channels")
    if req.text_dim is not None:
        text = [v for k, v in tensors.items() if k == req.text_key]
        if text and text[0].shape[-1] != req.text_dim:
            raise invalid(f"{where} text encoding", tuple(text[0].shape), f"last dimension {req.text_dim} (the "
                          "model's text_dim: cache with the matching text encoder)")


__all__ = ["build_cache", "CacheReport", "check_cache_for_model", "CachedDataset", "CachedSample", "load_cache_file",
           "read_manifest", "manifest_path", "prepare_item", "PreparedClip", "cache_settings"]
