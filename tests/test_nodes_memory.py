"""Block swap and activation offload through the nodes, in a real ComfyUI (in-process executor), on CPU.

`nodes.placement.use_test_transfer(FakeTransfer)` makes the DiT-running nodes take the block-swap path on CPU with
the engine's fake transfer: evicted weights live on the meta device, so a swapped block that ran without being
loaded would fail, and results must be bit-identical to the same graph without swap. The tiny preset has 2 blocks,
so blocks_to_swap=1 is the most it allows.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from training_graphs import SIZE, sample_nodes, train_prompt

pytestmark = pytest.mark.comfy


@pytest.fixture
def swap(comfy):
    """The test transfer on; every FakeTransfer made is recorded. Afterwards: no swapper left, transfer off."""
    placement = comfy.pack_module("nodes.placement")
    memory = importlib.import_module(comfy.pack_module().__name__ + ".engine.memory")
    made = []

    def factory():
        t = memory.FakeTransfer()
        made.append(t)
        return t

    previous = placement.use_test_transfer(factory)
    baseline = memory.pinned_bytes_in_use()
    yield {"placement": placement, "memory": memory, "transfers": made, "baseline": baseline}
    placement.release_swap()
    placement.use_test_transfer(previous)
    assert memory.pinned_bytes_in_use() == baseline
    comfy.pack_module("nodes.registry").SESSIONS.release()


def loader(blocks_to_swap=0, activation_offload=False, non_blocks=False) -> dict:
    return {"class_type": "MusubiWanDiTLoader",
            "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa", "fp8": "none",
                       "blocks_to_swap": blocks_to_swap, "activation_offload": activation_offload,
                       "offload_non_block_weights": non_blocks}}


def t2v_prompt(blocks_to_swap, seed=3, frames=5) -> dict:
    p = {"1": loader(blocks_to_swap)}
    sample_nodes(p, ["1", 0], "3", seed=seed)
    p["31"]["inputs"].update(frames=frames, guidance_scale=3.0, steps=4)
    return p


def swap_prompt(out_dir, tag, blocks_to_swap=0, activation_offload=False, steps=4, non_blocks=False) -> dict:
    """The training graph of test_nodes_training with the loader's memory options; `tag` names the session (a new
    session per tag, everything that affects the losses equal)."""
    p = train_prompt(out_dir, steps=steps)
    p["1"] = loader(blocks_to_swap, activation_offload, non_blocks)
    p["5"]["inputs"]["output_name"] = f"lora_{tag}"
    return p


def loads(transfers) -> list[int]:
    return [b for t in transfers for b in t.log.of("load")]


def test_sampling_with_block_swap_is_bit_identical_and_stays_attached(comfy, swap):
    placement = swap["placement"]
    comfy.run(t2v_prompt(0))
    reference = comfy.output("31")["samples"].clone()
    model = comfy.output("1").module
    assert placement.active_swapper() == [] and not swap["transfers"]

    comfy.run(t2v_prompt(1))
    swapped = comfy.output("31")["samples"]
    assert torch.equal(swapped, reference)
    sw = placement.active_swapper(model)
    assert sw is not None and sw.swapped == [1] and loads(swap["transfers"]), "the sampler did not swap"
    assert sw.host_bytes > 0 and swap["memory"].pinned_bytes_in_use() == swap["baseline"] + sw.host_bytes

    comfy.run(t2v_prompt(1, seed=4))   # next queue run, same model: the same swapper, nothing re-packed
    assert placement.active_swapper(model) is sw and len(swap["transfers"]) == 1

    comfy.run(t2v_prompt(0, seed=5))   # swap off again: detached to CPU, the whole model moves
    assert placement.active_swapper() == []
    assert model.blocks[1].self_attn.q.weight.device.type == "cpu"
    assert swap["memory"].pinned_bytes_in_use() == swap["baseline"]


def test_offloaded_non_block_weights_give_identical_samples(comfy, swap):
    """offload_non_block_weights: the swapper keeps embeddings/head on the host between forwards (the fake
    transfer's device is the CPU, so this checks the wiring and the results, not where the bytes are)."""
    placement = swap["placement"]
    comfy.run(t2v_prompt(0))
    reference = comfy.output("31")["samples"].clone()
    p = t2v_prompt(1)
    p["1"]["inputs"]["offload_non_block_weights"] = True
    comfy.run(p)
    assert torch.equal(comfy.output("31")["samples"], reference)
    sw = placement.active_swapper(comfy.output("1"))
    assert sw is not None and sw.config.offload_non_blocks


def test_training_losses_identical_with_swap_and_activation_offload(comfy, data, swap, tmp_path, monkeypatch):
    dit = importlib.import_module(comfy.pack_module().__name__ + ".engine.memory.checkpointing")   # wraps the blocks
    original, offload_flags = dit.checkpoint_block, []

    def spy(*args, offload=False, **kw):
        offload_flags.append(offload)
        return original(*args, offload=offload, **kw)

    monkeypatch.setattr(dit, "checkpoint_block", spy)
    results = {}
    # (with the fake transfer, offloaded weights are meta tensors between uses: using one would fail)
    for tag, n, offload, non_blocks in [("plain", 0, False, False), ("swap", 1, False, False),
                                        ("swap_offload", 1, True, False), ("offload", 0, True, False),
                                        ("swap_non_blocks", 1, True, True)]:
        offload_flags.clear()
        before = len(loads(swap["transfers"]))
        comfy.run(swap_prompt(tmp_path / tag, tag, n, offload, non_blocks=non_blocks))
        results[tag] = comfy.output("6", 2)["loss"]
        view = comfy.output("6", 4)   # the trained view's handle carries the loader's current options
        assert view.options.activation_offload is offload and view.options.blocks_to_swap == n
        assert offload_flags and set(offload_flags) == {offload}, "activation offload did not reach the DiT"
        assert (len(loads(swap["transfers"])) > before) == (n > 0)
        if n:
            assert swap["placement"].active_swapper(view) is not None
            net = view.module.__dict__["_musubi_lora_networks"][-1]
            assert all(p.device.type == "cpu" for p in net.parameters())   # not meta: real adapter weights
    assert len(results["plain"]) == 4
    for tag in ("swap", "swap_offload", "offload", "swap_non_blocks"):
        assert results[tag] == results["plain"], (tag, results[tag], results["plain"])


def test_sampling_the_base_after_training_a_view_switches_the_swapper_then_unload(comfy, data, swap, tmp_path):
    placement, memory = swap["placement"], swap["memory"]
    # the reference: the same two samples without swap
    p0 = swap_prompt(tmp_path / "ref", "ref", 0)
    sample_nodes(p0, ["6", 4], "4")
    comfy.run(p0)
    ref_view = comfy.output("41")["samples"].clone()
    p0b = dict(p0)
    sample_nodes(p0b, ["1", 0], "3")
    comfy.run(p0b)
    ref_base = comfy.output("31")["samples"].clone()

    p = swap_prompt(tmp_path / "swap", "swap", 1)
    sample_nodes(p, ["6", 4], "4")
    comfy.run(p)                       # train the view, sample with it: the view holds the swapper
    base, view = comfy.output("1").module, comfy.output("6", 4).module
    assert placement.active_swapper(view) is not None and placement.active_swapper(base) is None
    assert torch.equal(comfy.output("41")["samples"], ref_view)

    sample_nodes(p, ["1", 0], "3")
    comfy.run(p)                       # training cached; the base model runs: the swapper moves over to it
    assert placement.active_swapper(base) is not None and placement.active_swapper(view) is None
    assert len(placement.active_swapper()) == 1
    assert torch.equal(comfy.output("31")["samples"], ref_base)
    for block in view.blocks:          # the view keeps no swap hook
        assert not block._forward_pre_hooks and not block._forward_hooks

    p["90"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "everything",
                                                             "passthrough": ["31", 0]}}
    comfy.run(p)
    assert placement.active_swapper() == [] and memory.pinned_bytes_in_use() == swap["baseline"]
    assert all(t.device.type == "cpu" for t in list(base.parameters()) + list(base.buffers()))

    sample_nodes(p, ["6", 4], "4", seed=9)   # the view runs again after the offload: swapper re-attached
    del p["90"]
    comfy.run(p)
    assert placement.active_swapper(view) is not None
    p["90"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "release", "what": "training sessions",
                                                             "passthrough": ["41", 0]}}
    comfy.run(p)
    assert placement.active_swapper() == [] and memory.pinned_bytes_in_use() == swap["baseline"]


