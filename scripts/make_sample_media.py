"""Small deterministic sample media: PNG images, short mp4 videos (PyAV) and an image folder read as a video.

Content is simple on purpose so a LoRA can learn it quickly: a colored shape (circle or square) moving across a
plain background, and a caption that says which shape, color and direction.

    python scripts/make_sample_media.py OUT_DIR [--images 4] [--videos 2] [--size 128x96] [--frames 17]

Importable without side effects: `from scripts.make_sample_media import make_sample_dataset`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
BACKGROUNDS = [(235, 235, 230), (30, 30, 40)]
SHAPES = ("circle", "square")
DIRECTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "downwards": (0, 1), "upwards": (0, -1)}


def _scene(i: int) -> tuple[str, str, str, tuple]:
    shape = SHAPES[i % len(SHAPES)]
    color = list(COLORS)[i % len(COLORS)]
    direction = list(DIRECTIONS)[(i // 2) % len(DIRECTIONS)]
    return shape, color, direction, BACKGROUNDS[(i // 4) % len(BACKGROUNDS)]


def render_frame(width: int, height: int, shape: str, color: tuple, background: tuple, cx: float, cy: float,
                 radius: float) -> np.ndarray:
    """[H, W, 3] uint8: one shape centered at (cx, cy) on a plain background (anti-aliasing-free, exact)."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = background
    yy, xx = np.mgrid[0:height, 0:width]
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    else:
        inside = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    img[inside] = color
    return img


def render_clip(width: int, height: int, frames: int, index: int) -> tuple[np.ndarray, str]:
    """[F, H, W, 3] uint8 of scene `index` and its caption: the shape crosses the middle of the frame."""
    shape, color_name, direction, bg = _scene(index)
    dx, dy = DIRECTIONS[direction]
    radius = max(3.0, min(width, height) / 6)
    span_x, span_y = (width - 2 * radius) / 2, (height - 2 * radius) / 2
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        t = -1 + 2 * f / max(1, frames - 1)  # -1 .. 1
        out[f] = render_frame(width, height, shape, COLORS[color_name], bg, width / 2 + dx * t * span_x,
                              height / 2 + dy * t * span_y, radius)
    caption = f"a {color_name} {shape} moving {direction} on a {'light' if bg == BACKGROUNDS[0] else 'dark'} background"
    return out, caption


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def write_mp4(path: Path, frames: np.ndarray, fps: int = 16) -> None:
    """Lossless H.264 (yuv420p, qp 0) mp4 through PyAV.

    Lossless because x264's bitstream differs from run to run even on one thread; the decoded frames then do not."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_sample_dataset(folder: str | Path, *, num_images: int = 4, num_videos: int = 2, num_frame_folders: int = 1,
                        size: tuple[int, int] = (128, 96), frames: int = 17, fps: int = 16,
                        caption_extension: str = ".txt") -> dict:
    """Write `images/` (PNG + captions), `videos/` (mp4 + captions, plus image folders as videos) under `folder`.

    Deterministic: the same arguments give the same pixels. Returns {"images": dir, "videos": dir, "captions":
    {file name: caption}}. Sizes must be even (yuv420p)."""
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size: got {size}; expected even width and height")
    root = Path(folder)
    img_dir, vid_dir = root / "images", root / "videos"
    img_dir.mkdir(parents=True, exist_ok=True)
    vid_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(num_images):
        clip, caption = render_clip(width, height, 5, i)
        name = f"image_{i:03d}"
        write_png(img_dir / f"{name}.png", clip[2])  # the middle frame
        (img_dir / f"{name}{caption_extension}").write_text(caption.replace(" moving", ""))
        captions[f"{name}.png"] = caption.replace(" moving", "")
    for i in range(num_videos):
        clip, caption = render_clip(width, height, frames, i)
        name = f"video_{i:03d}"
        write_mp4(vid_dir / f"{name}.mp4", clip, fps)
        (vid_dir / f"{name}{caption_extension}").write_text(caption)
        captions[f"{name}.mp4"] = caption
    for i in range(num_frame_folders):
        clip, caption = render_clip(width, height, frames, num_videos + i)
        name = f"frames_{i:03d}"
        (vid_dir / name).mkdir(exist_ok=True)
        for f, frame in enumerate(clip):
            write_png(vid_dir / name / f"{f:05d}.png", frame)
        (vid_dir / f"{name}{caption_extension}").write_text(caption)
        captions[name] = caption
    return {"images": str(img_dir), "videos": str(vid_dir), "captions": captions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--frame-folders", type=int, default=1)
    ap.add_argument("--size", default="128x96", help="WxH, even numbers")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--fps", type=int, default=16)
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.lower().split("x"))
    result = make_sample_dataset(args.out_dir, num_images=args.images, num_videos=args.videos,
                                 num_frame_folders=args.frame_folders, size=(w, h), frames=args.frames, fps=args.fps)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
