"""Datasets and caches: TOML config, media reading, bucketing, frame extraction, caches, per-family adapters.

Flow: `load_dataset_config` (or `dataset_from_folder` / `dataset_from_tensors`) -> `build_cache(config, adapter)`
with the family's adapter (`WanCacheAdapter(vae=..., text_encoder=..., clip=...)`) -> the trainer calls
`check_cache_for_model(config, wan_cache_requirements(...))` and iterates `CachedBatchLoader(cached, seed)`.
"""

from .adapters import (ADAPTERS, CacheAdapter, CacheRequirements, Clip, WanCacheAdapter, strip_key,
                       wan_cache_requirements)
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
    "ADAPTERS", "CacheAdapter", "CacheRequirements", "Clip", "WanCacheAdapter", "strip_key", "wan_cache_requirements",
    "bucket_resolutions", "resize_and_crop", "select_bucket",
    "CachedDataset", "CachedSample", "CacheReport", "build_cache", "check_cache_for_model", "load_cache_file",
    "manifest_path", "read_manifest",
    "DatasetConfig", "GeneralConfig", "ImageDatasetConfig", "VideoDatasetConfig", "dataset_from_folder",
    "dataset_from_tensors", "load_dataset_config",
    "extract_clips", "kept_frame_indices", "normalize_target_frames", "round_down_4k1",
    "DatasetWarning", "SourceItem", "list_items", "CachedBatchLoader", "load_image", "read_video",
]
