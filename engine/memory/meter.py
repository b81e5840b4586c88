"""Exact live-tensor accounting for one device, op by op: the memory a step needs, without running it on that device.

`LiveMemoryMeter` is a `TorchDispatchMode`. After every ATen op it registers the storages of the op's outputs and
drops the ones Python has freed since, so `current` is the exact sum of live tensor storages on the metered device
and `peak` its maximum over the ops (an op's inputs and outputs are live together, which is where peaks happen).
It also counts matmul/convolution/attention FLOPs and every cross-device copy, in op order (`timeline`), which is
what `engine.memory.schedule` replays to estimate the time of a step.

Used under `FakeTensorMode` it measures real shapes on a machine that has neither the GPU nor the memory: the
memory simulation (`benchmarks/sim_memory.py`) runs a real DiT, LoRA, optimizer, block swap and activation
offload with the "GPU" played by fake `cpu` tensors and the host by fake `meta` tensors (autograd needs no CUDA
context for either). On a real GPU the same meter reports live bytes, which is what `torch.cuda.max_memory_allocated`
reports minus allocator rounding; kernel workspaces (cuBLAS, attention) and fragmentation come on top.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_flash_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _registry_flops(packet, args, kwargs, out) -> int:
    # torch's registry wraps its formulas to take tensors (it reads their shapes)
    return int(flop_registry[packet](*args, **kwargs, out_val=out))


# FLOP formulas by op packet: torch's registry plus the CPU flash-attention kernels it lacks (the simulation's
# attention runs on "cpu" tensors, where SDPA picks them)
_EXTRA_FLOPS = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flops)):
    if hasattr(_aten, _name):
        _EXTRA_FLOPS[getattr(_aten, _name)] = _fn

_COPY_OPS = {_aten._to_copy, _aten.copy_, _aten.copy}


@dataclass
class TimelineEntry:
    """One thing the device does, in program order. kind: "compute" (amount = FLOPs), "h2d"/"d2h" (bytes copied
    to/from the metered device), or a mark set by the caller (e.g. "load"/"wait" of a block-swap transfer)."""
    kind: str
    amount: int = 0
    stream: str = "compute"   # "compute" or a side stream's name
    tag: object = None        # for marks: what they refer to (a block index)


@dataclass
class MeterReport:
    peak_bytes: int
    current_bytes: int
    flops: int
    h2d_bytes: int
    d2h_bytes: int
    timeline: list[TimelineEntry] = field(default_factory=list)


class LiveMemoryMeter(TorchDispatchMode):
    """`with LiveMemoryMeter("cuda") as meter: ...` -> `meter.peak`, `meter.current`, `meter.flops`, `meter.timeline`.

    Tensors that existed before the meter was entered are unknown to it: `track(tensors)` adds them (e.g. a model's
    parameters). `stream(name)` tags the copies made inside it (block-swap loads on a side stream); `mark(kind,
    tag)` adds a caller event to the timeline."""

    def __init__(self, device: torch.device | str = "cuda", record_timeline: bool = True,
                 snapshot_peak: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.record_timeline = record_timeline
        # with snapshot_peak: ("op shape dtype" that made it, bytes) of every storage live at the peak, to see what
        # a peak is made of
        self.snapshot_peak = snapshot_peak
        self.peak_snapshot: list[tuple[str, int]] = []
        self._origin: dict[int, str] = {}
        self._shapes: dict[int, str] = {}
        # live storages by StorageImpl address, in two generations: checking every storage after every op would
        # make a 14B step take minutes; young ones are checked after each op, old ones when a peak is at stake
        self._young: dict[int, tuple[StorageWeakRef, int]] = {}
        self._old: dict[int, tuple[StorageWeakRef, int]] = {}
        self._promote_after = 512
        self.current = 0
        self.peak = 0
        self.flops = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.timeline: list[TimelineEntry] = []
        self._stream = "compute"

    # --- public -------------------------------------------------------------------------------------------------
    def track(self, tensors) -> None:
        """Count already existing tensors (their storages, once each) that live on the metered device."""
        new = [t for t in tensors if isinstance(t, torch.Tensor)]
        self._add(new)

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current

    def reset_counters(self) -> None:
        """Zero FLOPs, copy bytes and the timeline (not the live bytes)."""
        self.flops = self.h2d_bytes = self.d2h_bytes = 0
        self.timeline = []

    def live_bytes(self) -> int:
        self._sweep()
        return self.current

    def mark(self, kind: str, tag=None, stream: str | None = None) -> None:
        if self.record_timeline:
            self.timeline.append(TimelineEntry(kind, 0, stream or self._stream, tag))

    @contextlib.contextmanager
    def stream(self, name: str):
        """Copies made inside are tagged with this stream name (a side stream) instead of "compute"."""
        previous, self._stream = self._stream, name
        try:
            yield
        finally:
            self._stream = previous

    def report(self) -> MeterReport:
        self._sweep()
        return MeterReport(self.peak, self.current, self.flops, self.h2d_bytes, self.d2h_bytes, list(self.timeline))

    # --- dispatch -------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _COPY_OPS:
            self._count_copy(packet, args, kwargs, out)
        flops = self._count_flops(packet, args, kwargs, out)
        if flops:
            self.flops += flops
            if self.record_timeline:
                last = self.timeline[-1] if self.timeline else None
                if last is not None and last.kind == "compute" and last.stream == "compute":
                    last.amount += flops
                else:
                    self.timeline.append(TimelineEntry("compute", flops))
        self._add(tree_flatten(out)[0], str(packet))
        return out

    def _count_flops(self, packet, args, kwargs, out) -> int:
        if packet in _EXTRA_FLOPS:
            return int(_EXTRA_FLOPS[packet](*args, **kwargs))
        if packet in flop_registry:
            return _registry_flops(packet, args, kwargs, out)
        return 0

    def _count_copy(self, packet, args, kwargs, out) -> None:
        if packet is _aten._to_copy:       # _to_copy(src, ...) -> dst
            src, dst = args[0], out
        else:                                # copy_(dst, src) / copy(dst_like, src) -> dst
            src, dst = args[1], args[0] if packet is _aten.copy_ else out
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.device == dst.device:
            return
        nbytes = src.numel() * src.element_size()
        if self._on_device(dst):
            self.h2d_bytes += nbytes
            kind = "h2d"
        elif self._on_device(src):
            self.d2h_bytes += nbytes
            kind = "d2h"
        else:
            return
        if self.record_timeline:
            self.timeline.append(TimelineEntry(kind, nbytes, self._stream))

    # --- storages -------------------------------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _add(self, tensors, origin: str = "tracked") -> None:
        new = []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or not self._on_device(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            known = self._young.get(key) or self._old.get(key)
            if known is not None and not known[0].expired():
                continue
            new.append((key, StorageWeakRef(storage), storage.nbytes()))
            if self.snapshot_peak:
                self._shapes[key] = f"{tuple(t.shape)} {t.dtype}"
        if not new:
            return
        # frees first: a storage freed by this op and one it allocated may share an address
        self._sweep(self._young)
        for key, _, _ in new:
            if key in self._old:   # a dead old storage whose address was reused
                self._sweep(self._old)
                break
        for key, ref, nbytes in new:
            if key not in self._young:
                self._young[key] = (ref, nbytes)
                self.current += nbytes
                if self.snapshot_peak:
                    self._origin[key] = origin
        if self.current > self.peak:
            self._sweep(self._old)   # only a candidate peak needs the long-lived storages checked
            if self.current > self.peak:
                self.peak = self.current
                if self.snapshot_peak:
                    self.peak_snapshot = [(f"{self._origin.get(k, '?')} {self._shapes.get(k, '')}", n)
                                          for live in (self._old, self._young) for k, (_, n) in live.items()]
        if len(self._young) > self._promote_after:
            self._sweep(self._old)
            self._old.update(self._young)
            self._young = {}

    def _sweep(self, live: dict | None = None) -> None:
        """Drop freed storages (of one generation, or all)."""
        for generation in ((live,) if live is not None else (self._young, self._old)):
            dead = [k for k, (ref, _) in generation.items() if ref.expired()]
            for k in dead:
                self.current -= generation.pop(k)[1]
                self._origin.pop(k, None)
                self._shapes.pop(k, None)


__all__ = ["LiveMemoryMeter", "MeterReport", "TimelineEntry"]