def test_view_made_while_swapped_inherits_no_swap_hook(comfy, swap):
    comfy.run(t2v_prompt(1, seed=12))
    handle = comfy.output("1")
    model = handle.module
    placement, lora = swap["placement"], comfy.pack_module("nodes.lora")
    assert placement.active_swapper(model) is not None and model.blocks[0]._forward_pre_hooks
    view = comfy.pack_module("engine.lora.views").make_lora_view(model)
    assert "_musubi_block_swap" not in view.__dict__
    for block in view.blocks:
        assert not block._forward_pre_hooks and not block._forward_hooks
        assert not block._forward_pre_hooks_with_kwargs and not getattr(block, "_forward_hooks_with_kwargs", {})
    placement.place_dit(handle.with_module(view))   # the view takes the weight set's swapper over
    assert placement.active_swapper(view) is not None and placement.active_swapper(model) is None
    assert not model.blocks[0]._forward_pre_hooks


def test_apply_lora_merge_on_a_swapped_model(comfy, swap):
    """Merge mode reads the base weights: Apply LoRA detaches the swapper first (no meta weight gets merged)."""
    p = t2v_prompt(1, seed=11)     # a prompt no other test ran (ComfyUI would serve it from its cache)
    comfy.run(p)
    model = comfy.output("1").module
    assert swap["placement"].active_swapper(model) is not None
    # 2 blocks, prefetch 1: block 1 stays loaded after sampling; evict it as a bigger model would have it
    swap["placement"].active_swapper(model).evict_loaded()
    assert model.blocks[1].self_attn.q.weight.device.type == "meta"
    p["50"] = {"class_type": "MusubiCreateRandomLoRA", "inputs": {"model": ["1", 0], "rank": 2, "seed": 1}}
    p["51"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["50", 0], "strength": 1.0,
                                                         "mode": "merge", "block_filter": ""}}
    sample_nodes(p, ["51", 0], "6", seed=3)
    p["61"]["inputs"].update(frames=5, guidance_scale=3.0, steps=4)
    comfy.run(p)
    merged_swap = comfy.output("61")["samples"].clone()
    view = comfy.output("51", 0)
    assert swap["placement"].active_swapper(view) is not None
    p["1"] = loader(0)
    comfy.run(p)
    assert torch.equal(comfy.output("61")["samples"], merged_swap)


