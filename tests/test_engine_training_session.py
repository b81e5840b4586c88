"""TrainingSession on a small WanModel-shaped stand-in (fast on CPU): learning, repeated calls, clipping, mixed
precision, input validation, saving/retention, logging, validation. Resume/cancel bit-exactness, gradient
accumulation and bad inputs before training run on the real tiny preset with dropout: test_engine_training_wan.py."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from engine.errors import MusubiInputError
from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                             TrainingSession, ValidationConfig, ValidationPrompt, loss_curve_image, read_state)
from engine.memory.checkpointing import block_checkpointing

TEXT_DIM = 8


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q = nn.Linear(dim, dim)
        self.self_attn.o = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h):
        h = h + self.self_attn.o(torch.tanh(self.self_attn.q(h)))
        return h + self.ffn(h)


class StandInDiT(nn.Module):
    """WanModel's calling convention and module names (blocks.N.self_attn.q/o, ffn.0/2), pixel tokens; the Wan
    family's rules apply to it."""

    family = "wan"

    def __init__(self, dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(in_dim=16, out_dim=16, text_dim=TEXT_DIM, variant="stand-in", model_type="t2v",
                                      has_flf_pos_emb=False, has_image_input=False)
        self.patch_embedding = nn.Linear(16, dim)
        self.time_embedding = nn.Linear(1, dim)
        self.text_embedding = nn.Linear(TEXT_DIM, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(2)])
        self.head = nn.Linear(dim, 16)
        self.attention_backend = "sdpa"
        self.calls = 0

    def forward(self, x, t, context, clip_fea=None, y=None):
        self.calls += 1
        b, c, f, h, w = x.shape
        tok = self.patch_embedding(x.flatten(2).transpose(1, 2))                    # [B, FHW, D]
        ctx = torch.stack([cc.mean(0) for cc in context]) if isinstance(context, list) else context.mean(1)
        tok = tok + self.time_embedding(t.reshape(-1, 1, 1).float() / 1000) + self.text_embedding(ctx)[:, None]
        for blk in self.blocks:
            tok = blk(tok)
        return self.head(tok).transpose(1, 2).reshape(b, c, f, h, w)


def make_batches(n=4, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.8,
              "context": [torch.randn(5, TEXT_DIM, generator=g)]} for _ in range(n)]
    out = []
    for i in range(0, n, batch):
        group = items[i:i + batch]
        out.append({"latents": torch.cat([it["latents"] for it in group]),
                    "context": [c for it in group for c in it["context"]]})
    return out


def session(tmp_path, steps=20, model=None, batches=None, network=None, optimizer=None, resume=None, **train_kw):
    train_kw.setdefault("mixed_precision", "no")
    train_kw.setdefault("timesteps", TimestepConfig("uniform"))
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=steps, seed=7, **train_kw)
    return TrainingSession(model or StandInDiT(), network or NetworkConfig(rank=4, alpha=4),
                           optimizer or OptimizerConfig(learning_rate=3e-3),
                           InMemoryBatchLoader(batches or make_batches(), seed=3), cfg, resume_from=resume)


def test_loss_falls_and_base_is_frozen(tmp_path):
    model = StandInDiT()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    s = session(tmp_path, steps=60, model=model)
    assert all(not p.requires_grad for p in model.parameters())
    losses = s.train_steps(60)
    assert len(losses) == 60 and s.finished
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    # adapter stays attached: the model output differs from the bare model's
    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), [torch.randn(3, TEXT_DIM)]
    with torch.no_grad():
        with_lora = model(x, t, ctx)
        s.network.multiplier = 0.0
        without = model(x, t, ctx)
    assert not torch.allclose(with_lora, without)
    assert (tmp_path / "lora.safetensors").is_file() and (tmp_path / "lora-state").is_dir()


