"""Memory simulation of Wan, HunyuanVideo and FramePack training and inference at real shapes, on any machine (no
GPU, no weights, no RAM).

    python benchmarks/sim_memory.py                                  # 1.3B and 14B grid at 832×480×81 (~10 min)
    python benchmarks/sim_memory.py --model 14B --task train --fp8 scaled --swap 0,20 --offload 1
    python benchmarks/sim_memory.py --model tiny --latent 2,8,8      # seconds
    python benchmarks/sim_memory.py --markdown docs/memory_tables.md  # also write the docs tables
    python benchmarks/sim_memory.py --family wan22 --model A14B-T2V --task train --fp8 scaled --swap 30 --offload 1 \
        --experts both,offload                                       # Wan 2.2 A14B: both experts in one session
    python benchmarks/sim_memory.py --family hunyuan --model 13B --task train --fp8 scaled --swap 0,max --offload 1
    python benchmarks/sim_memory.py --family framepack --model 13B --task infer --fp8 scaled --swap max

Runs the engine's own code — the Wan (default), HunyuanVideo (`--family hunyuan`) or FramePack (`--family
framepack`) DiT with fp8 quantization, LoRA adapters (rank 32, fp32), gradient
checkpointing, activation offload, block swap and an AdamW step — under `FakeTensorMode`: tensors have shapes and
devices but no data. The "GPU" is played by fake `cpu` tensors, host memory by fake `meta` tensors, and
`engine.memory.meter.LiveMemoryMeter` counts every live storage on the "GPU" op by op. What it reports is exact for
the tensors the code keeps alive (weights, adapters, optimizer state, activations saved for backward, attention
outputs, block-swap slots, inputs). Not included: the CUDA caching allocator's rounding and fragmentation, cuBLAS /
attention workspaces and the CUDA context (~0.5–1 GB): budget 10–15 % + 1 GB on top (`fits` below does).

Time: `engine.memory.timing.replay` replays the op-order timeline (FLOPs, host<->device copies, block-swap waits)
on a modelled GPU (`GPU_MODELS`: assumed throughput and PCIe bandwidth) to estimate the swap/offload overhead
(modelled step time ÷ pure compute time). Measured numbers come from `bench_memory.py` on a real card.

HunyuanVideo: 16 latent channels (VAE 4×8×8, patch 1×2×2), 256 LLM text tokens × 4096 (all real: fake tensors have
no data, so no padding is dropped — the most attention work) + CLIP-L pooled 768, the embedded guidance of the
distilled T2V model; training goes through the family's `training_forward`, inference is one batch-1 forward (the
distilled model needs no CFG pass). Its block lists (20 double + 40 single blocks) are swapped and checkpointed as
one list of 60, through the same engine functions.

FramePack: one section (latent window 9 at 640×640: 14 400 generated tokens) with the longest history (start +
post latents, 2 latents 2× and 16 latents 4× compressed: +4 000 tokens), 729 SigLIP image tokens and 512 LLaMA text
tokens (all real) + CLIP-L; embedded guidance 10 (inference), 1.0 (training, through `training_forward`).

Wan 2.2 (`--family wan22`): A14B experts (the 14B DiT; I2V with 36 input channels, no CLIP) and TI2V-5B (48
channels, 16× VAE, t per latent frame with frame 0 clean). An A14B model is a pair: `--experts` both (the idle
expert placed too, its own block swapper), offload (parked in pinned host memory; switches cost park + place) or
lazy (inference: not loaded); training gives each expert its own LoRA, and one AdamW holds both.

One JSON line per configuration. Attention is PyTorch's flash kernel (memory linear in the sequence length), as
on a GPU with SDPA, FlashAttention or SageAttention.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

DEVICE = torch.device("cpu")    # the simulated GPU
HOST = torch.device("meta")     # the simulated host memory
MODELS = {"tiny": "tiny-t2v", "1.3B": "t2v-1.3B", "14B": "t2v-14B"}
TINY_LAYERS = 6
GB = 1e9


@dataclass(frozen=True)
class Family:
    """What the simulator needs of a DiT family: its benchmark models, how to build one, its inputs and one call."""
    display: str
    models: dict                     # benchmark name -> official config name (tiny: a preset, see `config`)
    config: object                   # name -> the family's config
    num_blocks: object               # config -> blocks in swap/checkpoint order (all block lists)
    build: object                    # (config, device) -> model
    keep_fp32: object                # parameter name -> kept in float32 by the loader
    inputs: object                   # (config, batch, device) -> dict of conditioning tensors
    call: object                     # (model, inputs, x, t, train) -> prediction
    cfg_batch: int                   # inference batch (2: cond + uncond batched; 1: guidance-distilled, no CFG)
    latent: tuple                    # the default latent shape of the tables
    swaps: str                       # the default --swap grid
    default_models: str
    channels: object = lambda c: 16  # config -> latent channels
    stride: object = lambda c: (4, 8, 8)   # config -> VAE (time, height, width) pixels per latent
    pairs: tuple = ()                # models that are timestep-expert pairs (Wan 2.2 A14B)


def _wan_config(name: str):
    from engine.families.wan.presets import OFFICIAL, preset_config

    if name == "tiny":
        return dataclasses.replace(preset_config(MODELS[name]), num_layers=TINY_LAYERS)
    return OFFICIAL[MODELS[name]]


def _wan_build(config, device):
    from engine.families.wan.dit import build_wan_model
    return build_wan_model(config, device)


def _wan_keep_fp32(name: str) -> bool:
    from engine.families.wan.dit import keep_fp32
    return keep_fp32(name)


def _wan_inputs(config, batch: int, device=DEVICE) -> dict:
    return {"context": torch.randn(batch, config.text_len, config.text_dim, device=device, dtype=torch.bfloat16)}


def _wan_call(model, inputs: dict, x, t, train: bool):
    cfg = model.config
    y = None
    if cfg.in_dim > cfg.out_dim:   # image-conditioned (A14B I2V: mask + image latents), as the cache gives them
        y = torch.randn(x.shape[0], cfg.in_dim - cfg.out_dim, *x.shape[2:], device=x.device, dtype=x.dtype)
    if cfg.model_type == "ti2v":   # TI2V-5B: the first latent frame kept clean, t per latent frame [B, f]
        t = torch.cat([torch.zeros_like(t)[:, None], t[:, None].expand(-1, x.shape[2] - 1)], dim=1)
    return model(x, t, inputs["context"], y=y)


WAN22_MODELS = {"tiny": "tiny-t2v-a14b-low-noise", "tiny-i2v": "tiny-i2v-a14b-low-noise",
                "tiny-ti2v": "tiny-ti2v-5b", "A14B-T2V": "t2v-A14B", "A14B-I2V": "i2v-A14B", "TI2V-5B": "ti2v-5B"}
WAN22_PAIRS = ("tiny", "tiny-i2v", "A14B-T2V", "A14B-I2V")   # expert pairs (the other models are one DiT)


def _wan22_config(name: str):
    from engine.families.wan.presets import OFFICIAL, preset_config

    if name.startswith("tiny"):
        return dataclasses.replace(preset_config(WAN22_MODELS[name]), num_layers=TINY_LAYERS)
    return OFFICIAL[WAN22_MODELS[name]]


HUNYUAN_MODELS = {"tiny": "tiny", "13B": "t2v-13B"}
HUNYUAN_TEXT_TOKENS = 256    # Musubi Tuner's LLM text length for HunyuanVideo
HUNYUAN_EMBEDDED_GUIDANCE = 6.0


def _hunyuan_config(name: str):
    from engine.families.hunyuan.presets import OFFICIAL, preset_config

    if name == "tiny":   # 3 double + 3 single blocks: swapped blocks exist past the prefetch, in both lists
        return dataclasses.replace(preset_config("tiny"), double_blocks=TINY_LAYERS // 2,
                                   single_blocks=TINY_LAYERS - TINY_LAYERS // 2)
    return OFFICIAL[HUNYUAN_MODELS[name]]


def _hunyuan_build(config, device):
    from engine.families.hunyuan.dit import build_hunyuan_model
    return build_hunyuan_model(config, device)


def _hunyuan_inputs(config, batch: int, device=DEVICE) -> dict:
    return {"text_states": torch.randn(batch, HUNYUAN_TEXT_TOKENS, config.text_dim, device=device,
                                       dtype=torch.bfloat16),
            "text_mask": torch.ones(batch, HUNYUAN_TEXT_TOKENS, device=device, dtype=torch.bool),
            "pooled": torch.randn(batch, config.text_pool_dim, device=device, dtype=torch.bfloat16)}


def _hunyuan_call(model, inputs: dict, x, t, train: bool):
    from engine.families.hunyuan.family import FAMILY
    from engine.families.hunyuan.pipeline import GUIDANCE_EMBED_SCALE

    if train:   # the trainer's own call (guidance 1.0 × 1000 on the distilled model)
        pred, _ = FAMILY.training_forward(model, inputs, x, t, None)
        return pred
    guidance = None
    if model.config.guidance_embed:
        guidance = torch.full((x.shape[0],), HUNYUAN_EMBEDDED_GUIDANCE * GUIDANCE_EMBED_SCALE,
                              device=x.device)
    return model(x, t, inputs["text_states"], inputs["text_mask"], inputs["pooled"], guidance=guidance)


FRAMEPACK_MODELS = {"tiny": "tiny", "13B": "i2v-13B"}
FRAMEPACK_TEXT_TOKENS = 512        # Musubi pads the LLaMA states to 512 (at most 256 real; all real here: the worst)
FRAMEPACK_IMAGE_TOKENS = 729       # SigLIP 384 px
FRAMEPACK_EMBEDDED_GUIDANCE = 10.0


def _framepack_config(name: str):
    from engine.families.framepack.presets import OFFICIAL, preset_config

    if name == "tiny":
        return dataclasses.replace(preset_config("tiny"), double_blocks=TINY_LAYERS // 2,
                                   single_blocks=TINY_LAYERS - TINY_LAYERS // 2)
    return OFFICIAL[FRAMEPACK_MODELS[name]]


def _framepack_build(config, device):
    from engine.families.framepack.dit import build_framepack_model
    return build_framepack_model(config, device)


def _framepack_keep_fp32(name: str) -> bool:
    from engine.families.framepack.dit import FP32_MODULES
    return name.startswith(FP32_MODULES)


def _framepack_inputs(config, batch: int, device=DEVICE) -> dict:
    return {"text_states": torch.randn(batch, FRAMEPACK_TEXT_TOKENS, config.text_dim, device=device,
                                       dtype=torch.bfloat16),
            "text_mask": torch.ones(batch, FRAMEPACK_TEXT_TOKENS, device=device, dtype=torch.bool),
            "pooled": torch.randn(batch, config.text_pool_dim, device=device, dtype=torch.bfloat16),
            "image_embeddings": torch.randn(batch, FRAMEPACK_IMAGE_TOKENS, config.image_dim, device=device,
                                            dtype=torch.bfloat16)}


def _framepack_section(x) -> dict:
    """One section of the original schedule at padding 0 (the last one sampled, the longest history): the window
    of F latents at 1..F, start + post latents (1x), 2 latents 2x and 16 latents 4x compressed, at their indices."""
    b, c, f, h, w = x.shape
    hist = lambda n: torch.randn(b, c, n, h, w, device=x.device, dtype=x.dtype)   # noqa: E731
    idx = lambda lo, n: torch.arange(lo, lo + n, device=x.device)[None].expand(b, -1)   # noqa: E731
    return {"latent_indices": idx(1, f), "clean_latents": hist(2),
            "clean_latent_indices": torch.tensor([[0, f + 1]], device=x.device).expand(b, -1),
            "clean_latents_2x": hist(2), "clean_latent_2x_indices": idx(f + 2, 2),
            "clean_latents_4x": hist(16), "clean_latent_4x_indices": idx(f + 4, 16)}


def _framepack_call(model, inputs: dict, x, t, train: bool):
    from engine.families.framepack.family import FAMILY
    from engine.families.framepack.pipeline import GUIDANCE_EMBED_SCALE

    section = _framepack_section(x)
    if train:   # the trainer's own call (guidance 1.0 x 1000)
        pred, _ = FAMILY.training_forward(model, {**inputs, **section}, x, t, None)
        return pred
    guidance = torch.full((x.shape[0],), FRAMEPACK_EMBEDDED_GUIDANCE * GUIDANCE_EMBED_SCALE, device=x.device)
    return model(x, t, inputs["text_states"], inputs["text_mask"], inputs["pooled"], guidance=guidance,
                 image_embeddings=inputs["image_embeddings"], **section)


FAMILIES = {
    "wan": Family("Wan", MODELS, _wan_config, lambda c: c.num_layers, _wan_build, _wan_keep_fp32, _wan_inputs,
                  _wan_call, cfg_batch=2, latent=(21, 60, 104), swaps="0,10,20,30,max", default_models="1.3B,14B"),
    "hunyuan": Family("HunyuanVideo", HUNYUAN_MODELS, _hunyuan_config, lambda c: c.double_blocks + c.single_blocks,
                      _hunyuan_build, lambda name: False, _hunyuan_inputs, _hunyuan_call, cfg_batch=1,
                      latent=(33, 68, 120), swaps="0,20,40,50,max", default_models="13B"),
    "framepack": Family("FramePack", FRAMEPACK_MODELS, _framepack_config,
                        lambda c: c.double_blocks + c.single_blocks, _framepack_build, _framepack_keep_fp32,
                        _framepack_inputs, _framepack_call, cfg_batch=1, latent=(9, 80, 80),
                        swaps="0,20,40,50,max", default_models="13B"),
    "wan22": Family("Wan 2.2", WAN22_MODELS, _wan22_config, lambda c: c.num_layers, _wan_build, _wan_keep_fp32,
                    _wan_inputs, _wan_call, cfg_batch=2, latent=(21, 60, 104), swaps="0,20,30,max",
                    default_models="A14B-T2V,A14B-I2V", channels=lambda c: c.out_dim,
                    stride=lambda c: c.vae_stride, pairs=WAN22_PAIRS),
}


@contextlib.contextmanager
def _fake_masks_all_real(family: str, fake: bool):
    """Fake tensors have no data: HunyuanVideo's two host-side mask checks (`bool(mask.all())`, which decides
    whether padded text keys are dropped, and the "one real token per prompt" check) would raise. During a fake
    run they read True for fake tensors — every text token is real. The engine code runs otherwise unchanged."""
    if family not in ("hunyuan", "framepack") or not fake:
        yield
        return
    import builtins

    from torch._subclasses.fake_tensor import FakeTensor

    from engine.families.framepack import dit as framepack_dit
    from engine.families.hunyuan import dit

    def _bool(x=False):
        return True if isinstance(x, FakeTensor) else builtins.bool(x)

    dit.bool = framepack_dit.bool = _bool
    try:
        yield
    finally:
        del dit.bool, framepack_dit.bool


@dataclass(frozen=True)
class SimConfig:
    model: str = "14B"                 # tiny | 1.3B | 14B (HunyuanVideo: tiny | 13B)
    task: str = "train"                # train | infer
    fp8: str = "none"                  # none | e4m3 | scaled
    blocks_to_swap: int | str = 0      # an int or "max"
    activation_offload: bool = False   # training only
    latent: tuple[int, int, int] = (21, 60, 104)   # 832×480×81 frames
    rank: int = 32
    prefetch: int = 1
    placement: str = "spread"
    cfg_batch: int | None = None       # inference batch; None: the family's (Wan 2: cond + uncond in one forward,
                                       # the sampler's batch_cfg default; HunyuanVideo 1: guidance-distilled)
    steps: int = 1                     # optimizer state exists from the start, so one step is the steady state
    offload_non_blocks: bool = False   # with block swap: embeddings/head on the host between forwards
    optimizer: str = "adamw"           # adamw (two fp32 moments) | adamw8bit (two uint8 moments, bitsandbytes) |
                                       # none (forward + backward only, like bench_memory.py)
    checkpoint_dtype: str = "compute"  # what checkpointing saves of each block input: compute (bf16) | float32
    offload_prefetch: bool = False     # activation offload: prefetch the restore in backward
    fp8_scale_dtype: str = "float32"   # float32 | bf16 (engine.memory.set_fp8_scale_dtype)
    source_dtype: str = "bf16"         # the simulated file: bf16 (ComfyUI's repackaged Wan, Musubi's recommendation:
                                       # the float32-computed time path/head/modulations stay bf16, exactly what the
                                       # file has) | float32 (the official release: they are kept in float32)
    optimizer_offload: bool = False    # AdamW's state on the host between optimizer steps
    composition: bool = False          # also list what the peak is made of (slower: snapshots the live storages)
    family: str = "wan"                # wan | hunyuan | framepack | wan22
    experts: str = "none"              # a timestep-expert pair (wan22 A14B): both (the idle expert placed too) |
                                       # offload (the idle expert parked in pinned host memory) | lazy (inference:
                                       # the idle expert not loaded) | none (one DiT)
    layout: str = "separate"           # pair training: one LoRA per expert (separate) | one shared LoRA (shared)


def model_config(name: str, family: str = "wan"):
    """The config of a benchmark model name (tiny gets 6 blocks, so swapped blocks exist past the prefetch)."""
    return FAMILIES[family].config(name)


def num_blocks(name: str, family: str = "wan") -> int:
    return FAMILIES[family].num_blocks(model_config(name, family))


def resolve_swap(name: str, swap, family: str = "wan") -> int:
    return num_blocks(name, family) - 1 if swap == "max" else int(swap)


def _build_on_host(config, fp8: str, device=DEVICE, host=HOST, scale_dtype: str = "float32",
                   source_dtype: str = "bf16", family: str = "wan"):
    """The model as the loader leaves it in host memory: bf16, the parameters the official code computes in float32
    in float32 unless the file has them in bf16 (`source_dtype`), fp8 targets quantized. Built (and quantized) on
    the simulated GPU, then moved to the host, like a fake load."""
    from engine.memory import move_to, quantize_model_fp8

    keep_fp32 = FAMILIES[family].keep_fp32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)   # Module.to() cannot swap fake parameters: build in the target dtype
    try:
        model = FAMILIES[family].build(config, device)
    finally:
        torch.set_default_dtype(previous)
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None and source_dtype == "float32" and keep_fp32(f"{prefix}.{name}" if prefix else name):
                module._parameters[name] = torch.nn.Parameter(p.detach().float(), requires_grad=False)
    model.requires_grad_(False)
    if fp8 != "none":
        quantize_model_fp8(model, fp8)
        if scale_dtype == "bf16":
            from engine.memory import set_fp8_scale_dtype
            set_fp8_scale_dtype(model, torch.bfloat16)
    return move_to(model, host)


def metered_transfer(meter):
    """A block-swap transfer (simulated GPU <- simulated host) that tells the meter which copies run on the side
    stream and when compute waits for them."""
    from engine.memory.transfer import Transfer

    class MeteredTransfer(Transfer):
        def start(self, block, master):
            meter.mark("load", block, stream="swap")
            with meter.stream("swap"):
                load = super().start(block, master)
            meter.mark("loaded", block, stream="swap")
            return load

        def finish(self, load):
            meter.mark("wait", load.block)
            return super().finish(load)

    return MeteredTransfer(DEVICE, pin_memory=False, host=HOST)


class _AdamWState:
    """AdamW's memory: two moments per trainable tensor (fp32; uint8 for bitsandbytes' AdamW8bit, whose fused
    kernel makes no temporaries) plus the update's temporaries. (torch.optim reads the step count with .item(),
    which fake tensors do not have.)"""

    def __init__(self, params, eight_bit: bool = False, offload: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.eight_bit, self.offload = eight_bit, offload
        # allocated up front: from the second step on they are live during the whole step, so one simulated step
        # shows the steady state; with `offload` they live on the host between steps
        dtype = torch.uint8 if eight_bit else None
        home = HOST if offload else None
        self.state = [(torch.zeros_like(p, dtype=dtype, device=home), torch.zeros_like(p, dtype=dtype, device=home))
                      for p in self.params]

    def step(self):
        if self.offload:   # the trainer's move_optimizer_state: all of it to the device, step, all back
            self.state = [(m.to(DEVICE), v.to(DEVICE)) for m, v in self.state]
        with torch.no_grad():   # (an idle expert's adapters have no gradient: the optimizer skips them)
            if self.eight_bit:
                for p in self.params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-1e-4)
            else:
                for p, (m, v) in zip(self.params, self.state):
                    if p.grad is None:
                        continue
                    m.mul_(0.9).add_(p.grad, alpha=0.1)
                    v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                    p.add_(m / (v.sqrt() + 1e-8), alpha=-1e-4)
        if self.offload:
            self.state = [(m.to(HOST), v.to(HOST)) for m, v in self.state]


EXPERT_MODES = ("both", "offload", "lazy")
INFERENCE_STEPS = 40   # the A14B sampler's default: one park + one place per expert per generation ("offload")


def _tensors_bytes(module, device, skip=()) -> int:
    """Bytes of the module's parameters and buffers on `device` (not counting `skip`, e.g. adapter parameters)."""
    skip = {id(t) for t in skip}
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers())
               if id(t) not in skip and t.device == torch.device(device))


