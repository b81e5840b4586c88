"""Block swap: keep N transformer blocks' frozen weights in host memory and stream them to the device just in time.

How it works (see docs/memory.md):

* `attach()` packs each swapped block's frozen tensors (frozen parameters and buffers: base weights, fp8 weights and
  their scales, norms, biases) into one host master (pinned on CUDA) and points the block's tensors at it. Trainable
  parameters (e.g. a full fine-tune's) and LoRA adapters (separate modules hooked on the Linear) never move.
* VRAM budget (Musubi's exchange): the device holds at most `num_blocks - n` blocks' frozen weights. Besides the n
  chosen blocks, `e = min(prefetch + 1, num_blocks - n - 1)` more blocks are streamed (`swapped` lists all), so that
  `e` device *slots* exist for streamed blocks: the block running (if streamed) plus the next ones copied ahead.
  A block that has run and is not needed before the ones being prefetched gives its slot to the next one. The
  effective prefetch is `slots - 1` (below `prefetch` only when n is close to num_blocks). With n = num_blocks - 1
  one block stays resident plus one slot (num_blocks - n + 1 blocks; no room for an exchange).
* A forward pre-hook on every block loads the block about to run (waits for its copy) and starts the copies of the
  next streamed blocks on a side stream, as many as the free slots allow; a forward hook evicts the block that ran
  (unless it is needed again first) and fills its slot. Eviction costs nothing: frozen tensors are re-pointed at
  the host master (no device->host copy).
* The order of upcoming blocks follows the pass: forward 0..n-1; under autograd's backward (gradient checkpointing
  recomputes each block there) n-1..0; after a training forward the first blocks needed are the last ones (the
  recompute), after an inference forward they are the first ones of the next step. Whether recompute happens is
  learned from the previous step (or set with `recompute=`).
* Tensors are re-bound by replacing the module's Parameter objects, never with `param.data = ...`: autograd may hold
  the previous (device) Parameter for backward; replacing keeps that one intact, so gradients are exact with and
  without gradient checkpointing (without it, autograd keeps the weights it needs alive until backward, so block
  swap saves little memory in training; use gradient checkpointing with it).

`swapped` lists every streamed block (the n chosen and the extra ones): the swapper owns their placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import invalid
from .offload import in_offloaded_forward
from .placement import EXECUTION_DEVICE_ATTR, move_to, request_room
from .transfer import FakeTransfer, HostMaster, PendingLoad, Transfer, default_transfer, views

PLACEMENTS = ("spread", "tail")


@dataclass
class BlockSwapConfig:
    blocks_to_swap: int = 0
    prefetch: int = 1                 # swapped blocks copied ahead of use (1 = double buffering)
    pin_memory: bool = True           # pinned host masters (CUDA only; faster, async copies)
    offload_non_blocks: bool = False  # keep embeddings/head on the host between forward calls too
    placement: str = "spread"         # "spread": evenly spaced swapped blocks (copies overlap resident blocks);
                                      # "tail": the last N (Musubi's classic mode)
    recompute: bool | None = None     # does backward call the blocks again (gradient checkpointing)? None: learn


def validate_blocks_to_swap(n, num_blocks: int, model_name: str = "model") -> int:
    """0 <= n <= num_blocks - 1 (one block always stays on the device), e.g. 39 for a 40-block DiT."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= num_blocks - 1:
        raise invalid("blocks_to_swap", n, f"an integer from 0 to {num_blocks - 1} ({model_name} has {num_blocks} "
                                           f"blocks and at least one stays on the GPU)")
    return n


