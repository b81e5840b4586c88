"""The items of a dataset: which media file (or in-memory frames) goes with which caption and control.

Listing is cheap (directory scans, stat, caption reads); media are decoded later by the cache builder.
Missing captions: an image without one is skipped with a visible warning (Musubi skips silently); a video without
one is an error naming the file (Musubi fails later, mid-caching).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import invalid
from .config import ImageDatasetConfig, VideoDatasetConfig
from .media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

DEFAULT_CAPTION_EXTENSION = ".txt"


class DatasetWarning(UserWarning):
    """A dataset item was skipped or adjusted (shown to the user, never silent)."""


@dataclass
class SourceItem:
    key: str                     # unique within its dataset; the stem of its cache files
    kind: str                    # "image" | "video"
    caption: str
    path: Path | None = None     # image / video file or image folder; None for in-memory items
    control_paths: list[Path] = field(default_factory=list)
    frames: np.ndarray | None = field(default=None, repr=False)  # in-memory [F, H, W, 3] uint8

    def fingerprint(self) -> dict:
        """What identifies the media content: size + mtime of the files (content hash for in-memory frames)."""
        if self.frames is not None:
            return {"sha1": hashlib.sha1(self.frames.tobytes()).hexdigest(), "shape": list(self.frames.shape)}
        return {"media": _stat(self.path), "control": [_stat(p) for p in self.control_paths]}

    def caption_hash(self) -> str:
        return hashlib.sha1(self.caption.encode("utf-8")).hexdigest()


def _stat(p: Path) -> list:
    if p.is_dir():  # image folder as video: every frame file counts
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()]
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def list_items(ds: ImageDatasetConfig | VideoDatasetConfig) -> list[SourceItem]:
    """Every usable item of a dataset, sorted by key."""
    if ds.in_memory is not None:
        items = [SourceItem(key=m.name, kind=ds.kind, caption=m.caption, frames=m.frames) for m in ds.in_memory]
        _warn_empty_captions(ds, items)
        return items
    jsonl = ds.image_jsonl_file if ds.kind == "image" else ds.video_jsonl_file
    items = _from_jsonl(ds, Path(jsonl)) if jsonl else _from_directory(ds)
    _warn_empty_captions(ds, items)
    if not items:
        raise invalid(f"dataset #{ds.index} ({ds.source})", "no usable items",
                      f"{ds.kind} files with captions ({ds.caption_extension or DEFAULT_CAPTION_EXTENSION})")
    return _unique_keys(items)


def _warn_empty_captions(ds, items: list[SourceItem]) -> None:
    """An empty caption trains the item unconditioned (as Musubi does); usually a forgotten file, so say so."""
    empty = [str(it.path or it.key) for it in items if not it.caption.strip()]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        warnings.warn(f"dataset #{ds.index}: {len(empty)} item(s) with an empty caption (trained without a prompt): "
                      f"{shown}", DatasetWarning, stacklevel=3)


def _from_directory(ds) -> list[SourceItem]:
    folder = Path(ds.source)
    if not folder.is_dir():
        raise invalid(f"dataset #{ds.index} {ds.kind}_directory", str(folder), "an existing folder")
    ext = ds.caption_extension or DEFAULT_CAPTION_EXTENSION
    control_dir = Path(ds.control_directory) if ds.control_directory else None
    media = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in (IMAGE_EXTENSIONS if ds.kind == "image" else VIDEO_EXTENSIONS):
            media.append(p)
        elif ds.kind == "video" and p.is_dir() and p != control_dir and any(
                f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir()):
            media.append(p)  # a folder of frames
    items = []
    for p in media:
        cap_path = (p.parent / (p.name + ext)) if p.is_dir() else p.with_suffix(ext)
        if not cap_path.is_file():
            if ds.kind == "image":
                warnings.warn(f"dataset #{ds.index}: image {p} has no caption file {cap_path.name}; skipped",
                              DatasetWarning, stacklevel=3)
                continue
            raise invalid(f"dataset #{ds.index} video {p}", f"no caption file {cap_path.name}",
                          f"a caption file next to every video ({cap_path})")
        caption = read_text_file(cap_path, f"dataset #{ds.index} caption file").strip()
        controls = _find_controls(ds, p, control_dir) if control_dir else []
        items.append(SourceItem(key=p.stem if p.is_file() else p.name, kind=ds.kind, caption=caption, path=p,
                                control_paths=controls))
    return items


def read_text_file(path: Path, what: str) -> str:
    """UTF-8 text; a leading byte-order mark (Windows Notepad) is dropped rather than kept in the caption.

    Other encodings (cp1252, UTF-16) are refused naming the file: guessing would silently train on mojibake."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        warnings.warn(f"{what} {path} starts with a UTF-8 byte-order mark (Notepad); it was removed, not trained on",
                      DatasetWarning, stacklevel=3)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise invalid(f"{what} {path}", f"byte {data[e.start:e.start + 1]!r} at offset {e.start} is not UTF-8",
                      "a UTF-8 text file (re-save it as UTF-8)") from None