def test_repeated_train_steps_equal_one_call(tmp_path):
    a = session(tmp_path / "a", steps=8).train_steps(8)
    s = session(tmp_path / "b", steps=8)
    b = s.train_steps(3) + s.train_steps(2) + s.train_steps(10)  # the last call stops at the end
    assert a == b


def test_clipping_bounds_the_update(tmp_path):
    opt = OptimizerConfig(learning_rate=1.0, optimizer_type="SGD", max_grad_norm=1e-3)
    s = session(tmp_path, steps=1, optimizer=opt)
    before = torch.cat([p.detach().flatten().clone() for p in s.network.trainable_parameters()])
    s.train_steps(1)
    after = torch.cat([p.detach().flatten() for p in s.network.trainable_parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_adapter(tmp_path, precision):
    s = session(tmp_path, steps=3, mixed_precision=precision, gradient_checkpointing=True)
    losses = s.train_steps(3)
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in s.network.trainable_parameters())
    assert (s.scaler is not None) == (precision == "fp16")
    assert block_checkpointing(s.model) == (True, False)


def test_periodic_saves_and_retention(tmp_path):
    s = session(tmp_path, steps=10, save_every_n_steps=2, keep_last_n_saves=2, save_state=True,
                keep_last_n_states=1)
    s.train_steps(10)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lora-state", "lora-step00000006.safetensors", "lora-step00000008-state",
                     "lora-step00000008.safetensors", "lora.safetensors"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys
    assert meta["ss_steps"] == "10" and meta["ss_timestep_sampling"] == "uniform"


def test_epoch_saves(tmp_path):
    s = session(tmp_path, steps=1, max_train_epochs=3, save_every_n_epochs=1)  # 4 batches/epoch -> 12 steps
    assert s.total_steps == 12
    s.train_steps(100)
    assert sorted(p.name for p in tmp_path.glob("lora-0*.safetensors")) == [
        "lora-000001.safetensors", "lora-000002.safetensors"]  # the final epoch is the final file


def test_tensorboard_status_loss_map_and_curve(tmp_path):
    s = session(tmp_path / "out", steps=5, logging_dir=str(tmp_path / "logs"))
    infos = []
    s.train_steps(5, progress=lambda st, tot, info: infos.append(info))
    s.close()
    assert [i["step"] for i in infos] == [1, 2, 3, 4, 5]
    assert infos[-1]["status"].startswith("step 5/5 | loss ") and "it/s" in infos[-1]["status"]
    assert s.loss_map() == {"loss": s.history.losses} and len(s.history.losses) == 5
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    img = loss_curve_image(s.history.losses, 200, 100)
    assert img.shape == (1, 100, 200, 3) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.01


def test_validation_samples_with_adapter_in_eval(tmp_path):
    seen = []

    def fake_generate(model, request, progress):
        seen.append((model.training, torch.is_grad_enabled(), request.width, request.seed))
        return torch.zeros(1, 16, 1, request.height // 8, request.width // 8)

    prompt = ValidationPrompt(context=torch.randn(4, TEXT_DIM), width=64, height=32, seed=9, steps=2)
    val = ValidationConfig(prompts=[prompt], every_n_steps=2, sample_fn=fake_generate)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=4, mixed_precision="no",
                         timesteps=TimestepConfig("uniform"))
    s = TrainingSession(StandInDiT(), NetworkConfig(), OptimizerConfig(learning_rate=1e-3),
                        InMemoryBatchLoader(make_batches()), cfg, validation=val)
    s.train_steps(4)
    assert seen == [(False, False, 64, 9)] * 2
    assert s.last_samples[0].shape == (1, 16, 1, 4, 8)


# --- validation before training ----------------------------------------------------------------------------------

def test_model_with_sage_backend_is_refused(tmp_path):
    model = StandInDiT()
    model.attention_backend = "sage"
    with pytest.raises(MusubiInputError, match="attention_backend"):
        session(tmp_path, model=model)


def test_dataset_for_another_model_is_refused(tmp_path):
    wrong_text = [{"latents": torch.randn(1, 16, 1, 4, 4), "context": [torch.randn(5, 4096)]}]
    with pytest.raises(MusubiInputError, match="text embeddings"):
        session(tmp_path, batches=wrong_text)
    wrong_latents = [{"latents": torch.randn(1, 48, 1, 4, 4), "context": [torch.randn(5, TEXT_DIM)]}]
    with pytest.raises(MusubiInputError, match="latents"):
        session(tmp_path, batches=wrong_latents)


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MusubiInputError, match="output_dir"):
        session(blocker / "sub")