def choose_swapped(num_blocks: int, n: int, placement: str = "spread") -> list[int]:
    """Indices of the swapped blocks. spread: k -> floor((2k+1)·num_blocks / 2n), evenly spaced block centres."""
    if placement not in PLACEMENTS:
        raise invalid("block swap placement", placement, f"one of {PLACEMENTS}")
    if n == 0:
        return []
    if placement == "tail":
        return list(range(num_blocks - n, num_blocks))
    return sorted({(2 * k + 1) * num_blocks // (2 * n) for k in range(n)})


def stream_plan(num_blocks: int, n: int, prefetch: int = 1, placement: str = "spread") -> tuple[list[int], int]:
    """(streamed blocks, device slots for them). The streamed blocks are the n chosen ones plus
    e = min(prefetch + 1, num_blocks - n - 1) extra ones, so the device holds num_blocks - n blocks at most
    (num_blocks - |streamed| resident + slots). The extra blocks never include a chosen one: the n chosen blocks are
    always off the device before attach (`choose_swapped` stays the set callers keep on the host)."""
    chosen = choose_swapped(num_blocks, n, placement)
    if n == 0:
        return [], 0
    e = min(prefetch + 1, num_blocks - n - 1)
    if e <= 0:                       # n = num_blocks - 1: one resident block and one slot
        return chosen, 1
    if placement == "tail":
        return list(range(num_blocks - n - e, num_blocks)), e
    rest = [i for i in range(num_blocks) if i not in set(chosen)]
    extra = {rest[(2 * k + 1) * len(rest) // (2 * e)] for k in range(e)}
    return sorted(set(chosen) | extra), e


def _training_forward() -> bool:
    """A forward pass that backward will follow: grad mode is on, or activation offload runs the block without a
    graph (its recompute builds one in backward)."""
    return torch.is_grad_enabled() or in_offloaded_forward()


class _Entry:
    """One frozen tensor of a block and every slot it is registered in (a tied tensor has several): all are
    re-pointed together, so a tie survives swapping."""
    __slots__ = ("owners", "is_param")

    def __init__(self, owner: nn.Module, name: str, is_param: bool):
        self.owners, self.is_param = [(owner, name)], is_param

    @property
    def name(self) -> str:
        return self.owners[0][1]

    def get(self) -> torch.Tensor:
        owner, name = self.owners[0]
        return (owner._parameters if self.is_param else owner._buffers)[name]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            t = nn.Parameter(t, requires_grad=False)
        for owner, name in self.owners:
            (owner._parameters if self.is_param else owner._buffers)[name] = t


NON_BLOCKS = -1   # the transfer-log index of the non-block layers (offload_non_blocks)


def _frozen_entries(module: nn.Module, skip: set[int] = frozenset()) -> tuple[list[_Entry], list[nn.Parameter]]:
    """(frozen parameter/buffer entries, trainable parameters) of a module, leaving out the submodules whose id is
    in `skip`; a shared tensor is one entry (packed once) with all its slots."""
    entries, trainable, seen = [], [], {}
    for m in module.modules():
        if id(m) in skip:
            continue
        for is_param, tensors in ((True, m._parameters), (False, m._buffers)):
            for name, t in tensors.items():
                if t is None:
                    continue
                if id(t) in seen:
                    if seen[id(t)] is not None:
                        seen[id(t)].owners.append((m, name))
                    continue
                if is_param and t.requires_grad:
                    trainable.append(t)
                    seen[id(t)] = None
                else:
                    seen[id(t)] = _Entry(m, name, is_param)
                    entries.append(seen[id(t)])
    return entries, trainable


SWAPPER_ATTR = "_musubi_block_swap"   # module.__dict__ entry: the swapper placement attached to that module


class BlockSwapper:
    """Attach to an `nn.ModuleList` of blocks (called as modules; a DiT's blocks in run order, `engine.families.blocks_of`).

    `with BlockSwapper(model.blocks, "cuda", BlockSwapConfig(blocks_to_swap=20), model=model):` or
    `attach()` / `detach()`. `transfer` defaults to `CudaTransfer` on CUDA; tests pass a `FakeTransfer`."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, config: BlockSwapConfig | None = None,
                 transfer: Transfer | None = None, model: nn.Module | None = None, model_name: str = "model"):
        self.config = config or BlockSwapConfig()
        self.blocks = blocks
        self.num_blocks = len(blocks)
        validate_blocks_to_swap(self.config.blocks_to_swap, self.num_blocks, model_name)
        if isinstance(self.config.prefetch, bool) or not isinstance(self.config.prefetch, int) \
                or self.config.prefetch < 0:
            raise invalid("block swap prefetch", self.config.prefetch, "an integer >= 0")
        self.transfer = transfer or default_transfer(device, self.config.pin_memory)
        self.device = self.transfer.device
        self.model = model
        n = self.config.blocks_to_swap
        self.chosen = choose_swapped(self.num_blocks, n, self.config.placement)   # the n blocks asked for
        # every streamed block (chosen + extra ones that pay for the prefetch slots) and the device slots
        self.swapped, self.slots = stream_plan(self.num_blocks, n, self.config.prefetch, self.config.placement)
        self._swapped_set = set(self.swapped)
        self._entries: dict[int, list[_Entry]] = {}
        self._masters: dict[int, HostMaster] = {}
        self._non_block: tuple[list[_Entry], HostMaster] | None = None   # offload_non_blocks
        self._loads: dict[int, PendingLoad] = {}    # swapped blocks loading or on the device
        self._bound: set[int] = set()                # swapped blocks whose tensors point at device memory
        self._handles: list = []
        self._attached = False
        self._expect_recompute = True if self.config.recompute is None else bool(self.config.recompute)
        self._last_forward_index = -1
        self._last_forward_grad = False
        self._saw_backward_call = False

    # --- lifecycle --------------------------------------------------------------------------------------------------
    def attach(self) -> "BlockSwapper":
        if self._attached:
            return self
        resident = [b for i, b in enumerate(self.blocks) if i not in self._swapped_set]
        for block in resident:
            move_to(block, self.device)
        for i in self.swapped:
            entries, trainable = _frozen_entries(self.blocks[i])
            for p in trainable:   # trainable tensors never swap
                request_room(p.numel() * p.element_size(), self.device)
                p.data = p.data.to(self.device)
            master = self.transfer.make_master([e.get() for e in entries])
            for e, v in zip(entries, self.transfer.evicted_views(master)):
                e.set(v)
            self._entries[i], self._masters[i] = entries, master
        if self.model is not None:
            if self.config.offload_non_blocks:
                # the embeddings/head are packed into one more host master, loaded for each forward call
                entries, trainable = _frozen_entries(self.model, skip={id(m) for m in self.blocks.modules()})
                for p in trainable:
                    p.data = p.data.to(self.device)
                master = self.transfer.make_master([e.get() for e in entries])
                for e, v in zip(entries, self.transfer.evicted_views(master)):
                    e.set(v)
                self._non_block = (entries, master)
                self._handles.append(self.model.register_forward_pre_hook(self._model_pre))
                self._handles.append(self.model.register_forward_hook(self._model_post))
            else:
                move_to(self.model, self.device, exclude=list(self.blocks))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(block.register_forward_hook(self._make_post(i)))
        if self.model is not None:
            self.model.__dict__[EXECUTION_DEVICE_ATTR] = self.device
        self._attached = True
        return self

    def detach(self, device: torch.device | str | None = None) -> None:
        """Remove the hooks, put every swapped tensor on `device` (default: the compute device) as ordinary tensors
        and release the host masters."""
        target = torch.device(device) if device is not None else self.device
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.model is not None:
            self.model.__dict__.pop(EXECUTION_DEVICE_ATTR, None)
        for i in list(self._masters):
            master, entries = self._masters[i], self._entries[i]
            request_room(master.nbytes, target)
            for e, v in zip(entries, views(master.flat, master.slots)):   # the masters are exact copies
                e.set(v.to(target, copy=True))
            master.release()
        if self._non_block is not None:
            entries, master = self._non_block
            request_room(master.nbytes, target)
            for e, v in zip(entries, views(master.flat, master.slots)):
                e.set(v.to(target, copy=True))
            master.release()
            self._non_block = None
        self._masters.clear()
        self._entries.clear()
        self._loads.clear()
        self._bound.clear()
        self.transfer.release_cached_host_memory()
        self._attached = False

    close = detach

    def __enter__(self) -> "BlockSwapper":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def host_bytes(self) -> int:
        """Bytes of host masters this swapper holds (pinned on CUDA), the non-block layers' one included."""
        non_block = self._non_block[1].nbytes if self._non_block is not None else 0
        return sum(m.nbytes for m in self._masters.values()) + non_block

    @property
    def resident_swapped(self) -> set[int]:
        """Streamed blocks loading or on the device now (at most `slots`)."""
        return set(self._loads)

    @property
    def max_device_blocks(self) -> int:
        """Most blocks whose frozen weights are on the device at once: num_blocks - n (n < num_blocks - 1)."""
        return self.num_blocks - len(self.swapped) + self.slots if self.swapped else self.num_blocks

    # --- schedule ---------------------------------------------------------------------------------------------------
    def _upcoming(self, i: int, backward: bool) -> list[int]:
        """Swapped blocks in the order they are expected after the call of block i (deduplicated)."""
        n = self.num_blocks
        if backward:
            seq = list(range(i - 1, -1, -1)) + list(range(n))
        elif _training_forward() and self._expect_recompute:
            seq = list(range(i + 1, n)) + list(range(n - 1, -1, -1))
        else:
            seq = list(range(i + 1, n)) + list(range(n))
        out, seen = [], set()
        for j in seq:
            if j in self._swapped_set and j not in seen:
                seen.add(j)
                out.append(j)
        return out

    def _track_pass(self, i: int, backward: bool) -> None:
        if backward:
            self._saw_backward_call = True
            return
        if i <= self._last_forward_index:   # a new forward pass began: learn whether the last backward recomputed
            if self.config.recompute is None and self._last_forward_grad:
                self._expect_recompute = self._saw_backward_call
            self._saw_backward_call = False
        self._last_forward_index = i
        self._last_forward_grad = _training_forward()

    # --- loads / evictions ------------------------------------------------------------------------------------------
    def evict_loaded(self) -> None:
        """Drop every swapped block on the device (prefetched or bound); the next forward loads them again."""
        for j in list(self._loads):
            self._evict(j)

    def _start(self, j: int) -> None:
        if j not in self._loads:
            request_room(self._masters[j].nbytes, self.device)
            self._loads[j] = self.transfer.start(j, self._masters[j])

    def _bind(self, i: int) -> None:
        self._start(i)
        device_views = self.transfer.finish(self._loads[i])
        if i not in self._bound:
            for e, v in zip(self._entries[i], device_views):
                e.set(v)
            self._bound.add(i)

    def _evict(self, j: int) -> None:
        self._loads.pop(j, None)
        if j in self._bound:
            for e, v in zip(self._entries[j], self.transfer.evicted_views(self._masters[j])):
                e.set(v)
            self._bound.discard(j)
        self.transfer.note("evict", j)
        self.transfer.evicted(j)   # after the references are dropped: CUDA marks where compute is done with them

    def _check_resident(self, i: int) -> None:
        for e in self._entries.get(i, ()):
            t = e.get()
            if t.device.type != self.device.type:
                raise RuntimeError(f"block swap: block {i} tensor {e.name!r} is on {t.device}, not {self.device}")

    def _make_pre(self, i: int):
        def pre_hook(module, args):
            backward = torch._C._current_graph_task_id() != -1
            self._track_pass(i, backward)
            upcoming = self._upcoming(i, backward)
            if i in self._swapped_set:   # the running block takes a slot; the others go to the next blocks
                keep = [i] + [j for j in upcoming if j != i][: self.slots - 1]
            else:
                keep = upcoming[: self.slots]
            for j in list(self._loads):
                if j not in keep:
                    self._evict(j)
            for j in keep:
                self._start(j)
            if i in self._swapped_set:
                self._bind(i)
                self._check_resident(i)
            self.transfer.note("run", i)
        return pre_hook

    def _make_post(self, i: int):
        def post_hook(module, args, output):
            backward = torch._C._current_graph_task_id() != -1
            upcoming = self._upcoming(i, backward)
            keep = upcoming[: self.slots]   # block i has run: its slot goes to the next block (exchange)
            for j in list(self._loads):
                if j not in keep:
                    self._evict(j)
            for j in keep:
                self._start(j)
        return post_hook

    # --- non-block layers -------------------------------------------------------------------------------------------
    def _model_pre(self, module, args):
        entries, master = self._non_block
        request_room(master.nbytes, self.device)
        for e, v in zip(entries, self.transfer.finish(self.transfer.start(NON_BLOCKS, master))):
            e.set(v)

    def _model_post(self, module, args, output):
        # re-point at the host master (autograd keeps the device copies it saved for backward)
        entries, master = self._non_block
        for e, v in zip(entries, self.transfer.evicted_views(master)):
            e.set(v)


def swap_blocks(model: nn.Module, blocks_to_swap: int, device: torch.device | str, **options) -> BlockSwapper:
    """Attach a BlockSwapper to a DiT's blocks, every block list of its family in run order."""
    from ..families import blocks_of

    blocks = blocks_of(model)
    transfer = options.pop("transfer", None)
    name = getattr(getattr(model, "config", None), "variant", None) or type(model).__name__   # any family's model
    config = BlockSwapConfig(blocks_to_swap=blocks_to_swap, **options)
    return BlockSwapper(blocks, device, config, transfer=transfer, model=model, model_name=name).attach()


__all__ = ["BlockSwapConfig", "BlockSwapper", "FakeTransfer", "choose_swapped", "stream_plan", "swap_blocks",
           "validate_blocks_to_swap"]
