"""Where swapped weights live and how they move: the device/stream abstraction under block swap.

A block's frozen tensors are packed into one flat uint8 *host master* (pinned on CUDA), so loading a block is one
host->device copy and evicting it is free: the module's tensors are re-pointed at views of the master (weights are
frozen, nothing is copied back).

Three implementations share one interface:

* `Transfer`      synchronous `.to(device)`; any device PyTorch supports (MPS, XPU, CPU).
* `CudaTransfer`  copies on a dedicated CUDA stream from pinned masters; the compute stream waits on an event only
                  when the block is about to run, so copies overlap the previous blocks' compute. Before a new load
                  it makes the host wait until the GPU is done with the blocks evicted so far (see `evicted`), so
                  the host cannot run ahead and device memory stays within the slot budget.
* `FakeTransfer`  CPU-only test double: "device" copies are CPU clones, evicted tensors point at the *meta* device
                  (so running a non-resident block fails loudly), and every load/wait/evict is logged in order.

`pinned_bytes_in_use()` counts the host masters this package holds right now, so tests and the node layer can
check that memory is released on detach.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

_ALIGN = 256  # bytes; keeps every view aligned for any dtype and for fast DMA
_live_host_bytes = 0
_lock = threading.Lock()


def release_pinned_cache() -> None:
    """Give the pinned host blocks PyTorch's caching host allocator keeps after they were freed (block-swap masters,
    activation-offload copies: tens of GB for a 14B DiT) back to the OS."""
    if torch.cuda.is_available():
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()


def pinned_bytes_in_use() -> int:
    """Bytes of host masters allocated by block swap and not yet released (pinned ones and fake/pageable ones)."""
    return _live_host_bytes


def _account(delta: int) -> None:
    global _live_host_bytes
    with _lock:
        _live_host_bytes += delta


@dataclass(frozen=True)
class Slot:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def pack_layout(tensors: list[torch.Tensor]) -> tuple[list[Slot], int]:
    """Byte offsets of each tensor in one flat buffer (aligned) and the buffer size."""
    slots, offset = [], 0
    for t in tensors:
        slot = Slot(offset, t.dtype, tuple(t.shape))
        slots.append(slot)
        offset += (slot.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return slots, max(offset, _ALIGN)


def views(flat: torch.Tensor, slots: list[Slot]) -> list[torch.Tensor]:
    """Typed views of a flat uint8 buffer: flat[offset:offset+nbytes] -> dtype -> shape (no copies)."""
    return [flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in slots]


@dataclass
class HostMaster:
    """One block's frozen tensors, packed in host memory."""
    flat: torch.Tensor            # [nbytes] uint8
    slots: list[Slot]
    pinned: bool
    released: bool = False

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def release(self) -> None:
        if not self.released:
            self.released = True
            _account(-self.flat.numel())
            self.flat = torch.empty(0, dtype=torch.uint8)


@dataclass
class PendingLoad:
    block: int
    master: HostMaster
    device_flat: torch.Tensor | None = None
    event: object = None          # torch.cuda.Event on CUDA
    done: bool = False


@dataclass
class TransferLog:
    """Ordered record of what the swapper asked for: ("load"|"wait"|"evict"|"run", block index)."""
    events: list[tuple[str, int]] = field(default_factory=list)
    bytes_h2d: int = 0
    eviction_waits: int = 0       # CUDA: times a load made the host wait for the GPU to finish an evicted block

    def of(self, kind: str) -> list[int]:
        return [b for k, b in self.events if k == kind]


class Transfer:
    """Synchronous transfers to `device`. Subclasses make them asynchronous or fake."""

    def __init__(self, device: torch.device | str, pin_memory: bool = False, host: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.host = torch.device(host)   # where masters live (the memory simulation uses fake "meta" tensors)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available() and self.host.type == "cpu"
        self.log = TransferLog()

    # --- host masters ---------------------------------------------------------------------------------------------
    def make_master(self, tensors: list[torch.Tensor]) -> HostMaster:
        """Pack `tensors` (wherever they are) into a new host master."""
        slots, nbytes = pack_layout(tensors)
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.host, pin_memory=self.pin_memory)
        _account(nbytes)
        for dst, src in zip(views(flat, slots), tensors):
            dst.copy_(src.detach())
        return HostMaster(flat, slots, self.pin_memory)

    def evicted_views(self, master: HostMaster) -> list[torch.Tensor]:
        """What a block's tensors point at while it is not on the device: the master itself."""
        return views(master.flat, master.slots)

    # --- loads ----------------------------------------------------------------------------------------------------
    def start(self, block: int, master: HostMaster) -> PendingLoad:
        self.log.events.append(("load", block))
        self.log.bytes_h2d += master.nbytes
        return PendingLoad(block, master, device_flat=master.flat.to(self.device, copy=True), done=True)

    def finish(self, load: PendingLoad) -> list[torch.Tensor]:
        """Block until the copy is usable by compute; return the device views."""
        self.log.events.append(("wait", load.block))
        return views(load.device_flat, load.master.slots)

    def note(self, kind: str, block: int) -> None:
        self.log.events.append((kind, block))

    def evicted(self, block: int) -> None:
        """The swapper has dropped its references to `block`'s device copy (its slot is free for the next load).
        Synchronous transfers need nothing; `CudaTransfer` remembers where the compute stream is."""

    def release_cached_host_memory(self) -> None:
        pass