def test_resume_with_other_rank_is_refused(tmp_path):
    s = session(tmp_path, steps=2)
    s.train_steps(1)
    folder = s.save_state()
    with pytest.raises(MusubiInputError, match="rank"):
        session(tmp_path, steps=2, network=NetworkConfig(rank=8, alpha=4), resume=folder)


def test_non_finite_loss_stops_with_a_clear_error_and_a_saved_state(tmp_path):
    full = session(tmp_path / "full", steps=6).train_steps(6)
    model = StandInDiT()
    s = session(tmp_path / "run", steps=6, model=model)
    s.train_steps(3)
    good = {k: v.clone() for k, v in s.network.state_dict().items()}
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k) * float("nan")
    with pytest.raises(MusubiInputError, match=r"training loss at step 4.*nan.*diverged.*state of step 3"):
        s.train_steps(3)
    model.forward = original
    for k, v in s.network.state_dict().items():          # the optimizer never stepped on the NaN gradients
        assert torch.equal(v, good[k]), k
    state = read_state(tmp_path / "run" / "lora-state")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["network"].values())
    resumed = session(tmp_path / "run", steps=6, resume=tmp_path / "run" / "lora-state")
    assert resumed.train_steps(3) == full[3:]


def test_lora_dir_takes_the_lora_files_and_the_states_stay_in_output_dir(tmp_path):
    s = session(tmp_path / "states", steps=6, save_every_n_steps=2, keep_last_n_saves=1, save_state=True,
                lora_dir=str(tmp_path / "loras"))
    s.train_steps(6)   # periodic LoRAs at steps 2 and 4 (step 2 pruned in lora_dir), the final one at 6
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["lora-step00000004.safetensors",
                                                                      "lora.safetensors"]
    assert not list((tmp_path / "states").glob("*.safetensors"))
    assert (tmp_path / "states" / "lora-state").is_dir() and (tmp_path / "states" / "lora-step00000004-state").is_dir()


def test_saved_lora_carries_the_trainer_metadata_musubi_writes(tmp_path):
    import json
    import time

    from safetensors import safe_open
    from engine.data.cache import CachedDataset, CachedSample

    loader = InMemoryBatchLoader(make_batches(), seed=3)  # 4 batches per epoch
    # what the cached-dataset loader exposes: 2 images at 48x32 and one 5-frame clip, 3 repeats
    samples = [CachedSample(f"img{i}", tmp_path / f"{i}.st", None, (48, 32, 1)) for i in range(2)]
    samples.append(CachedSample("clip", tmp_path / "c.st", None, (64, 48, 5)))
    loader.datasets = [CachedDataset("wan", samples, 1, 3, tmp_path / "cache_a")]
    cfg = TrainingConfig(output_dir=str(tmp_path / "out"), max_train_steps=6, seed=7, mixed_precision="no",
                         save_state=True,
                         timesteps=TimestepConfig("uniform", min_timestep=100, max_timestep=900))
    net = NetworkConfig(rank=4, alpha=4, dropout=0.1, rank_dropout=0.2, exclude=["ffn"])
    t0 = time.time()
    s = TrainingSession(StandInDiT(), net, OptimizerConfig(learning_rate=3e-3), loader, cfg)
    s.train_steps(6)
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_session_id"] == str(s.session_id) and 0 <= s.session_id < 2**32
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert t0 <= started <= finished <= time.time()
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"], meta["ss_num_train_items"]) == ("4", "2", "9")
    datasets = json.loads(meta["ss_datasets"])
    assert len(datasets) == 1 and datasets[0]["num_items"] == 3 and datasets[0]["num_repeats"] == 3
    assert datasets[0]["bucket_info"] == {"48x32x1": 6, "64x48x5": 3} and datasets[0]["is_image_dataset"] is False
    assert meta["modelspec.resolution"] == "48x32" and meta["modelspec.timestep_range"] == "100,900"
    assert meta["ss_network_dropout"] == "0.1"
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.2", "exclude_patterns": "['ffn']"}
    # a resumed run is the same session
    s2 = TrainingSession(StandInDiT(), net, OptimizerConfig(learning_rate=3e-3), loader, cfg,
                         resume_from=tmp_path / "out" / "lora-state")
    assert (s2.session_id, s2.started_at) == (s.session_id, s.started_at)


