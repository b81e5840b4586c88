"""Overlapping tiles over the space and time axes of a video tensor, blended with linear ramps: what lets a VAE
encode or decode a clip larger than the device holds. Shared by the families' VAEs."""

from __future__ import annotations

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size) with at least `overlap` shared; the last tile is
    aligned to the end. A single tile when the axis fits."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def ramp_weights(length: int, ramp: int, lead: bool, trail: bool) -> torch.Tensor:
    """1D blend weights [length]: linear ramps of `ramp` samples on the sides that touch a neighbour tile.

    Ramps go from 1/(ramp+1) to ramp/(ramp+1), never 0, so every output sample has a positive total weight."""
    w = torch.ones(length)
    r = min(ramp, length)
    if r > 0:
        up = torch.arange(1, r + 1, dtype=torch.float32) / (r + 1)
        if lead:
            w[:r] = torch.minimum(w[:r], up)
        if trail:
            w[-r:] = torch.minimum(w[-r:], up.flip(0))
    return w


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, out_scale: float, out_overlap: int) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of x [B, C, T, H, W] and blend the outputs.

    `fn` maps a tile of spatial size (h, w) to [B, C', T', h*out_scale, w*out_scale]. Tile starts and sizes must be
    exact in output units (the caller aligns them). Outputs are averaged with `ramp_weights` of `out_overlap`
    samples, so seams fade linearly instead of showing a hard edge."""
    H, W = x.shape[-2:]
    ys, xs = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    out = weight = None
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            th, tw = min(tile, H), min(tile, W)
            piece = fn(x[..., y0:y0 + th, x0:x0 + tw])
            if out is None:
                shape = (*piece.shape[:3], int(H * out_scale), int(W * out_scale))
                out = torch.zeros(shape, dtype=torch.float32, device=piece.device)
                weight = torch.zeros(shape[-2:], dtype=torch.float32, device=piece.device)
            ph, pw = piece.shape[-2:]
            wy = ramp_weights(ph, out_overlap, iy > 0, iy < len(ys) - 1)
            wx = ramp_weights(pw, out_overlap, ix > 0, ix < len(xs) - 1)
            w2 = (wy[:, None] * wx[None, :]).to(piece.device)
            oy, ox = int(y0 * out_scale), int(x0 * out_scale)
            out[..., oy:oy + ph, ox:ox + pw] += piece.float() * w2
            weight[oy:oy + ph, ox:ox + pw] += w2
    return out / weight


def temporal_tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, in_step: int, out_step: int) -> torch.Tensor:
    """Run `fn` on overlapping time windows of x [B, C, 1 + in_step*n, H, W] and blend to [B, C', 1 + out_step*n, ...].

    Time is cut in whole steps (4 frames <-> 1 latent frame): a window of `tile` steps maps in_step*tile + 1 input
    frames to out_step*tile + 1 output frames. Every window but the first drops its first output frame, which the
    causal network computed as a lone first frame (the official temporal tiling does the same); the rest is averaged
    with linear ramps over the out_step*overlap frames that neighbouring windows share."""
    n = (x.shape[2] - 1) // in_step
    starts = tile_starts(n, tile, overlap)
    out = weight = None
    for i, s in enumerate(starts):
        span = min(tile, n)
        piece = fn(x[:, :, in_step * s:in_step * (s + span) + 1])      # [B, C', out_step*span + 1, H', W']
        o0 = out_step * s
        if i > 0:
            piece, o0 = piece[:, :, 1:], o0 + 1
        if out is None:
            out = torch.zeros(*piece.shape[:2], 1 + out_step * n, *piece.shape[3:], device=piece.device)
            weight = torch.zeros(out.shape[2], device=piece.device)
        w = ramp_weights(piece.shape[2], out_step * overlap, lead=i > 0, trail=i < len(starts) - 1).to(piece.device)
        out[:, :, o0:o0 + piece.shape[2]] += piece.float() * w.view(1, 1, -1, 1, 1)
        weight[o0:o0 + piece.shape[2]] += w
        del piece
    return out.div_(weight.view(1, 1, -1, 1, 1))
