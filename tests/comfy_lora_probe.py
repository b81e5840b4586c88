"""Run ComfyUI's own LoRA loader on a Wan DiT state dict + LoRA file; report what it maps and the patched weights.

Usage (always in a subprocess: ComfyUI changes sys.path and global state):
    python comfy_lora_probe.py JOBS.json
JOBS.json: [{"base": BASE.safetensors, "lora": LORA.safetensors, "strength": s, "out": OUT.safetensors,
             "unet_config": {...} (optional)}, ...]
`unet_config`: entries laid over what ComfyUI's detection reads from the base (sizes it fixes instead of reading from
the weights: a tiny HunyuanVideo's head count, RoPE axes and CLIP width).
(several jobs per process: importing ComfyUI costs ~30 s on a small CPU).
Prints one JSON line: a list of {"model_class", "lora_keys", "patched_keys", "not_loaded"}; each OUT receives every
weight that ComfyUI patched (float32, native key names without the `diffusion_model.` prefix).
"""

import json
import logging
import os
import sys
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR") or str(Path(os.environ.get("MUSUBI_ENV") or Path.home() / ".cache/comfyui-musubi").expanduser() / "ComfyUI")
sys.path.insert(0, COMFYUI_DIR)
sys.argv, args = sys.argv[:1], sys.argv[1:]

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before any model code reads the device

import torch  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.not_loaded = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded:"):
            self.not_loaded.append(msg.split(":", 1)[1].strip())


def main(base_path, lora_path, strength, out_path, unet_config=None):
    import comfy.model_detection as detection

    base = comfy.utils.load_torch_file(base_path)
    detect = detection.detect_unet_config
    if unet_config:
        detection.detect_unet_config = lambda *a, **k: {**detect(*a, **k), **unet_config}
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(base, model_options={"dtype": torch.float32})
    finally:
        detection.detect_unet_config = detect
    if patcher is None:
        raise SystemExit("ComfyUI did not recognise the model")
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora_sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(lora_path))
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    patches = comfy.lora.load_lora(lora_sd, key_map)
    logging.getLogger().removeHandler(collect)
    patched_keys = patcher.add_patches(patches, float(strength))
    patcher.patch_model()
    sd = patcher.model.diffusion_model.state_dict()
    out = {}
    for key in patched_keys:
        native = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
        out[native] = sd[native].detach().float().contiguous().clone()
    from safetensors.torch import save_file
    save_file(out, out_path)
    return {"model_class": type(patcher.model).__name__, "lora_keys": len(lora_sd),
            "patched_keys": sorted(out), "not_loaded": collect.not_loaded}


if __name__ == "__main__":
    jobs = json.loads(Path(args[0]).read_text())
    results = [main(j["base"], j["lora"], j["strength"], j["out"], j.get("unet_config")) for j in jobs]
    print(json.dumps(results))