def test_blocks_to_swap_beyond_the_model_limit_fails_naming_it(comfy, swap):
    comfy.run(t2v_prompt(2), expect_success=False)
    assert not comfy.executor.success
    assert "blocks_to_swap" in comfy.error_message(), comfy.error_message()
    # a handle made without the loader's check is refused by the placement itself, before anything moves
    placement, errors = swap["placement"], importlib.import_module(comfy.pack_module().__name__ + ".engine.errors")
    (handle,) = comfy.pack_module("nodes.wan").MusubiWanDiTLoader().load("preset:tiny-t2v", "fp32", "sdpa")
    bad = dataclasses.replace(handle, options=dataclasses.replace(handle.options, blocks_to_swap=2))
    with pytest.raises(errors.MusubiInputError, match="blocks_to_swap"):
        placement.place_dit(bad)
    assert placement.active_swapper() == []


def test_two_loaders_of_one_file_keep_their_own_options(comfy, swap):
    """Both loader nodes get the same loaded module; each node's options travel on its own handle. They used to be
    attributes of the shared module, so whichever loader ran last decided for every sampler, also for a sampler
    re-run alone later with the other loader's output from the cache."""
    p = {"1": loader(1), "2": loader(0)}
    sample_nodes(p, ["1", 0], "3", seed=21)
    sample_nodes(p, ["2", 0], "4", seed=21)
    comfy.run(p)
    assert comfy.module("1") is comfy.module("2")
    assert comfy.output("1").options.blocks_to_swap == 1 and comfy.output("2").options.blocks_to_swap == 0
    assert torch.equal(comfy.output("31")["samples"], comfy.output("41")["samples"])

    placement, model = swap["placement"], comfy.module("1")
    for seed in (22, 23):   # only the swapping loader's sampler re-runs (the loaders come from the cache)
        p["31"]["inputs"]["seed"] = seed
        comfy.run(p)
        assert placement.active_swapper(model) is not None, "the sampler of the blocks_to_swap=1 loader did not swap"
        p["41"]["inputs"]["seed"] = seed   # and the other one alone: the whole model, no swapper
        comfy.run(p)
        assert placement.active_swapper() == []
        assert torch.equal(comfy.output("31")["samples"], comfy.output("41")["samples"])


def test_compile_and_fp8_matmul_loader_options_reach_the_model(comfy, swap, monkeypatch):
    """compile_blocks: every block's forward goes through torch.compile (here its eager backend: Dynamo traces,
    no C++ toolchain needed) with the same samples; fp8_matmul: every fp8 layer is switched to fp8 matmul, and a
    model without fp8 weights is refused naming the input."""
    compile_mod = importlib.import_module(comfy.pack_module().__name__ + ".engine.memory.compile")
    real_compile = torch.compile
    monkeypatch.setattr(compile_mod.torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    p = t2v_prompt(0, seed=31)
    comfy.run(p)
    eager = comfy.output("31")["samples"].clone()
    p["1"]["inputs"]["compile_blocks"] = True
    comfy.run(p)
    blocks = comfy.module("1").blocks
    assert compile_mod.is_compiled(blocks)
    report = blocks[0].forward.report
    assert report.compiled == [0, 1] and not report.fell_back, report
    torch.testing.assert_close(comfy.output("31")["samples"], eager, rtol=0, atol=1e-6)
    p["1"]["inputs"]["compile_blocks"] = False
    comfy.run(p)
    assert not compile_mod.is_compiled(comfy.module("1").blocks)

    fp8 = importlib.import_module(comfy.pack_module().__name__ + ".engine.memory.fp8")
    p["1"]["inputs"].update(fp8="scaled", fp8_matmul=True)
    comfy.run(p)
    layers = [m for m in comfy.module("1").modules() if isinstance(m, fp8.Fp8Linear)]
    assert layers and all(m.use_fp8_matmul and m.scale_layout != "block" for m in layers)
    p["1"]["inputs"].update(fp8="none")
    comfy.run(p, expect_success=False)
    assert "fp8_matmul" in comfy.error_message(), comfy.error_message()
