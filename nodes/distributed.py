"""Training outside ComfyUI's process: the config file of the headless trainer (engine/train.py, torchrun) written
from a graph's training inputs. docs/distributed.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from . import checks
from ..engine.errors import invalid
from .training import (MODEL_TYPES, MusubiInitTraining, _network_config, _optimizer_config, _training_config,
                       dataset_config, trained_models)

CATEGORY = "Musubi/training"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Init Training's inputs the headless run takes (validation prompts and held-out sets are tensors of this graph)
_KEPT_OPTIONAL = ("save_format", "continue_saved_state", "save_state_every_minutes", "max_train_epochs",
                  "save_every_n_epochs", "logit_mean", "logit_std", "mode_scale", "preserve_distribution_shape",
                  "num_timestep_buckets", "checkpoint_dtype", "offload_optimizer_state", "expert_layout")


def loader_inputs(prompt, unique_id, field: str = "model") -> dict:
    """The inputs of the node that feeds `field` of node `unique_id` in the API prompt ({} when unknown)."""
    try:
        source = prompt[str(unique_id)]["inputs"][field]
        return dict(prompt[str(source[0])]["inputs"])
    except (KeyError, TypeError, IndexError):
        return {}


def model_section(handle, loader: dict) -> dict:
    """[model] of the config: the file, family and memory options of the DiT; dtype and fp8 as its loader node
    chose them (else read from the weights)."""
    from ..engine.memory.fp8 import Fp8Linear

    module = handle.module
    source = getattr(module, "source_path", None)
    if not source or handle.family is None:
        raise invalid("model", type(module).__name__, "a DiT loaded from a file by a Musubi DiT loader node")
    dtype = loader.get("dtype") if isinstance(loader.get("dtype"), str) else None
    fp8 = loader.get("fp8") if isinstance(loader.get("fp8"), str) else None
    if dtype is None:
        dtype = next((DTYPE_NAMES[p.dtype] for p in module.parameters() if p.dtype in DTYPE_NAMES), "keep")
    if fp8 is None:
        fp8 = "scaled" if any(isinstance(m, Fp8Linear) for m in module.modules()) else "none"
    fp8_matmul = any(getattr(m, "use_fp8_matmul", False) for m in module.modules())
    scale_dtype = next((m.scale_weight.dtype for m in module.modules() if isinstance(m, Fp8Linear)), torch.float32)
    opts = handle.options
    return {"family": handle.family, "path": str(source), "dtype": dtype, "fp8": fp8, "fp8_matmul": fp8_matmul,
            "fp8_scale_dtype": "bf16" if scale_dtype == torch.bfloat16 else "float32", "attention": opts.attention,
            "blocks_to_swap": int(opts.blocks_to_swap), "offload_non_blocks": bool(opts.offload_non_blocks),
            "activation_offload": bool(opts.activation_offload), "compile_blocks": bool(opts.compile)}


def dataset_file(dataset) -> str:
    config = dataset_config(dataset)
    source = getattr(config, "source", None)
    if not source or not Path(source).is_file():
        raise invalid("dataset", source or type(dataset).__name__,
                      "a dataset read from a TOML file (Musubi Dataset from TOML): the headless run reads it there")
    return str(Path(source).resolve())


def pair_section(low, experts, loaders: tuple = ({}, {})) -> dict:
    """[model] of a pair of timestep experts (`experts`: hosted.py `HostedExperts`; `low` the low-noise handle):
    the low-noise expert's section, the high-noise file, boundary, layout and memory mode. The workers load both
    experts with one set of options: the two loaders must agree on everything but the file."""
    section = model_section(low, loaders[0] or {})
    high = model_section(experts.high, loaders[1] or {})
    differ = sorted(k for k in section if k != "path" and section[k] != high[k])
    if differ:
        raise invalid("devices with a pair of experts", {k: (high[k], section[k]) for k in differ},
                      "the same loader settings for both experts (high-noise, low-noise above): the worker "
                      "processes load both with one set of dtype / fp8 / memory options")
    return {**section, "high_path": high["path"], "boundary": float(experts.boundary),
            "expert_layout": experts.layout, "expert_mode": experts.mode}


def pair_loader_inputs(prompt, unique_id) -> tuple[dict, dict]:
    """The inputs of the two DiT loader nodes behind the pair node feeding `model` of node `unique_id`
    (({}, {}) when unknown: the sections then read dtype and fp8 from the weights)."""
    pair = loader_inputs(prompt, unique_id)
    found = []
    for field in ("low_noise_model", "high_noise_model"):
        try:
            found.append(dict(prompt[str(pair[field][0])]["inputs"]))
        except (KeyError, TypeError, IndexError):
            found.append({})
    return found[0], found[1]


def run_config(handle, dataset, network, optimizer, training, continue_saved: bool = True, loader=None,
               resume_from=None, experts=None) -> dict:
    """What `engine.training.run_config.parse_run_config` reads: a graph's training as a config (`loader`: the
    inputs of the DiT's loader node, when known, a pair of them for `experts`; `resume_from`: the state folder
    Resume Training continues; `experts`: hosted.py `HostedExperts`, `handle` being the low-noise expert)."""
    from ..engine.training.run_config import RunSection, to_dict

    run = RunSection(continue_saved=bool(continue_saved), resume_from=str(resume_from) if resume_from else None)
    model = model_section(handle, loader or {}) if experts is None else \
        pair_section(handle, experts, loader or ({}, {}))
    return {"model": model, "dataset": {"config": dataset_file(dataset)},
            "network": to_dict(network), "optimizer": to_dict(optimizer), "training": to_dict(training),
            "run": to_dict(run)}


def run_config_dict(model, dataset, lora_config, optimizer_config, prompt=None, unique_id=None, **inputs) -> dict:
    """`run_config` from Init Training's inputs."""
    names = inspect.signature(_training_config).parameters
    training = _training_config(**{k: v for k, v in inputs.items() if k in names})
    network, optimizer = _network_config(lora_config), _optimizer_config(optimizer_config)
    network.validate()
    optimizer.validate()
    training.validate()
    dit, experts = trained_models(model, inputs.get("expert_layout", "auto"))
    loaders = loader_inputs(prompt, unique_id) if experts is None else pair_loader_inputs(prompt, unique_id)
    return run_config(dit, dataset, network, optimizer, training, inputs.get("continue_saved_state", True),
                      loaders, experts=experts)


