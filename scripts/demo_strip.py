"""Frame strips of the main job's demo videos (docs/demo_strip.png in the README): one row per video, every 4th frame.

    python scripts/demo_strip.py [main job output folder] [--out docs/demo_strip.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from engine.data.media import read_video  # noqa: E402

ROWS = (("base_red_square", "base model: \"a red square moving to the right\""),
        ("before_lora_magenta", "before the LoRA: \"a magenta circle moving up\""),
        ("after_lora_magenta", "after the LoRA (trained in the graph): the same prompt and seed"))
SCALE, LABEL_H = 2, 18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, nargs="?", default=REPO / "out" / "main_job")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "demo_strip.png")
    args = ap.parse_args()
    rows = []
    for prefix, label in ROWS:
        video = sorted((args.folder / "musubi_demo").glob(f"{prefix}_*.mp4"))[-1]
        frames = read_video(video)[::4]                                  # [5, H, W, 3] uint8
        strip = np.concatenate(list(frames), axis=1).repeat(SCALE, 0).repeat(SCALE, 1)
        canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + LABEL_H), (255, 255, 255))
        canvas.paste(Image.fromarray(strip), (0, LABEL_H))
        ImageDraw.Draw(canvas).text((4, 3), label, fill=(0, 0, 0))
        rows.append(np.asarray(canvas))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