def _find_controls(ds, media: Path, control_dir: Path) -> list[Path]:
    stem = media.stem if media.is_file() else media.name
    if ds.kind == "image":
        # <stem>.<any image ext>, then numbered <stem>_0 / <stem>_0000 ...; the un-numbered one first.
        pattern = re.compile(re.escape(stem) + r"(_\d+)?$")
        found = sorted((p for p in control_dir.iterdir()
                        if p.suffix.lower() in IMAGE_EXTENSIONS and pattern.match(p.stem)),
                       key=lambda p: (p.stem != stem, p.stem))
    else:
        candidates = [control_dir / media.name, control_dir / stem] + [control_dir / (stem + e) for e in VIDEO_EXTENSIONS]
        found = [next((c for c in candidates if c.exists()), None)]
        found = [f for f in found if f is not None]
    if not found:
        raise invalid(f"dataset #{ds.index} {ds.kind} {media}", "no control file",
                      f"a control {ds.kind} named {stem}.* in {control_dir}")
    return found


def _from_jsonl(ds, path: Path) -> list[SourceItem]:
    if not path.is_file():
        raise invalid(f"dataset #{ds.index} {ds.kind}_jsonl_file", str(path), "an existing JSONL file")
    media_key = f"{ds.kind}_path"
    items = []
    for n, line in enumerate(read_text_file(path, f"dataset #{ds.index} {ds.kind}_jsonl_file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise invalid(where, line[:80], f"one JSON object per line ({e})") from e
        if not isinstance(entry, dict) or not isinstance(entry.get(media_key), str):
            raise invalid(where, entry, f"an object with a {media_key!r} string")
        caption = entry.get("caption")
        if not isinstance(caption, str):
            raise invalid(f"{where} 'caption'", caption, "a caption string")
        media = _resolve(path, entry[media_key])
        if not media.exists():
            raise invalid(f"{where} {media_key!r}", str(media), "an existing file")
        controls = []
        if "control_path" in entry:
            controls.append(_resolve(path, entry["control_path"]))
        i = 0
        while f"control_path_{i}" in entry:
            controls.append(_resolve(path, entry[f"control_path_{i}"]))
            i += 1
        for c in controls:
            if not c.exists():
                raise invalid(f"{where} control path", str(c), "an existing file")
        items.append(SourceItem(key=media.stem if media.is_file() else media.name, kind=ds.kind, caption=caption.strip(),
                                path=media, control_paths=controls))
    return items


def _resolve(jsonl: Path, value) -> Path:
    if not isinstance(value, str):
        raise invalid(f"{jsonl} path", value, "a path string")
    return (jsonl.parent / Path(value).expanduser()).resolve()


def _unique_keys(items: list[SourceItem]) -> list[SourceItem]:
    """Same stem in different folders (JSONL) -> append a short hash of the path so cache files never collide."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.key] = counts.get(it.key, 0) + 1
    for it in items:
        if counts[it.key] > 1:
            it.key = f"{it.key}-{hashlib.sha1(str(it.path).encode()).hexdigest()[:8]}"
    return sorted(items, key=lambda it: it.key)
