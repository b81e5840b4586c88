"""Acceptance test of the Family interface: a second family with a different block layout (two block lists, its own
cache layout, text key and LoRA names), defined only under tests/, goes through the generic engine unchanged —
cache a dataset, train a LoRA with block swap and gradient checkpointing, resume exactly, save and reload the LoRA
in two formats, apply it, sample, quantize to fp8."""

import torch

from engine.data import CachedBatchLoader, build_cache, check_cache_for_model, dataset_from_tensors
from engine.families import blocks_of, family_of
from engine.lora import apply_loras, match_lora, read_lora
from engine.memory import FakeTransfer, quantize_model_fp8, swap_blocks
from engine.memory.checkpointing import block_checkpointing
from engine.training import (NetworkConfig, OptimizerConfig, TrainingConfig, TrainingSession, ValidationConfig,
                             ValidationPrompt)


def _cached_loader(family, folder, model):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 32, 32, 3, generator=g)
    cfg = dataset_from_tensors(images, ["a red cat", "two blue dogs", "one green bird here"], folder,
                               resolution=(32, 32))
    report = build_cache(cfg, family.FAMILY.cache_adapter(vae=family.PoolVAE(), text_encoder=family.HashText()))
    assert report is not None
    assert sorted(p.name for p in folder.glob("*_ds.safetensors")) and list(folder.glob("*_ds_te.safetensors"))
    return CachedBatchLoader(check_cache_for_model(cfg, family.FAMILY.cache_requirements(model)), seed=1)


def _session(family, folder, steps, resume=None, swap=True):
    model = family.DualDiT()
    loader = _cached_loader(family, folder / "cache", model)
    swapper = swap_blocks(model, 2, "cpu", transfer=FakeTransfer()) if swap else None
    cfg = TrainingConfig(output_dir=str(folder / "out"), output_name="dual", max_train_steps=steps, seed=3,
                         mixed_precision="no", gradient_checkpointing=True, save_format="musubi")
    prompt = ValidationPrompt(context=torch.randn(3, family.TEXT), width=32, height=32, frames=1, steps=2, seed=5)
    session = TrainingSession(model, NetworkConfig(rank=4, alpha=2, dropout=0.1), OptimizerConfig(learning_rate=1e-2),
                              loader, cfg, validation=ValidationConfig(prompts=[prompt], every_n_steps=steps),
                              resume_from=resume)
    return session, swapper


def test_second_family_trains_resumes_saves_and_samples_through_the_generic_engine(dual_family, tmp_path):
    session, swapper = _session(dual_family, tmp_path / "a", 6)
    model = session.model
    assert family_of(model) is dual_family.FAMILY
    adapted = set(session.network.adapters())
    assert {"double_blocks.0.imgqkv", "double_blocks.1.txtmlp.2", "single_blocks.2.linear1"} <= adapted
    assert not any(n.startswith(("img_in", "final", "time_in")) for n in adapted)       # outside the blocks
    assert len(adapted) == 2 * 6 + 3 * 2

    losses = session.train_steps(6)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert block_checkpointing(model) == (True, False)
    log = swapper.transfer.log.of("run")
    assert swapper.swapped and set(swapper.swapped) <= set(log)    # swapped blocks of both lists were streamed in
    assert len(blocks_of(model)) == 5 and max(swapper.swapped) >= 2
    (latents,) = session.last_samples                               # validation through the family's sampler
    assert latents.shape == (1, dual_family.LATENT, 1, 4, 4)

    # resume: 3 steps, save, a fresh session from the state, 3 more == the uninterrupted run
    part, _ = _session(dual_family, tmp_path / "b", 6)
    part.train_steps(3)
    resumed, _ = _session(dual_family, tmp_path / "b", 6, resume=part.save_state())
    assert resumed.train_steps(3) == losses[3:]

    # the saved LoRA reads back without a model (the family's underscore names) and in ComfyUI's format
    swapper.detach("cpu")
    musubi = read_lora(tmp_path / "a" / "out" / "dual.safetensors")
    assert set(musubi.modules) == adapted and not musubi.unresolved
    assert musubi.metadata["ss_base_model_version"] == "dual"
    assert musubi.metadata["ss_network_module"] == "networks.lora_dual"
    comfy_file = session.save_lora(tmp_path / "comfy.safetensors")
    from engine.lora import save_lora
    save_lora(comfy_file, tmp_path / "comfy2.safetensors", format="comfyui")
    comfy = read_lora(tmp_path / "comfy2.safetensors")
    assert set(comfy.modules) == adapted

    # applied to a clean model, the file reproduces the trained model's output
    x, t, ctx = torch.randn(1, 4, 1, 4, 4), torch.tensor([400.0]), [torch.randn(2, dual_family.TEXT)]
    session.network.eval()
    with torch.no_grad():
        trained = model(x, t, ctx)
        clean = dual_family.DualDiT()
        report = match_lora(comfy, clean)
        assert sorted(report.matched) == sorted(adapted) and not report.unmatched_keys and not report.uncovered
        apply_loras(clean, [(tmp_path / "comfy2.safetensors", 1.0)])
        torch.testing.assert_close(clean(x, t, ctx), trained, rtol=1e-4, atol=1e-5)

    # the family's own sampler, deterministic by seed
    sample = lambda: dual_family.FAMILY.sample(model, dual_family.DualRequest(ctx[0], 32, 32, 1, 3, 7, 3.0))  # noqa
    assert torch.equal(sample(), sample())

    # fp8 storage follows the family's spec: only Linear layers inside both block lists
    converted = set(quantize_model_fp8(dual_family.DualDiT(), "scaled"))
    assert converted == {n for n, m in dual_family.DualDiT().named_modules()
                         if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks.", "single_blocks."))}
