"""Block swap on CPU with the fake transfer layer (engine.memory.block_swap / transfer).

FakeTransfer keeps evicted weights on the meta device, so a block that runs without its weights raises; results
with and without block swap must be bit-identical (the same CPU kernels run on the same values)."""

import re
from collections import deque

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.errors import MusubiInputError
from engine.memory import (BlockSwapConfig, BlockSwapper, CudaTransfer, FakeTransfer, Transfer, checkpoint_block,
                           choose_swapped, estimate_module_bytes, pinned_bytes_in_use, quantize_model_fp8,
                           validate_blocks_to_swap)
from engine.memory.block_swap import NON_BLOCKS, stream_plan
from engine.memory.transfer import TransferLog


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = nn.Module()
        self.self_attn.q = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.register_buffer("gain", torch.linspace(0.5, 1.5, d))

    def forward(self, x, ctx):
        h = self.self_attn.q(self.norm(x)) * self.gain + ctx
        return x + self.ffn(h)


class Net(nn.Module):
    def __init__(self, d=64, n=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 8)
        self.gradient_checkpointing = False
        self.activation_offload = False

    def forward(self, x):
        x = self.embed(x)
        ctx = x.mean(dim=1, keepdim=True)
        for b in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled() and self.activation_offload:
                x = checkpoint_block(b, x, ctx, offload=True)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(b, x, ctx, use_reentrant=False)
            else:
                x = b(x, ctx)
        return self.head(x)


class Lora(nn.Module):
    """Minimal adapter hooked on a Linear (like engine.lora): its params are not part of the block."""

    def __init__(self, lin, rank=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, lin.in_features, generator=g) * 0.1)
        self.up = nn.Parameter(torch.randn(lin.out_features, rank, generator=g) * 0.1)
        lin.register_forward_hook(lambda m, a, out: out + a[0] @ self.down.t() @ self.up.t())


def make_net(fp8=False, lora=True, blocks=6):
    net = Net(n=blocks)
    net.requires_grad_(False)
    if fp8:
        quantize_model_fp8(net, "scaled")
    adapters = nn.ModuleList()
    if lora:
        for i, b in enumerate(net.blocks):
            adapters.append(Lora(b.self_attn.q, seed=i))
            adapters.append(Lora(b.ffn[0], seed=100 + i))
    return net, adapters


def run_steps(net, adapters, steps=2, train=True):
    """Outputs and adapter/input gradients of `steps` forward(+backward) passes."""
    results = []
    for s in range(steps):
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(s), requires_grad=train)
        if train:
            y = net(x)
            y.pow(2).mean().backward()
            grads = [p.grad.clone() for p in adapters.parameters()] + [x.grad.clone()]
            adapters.zero_grad(set_to_none=True)
            results.append((y.detach(), grads))
        else:
            with torch.no_grad():
                results.append((net(x), []))
    return results