def test_closing_a_session_saves_unsaved_progress_and_time_based_saves(tmp_path):
    s = session(tmp_path, steps=10)
    s.train_steps(3)
    assert not (tmp_path / "lora-state").exists()
    s.close()                                                  # replaced / released: its steps are not lost
    assert read_state(tmp_path / "lora-state")["step"] == 3
    resumed = session(tmp_path, steps=10, resume=tmp_path / "lora-state")
    resumed.close()                                            # nothing new: the state is not rewritten
    assert read_state(tmp_path / "lora-state")["step"] == 3

    clock = [0.0]
    t = session(tmp_path / "timed", steps=10, save_state_every_minutes=5)
    t._clock = lambda: clock[0]
    t._last_state_save = 0.0
    t.train_steps(2)
    assert not (tmp_path / "timed" / "lora-state").exists()
    clock[0] = 301.0                                           # five minutes of training later
    t.train_steps(1)
    assert read_state(tmp_path / "timed" / "lora-state")["step"] == 3
    t.train_steps(1)                                           # the next save is five minutes after that one
    assert read_state(tmp_path / "timed" / "lora-state")["step"] == 3


def test_a_fresh_run_never_overwrites_a_later_state_of_another_run(tmp_path):
    first = session(tmp_path, steps=10)
    first.train_steps(6)
    first.save_state()
    fresh = session(tmp_path, steps=10)                        # same output name, started from scratch
    fresh.train_steps(2)
    fresh.close()
    assert read_state(tmp_path / "lora-state")["step"] == 6    # kept
    assert read_state(tmp_path / f"lora-run{fresh.session_id}-state")["step"] == 2


# --- engine/training/state.py on its own: names, retention, RNG capture/restore, the state file (mutation testing) --

def test_state_and_lora_names_for_step_epoch_and_latest(tmp_path):
    from engine.training.state import lora_path, state_dir

    assert lora_path(tmp_path, "x", step=12) == tmp_path / "x-step00000012.safetensors"
    assert lora_path(tmp_path, "x", epoch=3) == tmp_path / "x-000003.safetensors"
    assert lora_path(tmp_path, "x") == tmp_path / "x.safetensors"
    assert state_dir(tmp_path, "x", step=12) == tmp_path / "x-step00000012-state"
    assert state_dir(tmp_path, "x", epoch=3) == tmp_path / "x-000003-state"
    assert state_dir(tmp_path, "x") == tmp_path / "x-state"


