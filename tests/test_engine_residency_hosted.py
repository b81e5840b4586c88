"""Model handles, the residency manager (engine/memory/residency.py) and hosted training sessions
(engine/training/hosted.py) on the tiny Wan preset, without ComfyUI. Block swap runs on CPU with the engine's
FakeTransfer (evicted weights on the meta device, so a block that runs without its weights fails loudly)."""

import pytest
import torch

from engine.errors import MusubiInputError
from engine.handle import ModelHandle, RunOptions, apply_run_options, as_handle
from engine.lora.views import make_lora_view
from engine.memory import FakeTransfer
from engine.memory.compile import is_compiled
from engine.memory.residency import Residency
from engine.training import InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig
from engine.training.hosted import host_session
from engine.training.state import state_dir, state_run
from lora_fixtures import tiny_model

CPU = torch.device("cpu")


def _inputs(text_dim):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([300.0]), [torch.randn(5, text_dim, generator=g)]


def _residency(requests=None):
    r = Residency(make_room=lambda n, device, pins_required=0: requests.append((n, pins_required))
                  if requests is not None else None)
    r.use_test_transfer(FakeTransfer)
    return r


def test_as_handle_wraps_bare_models_and_refuses_other_values():
    model = tiny_model()
    h = as_handle(model)
    assert h.module is model and h.family == "wan" and h.options == RunOptions()
    assert as_handle(h) is h and as_handle("a string") is None
    view = make_lora_view(model)
    swapped = ModelHandle.of(model, blocks_to_swap=1).with_module(view)
    assert swapped.module is view and swapped.options.blocks_to_swap == 1 and swapped.family == "wan"


def test_run_options_reach_the_module_only_when_it_runs():
    model = tiny_model()
    before = model.attention_backend
    fast = ModelHandle.of(model, attention="sdpa_split", compile=True)
    plain = ModelHandle.of(model, compile=False)
    assert model.attention_backend == before and not is_compiled(model.blocks)   # making handles changes nothing
    apply_run_options(fast)
    assert model.attention_backend == "sdpa_split" and is_compiled(model.blocks)
    view = make_lora_view(model)   # a view never inherits the source's compiled forward (it is bound to the source)
    assert not is_compiled(view.blocks)
    apply_run_options(plain)
    assert not is_compiled(model.blocks)


def test_one_swapper_per_weight_set_moves_between_model_and_view_with_identical_outputs():
    model = tiny_model()
    x, t, ctx = _inputs(model.config.text_dim)
    with torch.no_grad():
        reference = model(x, t, ctx)
    requests = []
    residency = _residency(requests)
    assert residency.place(model, CPU, blocks_to_swap=1) == CPU
    swapper = residency.active_swapper(model)
    assert swapper is not None and swapper.swapped == [1] and residency.active_swapper() == [swapper]
    assert requests and requests[-1][1] == swapper.host_bytes > 0   # the pinned masters were declared
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), reference)
    assert 1 in swapper.transfer.log.of("load")    # block 1 was streamed in for the forward
    swapper.evict_loaded()
    assert model.blocks[1].self_attn.q.weight.device.type == "meta"   # and only the host master holds it

    residency.place(model, CPU, blocks_to_swap=1)   # the same module again: the same swapper, nothing re-packed
    assert residency.active_swapper(model) is swapper

    view = make_lora_view(model)
    residency.place(view, CPU, blocks_to_swap=1)    # another module of the weight set: the swapper moves over
    assert residency.active_swapper(view) is not None and residency.active_swapper(model) is None
    assert len(residency.active_swapper()) == 1
    with torch.no_grad():
        assert torch.equal(view(x, t, ctx), reference)

    assert residency.release() == 1 and residency.active_swapper() == []
    assert model.blocks[1].self_attn.q.weight.device.type == "cpu"   # real weights back in the shared dicts


def test_a_blocks_to_swap_outside_the_model_is_refused_before_anything_moves():
    model = tiny_model()
    residency = _residency()
    with pytest.raises(MusubiInputError, match="blocks_to_swap"):
        residency.place(model, CPU, blocks_to_swap=len(model.blocks))
    assert residency.active_swapper() == []


def _config(tmp_path, steps):
    return TrainingConfig(output_dir=str(tmp_path), max_train_steps=steps, mixed_precision="no", seed=1,
                          gradient_checkpointing=True, timesteps=TimestepConfig("shift", discrete_flow_shift=2.0))


def _loader(text_dim):
    g = torch.Generator().manual_seed(0)
    return InMemoryBatchLoader([{"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.7,
                                 "context": [torch.randn(6, text_dim, generator=g)]} for _ in range(2)], seed=0)


def _host(model, tmp_path, steps, residency, options=RunOptions(), continue_saved=False):
    return host_session(ModelHandle(model, "wan", options), _loader(model.config.text_dim),
                        NetworkConfig(rank=4, alpha=4), OptimizerConfig(learning_rate=2e-3), _config(tmp_path, steps),
                        residency=residency, device=CPU, continue_saved=continue_saved)


def test_hosted_session_trains_a_view_with_swap_and_offload_like_a_plain_run(tmp_path):
    plain = _host(tiny_model(), tmp_path / "plain", 4, _residency())
    expected = plain.train_to(4, CPU)

    model = tiny_model()
    residency = _residency()
    hosted = _host(model, tmp_path / "swap", 4, residency, RunOptions(blocks_to_swap=1, activation_offload=True))
    assert hosted.model is not model and not model.__dict__.get("_musubi_lora_networks")   # the model stays clean
    assert hosted.train_to(2, CPU) == expected[:2]
    assert residency.active_swapper(hosted.model) is not None and hosted.session.activation_offload
    hosted.offload()                                   # between uses: swapper detached, adapter state on the host
    assert residency.active_swapper() == []
    assert hosted.train_to(4, CPU) == expected[2:]    # activate brings everything back; the same losses
    assert hosted.train_to(9, CPU) == []              # capped at max_train_steps
    assert hosted.handle().module is hosted.model and hosted.handle().options.blocks_to_swap == 1


def test_closing_a_hosted_session_saves_its_steps_and_a_new_one_continues_them(tmp_path):
    residency = _residency()
    reference = _host(tiny_model(), tmp_path / "ref", 6, residency).train_to(6, CPU)

    first = _host(tiny_model(), tmp_path / "run", 6, residency)
    first.train_to(3, CPU)
    first.close()
    assert not first.network.is_attached
    folder = state_dir(tmp_path / "run", first.session.config.output_name)
    assert state_run(folder) is not None

    second = _host(tiny_model(), tmp_path / "run", 6, residency, continue_saved=True)
    assert second.session.step == 3
    assert second.train_to(6, CPU) == reference[3:]


def test_weights_loaded_under_inference_mode_become_trainable_in_place_with_the_same_values(tmp_path):
    from engine.training.hosted import make_trainable

    with torch.inference_mode():     # as ComfyUI loads models inside a prompt
        model = tiny_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    view = make_lora_view(model)     # shares the parameter dicts: fixed once for every view
    assert any(p.is_inference() for p in model.parameters())
    make_trainable(model)
    assert not any(t.is_inference() for t in list(view.parameters()) + list(view.buffers()))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    hosted = _host(model, tmp_path, 2, _residency())   # and autograd trains on top of it
    assert len(hosted.train_to(2, CPU)) == 2