# --- Init Training's `devices` ------------------------------------------------------------------------------------

DEVICES_INPUT = ("STRING", {"default": "", "tooltip": (
    "Train on several devices at once (data parallel, PyTorch DDP): a comma-separated list such as "
    "'cuda:0, cuda:1, cuda:2'. The first is ComfyUI's own device (this process trains there); the pack starts one "
    "worker process for each other device, loading the same model files with the same memory settings and reading "
    "the same caches. Each optimizer step then reads devices × gradient_accumulation_steps batches. Empty = "
    "ComfyUI's device only. Needs a dataset from a TOML file (the workers read it).")})


def parse_devices(text, own: torch.device) -> list[str]:
    """[] for one device; else the devices, the first being `own` (ComfyUI's)."""
    names = [d.strip() for d in str(text or "").split(",") if d.strip()]
    if len(names) <= 1 and all(_same(n, own) for n in names):
        return []
    devices = []
    for name in names:
        try:
            d = torch.device(name)
        except (RuntimeError, ValueError):
            raise invalid("devices", text, "torch devices separated by commas, e.g. 'cuda:0, cuda:1'") from None
        devices.append(torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d)
    if not _same(names[0], own):
        raise invalid("devices", text, f"ComfyUI's own device first ({own}): this process is rank 0")
    cuda = [d for d in devices if d.type == "cuda"]
    if len(set(cuda)) != len(cuda):
        raise invalid("devices", text, "each GPU once (NCCL runs one rank per GPU)")
    if cuda and len(cuda) != len(devices):
        raise invalid("devices", text, "all CUDA devices or all cpu (one backend for the group)")
    if cuda and torch.cuda.is_available() and max(d.index for d in cuda) >= torch.cuda.device_count():
        raise invalid("devices", text, f"GPUs 0..{torch.cuda.device_count() - 1} of this machine")
    return [str(d) for d in devices]


def _same(name: str, own: torch.device) -> bool:
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    index = lambda x: 0 if x.type == "cuda" and x.index is None else x.index   # noqa: E731
    return d.type == own.type and index(d) == index(own)


class MusubiExportTrainingConfig:
    DESCRIPTION = ("Write this graph's training as a config file for the headless trainer: `python -m engine.train "
                   "CONFIG` from the pack's folder, or `torchrun --nproc_per_node N -m engine.train CONFIG` on "
                   "several GPUs or machines (docs/distributed.md). The same inputs as Init Training; the model's "
                   "file, dtype, fp8 and memory options come from its loader, the dataset from its TOML. Nothing "
                   "is loaded or trained here.")
    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("config_path",)
    OUTPUT_TOOLTIPS = ("The written config file.",)

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None, config_name=None, **_):
        return checks.validate_inputs(cls, {"output_name": checks.plain_file_name,
                                            "config_name": checks.plain_file_name},
                                      output_name=output_name, config_name=config_name)

    @classmethod
    def INPUT_TYPES(cls):
        init = MusubiInitTraining.INPUT_TYPES()
        required = dict(init["required"])
        required["model"] = (MODEL_TYPES, {"tooltip": "The DiT to train a LoRA for, from a Musubi DiT loader, or a "
                                                      "pair from Musubi Wan 2.2 Experts (both experts train; its two "
                                                      "loaders need the same settings)."})
        required["config_name"] = ("STRING", {"default": "train_config.json",
                                   "tooltip": "File name of the config, written into output_dir (.json)."})
        optional = {k: v for k, v in init["optional"].items() if k in _KEPT_OPTIONAL}
        return {"required": required, "optional": optional,
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def export(self, model, dataset, lora_config, optimizer_config, config_name="train_config.json",
               unique_id=None, prompt=None, **inputs):
        from ..engine.atomic import write_json_atomic

        name = (config_name or "").strip()
        if not name.endswith(".json") or checks.plain_file_name(name):
            raise invalid("config_name", config_name, "a file name ending in .json")
        config = run_config_dict(model, dataset, lora_config, optimizer_config, prompt, unique_id, **inputs)
        path = Path(config["training"]["output_dir"]) / name
        write_json_atomic(path, config)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"MusubiExportTrainingConfig": MusubiExportTrainingConfig}
NODE_DISPLAY_NAME_MAPPINGS = {"MusubiExportTrainingConfig": "Musubi Export Training Config"}