def _resident_bytes(model, net) -> int:
    """What parking an expert moves off the device (and placing it back on): its weights on the device between
    steps, i.e. all but the streamed blocks; the adapters stay on the device."""
    return _tensors_bytes(model, DEVICE, net.parameters() if net is not None else ())


class _Idle:
    """The expert that does not run this step: the same architecture with its own weights. "both": placed like the
    running one (resident weights on the device, streamed blocks in its own block swapper's host masters);
    "offload": parked, every weight in (pinned) host memory; "lazy": not loaded. Training: its own adapters, on the
    device in every mode (they follow their expert there and stay when it parks); shared layout: the same tensors."""

    def __init__(self, cfg: SimConfig, config, meter, active_net, host):
        from engine.lora.adapters import AdapterConfig, AdapterNetwork
        from engine.memory import move_to, swap_blocks
        from engine.training.experts import tie_parameters

        self.cfg, self.swapper, self.net = cfg, None, None
        self.model = _build_on_host(config, cfg.fp8, DEVICE, host, cfg.fp8_scale_dtype, cfg.source_dtype,
                                    cfg.family)
        self.bytes = _tensors_bytes(self.model, host)   # every weight of the expert
        if active_net is not None:
            self.net = AdapterNetwork.create(self.model, AdapterConfig(rank=cfg.rank, alpha=cfg.rank))
            if cfg.layout == "shared":
                tie_parameters(self.net, active_net)
            move_to(self.net, DEVICE)
        n_swap = resolve_swap(cfg.model, cfg.blocks_to_swap, cfg.family)
        if cfg.experts == "both":
            if n_swap:
                self.swapper = swap_blocks(self.model, n_swap, DEVICE, prefetch=cfg.prefetch,
                                           placement=cfg.placement, offload_non_blocks=cfg.offload_non_blocks,
                                           transfer=metered_transfer(meter))
                self.swapper.evict_loaded()   # what `Residency.place(training=True)` leaves: nothing streamed in
            else:
                move_to(self.model, DEVICE)
        self.host_masters = self.swapper.host_bytes if self.swapper is not None else 0
        self.parked = self.bytes if cfg.experts == "offload" else 0

    def detach(self):
        if self.swapper is not None:
            self.swapper.detach(device=HOST)