@pytest.mark.parametrize("kind", ["step", "epoch", "step-state", "epoch-state"])
def test_prune_keeps_the_newest_of_one_kind_and_returns_what_it_removed(tmp_path, kind):
    from engine.training.state import lora_path, prune, state_dir

    per = "step" if kind.startswith("step") else "epoch"
    made = []
    for n in (9, 10, 2, 100):                                   # created out of order
        p = (state_dir if kind.endswith("state") else lora_path)(tmp_path, "a", **{per: n})
        if kind.endswith("state"):
            p.mkdir()
            (p / "training_state.pt").write_bytes(b"x")
        else:
            p.write_bytes(b"x")
        made.append((n, p))
    others = [tmp_path / "a.safetensors", tmp_path / "a-state", tmp_path / "ab-step00000001.safetensors"]
    for o in others:
        o.mkdir() if o.name.endswith("state") else o.write_bytes(b"x")
    removed = prune(tmp_path, "a", kind, 2)
    assert removed == [p for n, p in sorted(made)[:2]]          # 2 and 9, oldest first
    assert all(not p.exists() for p in removed)
    assert all(p.exists() for n, p in sorted(made)[2:]) and all(o.exists() for o in others)
    assert prune(tmp_path, "a", kind, 0) == [] and prune(tmp_path, "a", kind, None) == []


def _draws():
    import random

    import numpy as np

    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist())


def test_rng_capture_and_restore_round_trip_every_generator(tmp_path):
    from engine.training.state import capture_rng, read_state, restore_rng, write_state

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    state = capture_rng(gen)
    first = (torch.rand(2, generator=gen).tolist(), _draws())
    write_state(tmp_path, {"step": 1, "rng": state})          # through the file, as a resume does
    gen2 = torch.Generator().manual_seed(99)
    torch.manual_seed(2)
    restore_rng(read_state(tmp_path)["rng"], gen2)
    assert (torch.rand(2, generator=gen2).tolist(), _draws()) == first


def test_cuda_rng_is_captured_when_initialised_and_restored_only_on_the_same_device_count(monkeypatch):
    from engine.training import state as st

    cuda, calls = torch.cuda, []
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [torch.tensor([1, 2], dtype=torch.uint8)])
    monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: calls.append([s.tolist() for s in states]))
    gen = torch.Generator()
    assert "torch_cuda" not in st.capture_rng(gen)            # not initialised: nothing to save (and no CUDA start)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    state = st.capture_rng(gen)
    assert [s.tolist() for s in state["torch_cuda"]] == [[1, 2]]
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    st.restore_rng(state, gen)
    assert calls == []                                        # another device count: left alone
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    st.restore_rng(state, gen)
    assert calls == [[[1, 2]]]
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    st.restore_rng(state, gen)                                # a state from a GPU run resumed on CPU
    assert calls == [[[1, 2]]]
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    st.restore_rng({k: v for k, v in state.items() if k != "torch_cuda"}, gen)
    assert calls == [[[1, 2]]]


def test_state_file_and_its_run_record(tmp_path):
    from engine.training.state import RUN_FILE, read_state, state_run, write_state

    target = write_state(tmp_path, {"step": 7, "session_id": "abc", "t": torch.arange(3)})
    assert target == tmp_path / "training_state.pt"
    assert state_run(tmp_path) == {"session_id": "abc", "step": 7}
    for path in (tmp_path, target):                           # the folder or the .pt inside it
        s = read_state(path)
        assert s["step"] == 7 and s["version"] == 1 and s["t"].tolist() == [0, 1, 2]
    for bad in ('{"step": "7"}', '[7]', '{"session_id": "abc"}', 'not json'):   # a broken sidecar: the state says
        (tmp_path / RUN_FILE).write_text(bad)
        assert state_run(tmp_path) == {"session_id": "abc", "step": 7}, bad
    target.write_bytes(b"not a state")
    assert state_run(tmp_path) is None                          # and a broken state is no state
    assert state_run(tmp_path / "missing") is None


