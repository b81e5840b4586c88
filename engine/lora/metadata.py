"""safetensors metadata for LoRA files: Musubi's ss_* keys, ModelSpec keys and sd-webui-additional-networks hashes.

Hashes (what sd-scripts' `precalculate_safetensors_hashes` computes and Musubi stores):
  * the file is serialized in memory with only the `ss_*` metadata (so later user metadata edits keep the hash);
  * `sshs_model_hash`  = sha256 of everything after the safetensors header (the tensor bytes), hex;
  * `sshs_legacy_hash` = first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB of that serialization
    (sha256 of an empty string for files shorter than 1 MiB, as in the original).
"""

from __future__ import annotations

import datetime
import hashlib
import json

import torch

LYCORIS_MODULES = {"loha": "networks.loha", "lokr": "networks.lokr"}


def stringify(value) -> str:
    """Metadata values are strings; dicts/lists become JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
    return meta


# What the tensors of the file are: never taken from a source file's (or caller's) metadata when writing.
TENSOR_FACTS = ("ss_network_dim", "ss_network_alpha")


def lora_metadata(kind: str, rank: int | None, alpha: float | None, spec, user: dict | None = None,
                  title: str | None = None, facts_win: bool = False) -> dict[str, str]:
    """Musubi's minimal ss_* keys + ModelSpec for a family's `LoRASpec`; `user` entries (any values) are stored as
    strings and win, except the TENSOR_FACTS when `facts_win` (a converted file must not keep the alpha its source
    had)."""
    network_module = spec.network_module if kind == "lora" else LYCORIS_MODULES.get(kind, kind)
    meta = {
        "ss_base_model_version": spec.base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": stringify(rank if rank is not None else "mixed"),
        "ss_network_alpha": stringify(alpha if alpha is not None else "mixed"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec.architecture,
        "modelspec.implementation": spec.implementation,
        "modelspec.title": title or f"LoRA@{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    facts = {k: meta[k] for k in TENSOR_FACTS}
    for k, v in (user or {}).items():
        meta[str(k)] = stringify(v)
    if facts_win:
        meta.update(facts)
    return meta
