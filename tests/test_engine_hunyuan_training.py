"""Training a LoRA on the tiny HunyuanVideo DiT preset through the generic trainer: the loss falls (the Wan test's
metric), the adapter covers Musubi's HunyuanVideo targets, resume is exact, block swap over both block lists plus
gradient checkpointing trains the same losses, the guidance embedder sees 1.0 x 1000, SkyReels I2V trains with the
clip's first latent frame as y, and the LoRA saves in the Musubi / ComfyUI / diffusers dialects and reads back."""

import re

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families import blocks_of, get_family
from engine.families.hunyuan.dit import HunyuanVideoModel
from engine.families.hunyuan.presets import build_preset_state_dict, preset_config
from engine.lora import apply_loras, match_lora, read_lora, save_lora
from engine.lora.dialects import LoRAFile
from engine.memory import FakeTransfer, swap_blocks
from engine.memory.checkpointing import block_checkpointing
from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                             TrainingSession)

FAMILY = get_family("hunyuan")


def tiny(name="tiny"):
    model = HunyuanVideoModel(preset_config(name))
    model.load_state_dict(build_preset_state_dict(name))
    return model.eval().requires_grad_(False)


def batches(n=2, tokens=6):
    """Batches as the family's `collate` makes them: DiT latents, padded LLM states + mask, CLIP-L pooled."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = torch.zeros(1, tokens, dtype=torch.bool)
        mask[:, : 4 + i] = True
        out.append({"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.7,
                    "text_states": torch.randn(1, tokens, 32, generator=g), "text_mask": mask,
                    "pooled": torch.randn(1, 24, generator=g)})
    return out


def make(tmp_path, steps, resume=None, model=None, network=None, checkpointing=True, save_format="musubi"):
    model = model or tiny()
    cfg = TrainingConfig(output_dir=str(tmp_path), output_name="hv", max_train_steps=steps, mixed_precision="no",
                         seed=1, gradient_checkpointing=checkpointing, save_format=save_format,
                         timesteps=TimestepConfig("shift", discrete_flow_shift=2.0))
    return TrainingSession(model, network or NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=2e-3),
                           InMemoryBatchLoader(batches(), seed=0), cfg, resume_from=resume)


def test_tiny_hunyuan_learns_and_resumes_exactly(tmp_path):
    s = make(tmp_path / "a", 30)
    adapted = set(s.network.adapters())
    for block in ("double_blocks.0", "double_blocks.1"):
        assert {f"{block}.{m}" for m in ("img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2",
                                         "txt_attn_qkv", "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2")} <= adapted
    assert {"single_blocks.0.linear1", "single_blocks.1.linear2"} <= adapted
    assert len(adapted) == 2 * 8 + 2 * 2            # Musubi: no img_mod / txt_mod / modulation, nothing outside
    losses = s.train_steps(30)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses

    part = make(tmp_path / "b", 30)
    part.train_steps(20)
    resumed = make(tmp_path / "b", 30, resume=part.save_state())
    assert resumed.train_steps(10) == losses[20:]


def test_block_swap_over_both_lists_and_checkpointing_train_the_same_losses(tmp_path):
    plain = make(tmp_path / "plain", 4, checkpointing=False).train_steps(4)
    model = tiny()
    swapper = swap_blocks(model, 3, "cpu", transfer=FakeTransfer())     # 4 blocks: 2 double + 2 single
    s = make(tmp_path / "swap", 4, model=model)
    swapped = s.train_steps(4)
    assert block_checkpointing(model) == (True, False)
    assert len(blocks_of(model)) == 4 and {0, 3} & set(swapper.swapped) and max(swapper.swapped) >= 2
    assert set(swapper.swapped) <= set(swapper.transfer.log.of("run"))   # both lists streamed in
    torch.testing.assert_close(torch.tensor(swapped), torch.tensor(plain), rtol=1e-5, atol=1e-7)
    swapper.detach("cpu")


def test_token_chunked_blocks_train_the_same_losses(tmp_path):
    """The double blocks' image MLP and the single blocks' linear2 part run over token chunks in training (their
    wide activations are the largest at real sizes): the same losses, with block swap and checkpointing too."""
    plain = make(tmp_path / "plain", 4, checkpointing=False).train_steps(4)
    model = tiny()
    for block in blocks_of(model):
        block.train_chunk_tokens = 3            # 4 image (+ 4-5 text) tokens: several chunks
    swapper = swap_blocks(model, 3, "cpu", transfer=FakeTransfer())
    chunked = make(tmp_path / "chunked", 4, model=model).train_steps(4)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-5, atol=1e-7)
    swapper.detach("cpu")


def test_training_forward_feeds_guidance_times_1000_and_i2v_first_frame(tmp_path):
    seen = []
    model = tiny()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    b = batches(1)[0]
    x = torch.randn(1, 16, 1, 4, 4)
    FAMILY.training_forward(model, b, x, torch.tensor([500.0]), x)
    assert torch.equal(seen[0], torch.tensor([1000.0]))

    i2v = tiny("tiny-i2v")
    got = []
    i2v.register_forward_pre_hook(lambda m, a, kw: got.append(kw["y"]), with_kwargs=True)
    lat = torch.randn(2, 16, 3, 4, 4)
    batch = {**b, "latents": lat, "text_states": b["text_states"].expand(2, -1, -1),
             "text_mask": b["text_mask"].expand(2, -1), "pooled": b["pooled"].expand(2, -1)}
    pred, _ = FAMILY.training_forward(i2v, batch, torch.randn_like(lat), torch.tensor([500.0, 200.0]), lat)
    assert pred.shape == lat.shape
    assert torch.equal(got[0][:, :, :1], lat[:, :, :1]) and not got[0][:, :, 1:].any()


def test_batches_not_made_for_the_model_are_refused(tmp_path):
    model = tiny()
    good = batches(1)[0]
    for bad, needle in (({"latents": torch.zeros(1, 4, 1, 4, 4)}, "16-channel"),
                        ({"text_states": torch.zeros(1, 6, 4096)}, "re-cache the captions"),
                        ({"pooled": torch.zeros(1, 768)}, "CLIP-L"),
                        ({"text_mask": torch.zeros(1, 6, dtype=torch.bool)}, "no real token")):
        with pytest.raises(MusubiInputError, match=needle):
            FAMILY.check_batch(model, {**good, **bad})
    with pytest.raises(MusubiInputError, match="missing"):
        FAMILY.check_batch(model, {"latents": good["latents"]})
    FAMILY.check_batch(model, good)


def test_lora_dialects_save_and_read_back(tmp_path):
    s = make(tmp_path / "run", 3)
    s.train_steps(3)
    trained = set(s.network.adapters())
    musubi = read_lora(tmp_path / "run" / "hv.safetensors")               # the session's own save (musubi)
    assert set(musubi.modules) == trained and not musubi.unresolved and musubi.dialect == "musubi"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in _keys(tmp_path / "run" / "hv.safetensors")
    assert musubi.metadata["ss_base_model_version"] == "hunyuan_video"
    assert musubi.metadata["ss_network_module"] == "networks.lora"
    assert musubi.metadata["modelspec.architecture"] == "hunyuan-video/lora"

    comfy = read_lora(save_lora(s.network, tmp_path / "comfy.safetensors", format="comfyui"))
    assert set(comfy.modules) == trained and comfy.dialect == "comfyui"

    # applied to a clean model, the file reproduces the trained model's output
    s.network.eval()
    b = batches(1)[0]
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([400.0])
    args = (b["text_states"], b["text_mask"], b["pooled"])
    with torch.no_grad():
        expected = s.model(x, t, *args, guidance=torch.tensor([6000.0]))
        clean = tiny()
        report = match_lora(comfy, clean)
        assert sorted(report.matched) == sorted(trained) and not report.unmatched_keys and not report.uncovered
        apply_loras(clean, [(tmp_path / "comfy.safetensors", 1.0)])
        torch.testing.assert_close(clean(x, t, *args, guidance=torch.tensor([6000.0])), expected,
                                   rtol=1e-4, atol=1e-5)

    # diffusers splits the fused qkv / linear1 Linears: each piece gets the shared down matrix and its rows of up;
    # read back, the pieces join into the fused layer with the same ΔW, and the file reproduces the trained model
    path = save_lora(s.network, tmp_path / "d.safetensors", format="diffusers")
    keys = _keys(path)
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.1.proj_out.lora_B.weight" in keys
    for piece in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
        assert f"transformer.transformer_blocks.0.{piece}.lora_B.weight" in keys
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
    back = read_lora(path)
    assert back.dialect == "diffusers" and set(back.modules) == trained and not back.unused_keys
    for name, mw in musubi.modules.items():                              # alpha folded into B: same ΔW
        torch.testing.assert_close(back.modules[name].delta(), mw.delta(), rtol=1e-5, atol=1e-7)
        assert back.modules[name].rank == mw.rank                        # one shared down: no rank growth
    with torch.no_grad():
        clean = tiny()
        apply_loras(clean, [(path, 1.0)])
        torch.testing.assert_close(clean(x, t, *args, guidance=torch.tensor([6000.0])), expected,
                                   rtol=1e-4, atol=1e-5)



def test_trained_lora_merges_into_a_comfyui_hunyuan_checkpoint(tmp_path):
    """Merge LoRA into Model on a ComfyUI-style HunyuanVideo file: the merged model equals the model with the LoRA."""
    from safetensors.torch import save_file

    from engine.families.hunyuan.loader import load_hunyuan_dit
    from engine.lora import merge_loras_into_checkpoint

    s = make(tmp_path / "run", 2)
    s.train_steps(2)
    base = tiny()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in base.state_dict().items()},
              str(tmp_path / "hv.safetensors"))
    out = merge_loras_into_checkpoint(tmp_path / "hv.safetensors", [(tmp_path / "run" / "hv.safetensors", 0.8)],
                                      tmp_path / "merged.safetensors")
    merged = load_hunyuan_dit(out, dtype=torch.float32)
    b = batches(1)[0]
    x, t, g = torch.randn(1, 16, 1, 4, 4), torch.tensor([300.0]), torch.tensor([6000.0])
    with torch.no_grad():
        apply_loras(base, [(tmp_path / "run" / "hv.safetensors", 0.8)])
        torch.testing.assert_close(merged(x, t, b["text_states"], b["text_mask"], b["pooled"], guidance=g),
                                   base(x, t, b["text_states"], b["text_mask"], b["pooled"], guidance=g),
                                   rtol=1e-4, atol=1e-5)

def test_a_peft_lora_on_some_pieces_of_a_fused_layer_joins_block_diagonally():
    """Pieces with their own down matrices and alphas, one piece missing (a PEFT run that targeted to_q/to_v only):
    the fused layer's ΔW holds each piece's up·down·scale in its rows and zeros in the missing piece's rows."""
    g = torch.Generator().manual_seed(0)
    width, ranks = 8, {0: 2, 2: 3}                                       # to_q rank 2, to_v rank 3, no to_k
    sd, expected = {}, torch.zeros(3 * width, width)
    for i, (piece, r) in zip(ranks, (("to_q", 2), ("to_v", 3))):
        down, up = torch.randn(r, width, generator=g), torch.randn(width, r, generator=g)
        stem = f"base_model.model.transformer_blocks.1.attn.{piece}"
        sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(float(2 * r))                # scale 2
        expected[i * width:(i + 1) * width] = 2 * up @ down
    lora = read_lora(sd)
    mw = lora.modules["double_blocks.1.img_attn_qkv"]
    assert set(lora.modules) == {"double_blocks.1.img_attn_qkv"} and mw.rank == 5
    torch.testing.assert_close(mw.delta(), expected, rtol=1e-6, atol=1e-6)


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_fp8_storage_follows_the_family_spec():
    from engine.memory import quantize_model_fp8

    converted = set(quantize_model_fp8(tiny(), "scaled"))
    expected = {n for n, m in tiny().named_modules() if isinstance(m, torch.nn.Linear)
                and n.startswith(("double_blocks.", "single_blocks.")) and "modulation" not in n and "norm" not in n}
    assert converted == expected and "double_blocks.0.img_mod.linear" in converted   # Musubi quantizes img/txt_mod
    assert "single_blocks.0.modulation.linear" not in converted


def test_lora_names_find_their_family_when_block_lists_share_a_name(dual_family):
    """The test family's blocks are also called double_blocks / single_blocks: the layout decides, not the order."""
    from engine.families import families, family_for_lora_names

    assert [f.name for f in families()][-1] == "dual"                    # registered after HunyuanVideo
    hv = ["double_blocks.0.img_attn_qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mlp.fc2"]
    dual = ["double_blocks.0.imgqkv", "double_blocks.1.txtmlp.2", "single_blocks.2.linear1"]
    assert family_for_lora_names(hv) is FAMILY
    assert family_for_lora_names(dual) is dual_family.FAMILY
    assert family_for_lora_names(["blocks.0.self_attn.q"]).name == "wan"
