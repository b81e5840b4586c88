"""The live-memory meter (engine/memory/meter.py), the timing replay (engine/memory/timing.py) and the memory
simulation built on them (benchmarks/sim_memory.py)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import sim_memory as sim
from engine.memory.meter import LiveMemoryMeter, TimelineEntry
from engine.memory.timing import GpuModel, replay


def test_meter_counts_live_storages_and_peak():
    with LiveMemoryMeter("cpu") as m:
        a = torch.empty(1000, dtype=torch.float32)           # 4000 B
        b = torch.empty(500, dtype=torch.bfloat16)           # 1000 B
        view = a[10:20]                                      # a view: no new storage
        assert m.live_bytes() == 5000
        del a                                                # the view keeps a's storage alive
        assert m.live_bytes() == 5000
        del view
        c = torch.empty(250, dtype=torch.float64)            # 2000 B, allocated after a is gone
        assert m.live_bytes() == 3000
        assert m.peak == 5000
        d = b.float() + 1                                    # float copy (2000 B, freed) then d (2000 B)
        assert m.peak == 7000 and m.live_bytes() == 5000
        del b, c, d
        assert m.live_bytes() == 0


def test_peak_snapshot_says_what_the_peak_is_made_of():
    with LiveMemoryMeter("cpu", snapshot_peak=True) as m:
        a = torch.ones(100, 10)                   # 4000 B
        b = a.to(torch.float64)                   # 8000 B
        del a, b
    assert sum(n for _, n in m.peak_snapshot) == m.peak == 12000
    assert sorted(origin for origin, _ in m.peak_snapshot) == ["aten._to_copy (100, 10) torch.float64",
                                                               "aten.ones (100, 10) torch.float32"]


def test_meter_ignores_other_devices_and_counts_copies_and_flops():
    with FakeTensorMode(allow_non_fake_inputs=True), LiveMemoryMeter("cpu") as m:
        host = torch.empty(1024, dtype=torch.uint8, device="meta")
        assert m.live_bytes() == 0                            # not on the metered device
        dev = host.to("cpu")                                  # H2D 1024 B
        back = torch.empty(256, device="meta")
        back.copy_(torch.ones(256))                           # D2H 1024 B
        x = torch.empty(8, 16)
        w = torch.empty(32, 16)
        _ = x @ w.t()                                         # 2·8·16·32 FLOPs
        assert (m.h2d_bytes, m.d2h_bytes) == (1024, 1024)
        torch.ops.aten.copy(torch.empty(64, device="meta"), torch.ones(64))   # functional copy: D2H 256 B
        assert m.d2h_bytes == 1024 + 256
        assert m.flops == 2 * 8 * 16 * 32
        kinds = [e.kind for e in m.timeline]
        assert kinds == ["h2d", "d2h", "compute", "d2h"]
        del dev


def test_fake_simulation_equals_a_real_run():
    """The same tiny Wan training step measured with real CPU tensors and simulated with fake ones: same bytes."""
    cfg = sim.SimConfig(model="tiny", task="train", latent=(2, 8, 8), steps=2)
    fake = sim.simulate(cfg)
    real = sim.simulate(cfg, fake=False)
    # equal up to kernel details: CPU mse_loss returns its scalar as a view of the 8 KB elementwise buffer
    assert fake["peak_gb"] == pytest.approx(real["peak_gb"], rel=1e-3) and fake["peak_gb"] > 0.01
    assert fake["weights_on_gpu_gb"] == real["weights_on_gpu_gb"]
    assert fake["tflop_per_step"] == real["tflop_per_step"]


def test_simulation_sees_what_each_setting_saves():
    base = dict(model="tiny", latent=(8, 64, 64), steps=2)   # 8192 tokens: activations dominate
    plain = sim.simulate(sim.SimConfig(task="train", **base))
    offload = sim.simulate(sim.SimConfig(task="train", activation_offload=True, **base))
    fp8 = sim.simulate(sim.SimConfig(task="train", fp8="scaled", **base))
    swapped = sim.simulate(sim.SimConfig(task="train", blocks_to_swap=4, **base))
    assert offload["peak_gb"] < plain["peak_gb"] and offload["d2h_gb_per_step"] > 0
    assert fp8["weights_on_gpu_gb"] < plain["weights_on_gpu_gb"]
    assert swapped["weights_on_gpu_gb"] < plain["weights_on_gpu_gb"] and swapped["host_swap_gb"] > 0
    # each streamed block is copied at most once in forward and once for the recompute (blocks that stay across
    # the forward/backward turn are not copied again)
    assert swapped["host_swap_gb"] < swapped["h2d_gb_per_step"] <= 2 * swapped["host_swap_gb"]
    infer = sim.simulate(sim.SimConfig(task="infer", **base))
    assert infer["peak_gb"] < plain["peak_gb"]


def test_replay_hides_copies_behind_compute_and_charges_stalls():
    gpu = GpuModel("toy", 16, tflops=1.0, h2d_gbps=1.0, d2h_gbps=1.0)   # 1e12 FLOP/s, 1e9 B/s
    # block 1 is copied (0.5 s) while block 0 computes (1 s): no stall
    hidden = [TimelineEntry("load", 0, "swap", 1), TimelineEntry("h2d", int(0.5e9), "swap"),
              TimelineEntry("loaded", 0, "swap", 1), TimelineEntry("compute", int(1e12)),
              TimelineEntry("wait", 0, "compute", 1), TimelineEntry("compute", int(1e12))]
    t = replay(hidden, gpu)
    assert t.seconds == pytest.approx(2.0) and t.stall_seconds == 0
    # a 3 s copy behind 1 s of compute: 2 s stall
    slow = [TimelineEntry("load", 0, "swap", 1), TimelineEntry("h2d", int(3e9), "swap"),
            TimelineEntry("loaded", 0, "swap", 1), TimelineEntry("compute", int(1e12)),
            TimelineEntry("wait", 0, "compute", 1), TimelineEntry("compute", int(1e12))]
    t = replay(slow, gpu)
    assert t.seconds == pytest.approx(4.0) and t.stall_seconds == pytest.approx(2.0)
    # host->device copies on the compute stream (the activation restore in backward) add up; device->host copies
    # (activation offload in forward) overlap
    sync = [TimelineEntry("compute", int(1e12)), TimelineEntry("h2d", int(0.25e9)), TimelineEntry("d2h", int(0.5e9)),
            TimelineEntry("compute", int(1e12))]
    assert replay(sync, gpu).seconds == pytest.approx(2.25)