class CudaTransfer(Transfer):
    """Async H2D on a side stream. Device buffers are allocated on that stream and `record_stream`-ed onto the compute
    stream when used, so the caching allocator never reuses one while a kernel (or autograd) still reads it.

    The host (Python) usually runs far ahead of the GPU: when a block is evicted its buffer is still read by queued
    kernels, so the allocator cannot hand it to the next load yet and would allocate fresh memory, growing device
    memory beyond the slot budget. So `evicted` records an event on the compute stream, and `start` first waits on
    the host for all but the newest `max_pending_evictions` of those events (default 0: all of them). This bounds
    device memory to the slot budget; the price is that the host waits for the GPU at most once per swapped block.
    The GPU keeps running what is queued while the host waits, so it idles only until the host launches the next
    kernel (a launch latency plus hook overhead: small next to a large block's compute). `max_pending_evictions=k`
    lets the host stay k evictions ahead, for up to k more blocks of device memory. Musubi Tuner synchronises once
    per block too."""

    def __init__(self, device: torch.device | str, pin_memory: bool = True, max_pending_evictions: int = 0,
                 host: torch.device | str = "cpu"):
        super().__init__(device, pin_memory, host)
        if self.device.type != "cuda":
            raise ValueError(f"CudaTransfer needs a cuda device, got {self.device}")
        self.stream = torch.cuda.Stream(self.device)
        self.max_pending_evictions = max(0, int(max_pending_evictions))
        self._evictions: deque = deque()   # torch.cuda.Event per eviction not yet waited for, oldest first

    def evicted(self, block: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._evictions.append(event)

    def _wait_for_evictions(self) -> None:
        while len(self._evictions) > self.max_pending_evictions:
            self._evictions.popleft().synchronize()
            self.log.eviction_waits += 1

    def start(self, block: int, master: HostMaster) -> PendingLoad:
        self._wait_for_evictions()
        self.log.events.append(("load", block))
        self.log.bytes_h2d += master.nbytes
        with torch.cuda.stream(self.stream):
            flat = torch.empty(master.nbytes, dtype=torch.uint8, device=self.device)
            flat.copy_(master.flat, non_blocking=master.pinned)
            event = torch.cuda.Event()
            event.record(self.stream)
        return PendingLoad(block, master, flat, event)

    def finish(self, load: PendingLoad) -> list[torch.Tensor]:
        self.log.events.append(("wait", load.block))
        if not load.done:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(load.event)
            load.device_flat.record_stream(compute)
            load.done = True
        return views(load.device_flat, load.master.slots)

    def release_cached_host_memory(self) -> None:
        release_pinned_cache()


class FakeTransfer(Transfer):
    """CPU test double. Loads are *deferred* until `finish` (like an async copy that is not done yet), evicted
    tensors live on the meta device, and the log records every step."""

    def __init__(self, device: torch.device | str = "cpu", pin_memory: bool = False):
        super().__init__("cpu", False)

    def evicted_views(self, master: HostMaster) -> list[torch.Tensor]:
        return [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in master.slots]

    def start(self, block: int, master: HostMaster) -> PendingLoad:
        self.log.events.append(("load", block))
        self.log.bytes_h2d += master.nbytes
        return PendingLoad(block, master)

    def finish(self, load: PendingLoad) -> list[torch.Tensor]:
        self.log.events.append(("wait", load.block))
        if not load.done:
            load.device_flat = load.master.flat.clone()
            load.done = True
        return views(load.device_flat, load.master.slots)


def default_transfer(device: torch.device | str, pin_memory: bool = True) -> Transfer:
    device = torch.device(device)
    if device.type == "cuda":
        return CudaTransfer(device, pin_memory)
    return Transfer(device, False)
