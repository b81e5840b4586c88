"""Training telemetry: loss history (ComfyUI LOSS_MAP, loss-curve image), status line, TensorBoard events.

Named `logging` inside the package; modules here import the standard library one with absolute imports as usual.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch


@dataclass
class LossHistory:
    """One loss per optimizer step (the mean over its micro-batches)."""

    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)   # held-out eval loss, at `eval_steps`
    eval_steps: list[int] = field(default_factory=list)

    def add(self, step: int, loss: float) -> None:
        self.steps.append(int(step))
        self.losses.append(float(loss))

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(int(step))
        self.eval_losses.append(float(loss))

    def loss_map(self) -> dict[str, list[float]]:
        """ComfyUI's LOSS_MAP: {"loss": [floats]}, plus "eval_loss" (one per evaluation) when there is one."""
        out = {"loss": list(self.losses)}
        if self.eval_losses:
            out["eval_loss"] = list(self.eval_losses)
        return out

    def moving_average(self, window: int = 25) -> float | None:
        if not self.losses:
            return None
        tail = self.losses[-window:]
        return sum(tail) / len(tail)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "steps": list(self.steps), "eval_losses": list(self.eval_losses),
                "eval_steps": list(self.eval_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state.get("losses", [])]
        self.steps = [int(v) for v in state.get("steps", [])]
        self.eval_losses = [float(v) for v in state.get("eval_losses", [])]
        self.eval_steps = [int(v) for v in state.get("eval_steps", [])]


def ema_smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256, smoothing: float = 0.9,
                     log_scale: bool = False, eval_points: list[tuple[int, float]] | None = None) -> torch.Tensor:
    """[1, H, W, 3] float32 in 0..1 (a ComfyUI IMAGE): raw losses in light blue, smoothed in dark blue, and the
    held-out eval loss `eval_points` [(step, loss)] (step 1 = the first loss) in orange.

    Drawn with Pillow (no matplotlib): a plot area with a 1-pixel frame, min/max labels on the y axis."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 8, 8, height - 18
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = [v for v in losses if math.isfinite(v)]
    if values:
        tf = (lambda v: math.log10(max(v, 1e-12))) if log_scale else (lambda v: v)
        raw = [tf(v) for v in values]
        smooth = ema_smooth(raw, smoothing)
        evals = [(int(step) - 1, tf(v)) for step, v in (eval_points or []) if math.isfinite(v)]
        lo, hi = min(raw + [v for _, v in evals]), max(raw + [v for _, v in evals])
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(raw)

        def xy(i, v):
            x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
            y = bottom - (bottom - top) * (v - lo) / (hi - lo)
            return (x, y)

        for series, colour, w in ((raw, (150, 190, 235), 1), (smooth, (20, 60, 160), 2)):
            pts = [xy(i, v) for i, v in enumerate(series)]
            if len(pts) == 1:
                x, y = pts[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            else:
                draw.line(pts, fill=colour, width=w)
        eval_pts = [xy(i, v) for i, v in evals]
        if len(eval_pts) > 1:
            draw.line(eval_pts, fill=(235, 120, 20), width=2)
        for x, y in eval_pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(235, 120, 20))
        fmt = (lambda v: f"{10 ** v:.3g}") if log_scale else (lambda v: f"{v:.3g}")
        draw.text((2, top), fmt(hi), fill=(60, 60, 60))
        draw.text((2, bottom - 10), fmt(lo), fill=(60, 60, 60))
        draw.text((left, bottom + 4), f"{n} steps", fill=(60, 60, 60))
    else:
        draw.text((left + 8, (top + bottom) // 2), "no loss recorded yet", fill=(60, 60, 60))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (data.float() / 255.0).unsqueeze(0)


def memory_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB max alloc"
    rss = _process_rss()
    return f"{rss / 2 ** 30:.2f} GiB RSS" if rss else "n/a"


def _process_rss() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, Linux units (KiB)
        except Exception:
            return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class StepTimer:
    """it/s over the optimizer steps of the current `train_steps` call (excludes startup and saving)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def tick(self) -> None:
        self.count += 1

    @property
    def it_per_s(self) -> float:
        dt = time.perf_counter() - self.start
        return self.count / dt if dt > 0 and self.count else 0.0


def status_text(step: int, total: int, loss: float | None, avg: float | None, lr: float | None, it_s: float,
                device: torch.device) -> str:
    eta = (total - step) / it_s if it_s > 0 else float("nan")
    parts = [f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}" + (f" (avg {avg:.4f})" if avg is not None else ""))
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    parts += [f"{it_s:.2f} it/s", f"ETA {format_duration(eta)}", f"mem {memory_text(device)}"]
    return " | ".join(parts)


def current_lrs(optimizer) -> dict[str, float]:
    """lr per param group, plus d·lr for Prodigy/D-Adaptation (their group has a "d" entry)."""
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is None:
            continue
        suffix = "" if i == 0 else f"_group{i}"
        out[f"lr/unet{suffix}"] = float(lr)
        if "d" in group:
            out[f"lr/d*lr{suffix}"] = float(group["d"]) * float(lr)
    return out


class TensorBoardLogger:
    """tensorboardX event files in `logdir/<prefix><YYYYmmddHHMMSS>` (Musubi layout)."""

    def __init__(self, logdir: str, prefix: str = ""):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(logdir, prefix + time.strftime("%Y%m%d%H%M%S"))
        self.writer = SummaryWriter(self.path)

    def log_eval(self, step: int, loss: float) -> None:
        self.writer.add_scalar("loss/eval", loss, step)

    def log_step(self, step: int, loss: float, avg: float | None, lrs: dict[str, float], it_s: float,
                 timesteps: torch.Tensor | None) -> None:
        w = self.writer
        w.add_scalar("loss/current", loss, step)
        if avg is not None:
            w.add_scalar("loss/average", avg, step)
        for k, v in lrs.items():
            w.add_scalar(k, v, step)
        if it_s:
            w.add_scalar("perf/it_per_s", it_s, step)
        if timesteps is not None and timesteps.numel():
            w.add_histogram("timesteps", timesteps.detach().float().cpu().numpy(), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
