"""Non-finite weights are refused at load, naming the file and the tensor (issue 23 item 5)."""

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError


def _poison(sd: dict, key: str, value=float("nan")) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[0] = value
    return sd


def test_lora_file_with_nan_is_refused(tmp_path):
    from engine.lora.dialects import read_lora

    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 16),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(16, 4),
          "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}
    save_file(_poison(sd, "lora_unet_blocks_0_self_attn_q.lora_up.weight"), str(tmp_path / "nan.safetensors"))
    with pytest.raises(MusubiInputError, match=r"nan\.safetensors.*lora_up\.weight.*non-finite"):
        read_lora(tmp_path / "nan.safetensors")


def test_dit_file_with_inf_is_refused_plain_and_fp8(tmp_path):
    from engine.families.wan.loader import load_wan_dit
    from engine.families.wan.presets import build_preset_state_dict

    sd = build_preset_state_dict("tiny-t2v")
    key = "blocks.1.ffn.0.weight"
    save_file(_poison(sd, key, float("inf")), str(tmp_path / "dit.safetensors"))
    with pytest.raises(MusubiInputError, match=rf"dit\.safetensors.*{key}.*non-finite"):
        load_wan_dit(str(tmp_path / "dit.safetensors"), dtype=torch.float32)
    with pytest.raises(MusubiInputError, match=rf"dit\.safetensors.*{key}.*non-finite"):
        load_wan_dit(str(tmp_path / "dit.safetensors"), dtype=torch.float32, fp8="e4m3")


def test_fp8_stored_nan_is_found_on_bit_patterns(tmp_path):
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.zeros(8, dtype=torch.float32).to(dt)
        save_file({"ok.weight": t.clone()}, str(tmp_path / "ok.safetensors"))
        Checkpoint.open(tmp_path / "ok.safetensors").raw("ok.weight")
        bad = t.clone()
        bad.view(torch.uint8)[3] = 0x7F if dt == torch.float8_e4m3fn else 0x7C   # NaN / +Inf
        save_file({"bad.weight": bad}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(MusubiInputError, match="bad.weight"):
            Checkpoint.open(tmp_path / "bad.safetensors").raw("bad.weight")


def test_vae_and_encoder_files_with_nan_are_refused(tmp_path):
    from engine.encoders.clip_vision import load_clip_vision, tiny_clip_state_dict
    from engine.encoders.umt5 import load_umt5, tiny_umt5_state_dict
    from engine.families.wan.vae import build_vae_preset_state_dict, load_wan_vae

    vae = build_vae_preset_state_dict()
    vkey = next(k for k in sorted(vae) if k.startswith("decoder.") and k.endswith("weight"))
    save_file(_poison(vae, vkey), str(tmp_path / "vae.safetensors"))
    with pytest.raises(MusubiInputError, match=r"vae\.safetensors.*non-finite"):
        load_wan_vae(tmp_path / "vae.safetensors", dtype=torch.float32)

    te = tiny_umt5_state_dict()
    save_file(_poison(te, "encoder.block.0.layer.1.DenseReluDense.wo.weight"), str(tmp_path / "te.safetensors"))
    with pytest.raises(MusubiInputError, match=r"te\.safetensors.*non-finite"):
        load_umt5(str(tmp_path / "te.safetensors"), dtype=torch.float32)

    clip = tiny_clip_state_dict()
    ckey = next(k for k in sorted(clip) if k.endswith("weight") and clip[k].is_floating_point())
    save_file(_poison(clip, ckey), str(tmp_path / "clip.safetensors"))
    with pytest.raises(MusubiInputError, match=r"clip\.safetensors.*non-finite"):
        load_clip_vision(str(tmp_path / "clip.safetensors"), dtype=torch.float32)


def test_is_finite_agrees_with_isfinite_on_every_fp8_pattern_and_float_dtype():
    from engine.checkpoint import is_finite

    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        for byte in range(256):
            t = torch.zeros(4, dtype=torch.uint8)
            t[2] = byte
            v = t.view(dt)
            assert is_finite(v) == bool(torch.isfinite(v.float()).all()), (dt, hex(byte))
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.randn(64).to(dt)
        assert is_finite(t)
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[7] = bad
            assert not is_finite(u), (dt, bad)
