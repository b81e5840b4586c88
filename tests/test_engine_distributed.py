"""Data-parallel training (engine/training/distributed.py) and the headless trainer (engine/train.py) on CPU with
gloo: real processes launched the way torchrun launches them (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT), the tiny T2V preset and a cached dataset on disk (conftest `tiny_t2v_dataset`).

2 ranks × batch 1 == 1 rank × accumulation 2 (losses and weights at fp32 tolerance); resume across world sizes;
a stop on rank 0 stops both ranks after the same step; a killed rank fails the other within a bounded time with a
clear error; no process is left behind."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from engine.errors import MusubiInputError
from engine.training import InMemoryBatchLoader, read_state
from engine.training.distributed import LaunchEnv, ShardedLoader
from engine.training.run_config import load_run_config, parse_run_config
from distributed_runs import REPO, Ranks, history, train


# --- runs -------------------------------------------------------------------------------------------------------

def write_config(folder: Path, dataset: Path, *, steps: int, accum: int = 1, network=None, model=None,
                 **training) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"family": "wan", "path": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa", **(model or {})},
        "dataset": {"config": str(dataset)},
        "network": network or {"rank": 4, "alpha": 4.0},
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 3e-3, "max_grad_norm": 1.0},
        "training": {"output_dir": "out", "output_name": "lora", "max_train_steps": steps, "seed": 3,
                     "gradient_accumulation_steps": accum, "mixed_precision": "no", "gradient_checkpointing": True,
                     "save_format": "musubi", "save_state_every_minutes": None,
                     "timesteps": {"timestep_sampling": "shift", "discrete_flow_shift": 2.0}, **training},
        "run": {"timeout_s": 60},
    }
    path = folder / "run.json"
    path.write_text(json.dumps(cfg))
    return path


def lora_tensors(folder: Path):
    from safetensors import safe_open

    with safe_open(str(folder / "out" / "lora.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def reference(tiny_t2v_dataset, tmp_path_factory):
    """One process, batch 1 × accumulation 2, 6 steps: what every distributed run below must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    train(write_config(folder, tiny_t2v_dataset, steps=6, accum=2), 1)
    return folder


# --- the runs -----------------------------------------------------------------------------------------------------