def _pair_fields(cfg: SimConfig, config, idle: _Idle, resident: int) -> dict:
    """The pair's columns: mode, host RAM of the parked expert, bytes per expert switch and switches per step.
    Training ("offload"): Musubi's per-batch choice switches with probability 2p(1-p), p = the high-noise share of
    the timesteps (1 - boundary for uniform t); inference: two switches per generation of INFERENCE_STEPS steps."""
    from engine.families.wan.experts import BOUNDARY

    train = cfg.task == "train"
    p = 1 - BOUNDARY["i2v" if config.in_dim > config.out_dim else "t2v"]
    moving = cfg.experts != "both"
    return {"experts": cfg.experts, **({"layout": cfg.layout} if train else {}),
            "host_parked_gb": idle.parked / GB, "switch_gb": resident / GB if moving else 0.0,
            "switches_per_step": (2 * p * (1 - p) if train else 2 / INFERENCE_STEPS) if moving else 0.0}


def simulate(cfg: SimConfig, fake: bool = True) -> dict:
    """Peak live bytes on the simulated GPU (and what else a row of the tables needs) for one configuration.
    `fake=False` runs the same step with real CPU tensors (small models; no block swap or activation offload,
    which need a host distinct from the device): the tests use it to check that simulation and reality agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.lora.adapters import AdapterConfig, AdapterNetwork
    from engine.memory import move_to, set_block_checkpointing, swap_blocks
    from engine.memory.meter import LiveMemoryMeter

    fam = FAMILIES[cfg.family]
    config = model_config(cfg.model, cfg.family)
    n_swap = resolve_swap(cfg.model, cfg.blocks_to_swap, cfg.family)
    train = cfg.task == "train"
    host = HOST if fake else DEVICE
    if not fake and (n_swap or cfg.activation_offload or cfg.experts in ("offload", "lazy")):
        raise ValueError("a real (fake=False) run has no separate host memory: no block swap, activation offload "
                         "or parked expert")
    pair = cfg.experts != "none"
    if pair and (cfg.model not in fam.pairs or cfg.experts not in EXPERT_MODES
                 or (train and cfg.experts == "lazy")):
        raise ValueError(f"experts={cfg.experts!r}: {EXPERT_MODES} for an expert pair ({fam.pairs}), lazy only "
                         f"for inference")
    started = time.perf_counter()
    with (FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()), \
            LiveMemoryMeter(DEVICE, snapshot_peak=cfg.composition) as meter, _fake_masks_all_real(cfg.family, fake):
        model = _build_on_host(config, cfg.fp8, DEVICE, host, cfg.fp8_scale_dtype, cfg.source_dtype, cfg.family)
        set_block_checkpointing(model, train, offload=train and cfg.activation_offload, host=str(host),
                                saved_dtype=torch.bfloat16 if cfg.checkpoint_dtype == "compute" else None,
                                prefetch=cfg.offload_prefetch)
        net = optimizer = None
        if train:   # adapters first, then block swap (the training nodes' order): adapters are device tensors
            net = AdapterNetwork.create(model, AdapterConfig(rank=cfg.rank, alpha=cfg.rank))
            move_to(net, DEVICE)
        swapper = None
        if n_swap:
            swapper = swap_blocks(model, n_swap, DEVICE, prefetch=cfg.prefetch, placement=cfg.placement,
                                  offload_non_blocks=cfg.offload_non_blocks, transfer=metered_transfer(meter))
        else:
            move_to(model, DEVICE)
        idle = _Idle(cfg, config, meter, net, host) if pair else None
        weights = meter.live_bytes()   # base weights on the device (+ adapters; + the idle expert's)
        host_masters = (swapper.host_bytes if swapper is not None else 0) + (idle.host_masters if idle else 0)
        if train and cfg.optimizer != "none":   # a pair: one optimizer for both experts' adapters (separate layout)
            params = list(net.parameters()) + (list(idle.net.parameters()) if idle and idle.net else [])
            params = list({id(p): p for p in params}.values())   # shared layout: the same tensors once
            optimizer = _AdamWState(params, eight_bit=cfg.optimizer == "adamw8bit",
                                    offload=cfg.optimizer_offload and host != DEVICE)

        f, h, w = cfg.latent
        batch = 1 if train else (cfg.cfg_batch or fam.cfg_batch)
        x0 = torch.randn(batch, fam.channels(config), f, h, w, device=DEVICE)
        inputs = fam.inputs(config, batch)
        t = torch.full((batch,), 500.0, device=DEVICE)
        meter.reset_peak()
        for _ in range(cfg.steps):
            meter.reset_counters()
            if train:
                noise = torch.randn_like(x0)
                x_t = 0.5 * x0 + 0.5 * noise
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    pred = fam.call(model, inputs, x_t, t, True)
                loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
                loss.backward()
                del pred, loss, x_t, noise
                if optimizer is not None:
                    optimizer.step()
                net.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    fam.call(model, inputs, x0, t, False)
        report = meter.report()
        if swapper is not None:
            swapper.detach(device=host)
        if idle is not None:
            idle.detach()
        resident = _resident_bytes(model, net)

    return {
        **({"family": cfg.family} if cfg.family != "wan" else {}),
        "model": cfg.model, "task": cfg.task, "fp8": cfg.fp8, "blocks_to_swap": n_swap,
        "activation_offload": bool(train and cfg.activation_offload),
        "checkpoint_dtype": cfg.checkpoint_dtype if train else None,
        **({"offload_prefetch": True} if train and cfg.activation_offload and cfg.offload_prefetch else {}),
        **({"fp8_scale_dtype": cfg.fp8_scale_dtype} if cfg.fp8 != "none" and cfg.fp8_scale_dtype != "float32" else {}),
        **({"source_dtype": cfg.source_dtype} if cfg.source_dtype != "bf16" else {}),
        **({"optimizer_offload": True} if train and cfg.optimizer_offload else {}),
        "offload_non_blocks": bool(n_swap and cfg.offload_non_blocks), "optimizer": cfg.optimizer if train else None,
        "latent": list(cfg.latent),
        "tokens": f * h * w // 4, "batch": batch,
        "peak_gb": report.peak_bytes / GB,
        "weights_on_gpu_gb": weights / GB,
        "host_swap_gb": host_masters / GB,
        "h2d_gb_per_step": report.h2d_bytes / GB, "d2h_gb_per_step": report.d2h_bytes / GB,
        "tflop_per_step": report.flops / 1e12,
        **(_pair_fields(cfg, config, idle, resident) if pair else {}),
        "sim_seconds": round(time.perf_counter() - started, 1),
        "_timeline": report.timeline,
        **({"peak_composition": composition(meter.peak_snapshot)} if cfg.composition else {}),
    }


def composition(snapshot: list[tuple[str, int]], top: int = 12) -> list[str]:
    """The storages live at the peak, grouped by (op, shape, dtype), largest groups first: "GB = count × what"."""
    groups: dict[str, list[int]] = {}
    for what, nbytes in snapshot:
        groups.setdefault(what, []).append(nbytes)
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"{sum(n) / GB:.2f} GB = {len(n)} × {what}" for what, n in ranked[:top]]
    rest = sum(sum(n) for _, n in ranked[top:])
    return lines + [f"{rest / GB:.2f} GB = {sum(len(n) for _, n in ranked[top:])} others"]


def fits(row: dict, memory_gb: float) -> bool:
    """Simulated peak + allocator/workspace margin (12 % + 1 GB) within the card's memory."""
    return row["peak_gb"] * 1.12 + 1.0 <= memory_gb


