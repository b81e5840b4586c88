"""Fixed-seed outputs of the Wan slice (sampler latents of every task, training losses, saved LoRA tensors), recorded
before the engine was reorganised around the Family interface and kept by `test_wan_golden.py`: a refactor that
changes any Wan number fails there.

Re-record only for an intended numerical change: `python tests/wan_golden.py --write` (then say why in the commit).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "wan_golden.safetensors"
TEXT_DIM = CLIP_DIM = 32     # tiny presets


def _image(seed: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _sampling(out: dict) -> None:
    from engine.families.wan.loader import load_wan_dit
    from engine.families.wan.pipeline import (WanGenerateRequest, generate, prepare_flf2v, prepare_fun_control,
                                              prepare_i2v, prepare_one_frame)
    from engine.families.wan.vae import load_wan_vae

    g = torch.Generator().manual_seed(7)
    pos, neg = torch.randn(6, TEXT_DIM, generator=g), torch.randn(4, TEXT_DIM, generator=g)
    clip = torch.randn(257, CLIP_DIM, generator=g)
    vae = load_wan_vae("preset:tiny-vae", dtype=torch.float32)

    def run(preset, task, **kw):
        model = load_wan_dit(f"preset:tiny-{preset}", dtype=torch.float32)
        base = dict(width=32, height=32, frames=5, steps=3, seed=11, guidance_scale=4.0)
        base.update(kw)
        return generate(model, WanGenerateRequest(task, pos, neg, **base))

    out["sample/t2v_unipc"] = run("t2v", "t2v")
    out["sample/t2v_dpm"] = run("t2v", "t2v", solver="dpm++", shift=3.0)
    out["sample/t2v_euler_slg"] = run("t2v", "t2v", solver="euler", slg_layers=(1,), slg_scale=2.0)
    out["sample/i2v"] = run("i2v", "i2v", conditioning=prepare_i2v(vae, _image(1), frames=5), clip_fea=clip)
    out["sample/flf2v"] = run("flf2v", "flf2v", frames=9, conditioning=prepare_flf2v(vae, _image(2), _image(3), 9),
                              clip_fea=torch.cat([clip, clip.flip(0)]))
    control = torch.rand(3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out["sample/fun_control"] = run("fun-control", "fun_control",
                                    conditioning=prepare_fun_control(vae, control, frames=5))
    out["sample/one_frame"] = run("i2v", "one_frame", frames=None, clip_fea=clip,
                                  conditioning=prepare_one_frame(vae, [_image(5)], control_indices=[0],
                                                                 target_index=5))


def _training(out: dict, folder: Path) -> None:
    from engine.families.wan.loader import load_wan_dit
    from engine.lora import read_lora
    from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                                 TrainingSession)

    g = torch.Generator().manual_seed(0)
    t2v = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "context": [torch.randn(6, TEXT_DIM, generator=g)]}
           for _ in range(3)]
    i2v = [dict(b, y=torch.randn(1, 20, 2, 4, 4, generator=g), clip_fea=torch.randn(1, 257, CLIP_DIM, generator=g))
           for b in t2v]
    for name, preset, batches in (("t2v", "t2v", t2v), ("i2v", "i2v", i2v)):
        model = load_wan_dit(f"preset:tiny-{preset}", dtype=torch.float32)
        cfg = TrainingConfig(output_dir=str(folder / name), output_name=name, max_train_steps=4, mixed_precision="no",
                             seed=5, gradient_checkpointing=True, save_format="musubi",
                             timesteps=TimestepConfig("shift", discrete_flow_shift=3.0))
        session = TrainingSession(model, NetworkConfig(rank=4, alpha=2), OptimizerConfig(learning_rate=1e-3),
                                  InMemoryBatchLoader(batches, seed=1), cfg)
        out[f"train/{name}_losses"] = torch.tensor(session.train_steps(4), dtype=torch.float64)
        lora = read_lora(session.save_lora(folder / f"{name}.safetensors"))
        for module, weights in sorted(lora.modules.items())[:6]:
            for key, t in sorted(weights.tensors.items()):
                out[f"lora/{name}/{module}/{key}"] = t


def compute() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    _sampling(out)
    with tempfile.TemporaryDirectory() as tmp:
        _training(out, Path(tmp))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if "--write" in sys.argv:
        from safetensors.torch import save_file

        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(compute(), str(GOLDEN))
        print(f"wrote {GOLDEN}")
