"""Post-hoc EMA of saved LoRA checkpoints (Musubi's lora_post_hoc_ema.py semantics).

avg ← β·avg + (1−β)·new over the files in order (the first file initializes avg), fp32 math:
  * constant β;
  * linear β → β2: the i-th merge (0-based, k merges) uses β_i = β + (β2−β)·i/(k−1);
  * power-function EMA (Karras et al. 2023) from σ_rel: γ = largest non-negative real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0, and the merge of the t-th later file (t = 1, 2, ...) uses
    β_t = (1 − 1/t)^(γ+1) (so the first file gets zero weight).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_safetensors_atomic
from ..checkpoint import Checkpoint
from ..errors import invalid
from .metadata import with_hashes
from .writer import refuse_overwrite


@dataclass
class EMAConfig:
    beta: float = 0.95
    beta2: float | None = None
    sigma_rel: float | None = None   # overrides beta/beta2
    sort: bool = True                # by modification time


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    if not 0 < sigma_rel:
        raise invalid("sigma_rel", sigma_rel, "a positive number (e.g. 0.15 .. 0.25)")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    if not real:
        raise invalid("sigma_rel", sigma_rel, "a value whose EMA exponent is non-negative (sigma_rel <= ~0.28)")
    return float(max(real))


def ema_betas(n_merges: int, config: EMAConfig) -> list[float]:
    """β for each of the `n_merges` merges (files 2..N)."""
    if config.sigma_rel is not None:
        gamma = sigma_rel_to_gamma(config.sigma_rel)
        return [(1.0 - 1.0 / t) ** (gamma + 1.0) for t in range(1, n_merges + 1)]
    for name in ("beta", "beta2"):
        v = getattr(config, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise invalid(name, v, "a number in [0, 1]")
    if config.beta2 is None or n_merges < 2:
        return [config.beta] * n_merges
    return [config.beta + (config.beta2 - config.beta) * i / (n_merges - 1) for i in range(n_merges)]


def _list_files(files, output) -> list[Path]:
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        out = Path(output).resolve()
        paths = [p for p in sorted(Path(files).glob("*.safetensors")) if p.resolve() != out]
    elif isinstance(files, (str, Path)):
        paths = [Path(files)]
    else:
        paths = [Path(f) for f in files]
    if not paths:
        raise invalid("EMA input files", [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)],
                      "at least one LoRA .safetensors file (a list or a folder)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise invalid("EMA input files", missing, "existing files")
    return paths


def post_hoc_ema(files, output, config: EMAConfig | None = None, progress=None) -> Path:
    """Average LoRA checkpoints `files` (list or folder) into `output` (.safetensors). Returns the output path."""
    config = config or EMAConfig()
    paths = _list_files(files, output)
    refuse_overwrite(output, paths)
    if config.sort:
        paths.sort(key=lambda p: p.stat().st_mtime)
    betas = ema_betas(len(paths) - 1, config)

    first = Checkpoint.open(paths[0])
    dtypes = {k: first.dtype(k) for k in first.keys()}
    avg = {k: (first.get(k).float() if dtypes[k].is_floating_point else first.get(k)) for k in first.keys()}
    metadata = dict(first.metadata)
    for i, (path, beta) in enumerate(zip(paths[1:], betas)):
        if progress is not None:  # may raise to cancel; nothing has been written yet
            progress(i, len(betas))
        ckpt = Checkpoint.open(path)
        missing = sorted(set(avg) - set(ckpt.keys()))
        if missing:
            raise invalid(f"EMA file {path}", f"missing key {missing[0]!r}", f"the same keys as {paths[0].name}")
        for k in avg:
            if not dtypes[k].is_floating_point:
                continue  # non-float tensors come from the first file
            new = ckpt.get(k).float()
            if tuple(new.shape) != tuple(avg[k].shape):
                raise invalid(f"EMA file {path} key {k!r}", tuple(new.shape),
                              f"shape {tuple(avg[k].shape)} as in {paths[0].name}")
            if k.endswith(".alpha"):
                if not torch.equal(new, avg[k]):
                    raise invalid(f"EMA file {path} key {k!r}", new.tolist(),
                                  f"alpha {avg[k].tolist()} as in {paths[0].name}")
                continue
            avg[k].mul_(beta).add_(new, alpha=1.0 - beta)
        metadata = dict(ckpt.metadata)

    out = {k: v.to(dtypes[k]) for k, v in avg.items()}
    if config.sigma_rel is not None:
        method = {"method": "power", "sigma_rel": config.sigma_rel, "gamma": sigma_rel_to_gamma(config.sigma_rel)}
    elif config.beta2 is not None:
        method = {"method": "linear", "beta": config.beta, "beta2": config.beta2}
    else:
        method = {"method": "constant", "beta": config.beta}
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    metadata["musubi_ema"] = json.dumps(method, sort_keys=True)
    metadata["musubi_ema_files"] = json.dumps([p.name for p in paths])
    metadata = with_hashes(out, metadata)
    save_safetensors_atomic(out, output, metadata)
    return Path(output)