def add_timing(row: dict, gpus: dict) -> dict:
    from engine.memory.timing import replay

    for key, gpu in gpus.items():
        t = replay(row["_timeline"], gpu)
        # an expert switch ("offload", "lazy"): park the running expert (D2H; "lazy" frees it) and place the other
        # (H2D; "lazy" also reads its file, not modelled), synchronous; amortized over the steps
        switch = row.get("switch_gb", 0.0) * (1 / gpu.h2d_gbps + (1 / gpu.d2h_gbps if row.get("experts") == "offload"
                                                                  else 0.0))
        seconds = t.seconds + row.get("switches_per_step", 0.0) * switch
        row[f"overhead_{key}"] = round(seconds / t.compute_seconds, 3) if t.compute_seconds else None
        row[f"step_s_{key}"] = round(seconds, 2)
        if "switch_gb" in row:
            row[f"switch_s_{key}"] = round(switch, 2)
    return row


def public(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not k.startswith("_")}


# --- the docs tables ----------------------------------------------------------------------------------------------

def row_family(row: dict) -> str:
    return row.get("family", "wan")   # Wan rows carry no family key (their output predates the option)


def _models(rows: list[dict]) -> list[tuple[str, str]]:
    """(family, model) pairs of the rows, in the families' and their MODELS' order."""
    pairs = {(row_family(r), r["model"]) for r in rows}
    return sorted(pairs, key=lambda fm: (list(FAMILIES).index(fm[0]), list(FAMILIES[fm[0]].models).index(fm[1])))


