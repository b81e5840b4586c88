"""The README's before/after frame strip, from the videos the main job wrote (scripts/run_main_job.sh):
the base model's clip, the new-colour prompt before the LoRA, and the same prompt and seed after it.

    python scripts/demo_strip.py [--videos out/main_job/musubi] [--out docs/demo_strip.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo_training.common import REPO, pack

read_video = pack("engine.data.media").read_video     # [F, H, W, 3] uint8
ROWS = (("demo_base", "base model: a green triangle moving up"),
        ("demo_before", "before the LoRA: a magenta circle moving up"),
        ("demo_after", "after the LoRA (300 steps in the graph): same prompt and seed"))
FRAMES = (0, 4, 8, 12, 16)
SCALE, LABEL_W = 2, 330


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=Path, default=REPO / "out" / "main_job" / "musubi")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "demo_strip.png")
    args = ap.parse_args()
    rows = []
    for prefix, label in ROWS:
        latest = sorted(args.videos.glob(f"{prefix}_*.mp4"))[-1]
        frames = read_video(latest)
        tiles = [np.kron(frames[i], np.ones((SCALE, SCALE, 1), np.uint8)) for i in FRAMES]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        rows.append((label, np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)))
    h, w = rows[0][1].shape[:2]
    img = Image.new("RGB", (LABEL_W + w, len(rows) * (h + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (label, strip) in enumerate(rows):
        img.paste(Image.fromarray(strip), (LABEL_W, r * (h + 6)))
        draw.text((8, r * (h + 6) + h // 2 - 6), label, fill=(0, 0, 0))
    img.save(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