def assert_same(a, b):
    for (ya, ga), (yb, gb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert len(ga) == len(gb)
        for u, v in zip(ga, gb):
            assert torch.equal(u, v)


def attach(net, n, **kw):
    cfg = BlockSwapConfig(blocks_to_swap=n, **kw)
    return BlockSwapper(net.blocks, "cpu", cfg, transfer=FakeTransfer(), model=net).attach()


# --- equality ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_training_identical_with_and_without_swap(n, gc, fp8):
    ref_net, ref_ad = make_net(fp8)
    ref_net.gradient_checkpointing = gc
    expected = run_steps(ref_net, ref_ad)
    net, ad = make_net(fp8)
    net.gradient_checkpointing = gc
    sw = attach(net, n)
    assert_same(run_steps(net, ad), expected)
    assert any(t.device.type == "meta" for t in net.blocks[sw.swapped[0]].parameters()) or sw.swapped[0] in sw.resident_swapped
    sw.detach()
    assert_same(run_steps(net, ad, steps=1), expected[:1])   # detached model is an ordinary model again


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_inference_identical_and_prefetched_ahead(prefetch):
    nb = 12
    ref_net, ref_ad = make_net(blocks=nb)
    expected = run_steps(ref_net, ref_ad, steps=3, train=False)
    net, ad = make_net(blocks=nb)
    sw = attach(net, 4, prefetch=prefetch)
    assert sw.slots == prefetch + 1 and len(sw.swapped) == 4 + prefetch + 1 and sw.max_device_blocks == nb - 4
    log = sw.transfer.log
    log.events.clear()
    assert_same(run_steps(net, ad, steps=3, train=False), expected)
    runs = [i for k, i in log.events if k == "run"]
    assert runs == list(range(nb)) * 3
    if prefetch:
        # every swapped block's copy was started before the block preceding it in execution ran
        events = log.events
        all_runs = [p for p, e in enumerate(events) if e[0] == "run"]
        for step in range(1, 3):   # steps after the first: the wrap-around prefetch is in place
            for j in sw.swapped:
                run_j = all_runs[step * nb + j]
                prev_run = all_runs[step * nb + j - 1]   # j = 0: the previous step's last block
                loads = [p for p, e in enumerate(events) if e == ("load", j) and p < run_j]
                assert loads and loads[-1] < prev_run, (j, step)
    sw.detach()


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_exchange_refills_the_freed_slot_before_the_block_returns(prefetch, train):
    """The exchange: a streamed block that has run gives its slot to the next streamed block at once, from its own
    forward hook, so that copy overlaps everything up to the next block's hook too. Only performance depends on it,
    so it is checked on the transfer timeline: ("done", i) is noted by a hook registered after the swapper's."""
    nb = 12
    net, ad = make_net(blocks=nb)
    net.gradient_checkpointing = train
    sw = attach(net, 4, prefetch=prefetch)
    for i, b in enumerate(net.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: sw.transfer.note("done", i))
    run_steps(net, ad, steps=2, train=train)
    sw.detach()
    events = sw.transfer.log.events
    exchanges = 0
    for p, (kind, i) in enumerate(events):
        if kind != "run":
            continue
        nxt = next((q for q in range(p + 1, len(events)) if events[q][0] in ("run", "done")), len(events))
        if nxt == len(events) or events[nxt] != ("done", i):
            continue   # a recompute that checkpoint stopped early: its forward hooks never ran
        inside = events[p + 1:nxt]
        if ("evict", i) in inside:   # block i gave its slot back at its own end: the refill is issued right there
            after = inside[inside.index(("evict", i)) + 1:]
            assert after and after[0][0] == "load" and after[0][1] in sw.swapped, (p, inside)
            exchanges += 1
    assert exchanges >= 2 * (len(sw.swapped) - sw.slots)   # every step streams its blocks through the slots


def test_backward_recompute_loads_in_reverse_order_and_bounds_residency():
    net, ad = make_net()
    net.gradient_checkpointing = True
    sw = attach(net, 3, prefetch=1)
    assert sw.chosen == [1, 3, 5] and sw.swapped == [0, 1, 3, 4, 5] and sw.slots == 2   # 2 extra blocks: 2 slots
    resident_counts = []
    for b in net.blocks:   # registered after the swapper's hook: sees the state the block runs with
        b.register_forward_pre_hook(lambda m, a: resident_counts.append(len(sw.resident_swapped)))
    run_steps(net, ad, steps=2)
    sw.detach()
    assert max(resident_counts) <= 2
    events = sw.transfer.log.events
    runs = [i for k, i in events if k == "run"]
    assert runs == (list(range(6)) + list(range(5, -1, -1))) * 2   # forward, then recompute in reverse
    # second step's forward: each block that ran gives its slot to the next streamed block (exchange)
    runs_pos = [p for p, e in enumerate(events) if e[0] == "run"]
    fwd = [e for e in events[runs_pos[12]:runs_pos[18]] if e[0] in ("load", "evict")]
    assert fwd == [("evict", 0), ("load", 3), ("evict", 1), ("load", 4), ("evict", 3), ("load", 5)]
    # second step's backward: the blocks still loaded from the forward->backward turn (the last 2 streamed ones)
    # are not reloaded; every other streamed block is loaded before the block after it (in forward order) runs,
    # i.e. one block ahead of its recompute
    bwd = events[runs_pos[18]:]
    loaded = [i for k, i in bwd if k == "load"]
    assert loaded == [3, 1, 0]
    for j in loaded:
        assert bwd.index(("load", j)) < bwd.index(("run", j + 1))


@pytest.mark.parametrize("n", [1, 3, 5])
def test_activation_offload_with_swap_identical_and_same_schedule(n):
    """checkpoint_block(offload=True) runs the forward without a graph (grad mode off); block swap still schedules it
    as a training pass (the recompute follows), exactly as with torch.utils.checkpoint."""
    ref_net, ref_ad = make_net()
    expected = run_steps(ref_net, ref_ad)
    logs = []
    for offload in (False, True):
        net, ad = make_net()
        net.gradient_checkpointing, net.activation_offload = True, offload
        sw = attach(net, n, prefetch=1)
        assert_same(run_steps(net, ad), expected)
        logs.append(sw.transfer.log.events)
        sw.detach()
    assert logs[0] == logs[1]


class EvictionTracking(FakeTransfer):
    """Records the order of `start` and `evicted` calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def start(self, block, master):
        self.calls.append(("start", block))
        return super().start(block, master)

    def evicted(self, block):
        super().evicted(block)
        self.calls.append(("evicted", block))


@pytest.mark.parametrize("offload", [False, True])
def test_every_eviction_is_reported_before_its_slot_is_reused(offload):
    net, ad = make_net(blocks=6)
    net.gradient_checkpointing, net.activation_offload = True, offload
    transfer = EvictionTracking()
    sw = BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=3, prefetch=1), transfer=transfer,
                      model=net).attach()
    assert sw.slots == 2
    run_steps(net, ad, steps=2)
    run_steps(net, ad, steps=1, train=False)
    sw.detach()
    evicted = [b for k, b in transfer.calls if k == "evicted"]
    assert evicted == transfer.log.of("evict") and len(evicted) > 0   # once per eviction, same order
    assert len(transfer.calls) == len(transfer.log.of("load")) + len(evicted)
    occupied = set()
    for kind, b in transfer.calls:
        if kind == "start":
            assert b not in occupied and len(occupied) < sw.slots, (b, occupied)   # a free slot, freed by evicted
            occupied.add(b)
        else:
            occupied.remove(b)
    assert transfer.log.eviction_waits == 0   # only CudaTransfer waits for the GPU


def test_cuda_transfer_waits_for_evicted_blocks_before_loading(monkeypatch):
    """The host-side bookkeeping of CudaTransfer (events faked: no GPU here)."""
    synced = []

    class FakeEvent:
        count = 0

        def __init__(self):
            FakeEvent.count += 1
            self.id, self.stream = FakeEvent.count, None

        def record(self, stream):
            self.stream = stream

        def synchronize(self):
            synced.append((self.id, self.stream))

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "compute")
    t = CudaTransfer.__new__(CudaTransfer)   # skips the CUDA stream
    t.device, t.log, t.max_pending_evictions, t._evictions = torch.device("cuda"), TransferLog(), 0, deque()
    t.evicted(4)
    t.evicted(5)
    t._wait_for_evictions()
    assert synced == [(1, "compute"), (2, "compute")] and t.log.eviction_waits == 2 and t.log.events == []
    t._wait_for_evictions()
    assert t.log.eviction_waits == 2
    t.max_pending_evictions = 1
    for b in range(3):
        t.evicted(b)
    t._wait_for_evictions()
    assert [i for i, _ in synced] == [1, 2, 3, 4] and len(t._evictions) == 1   # the newest may stay pending


class CountingTransfer(FakeTransfer):
    """FakeTransfer that records how many blocks have frozen weights on the device (bound, or a copy started)
    right after every load starts and whenever a block runs."""

    def __init__(self):
        super().__init__()
        self.swapper, self.counts = None, []

    def on_device(self, extra=()) -> set:
        sw = self.swapper
        bound = {i for i, b in enumerate(sw.blocks)
                 if any(t.device.type != "meta" for t in list(b.parameters()) + list(b.buffers())
                        if not t.requires_grad)}
        return bound | set(sw._loads) | set(extra)

    def start(self, block, master):
        load = super().start(block, master)
        self.counts.append(len(self.on_device([block])))
        return load

    def note(self, kind, block):
        super().note(kind, block)
        self.counts.append(len(self.on_device()))


@pytest.mark.parametrize("placement", ["spread", "tail"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7])
def test_device_holds_at_most_num_blocks_minus_n(n, prefetch, placement):
    nb = 8
    ref_net, ref_ad = make_net(blocks=nb)
    ref_net.gradient_checkpointing = True
    expected_train = run_steps(ref_net, ref_ad, steps=2)
    expected_infer = run_steps(ref_net, ref_ad, steps=2, train=False)
    net, ad = make_net(blocks=nb)
    net.gradient_checkpointing = True
    transfer = CountingTransfer()
    sw = BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=n, prefetch=prefetch, placement=placement),
                      transfer=transfer, model=net)
    transfer.swapper = sw
    sw.attach()
    assert set(sw.chosen) <= set(sw.swapped) and len(sw.swapped) == n + sw.slots - (n == nb - 1)
    budget = nb - n if n < nb - 1 else 2   # n = num_blocks - 1: one resident block + one slot
    assert sw.max_device_blocks == budget
    assert sw.slots == (min(prefetch + 1, nb - n - 1) or 1)
    for mode, expected in (("inference", expected_infer), ("training", expected_train)):
        transfer.counts.clear()
        assert_same(run_steps(net, ad, steps=2, train=mode == "training"), expected)
        assert max(transfer.counts) <= budget, (mode, max(transfer.counts))
        assert max(transfer.counts) == budget   # the budget is used: prefetch fills every slot
    sw.detach()


def test_stream_plan():
    assert stream_plan(40, 0) == ([], 0)
    assert stream_plan(40, 20, 1, "tail") == (list(range(18, 40)), 2)   # last 20 + 2 that pay for the slots
    s, slots = stream_plan(40, 20, 1)
    assert slots == 2 and len(s) == 22 and set(choose_swapped(40, 20)) <= set(s)
    assert stream_plan(40, 38, 1, "tail") == (list(range(1, 40)), 1)    # 2 blocks of room: 1 slot, no overlap
    assert stream_plan(40, 39, 1) == (choose_swapped(40, 39), 1)          # max: 1 resident + 1 slot
    for n in range(1, 40):
        for p in range(4):
            s, slots = stream_plan(40, n, p)
            assert len(set(s)) == len(s) and set(choose_swapped(40, n)) <= set(s)
            assert 40 - len(s) + slots == (40 - n if n < 39 else 2)


def test_non_resident_weights_cannot_be_used():
    net, _ = make_net(lora=False)
    sw = attach(net, 2)
    j = sw.swapped[0]
    assert net.blocks[j].self_attn.q.weight.device.type == "meta"
    assert net.blocks[j].gain.device.type == "meta"
    with pytest.raises(Exception):
        net.blocks[j].forward(torch.randn(1, 3, 64), torch.zeros(1, 1, 64))   # bypasses the hooks
    sw.detach()


# --- what moves -------------------------------------------------------------------------------------------------------

def test_adapters_and_trainable_params_stay_on_device_host_bytes_match():
    net, ad = make_net()
    extra = net.blocks[1].norm.weight
    extra.requires_grad_(True)   # a trainable base tensor in a swapped block: never swapped
    sw = attach(net, 3, placement="tail")
    assert sw.chosen == [3, 4, 5] and sw.swapped == [1, 2, 3, 4, 5]   # + 2 blocks that pay for 2 slots
    frozen = sum(estimate_module_bytes(net.blocks[i], only_frozen=True) for i in sw.swapped)
    assert frozen <= sw.host_bytes <= frozen + 256 * 8 * 5
    assert all(p.device.type == "cpu" for p in ad.parameters())
    sw.detach()
    sw2 = attach(net, 5)
    assert 1 in sw2.swapped and extra.device.type == "cpu" and net.blocks[1].norm.weight is extra
    x = torch.randn(2, 5, 8)
    net(x).sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    sw2.detach()


def test_host_memory_is_released_on_detach_no_growth():
    base = pinned_bytes_in_use()
    net, ad = make_net()
    sizes = []
    for _ in range(3):
        sw = attach(net, 4)
        sizes.append(pinned_bytes_in_use() - base)
        assert sizes[-1] == sw.host_bytes > 0
        run_steps(net, ad, steps=1)
        sw.detach()
        assert pinned_bytes_in_use() == base
    assert sizes[0] == sizes[1] == sizes[2]
    assert all(t.device.type == "cpu" for t in net.parameters())


def test_real_synchronous_transfer_path_matches():
    base = pinned_bytes_in_use()
    ref_net, ref_ad = make_net()
    expected = run_steps(ref_net, ref_ad)
    net, ad = make_net()
    sw = BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=3), transfer=Transfer("cpu"), model=net)
    with sw:
        assert_same(run_steps(net, ad), expected)
        assert sw.transfer.log.bytes_h2d > 0
    assert pinned_bytes_in_use() == base


def test_offload_non_blocks_keeps_results():
    ref_net, ref_ad = make_net()
    expected = run_steps(ref_net, ref_ad)
    net, ad = make_net()
    sw = attach(net, 2, offload_non_blocks=True)
    assert_same(run_steps(net, ad), expected)
    sw.detach()


# --- validation -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [6, -1, 7, 2.5, True, "3"])
def test_blocks_to_swap_validated(bad):
    net, _ = make_net(lora=False)
    with pytest.raises(MusubiInputError, match=r"blocks_to_swap.*0 to 5 \(model has 6 blocks"):
        BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=bad), transfer=FakeTransfer())


def test_wan_limits():
    assert validate_blocks_to_swap(39, 40, "Wan 14B") == 39
    assert validate_blocks_to_swap(29, 30, "Wan 1.3B") == 29
    with pytest.raises(MusubiInputError, match="Wan 14B has 40 blocks"):
        validate_blocks_to_swap(40, 40, "Wan 14B")
    with pytest.raises(MusubiInputError, match="0 to 29"):
        validate_blocks_to_swap(30, 30, "Wan 1.3B")


def test_choose_swapped():
    for n in range(1, 40):
        s = choose_swapped(40, n)
        assert len(s) == n and len(set(s)) == n and 0 <= min(s) and max(s) < 40
    assert choose_swapped(30, 3) == [5, 15, 25]       # centres of three equal thirds
    assert choose_swapped(30, 2, "tail") == [28, 29]
    assert choose_swapped(30, 0) == []
    with pytest.raises(MusubiInputError, match="placement"):
        choose_swapped(30, 2, "middle")


# --- details the tests above do not pin (mutation testing, #21 item 9) ------------------------------------------

def test_swap_blocks_attaches_to_a_family_models_blocks_and_names_the_variant():
    from engine.memory.block_swap import swap_blocks
    from lora_fixtures import tiny_model

    model = tiny_model("t2v")                                  # 2 blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sw = swap_blocks(model, 1, "cpu", transfer=FakeTransfer(), placement="tail", prefetch=0)
    assert all(a is b for a, b in zip(sw.blocks, model.blocks)) and len(sw.blocks) == 2 and sw.model is model and sw.chosen == [1] and sw.config.prefetch == 0
    assert {p.device.type for p in model.blocks[1].parameters()} == {"meta"}       # streamed: on the host master
    assert {p.device.type for p in model.blocks[0].parameters()} == {"cpu"}
    sw.detach()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(MusubiInputError, match=r"^blocks_to_swap: got 2; expected an integer from 0 to 1 \(tiny-t2v has 2 "):
        swap_blocks(model, 2, "cpu", transfer=FakeTransfer())
    # no transfer given: the device's own (a plain synchronous one on the CPU); the defaults of BlockSwapConfig
    sw = swap_blocks(model, 1, "cpu")
    assert type(sw.transfer) is Transfer and sw.device == torch.device("cpu") and sw.config == BlockSwapConfig(1)
    sw.detach()
    # a model of no variant is named by its class
    model.config.variant = None
    name = type(model).__name__
    with pytest.raises(MusubiInputError, match=rf"^blocks_to_swap: got 2; expected an integer from 0 to 1 \({name} has 2 "):
        swap_blocks(model, 2, "cpu")


def test_evict_loaded_drops_every_streamed_block_from_the_device():
    net, ad = make_net()
    sw = attach(net, 3, prefetch=1)
    expected = run_steps(*make_net(), steps=1, train=False)
    assert_same(run_steps(net, ad, steps=1, train=False), expected)
    assert sw.resident_swapped
    sw.evict_loaded()
    assert sw.resident_swapped == set()
    assert all(p.device.type == "meta" for i in sw.swapped for p in net.blocks[i].parameters())
    assert_same(run_steps(net, ad, steps=1, train=False), expected)           # loaded again on the next forward
    sw.detach()


def test_non_block_layers_go_back_to_the_host_after_each_forward():
    net, ad = make_net()
    sw = attach(net, 2, offload_non_blocks=True)
    run_steps(net, ad, steps=2, train=False)
    assert {p.device.type for p in net.embed.parameters()} | {p.device.type for p in net.head.parameters()} == {"meta"}
    events = sw.transfer.log.events
    assert [e for e in events if e[1] == NON_BLOCKS] == [("load", NON_BLOCKS), ("wait", NON_BLOCKS)] * 2   # per forward
    assert events.index(("load", NON_BLOCKS)) < events.index(("run", 0))
    sw.detach()


@pytest.mark.parametrize("case, expected", [
    # checkpointed training: the recompute starts with blocks 5 and 4, already there: nothing moves
    ("recompute", [[], []]),
    # inference: the next forward's blocks 0 and 1 (0 was taken at block 5's start)
    ("inference", [[("evict", 5), ("load", 1)], [("evict", 5), ("load", 1)]]),
    # training without checkpointing: the first forward guesses a recompute; the backward recomputes nothing, so from
    # the second forward on the slots go to the next forward
    ("no recompute", [[], [("evict", 5), ("load", 1)], [("evict", 5), ("load", 1)]]),
    # the same, told there is no recompute (BlockSwapConfig.recompute=False): right from the first forward
    ("told no recompute", [[("evict", 5), ("load", 1)], [("evict", 5), ("load", 1)]]),
    # told there is one (recompute=True): kept for it whatever the backward did
    ("told recompute", [[], [], []]),
])
def test_the_slots_at_the_end_of_a_forward_go_to_what_runs_next(case, expected):
    net, ad = make_net()
    net.gradient_checkpointing = case == "recompute"
    told = {"told no recompute": {"recompute": False}, "told recompute": {"recompute": True}}.get(case, {})
    sw = attach(net, 3, prefetch=1, **told)
    assert sw.swapped == [0, 1, 3, 4, 5] and sw.slots == 2
    assert _moves_as_forwards_end(net, ad, sw, len(expected), train=case != "inference") == expected


def test_a_recompute_that_reaches_block_0_keeps_block_1_for_it():
    """4 slots for 5 streamed blocks (0, 1, 3, 4, 5): at the end of a checkpointed forward they hold the recompute's
    first streamed blocks 5, 4, 3 and 1; block 1, loaded since the forward, stays."""
    net, ad = make_net()
    net.gradient_checkpointing = True
    sw = attach(net, 1, prefetch=3)
    assert sw.swapped == [0, 1, 3, 4, 5] and sw.slots == 4
    resident = []
    net.register_forward_hook(lambda *_: resident.append(sw.resident_swapped))
    assert _moves_as_forwards_end(net, ad, sw, 2, train=True) == [[], []]
    assert resident == [{1, 3, 4, 5}] * 2


def _moves_as_forwards_end(net, ad, sw, steps: int, train: bool) -> list[list]:
    """Per forward pass of `run_steps`, the loads and evictions after the last block ran (in its hook)."""
    events = sw.transfer.log.events
    net.register_forward_hook(lambda *_: events.append(("forward done", None)))   # after block 5's own hooks
    run_steps(net, ad, steps=steps, train=train)
    ends = [p for p, e in enumerate(events) if e[0] == "forward done"]
    last_runs = [max(q for q in range(p) if events[q] == ("run", 5)) for p in ends]
    return [[e for e in events[r + 1:p] if e[0] in ("load", "evict")] for r, p in zip(last_runs, ends)]


# --- the rest of block swap's mutants (#21: the 413 not checked before) -------------------------------------------

def test_refusals_name_the_value_and_what_was_expected():
    with pytest.raises(MusubiInputError, match=r"^blocks_to_swap: got 6; expected an integer from 0 to 5 \(model "
                                               r"has 6 blocks and at least one stays on the GPU\)$"):
        validate_blocks_to_swap(6, 6)
    assert validate_blocks_to_swap(0, 6) == 0                                # no swap is a valid setting
    with pytest.raises(MusubiInputError, match=r"^block swap placement: got 'middle'; expected one of "
                                               r"\('spread', 'tail'\)$"):
        choose_swapped(30, 2, "middle")
    net, _ = make_net(lora=False)
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(MusubiInputError, match=rf"^block swap prefetch: got {re.escape(repr(bad))}; expected "
                                                   r"an integer >= 0$"):
            BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=1, prefetch=bad), transfer=FakeTransfer())


def test_stream_plan_spreads_the_extra_blocks_over_the_rest():
    # chosen: the blocks at the centres of 10 cut in thirds, 1, 5 and 8. The 7 others are 0 2 3 4 6 7 9; prefetch 1
    # takes 2 more, those at their halves' centres (positions 1 and 5: blocks 2 and 7), prefetch 2 three more
    # (positions 1, 3 and 5: blocks 2, 4 and 7)
    assert choose_swapped(10, 3) == [1, 5, 8]
    assert stream_plan(10, 3) == stream_plan(10, 3, 1, "spread") == ([1, 2, 5, 7, 8], 2)
    assert stream_plan(10, 3, 2) == ([1, 2, 4, 5, 7, 8], 3)


class TiedBlock(Block):
    """A block with a tied weight, a shared buffer and empty slots (a bias-free layer's `bias` is None)."""

    def __init__(self, d):
        super().__init__(d)
        self.out = nn.Linear(d, d)
        self.out.weight = self.self_attn.q.weight
        self.out.register_parameter("unused", None)
        self.out.register_buffer("absent", None)
        self.out.register_buffer("gain", self.gain)

    def forward(self, x, ctx):
        return self.out(super().forward(x, ctx)) * self.out.gain


def test_a_tied_tensor_is_packed_once_and_stays_tied():
    def tied_net():
        net = Net()
        torch.manual_seed(1)
        net.blocks = nn.ModuleList(TiedBlock(64) for _ in range(6))
        return net.requires_grad_(False)
    ref = tied_net()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = ref(x)
    net = tied_net()
    trainable = net.blocks[4].self_attn.q.weight.requires_grad_(True)     # tied and trainable: stays on the device
    sw = attach(net, 2, placement="tail")
    assert sw.swapped == [2, 3, 4, 5] and net.blocks[4].out.weight is trainable and trainable.device.type == "cpu"
    block = net.blocks[5]
    frozen = sum(estimate_module_bytes(net.blocks[i], only_frozen=True) for i in sw.swapped)   # shared: once
    assert frozen <= sw.host_bytes <= frozen + 256 * 10 * 4                          # (alignment)
    # every slot of the tied tensors is re-pointed: nothing stays behind in the streamed blocks
    slots = [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
    assert {t.device.type for _, t in slots} == {"meta"}
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    sw.detach()
    assert block.out.weight is block.self_attn.q.weight and block.out.gain is block.gain
    assert block.out.bias.device.type == "cpu" and block.out.unused is None and block.out.absent is None
    with torch.no_grad():
        assert torch.equal(net(x), expected)


class Undelivered(FakeTransfer):
    """A broken transfer: its loads finish, but hand back the host-side (meta) views."""

    def finish(self, load):
        super().finish(load)
        return self.evicted_views(load.master)


def test_a_block_whose_weights_did_not_arrive_is_refused_before_it_runs():
    net, _ = make_net(lora=False)
    sw = BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=2), transfer=Undelivered(), model=net).attach()
    first = sw.swapped[0]
    with pytest.raises(RuntimeError, match=rf"^block swap: block {first} tensor 'gain' is on meta, not cpu$"):
        net(torch.randn(2, 5, 8))
    assert ("run", first) not in sw.transfer.log.events
    sw.detach()


def test_room_is_asked_for_the_bytes_each_move_puts_on_the_device(monkeypatch):
    import engine.memory.block_swap as block_swap

    asked = []
    monkeypatch.setattr(block_swap, "request_room", lambda nbytes, device: asked.append((nbytes, str(device))))
    net, ad = make_net()
    net.blocks[5].norm.weight.requires_grad_(True)                  # trainable, in a streamed block: moved at attach
    net.embed.bias.requires_grad_(True)                             # trainable, outside the blocks: never asked for
    sw = attach(net, 2, placement="tail", offload_non_blocks=True)
    masters = {i: m.nbytes for i, m in sw._masters.items()}
    assert asked == [(64 * 4, "cpu")]                               # the trainable norm weight, 64 floats
    asked.clear()
    run_steps(net, ad, steps=1, train=False)
    loads = [b for kind, b in sw.transfer.log.events if kind == "load"]
    non_block = sw.host_bytes - sum(masters.values())
    assert asked == [(non_block, "cpu")] + [(masters[b], "cpu") for b in loads[1:]]
    asked.clear()
    sw.detach("meta")
    assert asked == [(masters[i], "meta") for i in sorted(masters)] + [(non_block, "meta")]


def test_attach_and_detach_are_idempotent_and_set_the_execution_device():
    from engine.memory.placement import EXECUTION_DEVICE_ATTR, execution_device

    net, ad = make_net()
    sw = attach(net, 2, offload_non_blocks=True)
    assert sw.attach() is sw                                         # a second attach adds nothing
    assert execution_device(net) == torch.device("cpu") and net.embed.weight.device.type == "meta"
    run_steps(net, ad, steps=1, train=False)
    assert [e for e in sw.transfer.log.events if e[0] == "run"] == [("run", i) for i in range(6)]   # one hook each
    sw.detach()
    sw.detach()                                                      # (`with` after `close()`)
    assert EXECUTION_DEVICE_ATTR not in net.__dict__ and sw.host_bytes == 0
    assert all(t.device.type == "cpu" for t in net.state_dict().values())
    sw.attach()                                                      # attached again after a detach
    assert sw.host_bytes > 0 and net.blocks[sw.swapped[0]].gain.device.type == "meta"
    sw.detach()


def test_non_block_layers_keep_their_weights_readable_between_forwards():
    net, ad = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.head.bias.requires_grad_(True)                              # trainable: stays a device tensor
    sw = attach(net, 2, offload_non_blocks=True)
    assert net.embed.weight.shape == before["embed.weight"].shape and net.head.bias.device.type == "cpu"
    run_steps(net, ad, steps=1)
    assert net.head.bias.grad is not None
    sw.detach()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_detach_gives_each_tensor_its_own_memory_on_the_target():
    net, _ = make_net(lora=False)
    config = BlockSwapConfig(blocks_to_swap=2, offload_non_blocks=True)
    sw = BlockSwapper(net.blocks, "cpu", config, transfer=Transfer("cpu"), model=net).attach()
    swapped = list(sw.swapped)
    sw.detach()
    for t in net.state_dict().values():   # not views into the released masters (which would keep them alive)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    sw = BlockSwapper(net.blocks, "cpu", config, transfer=Transfer("cpu"), model=net).attach()
    sw.detach("meta")
    assert all(t.device.type == "meta" for i in swapped for t in net.blocks[i].parameters())
    assert all(t.device.type == "meta" for t in net.embed.parameters())


def test_the_pin_memory_setting_reaches_the_default_transfer(monkeypatch):
    import engine.memory.block_swap as block_swap

    made = []
    monkeypatch.setattr(block_swap, "default_transfer", lambda device, pin: made.append((device, pin)) or FakeTransfer())
    net, _ = make_net(lora=False)
    for pin in (True, False):
        BlockSwapper(net.blocks, "cpu", BlockSwapConfig(blocks_to_swap=1, pin_memory=pin))
    assert made == [("cpu", True), ("cpu", False)]


def test_attach_puts_the_resident_blocks_and_the_other_layers_on_the_device(monkeypatch):
    import engine.memory.block_swap as block_swap

    moved = []
    monkeypatch.setattr(block_swap, "move_to", lambda module, device, exclude=(): moved.append((module, device, exclude)))
    net, _ = make_net(lora=False)
    sw = attach(net, 2, placement="tail")
    assert sw.swapped == [2, 3, 4, 5]
    assert moved == [(net.blocks[0], sw.device, ()), (net.blocks[1], sw.device, ()),
                     (net, sw.device, list(net.blocks))]
