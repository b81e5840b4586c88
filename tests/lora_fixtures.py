"""Shared helpers for the LoRA engine tests: the real tiny Wan DiT and hand-built LoRA state dicts.

Keys are spelled here from the published patterns (not through engine.lora's writer), so the reader is checked
against an independent source."""

import torch

from engine.families.wan.loader import load_wan_dit
from engine.families.wan.presets import build_preset_state_dict

T2V_TARGETS_PER_BLOCK = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                         "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
I2V_EXTRA = ["cross_attn.k_img", "cross_attn.v_img"]

DIFFUSERS_NAME = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                  "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                  "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                  "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
                  "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def tiny_model(variant="t2v", dtype=torch.float32):
    """The tiny Wan DiT preset (real architecture and key names), in eval mode: the tests' one tiny-DiT factory."""
    return load_wan_dit(f"preset:tiny-{variant}", dtype=dtype).eval()


def comfy_base(variant):
    """The tiny preset resized where ComfyUI's Wan detection does not read sizes from the weights: it derives dim,
    heads (dim/128), ffn_dim, layers and in_dim, but fixes text_dim = 4096 and the CLIP width = 1280."""
    sd = build_preset_state_dict(f"tiny-{variant}")
    g = torch.Generator().manual_seed(11)
    dim = sd["head.modulation"].shape[-1]
    sd["text_embedding.0.weight"] = torch.randn(dim, 4096, generator=g) * 0.01
    if "img_emb.proj.1.weight" in sd:
        sd |= {"img_emb.proj.0.weight": torch.ones(1280), "img_emb.proj.0.bias": torch.zeros(1280),
               "img_emb.proj.1.weight": torch.randn(1280, 1280, generator=g) * 0.01,
               "img_emb.proj.1.bias": torch.zeros(1280),
               "img_emb.proj.3.weight": torch.randn(dim, 1280, generator=g) * 0.01}
    return sd


def weight_shapes(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_lora_factors(model, rank=4, seed=0, variant_targets=None, blocks=None):
    """{module: (down [r, in], up [out, r], alpha)} for the default Wan targets of `model`."""
    g = torch.Generator().manual_seed(seed)
    shapes = weight_shapes(model)
    out = {}
    for name, (o, i) in shapes.items():
        if not name.startswith("blocks."):
            continue
        sub = name.split(".", 2)[2]
        if sub not in T2V_TARGETS_PER_BLOCK + I2V_EXTRA:
            continue
        if blocks is not None and int(name.split(".")[1]) not in blocks:
            continue
        down = torch.randn(rank, i, generator=g) * 0.1
        up = torch.randn(o, rank, generator=g) * 0.1
        out[name] = (down, up, float(rank) * 2.0)  # alpha = 2·rank -> scale 2
    return out


def reference_delta(down, up, alpha, rank=None):
    rank = rank or down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return (up.double() @ down.double() * scale).float()


def write_musubi_lora(path, factors: dict):
    """Hand-spelled Musubi/kohya keys (independent of the engine's writer)."""
    from pathlib import Path

    from safetensors.torch import save_file

    sd = {}
    for name, (down, up, alpha) in factors.items():
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = down.contiguous()
        sd[f"{stem}.lora_up.weight"] = up.contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