def markdown_tables(rows: list[dict], gpus: dict) -> str:
    lines = []
    for family, model in _models(rows):
        for task in ("train", "infer"):
            sel = [r for r in rows if row_family(r) == family and r["model"] == model and r["task"] == task]
            if not sel:
                continue
            what = "LoRA rank 32 training step" if task == "train" else f"inference forward (batch {sel[0]['batch']})"
            pair = any("experts" in r for r in sel)
            lines += [f"### {FAMILIES[family].display} {model}, {what}, latent {'×'.join(map(str, sel[0]['latent']))} "
                      f"({sel[0]['tokens']} tokens)", "",
                      "| " + ("experts | " if pair else "") + "fp8 | swap | act. offload | non-block offload | "
                      "optimizer | saved inputs | peak GB | weights GB | host GB (swap + act."
                      + (" + parked" if pair else "") + ") | H2D GB/step | "
                      + ("switch GB | " if pair else "")
                      + " | ".join(f"overhead {k}" for k in gpus) + " |",
                      "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(gpus) + 2 * pair)]
            for r in sel:
                lines.append(("| " + r.get("experts", "-") + " " if pair else "")
                             + f"| {r['fp8']} | {r['blocks_to_swap']} | {'yes' if r['activation_offload'] else 'no'} "
                             f"| {'yes' if r.get('offload_non_blocks') else 'no'} | {r.get('optimizer') or '-'} "
                             f"| {saved_inputs(r)} | {r['peak_gb']:.1f} | {r['weights_on_gpu_gb']:.1f} "
                             f"| {host_gb(r):.1f} | "
                             f"{r['h2d_gb_per_step']:.1f} | "
                             + (f"{r.get('switch_gb', 0.0):.1f} | " if pair else "")
                             + " | ".join(f"{r.get(f'overhead_{k}', 0):.2f}×" for k in gpus) + " |")
            lines.append("")
    return "\n".join(lines)


def saved_inputs(row: dict) -> str:
    """The dtype of the checkpointed block inputs of a training row (rows written before the setting: float32)."""
    if row["task"] != "train":
        return "-"
    return "fp32" if row.get("checkpoint_dtype", "float32") == "float32" else "bf16"


QUALITY = {"none": 0, "scaled": 1, "e4m3": 2}   # bf16 > fp8 scaled > fp8 e4m3 (Musubi's docs)
CARDS_GB = (8, 12, 16, 24, 32, 48, 80)
PAIR_PREFERENCE = {"both": 0, "offload": 1, "lazy": 2}   # no switch cost, then a switch from RAM, then from disk


def host_gb(row: dict) -> float:
    """Host RAM the setting holds (pinned on CUDA): block-swap masters plus the offloaded activations, which are
    all live at the end of the forward pass, plus a parked expert's weights."""
    return row["host_swap_gb"] + (row["d2h_gb_per_step"] if row.get("activation_offload") else 0.0) \
        + row.get("host_parked_gb", 0.0)   # an expert pair's parked expert ("offload")


def ram_budget_gb(memory_gb: float) -> float:
    """The host RAM assumed next to a card (2× its memory + 16 GB: 48 GB for 16 GB cards, 64 GB for 24 GB)."""
    return 2 * memory_gb + 16


def recommend(rows: list[dict], memory_gb: float, model: str, task: str, family: str = "wan") -> dict | None:
    """The setting to use on a card of `memory_gb`: among the simulated rows that fit (`fits`) and whose host RAM
    fits `ram_budget_gb`, the best weight quality, then the fewest swapped blocks, then no activation offload,
    then the default optimizer."""
    fitting = [r for r in rows if row_family(r) == family and r["model"] == model and r["task"] == task
               and fits(r, memory_gb)
               and host_gb(r) <= ram_budget_gb(memory_gb)]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (QUALITY[r["fp8"]], r["blocks_to_swap"], r["activation_offload"],
                                       r.get("offload_non_blocks", False), r.get("optimizer") == "adamw8bit",
                                       PAIR_PREFERENCE.get(r.get("experts"), 0)))