def test_read_state_refuses_missing_unreadable_foreign_and_old_states(tmp_path):
    from engine.training.state import read_state

    missing = tmp_path / "none"
    with pytest.raises(MusubiInputError) as e:
        read_state(missing)
    assert str(e.value) == f"resume state: got {str(missing)!r}; expected a state folder containing training_state.pt"

    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a torch file")
    try:
        torch.load(garbage, map_location="cpu", weights_only=True)
    except Exception as err:             # noqa: BLE001 - the type named in the message
        kind = type(err).__name__
    with pytest.raises(MusubiInputError) as e:
        read_state(garbage)
    assert str(e.value).startswith(f"resume state: got {str(garbage)!r}; expected a readable training state ({kind}: ")

    pickled = tmp_path / "p.pt"                                # arbitrary objects are never unpickled
    torch.save({"version": 1, "step": 1, "obj": SimpleNamespace(a=1)}, pickled)
    with pytest.raises(MusubiInputError, match=r"^resume state: got .*p\.pt'; expected a readable training state"):
        read_state(pickled)

    for i, content in enumerate(({"version": 2, "step": 1}, {"step": 1}, [1, 2])):
        old = tmp_path / f"old{i}.pt"
        torch.save(content, old)
        with pytest.raises(MusubiInputError) as e:
            read_state(old)
        assert str(e.value) == f"resume state: got {str(old)!r}; expected a training state of version 1"


def test_read_state_loads_onto_the_cpu_with_weights_only_on_every_supported_torch(tmp_path, monkeypatch):
    """torch 2.4/2.5 (supported) default to weights_only=False, and a state saved from a GPU run must load on a
    CPU-only machine: both arguments are part of the contract, whatever this torch's defaults are."""
    from engine.training.state import read_state, write_state

    write_state(tmp_path, {"step": 1})
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    assert read_state(tmp_path)["step"] == 1
    assert seen == [{"map_location": "cpu", "weights_only": True}]


def test_a_state_whose_run_json_was_never_written_is_still_found(tmp_path):
    """#23: killed between writing training_state.pt and its run.json sidecar, the state is still the run's latest
    (a continuing run finds it; a fresh one saves beside it instead of overwriting it)."""
    from engine.training.state import RUN_FILE, state_run

    first = session(tmp_path, steps=10)
    first.train_steps(4)
    first.save_state()
    (tmp_path / "lora-state" / RUN_FILE).unlink()
    assert state_run(tmp_path / "lora-state") == {"session_id": first.session_id, "step": 4}
    fresh = session(tmp_path, steps=10)
    fresh.train_steps(1)
    fresh.close()
    assert read_state(tmp_path / "lora-state")["step"] == 4
    assert state_run(tmp_path / "empty-state") is None


@pytest.mark.parametrize("kind, lokr_factor", [("lora", -1), ("loha", -1), ("lokr", 4), ("lokr", -1)])
def test_network_weights_start_from_a_saved_adapter_of_each_kind(tmp_path, kind, lokr_factor):
    """Musubi --network_weights: a new session starts with the saved adapter's weights (LoHa/LoKr included); a file of
    another kind or rank is refused by name."""
    net = NetworkConfig(kind=kind, rank=4, alpha=2.0, lokr_factor=lokr_factor)
    first = session(tmp_path / "a", steps=3, network=net)
    first.train_steps(3)
    saved = tmp_path / "a" / "lora.safetensors"
    trained = {k: v.clone() for k, v in first.network.state_dict().items()}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "alpha" not in k)

    second = session(tmp_path / "b", steps=3, network=NetworkConfig(kind=kind, rank=4, alpha=2.0,
                                                                    lokr_factor=lokr_factor,
                                                                    network_weights=str(saved)))
    for k, v in second.network.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)

    other = "loha" if kind != "loha" else "lora"
    with pytest.raises(MusubiInputError, match="network_weights"):
        session(tmp_path / "c", network=NetworkConfig(kind=other, rank=4, network_weights=str(saved)))
    with pytest.raises(MusubiInputError, match="network_weights"):
        session(tmp_path / "d", network=NetworkConfig(kind=kind, rank=2, lokr_factor=lokr_factor,
                                                      network_weights=str(saved)))