def test_two_ranks_batch_1_equal_one_rank_accumulating_2(reference, tiny_t2v_dataset, tmp_path):
    ranks = train(write_config(tmp_path, tiny_t2v_dataset, steps=6, accum=1), 2)
    ref, got = history(reference), history(tmp_path)
    assert len(got) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    (a, meta_a), (b, meta_b) = lora_tensors(reference), lora_tensors(tmp_path)
    assert list(a) == list(b) and not any(k.startswith("module.") for k in b)   # the single-process file format
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert set(meta_a) == set(meta_b) and meta_b["ss_steps"] == "6"
    assert meta_b["ss_num_batches_per_epoch"] == meta_a["ss_num_batches_per_epoch"] == "4"
    # rank 0 reports, rank 1 is silent; only rank 0 wrote files
    assert "step 6/6" in ranks.out(0) and ranks.out(1) == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora-state", "lora.safetensors"]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_resume_across_world_sizes(reference, tiny_t2v_dataset, tmp_path, first, then):
    """Saved with `first` ranks at step 3, continued by `then` ranks (the same global batch: accumulation 2 // W):
    the steps of the uninterrupted run."""
    train(write_config(tmp_path, tiny_t2v_dataset, steps=3, accum=2 // first), first)
    assert read_state(tmp_path / "out" / "lora-state")["step"] == 3
    train(write_config(tmp_path, tiny_t2v_dataset, steps=6, accum=2 // then), then)
    got, ref = history(tmp_path), history(reference)
    assert len(got) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_stop_on_rank_0_stops_both_ranks_after_the_same_step(tiny_t2v_dataset, tmp_path):
    """The stop file (what Ctrl-C or a node cancel does on rank 0), with every dropout on: module dropout keeps
    DDP's every-weight-in-every-backward rule."""
    dropout = {"rank": 4, "alpha": 4.0, "dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.3}
    config = write_config(tmp_path, tiny_t2v_dataset, steps=500, accum=2, network=dropout)
    ranks = Ranks(config, 2)
    try:
        ranks.wait_for(0, "step 2/500")
        (tmp_path / "out" / "lora.stop").touch()
        codes = ranks.wait()
    finally:
        ranks.kill()
    assert codes == [0, 0], (ranks.err(0), ranks.err(1))
    ranks.assert_gone()
    step = read_state(tmp_path / "out" / "lora-state")["step"]
    assert 2 <= step < 500
    assert f"stopped after step {step};" in ranks.out(0)
    assert f"rank 1: stopped by another rank after step {step}" in ranks.err(1)
    assert not (tmp_path / "out" / "lora.stop").exists()   # honoured once


def test_killed_rank_fails_the_other_with_a_clear_error_and_no_hang(tiny_t2v_dataset, tmp_path):
    config = write_config(tmp_path, tiny_t2v_dataset, steps=500)
    ranks = Ranks(config, 2)
    try:
        ranks.wait_for(0, "step 2/500")
        os.kill(ranks.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        codes = ranks.wait(timeout=70)   # gloo sees the closed connection at once; the group timeout is 60 s
        took = time.monotonic() - start
    finally:
        ranks.kill()
    assert codes[0] == 1 and codes[1] == -signal.SIGKILL, ranks.err(0)
    assert "lost contact with another rank" in ranks.err(0) and "Traceback" not in ranks.err(0), ranks.err(0)
    assert took < 65
    ranks.assert_gone()
    state = read_state(tmp_path / "out" / "lora-state")   # rank 0 saved its last completed step
    assert state["step"] >= 2


# --- the frozen base sharded with FSDP2 ------------------------------------------------------------------------

FSDP2 = {"shard_base": "fsdp2"}


def test_fsdp2_sharded_base_trains_like_ddp(reference, tiny_t2v_dataset, tmp_path):
    """2 ranks with the base split by FSDP2 == 2 ranks of plain DDP == 1 process accumulating 2 (`reference`): the
    same losses and the same LoRA file (keys, dtypes, metadata keys; values at fp32 tolerance)."""
    ranks = train(write_config(tmp_path, tiny_t2v_dataset, steps=6, model=FSDP2), 2)
    got = history(tmp_path)
    assert len(got) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(history(reference)), rtol=1e-5, atol=1e-6)
    (a, meta_a), (b, meta_b) = lora_tensors(reference), lora_tensors(tmp_path)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert set(meta_a) == set(meta_b) and meta_b["ss_steps"] == "6"
    line = next(x for x in ranks.out(0).splitlines() if x.startswith("base sharded (fsdp2"))
    local, total = (float(v) for v in re.findall(r"([\d.]+) MiB", line))
    assert 0.45 < local / total < 0.6, line        # rank 0 holds about half of the base (buffers are whole)
    assert ranks.out(1) == ""


def test_fsdp2_resume(reference, tiny_t2v_dataset, tmp_path):
    """A sharded run saved at step 3 continues sharded to 6, and its state continues on one process (where there
    is nothing to shard): the steps of the uninterrupted run."""
    train(write_config(tmp_path, tiny_t2v_dataset, steps=3, model=FSDP2), 2)
    assert read_state(tmp_path / "out" / "lora-state")["step"] == 3
    train(write_config(tmp_path, tiny_t2v_dataset, steps=5, model=FSDP2), 2)
    ranks = train(write_config(tmp_path, tiny_t2v_dataset, steps=6, accum=2, model=FSDP2), 1)
    assert "one rank, nothing to shard" in ranks.out(0)
    torch.testing.assert_close(torch.tensor(history(tmp_path)), torch.tensor(history(reference)), rtol=1e-5,
                               atol=1e-6)


def _shard_rank(rank: int, world: int, folder: str, dtype: str, fp8):
    """One rank of `test_sharded_base_holds_its_shards_and_computes_the_same`."""
    import torch.distributed as dist

    from engine.families import get_family
    from engine.training.sharding import resident_bytes, shard_frozen_base

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        model = get_family("wan").load_dit("preset:tiny-t2v", dtype=getattr(torch, dtype), device="cpu", fp8=fp8)
        model.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 16, 1, 4, 4, generator=g), torch.tensor([300.0, 800.0])
        context = [torch.randn(6, 32, generator=g) for _ in range(2)]
        with torch.no_grad():
            want = model(x, t, context)
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = resident_bytes(model)
        report = shard_frozen_base(model, torch.device("cpu"))
        with torch.no_grad():
            got = model(x, t, context)
        wrong = []
        for n, p in model.named_parameters():   # rank r holds the r-th dim-0 chunk of every weight
            chunks = full[n].chunk(world)
            expected = chunks[rank] if rank < len(chunks) else full[n][:0]
            if not torch.equal(p.to_local(), expected):
                wrong.append(n)
        torch.save({"before": before, "report": report.__dict__, "resident": resident_bytes(model), "want": want,
                    "got": got, "wrong": wrong}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype, fp8", [("float32", None), ("bfloat16", "scaled")], ids=["fp32", "fp8-scaled"])
def test_sharded_base_holds_its_shards_and_computes_the_same(tmp_path, dtype, fp8):
    """FSDP2 over the tiny DiT on 2 gloo ranks: each rank's resident base is about half the model (its dim-0
    chunk of every weight; buffers such as fp8 scales stay whole) and the sharded model's output is bit-equal."""
    import torch.multiprocessing as mp

    mp.start_processes(_shard_rank, args=(2, str(tmp_path), dtype, fp8), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(results):
        assert res["wrong"] == [], (r, res["wrong"])
        assert torch.equal(res["got"], res["want"]), r
        assert res["report"]["total_bytes"] == res["before"] and res["report"]["units"] == 3
        assert res["report"]["local_bytes"] == res["resident"]
        assert 0.45 < res["resident"] / res["before"] < 0.6, (r, res["resident"], res["before"])


# --- pieces, in this process ------------------------------------------------------------------------------------

def test_sharded_order_is_the_single_process_order_across_epochs():
    batches = [{"i": i} for i in range(5)]            # 5 batches: rank groups straddle epoch ends
    one = InMemoryBatchLoader(batches, seed=4)
    sequence = []
    for _ in range(3):
        sequence += [b["i"] for b in one]
    ranks = [ShardedLoader(InMemoryBatchLoader(batches, seed=4), r, 2) for r in range(2)]
    its = [iter(r) for r in ranks]
    got = []
    while len(got) < 14:
        for r, it in enumerate(its):
            b = next(it, None)
            if b is None:                              # epoch end: the trainer iterates again
                its[r] = iter(ranks[r])
                b = next(its[r])
            got.append(b["i"])
    assert got == sequence[:14]
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"seed": 4, "epoch": 2, "index": 4}
    assert len(ranks[0]) == 3 and ranks[0].completed_epochs == 2
    plain = InMemoryBatchLoader(batches, seed=4)       # the saved position is the plain loader's
    plain.load_state_dict(ranks[0].state_dict())
    assert [b["i"] for b in plain] == sequence[14:15]


def test_one_rank_group_trains_bit_identically_and_ddp_holds_only_adapter_weights(tmp_path):
    """A process group of one: DDP over the adapter network (never a base weight) changes nothing."""
    import torch.distributed as dist

    from engine.training import NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig, TrainingSession
    from engine.training.distributed import DataParallel
    from lora_fixtures import tiny_model

    g = torch.Generator().manual_seed(0)
    data = [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g), "context": [torch.randn(6, 32, generator=g)]}
            for _ in range(3)]

    def session(out, parallel=None):
        cfg = TrainingConfig(output_dir=str(out), max_train_steps=3, mixed_precision="no", seed=1,
                             gradient_accumulation_steps=2, timesteps=TimestepConfig("shift", discrete_flow_shift=2.0),
                             save_state_every_minutes=None)
        return TrainingSession(tiny_model(), NetworkConfig(rank=4, alpha=4), OptimizerConfig(learning_rate=3e-3),
                               InMemoryBatchLoader(data, seed=2), cfg, parallel=parallel)

    plain = session(tmp_path / "plain").train_steps(3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        parallel = DataParallel()
        s = session(tmp_path / "group", parallel)
        assert s.train_steps(3) == plain
        ddp_params = {id(p) for p in parallel._ddp.parameters()}
        assert ddp_params == {id(p) for p in s.network.trainable_parameters()}
        assert not ddp_params & {id(p) for p in s.model.parameters()}
    finally:
        dist.destroy_process_group()


def test_config_refusals_name_the_key(tiny_t2v_dataset, tmp_path):
    good = json.loads(write_config(tmp_path, tiny_t2v_dataset, steps=2).read_text())
    cfg = load_run_config(tmp_path / "run.json")
    assert cfg.training.output_dir == str(tmp_path / "out")     # relative to the config file
    assert cfg.training.timesteps.discrete_flow_shift == 2.0 and cfg.network.rank == 4

    def refused(change, match):
        raw = json.loads(json.dumps(good))
        change(raw)
        with pytest.raises(MusubiInputError, match=match):
            parse_run_config(raw, tmp_path).validate()

    refused(lambda r: r["training"].update(max_steps=3), r"\[training\] key 'max_steps'")
    refused(lambda r: r.update(trainer={}), r"config section 'trainer'")
    refused(lambda r: r["network"].update(rank="8"), r"\[network\] rank: got '8'; expected an integer")
    refused(lambda r: r["training"]["timesteps"].update(discrete_flow_shift="x"),
            r"\[training.timesteps\] discrete_flow_shift")
    refused(lambda r: r["model"].pop("family"), r"\[model\] family: got None; expected a value")
    refused(lambda r: r["model"].update(dtype="fp64"), r"\[model\] dtype")
    refused(lambda r: r["model"].update(fp8_scale_dtype="fp16"), r"\[model\] fp8_scale_dtype")
    refused(lambda r: r["model"].update(compile_blocks="yes"), r"\[model\] compile_blocks: got 'yes'; expected true")
    refused(lambda r: r["model"].update(path="missing.safetensors"), r"\[model\] path")
    refused(lambda r: r["training"].update(gradient_accumulation_steps=0), "gradient_accumulation_steps")
    refused(lambda r: r["model"].update(shard_base="zero3"), r"\[model\] shard_base: got 'zero3'")
    refused(lambda r: r["model"].update(shard_base="fsdp2", blocks_to_swap=4),
            r"\[model\] blocks_to_swap / offload_non_blocks with shard_base = fsdp2")

    from engine.train import main

    (tmp_path / "bad.json").write_text(json.dumps({**good, "run": {"timeout_s": -1}}))
    assert main([str(tmp_path / "bad.json")]) == 2


def test_a_sharded_base_refuses_what_one_rank_would_run_alone(tmp_path):
    """Validation and held-out evaluation run the model on rank 0 alone: with the base split across ranks the
    others would never join its all-gathers. Refused before the model is touched; block swap is refused too."""
    from engine.training import NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig, TrainingSession
    from engine.training.distributed import SingleProcess
    from engine.training.sharding import shard_frozen_base
    from engine.training.validation import ValidationConfig, ValidationPrompt
    from lora_fixtures import tiny_model

    class Sharding(SingleProcess):
        shards_base = True

        def shard_model(self, model):
            raise AssertionError("sharded before the refusal")

    data = [{"latents": torch.zeros(1, 16, 1, 4, 4), "context": [torch.zeros(6, 32)]}]
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=1, mixed_precision="no",
                         timesteps=TimestepConfig("shift", discrete_flow_shift=2.0), save_state_every_minutes=None)
    validation = ValidationConfig(prompts=[ValidationPrompt(context=torch.zeros(6, 32))])
    with pytest.raises(MusubiInputError, match="validation / eval dataset: got 'given with a sharded base"):
        TrainingSession(tiny_model(), NetworkConfig(rank=4), OptimizerConfig(), InMemoryBatchLoader(data, seed=0),
                        cfg, validation=validation, parallel=Sharding())

    model = tiny_model().requires_grad_(False)
    model.__dict__["_musubi_block_swap"] = object()   # a block swapper attached
    with pytest.raises(MusubiInputError, match="shard_base: got 'fsdp2 with block swap'"):
        shard_frozen_base(model, torch.device("cpu"))


def test_the_documented_config_parses():
    """docs/distributed.md's example is a valid config (types and keys; its paths are examples)."""
    import re

    try:
        import tomllib
    except ImportError:   # Python 3.10: the backport the pack depends on there
        import tomli as tomllib

    text = (REPO / "docs" / "distributed.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    cfg = parse_run_config(tomllib.loads(example))
    assert cfg.model.family == "wan" and cfg.network.rank == 32 and cfg.training.timesteps.discrete_flow_shift == 5.0
    assert cfg.run.timeout_s == 1800.0 and cfg.training.save_format == "comfyui"


def test_launch_environment_refusals():
    assert LaunchEnv.read({}) == LaunchEnv(0, 1, 0)
    assert LaunchEnv.read({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}) == LaunchEnv(1, 2, 1)
    with pytest.raises(MusubiInputError, match="RANK / WORLD_SIZE"):
        LaunchEnv.read({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(MusubiInputError, match="MASTER_ADDR"):
        LaunchEnv.read({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(MusubiInputError, match="WORLD_SIZE"):
        LaunchEnv.read({"WORLD_SIZE": "two"})
