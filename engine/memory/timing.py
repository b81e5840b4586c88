"""Time of a step on a modelled GPU, from the op-order timeline a `LiveMemoryMeter` recorded.

The model has one compute stream and side streams for copies:

* "compute" entries take `FLOPs / throughput` on the compute stream;
* host->device copies tagged with the compute stream (activation offload's restore in backward, inputs) take
  `bytes / bandwidth` there, in order; device->host copies (activation offload in forward) run on a side stream
  in the engine and nothing waits for them;
* copies on a side stream (block-swap loads, between a "load" and a "loaded" mark) start when the side stream is
  free and no earlier than the compute stream reached the point where they were issued (the swapper waits for the
  slot's previous block before reusing it, so the host cannot run further ahead); a "wait" mark makes the compute
  stream wait for that block's copy.

H2D and D2H use separate bandwidths (PCIe is full duplex). Everything else a real GPU does (kernel launch gaps,
elementwise ops, memory-bound kernels) is left out, so absolute times are optimistic; the ratio "with swap / without"
is what the model is for: it says whether copies hide behind compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from .meter import TimelineEntry


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_gb: float
    tflops: float        # achieved dense bf16 TFLOP/s on the step's large matmuls and attention
    h2d_gbps: float      # pinned host->device GB/s
    d2h_gbps: float      # device->host GB/s

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12


# Assumptions, not measurements: about 60 % of the dense bf16 tensor peak (fp32 accumulate) and the pinned copy rate
# of the host link. Replace them with `bench_memory.py` numbers from the card when one is available.
GPU_MODELS = {
    "rtx4060ti-16": GpuModel("RTX 4060 Ti 16 GB, PCIe 4 x8", 16, 0.6 * 22, 12, 12),
    "rtx4080-16": GpuModel("RTX 4080 16 GB, PCIe 4 x16", 16, 0.6 * 97, 24, 24),
    "rtx4090-24": GpuModel("RTX 4090 24 GB, PCIe 4 x16", 24, 0.6 * 165, 24, 24),
    "rtx5090-32": GpuModel("RTX 5090 32 GB, PCIe 5 x16", 32, 0.6 * 210, 48, 48),
    "h100-80": GpuModel("H100 80 GB SXM, PCIe 5 x16 host link", 80, 0.6 * 989, 48, 48),
}


@dataclass
class StepTime:
    seconds: float          # modelled step time
    compute_seconds: float  # FLOPs / throughput alone
    stall_seconds: float    # compute stream waiting for block copies
    sync_copy_seconds: float  # copies on the compute stream (activation offload)
    side_copy_seconds: float  # copies on side streams (hidden unless they cause stalls)


def replay(timeline: list[TimelineEntry], gpu: GpuModel) -> StepTime:
    compute = 0.0
    stall = sync_copies = side_busy = 0.0
    side_clock: dict[str, float] = {}
    done: dict[object, float] = {}
    flops = 0
    for e in timeline:
        if e.kind == "compute":
            compute += e.amount / gpu.flops_per_s
            flops += e.amount
        elif e.kind in ("h2d", "d2h"):
            seconds = e.amount / ((gpu.h2d_gbps if e.kind == "h2d" else gpu.d2h_gbps) * 1e9)
            stream = e.stream
            if e.kind == "d2h" and stream == "compute":
                # the engine's device->host copies (activation offload) run on a side stream and are read only in
                # backward: nothing waits for them
                stream = "d2h"
            if stream == "compute":
                compute += seconds
                sync_copies += seconds
            else:
                start = max(side_clock.get(stream, 0.0), compute)
                side_clock[stream] = start + seconds
                side_busy += seconds
        elif e.kind == "loaded":
            done[e.tag] = side_clock.get(e.stream, compute)
        elif e.kind == "wait":
            ready = done.pop(e.tag, compute)
            if ready > compute:
                stall += ready - compute
                compute = ready
    return StepTime(compute, flops / gpu.flops_per_s, stall, sync_copies, side_busy)


__all__ = ["GPU_MODELS", "GpuModel", "StepTime", "replay"]
