"""Datasets and caches: TOML config, media reading, bucketing, frame extraction, caches (the family encodes).

Flow: `load_dataset_config` (or `dataset_from_folder` / `dataset_from_tensors`) -> `build_cache(config, adapter)`
with the family's adapter (`family.cache_adapter(vae=..., text_encoder=..., ...)`) -> the trainer calls
`check_cache_for_model(config, family.cache_requirements(model))` and iterates `CachedBatchLoader(cached, seed)`.
"""

from .encoding import CacheAdapter, CacheRequirements, Clip, OneFrameSpec, strip_key
from .buckets import bucket_resolutions, resize_and_crop, select_bucket
from .cache import (CachedDataset, CachedSample, CacheReport, build_cache, check_cache_for_model, load_cache_file,
                    manifest_path, read_manifest)
from .config import (DatasetConfig, GeneralConfig, ImageDatasetConfig, VideoDatasetConfig, dataset_from_folder,
                     dataset_from_tensors, load_dataset_config)
from .frames import extract_clips, kept_frame_indices, normalize_target_frames, round_down_4k1
from .items import DatasetWarning, SourceItem, list_items
from .loader import CachedBatchLoader
from .media import load_image, read_video

__all__ = [
    "CacheAdapter", "CacheRequirements", "Clip", "OneFrameSpec", "strip_key",
    "bucket_resolutions", "resize_and_crop", "select_bucket",
    "CachedDataset", "CachedSample", "CacheReport", "build_cache", "check_cache_for_model", "load_cache_file",
    "manifest_path", "read_manifest",
    "DatasetConfig", "GeneralConfig", "ImageDatasetConfig", "VideoDatasetConfig", "dataset_from_folder",
    "dataset_from_tensors", "load_dataset_config",
    "extract_clips", "kept_frame_indices", "normalize_target_frames", "round_down_4k1",
    "DatasetWarning", "SourceItem", "list_items", "CachedBatchLoader", "load_image", "read_video",
]
