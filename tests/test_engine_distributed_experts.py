"""Data-parallel training of a pair of timestep experts (Wan 2.2 A14B: `[model] high_path`, engine/training/experts.py
on several ranks, distributed.py `reduce_gradients`) on CPU with gloo: the tiny A14B T2V presets and the cached
dataset on disk (conftest `tiny_t2v_dataset`), real processes launched as torchrun launches them.

2 ranks × batch 1 == 1 rank × accumulation 2 in both LoRA layouts (losses, the per-batch experts and both saved
LoRA files at fp32 tolerance); an expert no rank ran in a step does not move (weights and optimizer state
bit-equal) while the ranks stay bit-equal to each other; resume across world sizes; no process left behind."""

import json
import re
from pathlib import Path

import pytest
import torch

from engine.errors import MusubiInputError
from engine.training import read_state
from engine.training.run_config import parse_run_config
from distributed_runs import history, train
from test_engine_distributed import write_config

PAIR = {"path": "preset:tiny-t2v-a14b-low-noise", "high_path": "preset:tiny-t2v-a14b-high-noise", "boundary": 0.6}
FILES = {"separate": ["lora_high_noise.safetensors", "lora_low_noise.safetensors"], "shared": ["lora.safetensors"]}


def pair_config(folder: Path, dataset: Path, layout: str, *, steps: int, accum: int, **model) -> Path:
    return write_config(folder, dataset, steps=steps, accum=accum,
                        model={**PAIR, "expert_layout": layout, **model})


def experts_of(out: str) -> list[str]:
    """The experts of each step from rank 0's progress lines."""
    return re.findall(r"\| experts ([a-z,]+)", out)