def describe(r: dict) -> str:
    parts = ["bf16" if r["fp8"] == "none" else f"fp8 {r['fp8']}"]
    if r.get("experts"):
        parts.insert(0, {"both": "both experts on the GPU", "offload": "idle expert offloaded",
                         "lazy": "lazy experts"}[r["experts"]])
    parts.append(f"swap {r['blocks_to_swap']}" if r["blocks_to_swap"] else "no swap")
    if r.get("activation_offload"):
        parts.append("activation offload")
    if r.get("offload_non_blocks"):
        parts.append("offload non-block weights")
    if r.get("optimizer") == "adamw8bit":
        parts.append("AdamW8bit")
    return ", ".join(parts)


def recommendation_table(rows: list[dict], overhead_key: str = "rtx4090-24") -> str:
    """GPU memory -> setting per model and task, for the rows of one latent shape. A grid without swap-0 rows for
    some column only answers for cards up to 24 GB (bigger cards would want less swap than it has)."""
    def of(f, m, t):
        return [r for r in rows if row_family(r) == f and r["model"] == m and r["task"] == t]

    cols = [(f, m, t) for f, m in _models(rows) for t in ("train", "infer") if of(f, m, t)]
    complete = all(any(r["blocks_to_swap"] == 0 for r in of(f, m, t)) for f, m, t in cols)
    cards = CARDS_GB if complete else tuple(gb for gb in CARDS_GB if gb <= 24)
    lines = ["| GPU memory | " + " | ".join(f"{FAMILIES[f].display} {m} {'training' if t == 'train' else 'inference'}"
                                          for f, m, t in cols) + " |", "|---|" + "---|" * len(cols)]
    for gb in cards:
        cells = []
        for f, m, t in cols:
            r = recommend(rows, gb, m, t, f)
            cells.append("does not fit" if r is None else
                         f"{describe(r)} ({r['peak_gb']:.1f} GB, host {host_gb(r):.0f} GB, "
                         f"{r.get(f'overhead_{overhead_key}', 1.0):.2f}×)")
        lines.append(f"| {gb} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan", choices=list(FAMILIES))
    p.add_argument("--model", default=None, help="default: the family's (Wan 1.3B,14B; HunyuanVideo 13B)")
    p.add_argument("--task", default="train,infer")
    p.add_argument("--fp8", default="none,scaled")
    p.add_argument("--swap", default=None, help="default: Wan 0,10,20,30,max; HunyuanVideo 0,20,40,50,max")
    p.add_argument("--offload", default="0,1", help="activation offload settings to try for training: 0, 1 or 0,1")
    p.add_argument("--non-blocks", default="0", help="offload_non_blocks settings for rows with swap: 0, 1 or 0,1")
    p.add_argument("--optimizer", default="adamw", help="training optimizers: adamw, adamw8bit or both")
    p.add_argument("--latent", default=None, help="default: Wan 21,60,104 (832×480×81); HunyuanVideo 33,68,120 "
                                                  "(960×544×129); FramePack 9,80,80 (one 640×640 section)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--checkpoint-dtype", default="compute", help="training: compute (bf16), float32 or both")
    p.add_argument("--fp8-scale-dtype", default="float32", help="fp8 block scales: float32 or bf16")
    p.add_argument("--source-dtype", default="bf16", help="the simulated DiT file: bf16 or float32 (official release)")
    p.add_argument("--optimizer-offload", default="0", help="optimizer state on the host between steps: 0, 1 or 0,1")
    p.add_argument("--composition", action="store_true", help="list what each peak is made of")
    p.add_argument("--experts", default=None, help="expert pairs (wan22 A14B): both, offload, lazy (inference) or a "
                                                   "comma list; default both,offload (+ lazy for inference)")
    p.add_argument("--layout", default="separate", help="pair training: separate (a LoRA per expert) or shared")
    p.add_argument("--gpus", default="rtx4060ti-16,rtx4090-24,h100-80")
    p.add_argument("--markdown", default=None, help="write the tables to this file")
    p.add_argument("--from-jsonl", default=None, help="no simulation: read rows this script printed earlier")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    from engine.memory.timing import GPU_MODELS

    args = parse_args(argv)
    gpus = {k: GPU_MODELS[k] for k in args.gpus.split(",") if k}
    if args.from_jsonl:
        rows = [json.loads(line) for line in Path(args.from_jsonl).read_text().splitlines() if line.startswith("{")]
        if args.markdown:
            write_markdown(args.markdown, rows, gpus)
        return rows
    fam = FAMILIES[args.family]
    latent = tuple(int(v) for v in args.latent.split(",")) if args.latent else fam.latent
    rows = []
    for model in (args.model or fam.default_models).split(","):
        swaps = []
        for s in (args.swap or fam.swaps).split(","):
            n = resolve_swap(model, s, args.family)
            if n <= num_blocks(model, args.family) - 1 and n not in swaps:
                swaps.append(n)
        for task in args.task.split(","):
            for fp8 in args.fp8.split(","):
                for n in swaps:
                    for off, nb, opt, cd, oo, ex in itertools.product(
                            args.offload.split(",") if task == "train" else ["0"],
                            args.non_blocks.split(",") if n else ["0"],
                            args.optimizer.split(",") if task == "train" else ["adamw"],
                            args.checkpoint_dtype.split(",") if task == "train" else ["compute"],
                            args.optimizer_offload.split(",") if task == "train" else ["0"],
                            _expert_modes(args.experts, model, task, fam)):
                        row = simulate(SimConfig(model=model, task=task, fp8=fp8, blocks_to_swap=n, experts=ex,
                                                 layout=args.layout,
                                                 activation_offload=off == "1", offload_non_blocks=nb == "1",
                                                 optimizer=opt, latent=latent, steps=args.steps,
                                                 checkpoint_dtype=cd, composition=args.composition,
                                                 fp8_scale_dtype=args.fp8_scale_dtype,
                                                 source_dtype=args.source_dtype, optimizer_offload=oo == "1",
                                                 family=args.family))
                        add_timing(row, gpus)
                        rows.append(row)
                        print(json.dumps(public(row)), flush=True)
    if args.markdown:
        write_markdown(args.markdown, rows, gpus)
    return rows


