"""The dataset preview grid: a few frames of each clip with its bucket label and caption (Musubi's debug view)."""

from __future__ import annotations

import numpy as np

PAD, LINE_H = 6, 16
BACKGROUND = (32, 32, 36)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int = 3) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if font.getlength(trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines or ["(empty caption)"]


def render_clip_grid(rows: list[dict], frames_per_clip: int, tile: int) -> np.ndarray:
    """rows: {"frames": [F,H,W,3] uint8, "label": str, "caption": str} -> one RGB uint8 image [H, W, 3]: per row
    up to `frames_per_clip` evenly spaced frames (each fit into a `tile`-pixel square), the label and the caption
    (wrapped, at most 3 lines)."""
    from PIL import Image, ImageDraw

    font = _font(13)
    pad, line_h = PAD, LINE_H
    width = pad + frames_per_clip * (tile + pad)
    blocks = []
    for row in rows:
        caption = _wrap(row["caption"], font, width - 2 * pad)
        h = pad + tile + pad + line_h * (1 + len(caption)) + pad
        im = Image.new("RGB", (width, h), BACKGROUND)
        draw = ImageDraw.Draw(im)
        frames = row["frames"]
        picks = np.unique(np.linspace(0, len(frames) - 1, min(frames_per_clip, len(frames))).round().astype(int))
        for j, fi in enumerate(picks):
            f = Image.fromarray(frames[fi])
            f.thumbnail((tile, tile))
            im.paste(f, (pad + j * (tile + pad) + (tile - f.width) // 2, pad + (tile - f.height) // 2))
        y = pad + tile + pad
        draw.text((pad, y), row["label"], fill=(255, 210, 90), font=font)
        for k, ln in enumerate(caption):
            draw.text((pad, y + line_h * (k + 1)), ln, fill=(235, 235, 235), font=font)
        blocks.append(im)
    if not blocks:
        im = Image.new("RGB", (width, tile), BACKGROUND)
        ImageDraw.Draw(im).text((pad, pad), "no clips (videos shorter than target_frames?)", fill=(255, 120, 120),
                                font=font)
        blocks.append(im)
    out = Image.new("RGB", (width, sum(b.height for b in blocks)), (20, 20, 24))
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    return np.asarray(out)
