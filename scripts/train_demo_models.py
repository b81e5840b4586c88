"""Train the demo models: tiny Wan 2.1, HunyuanVideo and FramePack models that really generate the procedural shape
clips.

Plain PyTorch on the CPU, reproducible from the seed; the weights are written with the real key names to
`demo_models/` and load through the same loaders as real checkpoints (docs/demo.md).

    python scripts/train_demo_models.py [--family wan|hunyuan|framepack] [--stage vae|dit|all|eval] [--out demo_models]

Stage `vae` trains the autoencoder on clips of every palette colour (the VAE must be able to show a colour the DiT
has never seen, for the demo LoRA to teach it), then maps its latents onto the statistics the family's pipeline
normalises with. Stage `dit` trains the DiT (flow matching, text-conditioned) together with the text encoder(s) on
the base colours only, on latents of the frozen demo VAE. Stage `eval` scores the files in `--out` with the demo
detector: the VAE on held-out clips of every colour (encode, decode), the whole model on generated clips (the
sampler the family's demo workflow uses).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from demo_training import framepack, hunyuan, wan
from demo_training.common import OUT, log

FAMILIES = {"wan": wan, "hunyuan": hunyuan, "framepack": framepack}
# (VAE, DiT) steps of the shipped models; FramePack uses HunyuanVideo's VAE and text encoders (train those first)
STEPS = {"wan": (2000, 6000), "hunyuan": (1500, 6000), "framepack": (0, 8000)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=tuple(FAMILIES), default="wan")
    ap.add_argument("--stage", choices=("vae", "dit", "all", "eval"), default="all")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=None, help="default: the shipped model's")
    ap.add_argument("--dit-steps", type=int, default=None, help="default: the shipped model's")
    args = ap.parse_args(argv)
    family = FAMILIES[args.family]
    vae_steps, dit_steps = (given or default for given, default in
                            zip((args.vae_steps, args.dit_steps), STEPS[args.family]))
    warnings.simplefilter("ignore", wan.umt5.PromptTruncatedWarning)   # the negative prompt is long in tiny tokens
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.stage in ("vae", "all"):
        family.stage_vae(args.out, args.seed, vae_steps)
    if args.stage in ("dit", "all"):
        family.stage_dit(args.out, args.seed, dit_steps)
    if args.stage == "eval":
        family.stage_eval(args.out, args.seed)
    log(f"done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