def _expert_modes(arg: str | None, model: str, task: str, fam: Family) -> list[str]:
    if model not in fam.pairs:
        return ["none"]
    modes = arg.split(",") if arg else ["both", "offload"] + (["lazy"] if task == "infer" else [])
    return [m for m in modes if not (m == "lazy" and task == "train")]


def write_markdown(path: str, rows: list[dict], gpus: dict) -> None:
    """Per latent shape: the recommendation table, then every simulated row."""
    parts = []
    def stride(r):
        fam = FAMILIES[row_family(r)]
        return tuple(fam.stride(fam.config(r["model"])))

    for latent, st in sorted({(tuple(r["latent"]), stride(r)) for r in rows},
                             key=lambda x: -x[0][0] * x[0][1] * x[0][2] * x[1][1] * x[1][2]):
        sel = [r for r in rows if tuple(r["latent"]) == latent and stride(r) == st]
        f, h, w = latent
        size = f"{w * st[2]}×{h * st[1]}×{(f - 1) * st[0] + 1}"
        parts += [f"## {size} (latent {f}×{h}×{w}, {sel[0]['tokens']} tokens)", "",
                  recommendation_table(sel), "", markdown_tables(sel, gpus)]
    Path(path).write_text("\n".join(parts), encoding="utf-8")


if __name__ == "__main__":
    main()