def lora_files(folder: Path, layout: str) -> dict:
    from safetensors import safe_open

    out = {}
    for name in FILES[layout]:
        with safe_open(str(folder / "out" / name), "pt") as f:
            out[name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


@pytest.fixture(scope="module")
def references(tiny_t2v_dataset, tmp_path_factory):
    """One process, batch 1 × accumulation 2, 6 steps, per layout (built on first use)."""
    made = {}

    def get(layout):
        if layout not in made:
            folder = tmp_path_factory.mktemp(f"reference_{layout}")
            ranks = train(pair_config(folder, tiny_t2v_dataset, layout, steps=6, accum=2), 1)
            made[layout] = (folder, experts_of(ranks.out(0)))
        return made[layout]
    return get


@pytest.mark.parametrize("layout, mode", [("separate", "both"), ("shared", "offload")])
def test_two_ranks_train_a_pair_like_one_rank_accumulating_two(references, tiny_t2v_dataset, tmp_path, layout, mode):
    """The ranks' batches pick their experts as one process's micro-batches do; a micro-batch where rank 0 runs one
    expert and rank 1 the other reduces each expert's gradients over both ranks (zeros from the one that did not
    run it)."""
    reference, ref_experts = references(layout)
    ranks = train(pair_config(tmp_path, tiny_t2v_dataset, layout, steps=6, accum=1, expert_mode=mode), 2)
    assert experts_of(ranks.out(0)) == ref_experts and len(ref_experts) == 6
    steps = [set(e.split(",")) for e in ref_experts]
    assert {"high", "low"} in steps and any(len(s) == 1 for s in steps)   # mixed steps and one-expert steps
    torch.testing.assert_close(torch.tensor(history(tmp_path)), torch.tensor(history(reference)), rtol=1e-5,
                               atol=1e-6)
    want, got = lora_files(reference, layout), lora_files(tmp_path, layout)
    assert sorted(got) == FILES[layout]
    for name, (a, meta_a) in want.items():
        b, meta_b = got[name]
        assert list(a) == list(b) and not any(k.startswith("module.") for k in b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        assert set(meta_a) == set(meta_b) and meta_b["ss_steps"] == "6"
        assert meta_b["ss_timestep_expert"] == meta_a["ss_timestep_expert"]
    assert ranks.out(1) == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES[layout] + ["lora-state"])


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_pair_resumes_across_world_sizes(references, tiny_t2v_dataset, tmp_path, first, then):
    reference, ref_experts = references("separate")
    a = train(pair_config(tmp_path, tiny_t2v_dataset, "separate", steps=3, accum=2 // first), first)
    picked = experts_of(a.out(0))   # (the next run writes the same log files)
    assert read_state(tmp_path / "out" / "lora-state")["step"] == 3
    b = train(pair_config(tmp_path, tiny_t2v_dataset, "separate", steps=6, accum=2 // then), then)
    assert picked + experts_of(b.out(0)) == ref_experts
    torch.testing.assert_close(torch.tensor(history(tmp_path)), torch.tensor(history(reference)), rtol=1e-5,
                               atol=1e-6)
    want, got = lora_files(reference, "separate"), lora_files(tmp_path, "separate")
    for name, (a_t, _) in want.items():
        for k in a_t:
            torch.testing.assert_close(got[name][0][k], a_t[k], rtol=1e-4, atol=1e-6)


# --- per step, in two spawned ranks ---------------------------------------------------------------------------

def _pair_rank(rank: int, world: int, folder: str, steps: int):
    """One rank of `test_an_expert_no_rank_ran_does_not_move`: 2-expert separate-layout session, every step's
    weights, optimizer state and experts recorded."""
    import torch.distributed as dist

    from engine.families.wan.loader import load_wan_dit
    from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig,
                                 TrainingConfig, TrainingSession)
    from engine.training.distributed import DataParallel
    from engine.training.experts import TimestepExperts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        data = [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g), "context": [torch.randn(6, 32, generator=g)]}
                for _ in range(8)]
        low = load_wan_dit("preset:tiny-t2v-a14b-low-noise", dtype=torch.float32)
        high = load_wan_dit("preset:tiny-t2v-a14b-high-noise", dtype=torch.float32)
        cfg = TrainingConfig(output_dir=f"{folder}/out{rank}", max_train_steps=steps, mixed_precision="no", seed=5,
                             timesteps=TimestepConfig("shift", discrete_flow_shift=2.0), save_state_every_minutes=None,
                             gradient_checkpointing=True)
        optimizer = OptimizerConfig(learning_rate=1e-2, optimizer_args={"weight_decay": 0.1})
        session = TrainingSession(low, NetworkConfig(rank=4, alpha=4), optimizer,
                                  InMemoryBatchLoader(data, seed=1), cfg, parallel=DataParallel(),
                                  experts=TimestepExperts(high, 0.75, layout="separate"))
        nets = session.network.networks()

        def snapshot():
            opt = session.optimizer
            return {e: ({k: v.detach().clone() for k, v in n.state_dict().items()},
                        [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                         for p in n.parameters()]) for e, n in nets.items()}

        record = [{"experts": [], "state": snapshot()}]
        session.train_steps(steps, progress=lambda s, t, info: record.append({"experts": info["experts"],
                                                                            "state": snapshot()}))
        torch.save(record, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_an_expert_no_rank_ran_does_not_move(tmp_path):
    """Separate layout, AdamW with weight decay (zero gradients would still move a weight): after each step, an
    expert that ran on no rank has bit-equal weights and optimizer state; the one that ran moved; both ranks hold
    bit-equal weights."""
    import torch.multiprocessing as mp

    steps = 8
    mp.start_processes(_pair_rank, args=(2, str(tmp_path), steps), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [s["experts"] for s in ranks[0]] == [s["experts"] for s in ranks[1]]
    idle_steps = 0
    for before, after in zip(ranks[0], ranks[0][1:]):
        ran = set(after["experts"])
        assert len(after["experts"]) == 2                              # one batch per rank
        for expert in ("high", "low"):
            (w0, opt0), (w1, opt1) = before["state"][expert], after["state"][expert]
            unchanged = all(torch.equal(w0[k], w1[k]) for k in w0)
            if expert in ran:
                assert not unchanged, (expert, after["experts"])
            else:
                idle_steps += 1
                assert unchanged, (expert, after["experts"])
                assert len(opt0) == len(opt1) and all(
                    a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
                                                 for k in a) for a, b in zip(opt0, opt1))
    assert idle_steps >= 1, [s["experts"] for s in ranks[0]]
    assert any(set(s["experts"]) == {"high", "low"} for s in ranks[0])   # and a step where the ranks differ
    for a, b in zip(ranks[0], ranks[1]):                                 # the ranks stay in step, bit for bit
        for expert in ("high", "low"):
            wa, wb = a["state"][expert][0], b["state"][expert][0]
            assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --- the config ------------------------------------------------------------------------------------------------

def test_pair_config_refusals_name_the_key(tiny_t2v_dataset, tmp_path):
    good = json.loads(pair_config(tmp_path, tiny_t2v_dataset, "separate", steps=2, accum=1).read_text())
    cfg = parse_run_config(good, tmp_path)
    cfg.validate()
    assert cfg.model.high_path == PAIR["high_path"] and cfg.model.boundary == 0.6

    def refused(change, match):
        raw = json.loads(json.dumps(good))
        change(raw["model"])
        with pytest.raises(MusubiInputError, match=match):
            parse_run_config(raw, tmp_path).validate()

    refused(lambda m: m.pop("boundary"), r"\[model\] boundary: got None; expected the pair's boundary")
    refused(lambda m: m.update(boundary=1.0), r"\[model\] boundary: got 1.0")
    refused(lambda m: m.update(expert_layout="stacked"), r"\[model\] expert_layout: got 'stacked'")
    refused(lambda m: m.update(expert_mode="lazy"), r"\[model\] expert_mode: got 'lazy'")
    refused(lambda m: m.update(high_path="missing.safetensors"), r"\[model\] high_path")
    refused(lambda m: m.update(high_path=m["path"]), r"\[model\] high_path: .*a file other than path")
    refused(lambda m: m.update(shard_base="fsdp2"), r"\[model\] shard_base with high_path: got 'fsdp2'")
    refused(lambda m: m.pop("high_path"), r"\[model\] boundary: got \(0.6,\); expected unset without high_path")
