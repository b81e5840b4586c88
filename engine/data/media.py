"""Reading images and videos into uint8 RGB arrays.

Images go through Pillow, videos through PyAV (decoding stops as soon as enough frames are kept), and a folder of
images is read as a video (files sorted by name). Frames come back as numpy uint8 [F, H, W, 3].
Unreadable files raise `MusubiInputError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import invalid
from .frames import keep_frame

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: str | os.PathLike) -> bool:
    """A video file, or a folder of images read as a video."""
    p = Path(path)
    return p.suffix.lower() in VIDEO_EXTENSIONS or p.is_dir()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """[H, W, 3] uint8 RGB, whatever the Pillow mode (see `to_rgb8`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError for truncated data, ...)
        raise invalid(f"image {path}", f"unreadable ({type(e).__name__}: {e})", "a valid png/jpg/webp/bmp image") from e


# Transparent pixels are composited on white: what image viewers and browsers show for a transparent image, and
# the colour hidden under alpha=0 (often black or garbage) is never what the author meant to train on.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb8(im) -> np.ndarray:
    """A Pillow image as [H, W, 3] uint8 RGB.

    * 16/32-bit integer greyscale (`I;16*`, `I`): scaled from 0..65535 to 0..255 (`convert("RGB")` would clip
      them, turning almost every pixel white); `F` (float) is read as 0..1.
    * anything with alpha (`RGBA`, `LA`, `PA`, palette or greyscale with a transparent colour): composited on
      `ALPHA_BACKGROUND` (white).
    * palette, CMYK, YCbCr, LAB, 1-bit, greyscale: Pillow's own conversion to RGB.
    """
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        g = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        g = np.clip(np.rint(np.asarray(im, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) from the header only; also proves the file is an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # checks the file structure without decoding all pixels
            return im.size
    except Exception as e:
        raise invalid(f"image {path}", f"unreadable ({type(e).__name__}: {e})", "a valid png/jpg/webp/bmp image") from e


def image_folder_files(folder: str | os.PathLike) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise invalid(f"video folder {folder}", "no image files", f"images ({', '.join(IMAGE_EXTENSIONS)}) as frames")
    return files


def video_first_frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) of the first frame (the bucket of a video is decided from it)."""
    frames = read_video(path, max_frames=1)
    return frames.shape[2], frames.shape[1]


def read_video(path: str | os.PathLike, max_frames: int | None = None, source_fps: float | None = None,
               target_fps: float | None = None) -> np.ndarray:
    """Frames [F, H, W, 3] uint8 of a video file or image folder, after `source_fps` -> `target_fps` dropping.

    Decoding stops once `max_frames` frames have been kept."""
    p = Path(path)
    kept: list[np.ndarray] = []
    for i, frame in enumerate(_decoded_frames(p)):
        if not keep_frame(i, source_fps, target_fps):
            continue
        if kept and frame.shape != kept[0].shape:
            raise invalid(f"video {p} frame {i}", frame.shape[:2], f"the size of the first frame {kept[0].shape[:2]}")
        kept.append(frame)
        if max_frames is not None and len(kept) >= max_frames:
            break
    if not kept:
        raise invalid(f"video {p}", "no decodable frames", "a video with at least one frame")
    return np.stack(kept)


def _decoded_frames(p: Path):
    if p.is_dir():
        for f in image_folder_files(p):
            yield load_image(f)
        return
    import av

    try:
        container = av.open(str(p))
    except Exception as e:  # av.FFmpegError subclasses, FileNotFoundError, ...
        raise invalid(f"video {p}", f"unreadable ({type(e).__name__}: {e})", "a video file PyAV/FFmpeg can open") from e
    try:
        if not container.streams.video:
            raise invalid(f"video {p}", "no video stream", "a file with a video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except Exception as e:
            raise invalid(f"video {p}", f"corrupt ({type(e).__name__}: {e})", "a decodable video") from e
    finally:
        container.close()


def video_fps(path: str | os.PathLike) -> float | None:
    """The container's average frame rate (None for image folders or when unknown)."""
    p = Path(path)
    if p.is_dir():
        return None
    import av

    try:
        with av.open(str(p)) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else None
    except Exception as e:
        raise invalid(f"video {p}", f"unreadable ({type(e).__name__}: {e})", "a video file PyAV/FFmpeg can open") from e
