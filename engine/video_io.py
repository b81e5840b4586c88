"""Write frames to an mp4 with PyAV, embedding metadata (ComfyUI's workflow) the way ComfyUI's own SaveVideo does:
every value json-encoded into the container tags (`movflags=use_metadata_tags`), so dropping the video onto the
ComfyUI canvas restores the graph."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .errors import invalid


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, C>=3] float in [0, 1] -> uint8 [F, H', W', 3] with even H'/W' (yuv420p needs even sizes)."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] < 3:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise invalid("images", got, "an IMAGE batch [frames, height, width, 3]")
    f, h, w, _ = frames.shape
    x = frames[:, : h - h % 2, : w - w % 2, :3].float().clamp(0, 1)
    return (x * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float, metadata: dict | None = None,
              crf: int = 19, codec: str = "libx264") -> Path:
    """Encode IMAGE frames as H.264 mp4, atomically. Returns the path."""
    import av

    if fps <= 0:
        raise invalid("fps", fps, "a positive frame rate")
    data = frames_to_uint8(frames)
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as out:
            for key, value in (metadata or {}).items():
                out.metadata[key] = value if isinstance(value, str) else json.dumps(value)
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = data.shape[2], data.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in data:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path


def read_mp4_metadata(path: str | Path) -> dict[str, str]:
    import av

    with av.open(str(path)) as c:
        return dict(c.metadata)
