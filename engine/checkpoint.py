"""Read weights from the files users actually have, one tensor at a time.

Supported: safetensors (single file, `-0000N-of-0000M` shards given by any shard, `*.safetensors.index.json`, or a
model folder holding one of these), and pickle-based
`.pt/.pth/.ckpt/.bin` loaded with `torch.load(weights_only=True)` only (memory-mapped when the file allows it).

A `Checkpoint` is a read-only name -> tensor view. Tensors are produced on demand, so a 14B model is streamed into
its module (see `load_into_module`) without a second full copy in RAM. Views can strip key prefixes
(`model.diffusion_model.` and friends) without touching the files.

Quantized ComfyUI files, two layouts (read the same way; `get(..., dequantize=True)` returns `weight.float() * scale`,
`raw` keeps the stored fp8/int8 tensor for the memory engine):

* legacy "scaled fp8": `<layer>.weight` in float8_e4m3fn, `<layer>.scale_weight` (a scalar or one value per output
  channel), optional `<layer>.scale_input`, and an empty marker tensor `scaled_fp8`;
* current (ComfyUI's mixed-precision ops, what its converter turns the legacy layout into): `<layer>.weight` (fp8 or
  int8), `<layer>.weight_scale`, optional `<layer>.input_scale`, and the layer's format as JSON either in a uint8
  tensor `<layer>.comfy_quant` ({"format": "float8_e4m3fn"} / "float8_e5m2" / "int8_tensorwise", ...) or in the
  safetensors metadata `_quantization_metadata` ({"layers": {"<layer>": {"format": ...}}}). Formats that need more
  than a scale to decode (nvfp4, mxfp8, rotated int8) are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import MusubiInputError, invalid

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".pth", ".ckpt", ".bin")
_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<total>\d{5})(?P<ext>\.safetensors)$")
# Keys under which trainers nest the real state dict inside a pickle file.
_NESTED_STATE_KEYS = ("state_dict", "model", "module", "ema", "params")
SCALE_SUFFIX = ".scale_weight"            # legacy scaled fp8
WEIGHT_SCALE_SUFFIX = ".weight_scale"      # current ComfyUI quantized layout
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_CONF_SUFFIX = ".comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
# Per-layer bookkeeping tensors of both layouts: never model weights.
QUANT_AUX_SUFFIXES = (SCALE_SUFFIX, ".scale_input", WEIGHT_SCALE_SUFFIX, ".input_scale", QUANT_CONF_SUFFIX)
# Formats that decode as stored.float() * scale (scalar, or one per output row)
DEQUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise")


def expand_shards(path: Path) -> list[Path]:
    """`x-00001-of-00003.safetensors` -> all three shards; an index json -> the files it names; else [path]."""
    if path.name.endswith(".safetensors.index.json"):
        try:
            index = json.loads(path.read_text())
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise invalid(f"checkpoint index {path}", "unreadable", "a json file with a 'weight_map' object") from e
        missing = [f for f in files if not (path.parent / f).is_file()]
        if missing:
            raise invalid(f"checkpoint index {path}", f"{len(files)} shards with {missing} missing",
                          "every shard the index names, in the index's folder")
        return [path.parent / f for f in files]
    m = _SHARD_RE.match(path.name)
    if not m:
        return [path]
    total = int(m["total"])
    shards = [path.parent / f"{m['stem']}-{i:05d}-of-{total:05d}{m['ext']}" for i in range(1, total + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise invalid(f"checkpoint {path}", f"{total} shards with {missing} missing", "every shard in the same folder")
    return shards


def weights_in_folder(folder: Path) -> Path:
    """The weight file a model folder holds (a Hugging Face snapshot, a diffusers component folder): its
    `*.safetensors.index.json`, else its single `.safetensors` file or shard set (the first shard)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if len(index) == 1:
        return index[0]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SAFETENSORS_EXT))
    sets = {(m["stem"], m["total"]) if (m := _SHARD_RE.match(p.name)) else p.name: p for p in reversed(files)}
    if len(index) > 1 or len(sets) != 1:
        found = [p.name for p in index] or [p.name for p in files[:6]]
        raise invalid(f"checkpoint folder {folder}", found or "no .safetensors file",
                      "one model in the folder: one *.safetensors.index.json, one .safetensors file or one shard set")
    return next(iter(sets.values()))


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self.keys = list(self._f.keys())
            self.metadata = dict(self._f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise invalid(f"checkpoint {path}", f"unreadable safetensors ({type(e).__name__}: {e})",
                          "a complete .safetensors file (it is truncated or corrupt)") from e

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return self.get(key).dtype if self.shape(key) == () else _ST_DTYPES[self._f.get_slice(key).get_dtype()]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _InMemoryFile:
    def __init__(self, state: dict[str, torch.Tensor], name: str, metadata: dict[str, str]):
        self.path = Path(name)
        self.state = state
        self.keys = list(state)
        self.metadata = dict(metadata)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.state[key].dtype


class _PickleFile(_InMemoryFile):
    """A .pt/.pth state dict (memory-mapped where the format allows), read with weights_only=True."""

    def __init__(self, path: Path):
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            raise invalid(f"checkpoint {path}", f"not loadable with weights_only=True ({type(e).__name__}: {e})",
                          "a plain tensor state dict (pickled code is never executed; convert it to .safetensors)") from e
        super().__init__(_find_state_dict(obj, path), str(path), {})
        self.path = path


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) // 2:
            return tensors
        for k in _NESTED_STATE_KEYS:
            if isinstance(obj.get(k), dict):
                return _find_state_dict(obj[k], path)
    raise invalid(f"checkpoint {path}", type(obj).__name__, "a dict of tensors (a state dict)")


class Checkpoint:
    """A read-only, streaming name -> tensor view over one or more weight files."""

    def __init__(self, files: list, key_map: dict[str, tuple[int, str]] | None = None, source: Path | None = None):
        self._files = files
        if key_map is None:
            key_map = {}
            for i, f in enumerate(files):
                for k in f.keys:
                    key_map[k] = (i, k)
        self._map = key_map
        self.source = source or files[0].path

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], name: str = "<in memory>",
                        metadata: dict[str, str] | None = None) -> "Checkpoint":
        """A checkpoint view over tensors already in memory (presets, tests), read through the same code as files."""
        return cls([_InMemoryFile(state, name, metadata or {})], source=Path(name))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        path = Path(path)
        if path.is_dir():
            path = weights_in_folder(path)
        if not path.is_file():
            raise invalid("checkpoint", str(path), "an existing weight file or model folder")
        files = []
        for p in expand_shards(path):
            name = p.name.lower()
            if name.endswith(SAFETENSORS_EXT):
                files.append(_SafetensorsFile(p))
            elif name.endswith(PICKLE_EXT):
                files.append(_PickleFile(p))
            else:
                raise invalid("checkpoint", str(p), f"a file ending in one of {SAFETENSORS_EXT + PICKLE_EXT}")
        ckpt = cls(files, source=path)
        if not len(ckpt):
            raise invalid(f"checkpoint {path}", "no tensors", "a file with model weights")
        return ckpt

    def renamed(self, fn: Callable[[str], str | None]) -> "Checkpoint":
        """A view whose keys are `fn(key)`; keys mapped to None are hidden."""
        new = {}
        for k, loc in self._map.items():
            nk = fn(k)
            if nk is not None:
                new[nk] = loc
        view = Checkpoint(self._files, new, self.source)
        return view

    def strip_prefix(self, prefixes: Iterable[str]) -> "Checkpoint":
        """Strip the first of `prefixes` that *every* weight key starts with (e.g. `model.diffusion_model.`)."""
        keys = [k for k in self._map if "." in k]  # bookkeeping keys (`scaled_fp8`, `spiece_model`) have no dot
        for p in prefixes:
            if keys and all(k.startswith(p) for k in keys):
                return self.renamed(lambda k, p=p: k[len(p):] if k.startswith(p) else k)
        return self

    # --- access -----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def __len__(self) -> int:
        return len(self._map)

    @property
    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self._files:
            out.update(f.metadata)
        return out

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def _loc(self, key: str):
        try:
            i, k = self._map[key]
        except KeyError:
            raise invalid(f"checkpoint {self.source}", f"no tensor named {key!r}", "the key to be present") from None
        return self._files[i], k

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._loc(key)
        return f.shape(k)

    def dtype(self, key: str) -> torch.dtype:
        f, k = self._loc(key)
        return f.dtype(k)

    def raw(self, key: str) -> torch.Tensor:
        """The stored tensor, as stored (may be fp8). Treat as read-only.

        Every read goes through here, so NaN/Inf weights are refused (naming the file and the tensor) whatever
        loads them: a LoRA of NaN would otherwise give an all-black video reported as success."""
        f, k = self._loc(key)
        t = f.get(k)
        if not is_finite(t):
            raise invalid(f"checkpoint {f.path} tensor {key!r}", "non-finite values (NaN or Inf)",
                          "finite weights (the file is corrupt or was saved from a diverged training)")
        return t

    @property
    def is_scaled_fp8(self) -> bool:
        """Any ComfyUI quantized layout (legacy scaled fp8 or the current weight_scale/comfy_quant one)."""
        return (SCALED_FP8_MARKER in self._map or any(k.endswith(QUANT_AUX_SUFFIXES) for k in self._map)
                or any(QUANT_METADATA_KEY in f.metadata for f in self._files))

    is_quantized = is_scaled_fp8

    def scale_key(self, key: str) -> str | None:
        """The scale tensor of quantized weight `key` (`x.weight` -> `x.weight_scale` or legacy `x.scale_weight`)."""
        if key.endswith(".weight"):
            layer = key[: -len(".weight")]
            for suffix in (WEIGHT_SCALE_SUFFIX, SCALE_SUFFIX):
                if layer + suffix in self._map:
                    return layer + suffix
        return None

    def quant_format(self, key: str) -> str | None:
        """The ComfyUI quantization format of weight `key` ("float8_e4m3fn", "int8_tensorwise", ...), or None.

        Looked up by the key's name in its own file (`<layer>.comfy_quant`, else the file's `_quantization_metadata`)
        so prefix-stripped and renamed views still find it; a legacy scale without either means scaled fp8."""
        if not key.endswith(".weight") or key not in self._map:
            return None
        f, raw_key = self._loc(key)
        layer = raw_key[: -len(".weight")]
        keyset, layers = self._quant_index(f)
        conf = None
        if layer + QUANT_CONF_SUFFIX in keyset:
            conf = _json_conf(f.get(layer + QUANT_CONF_SUFFIX), f"{self.source} {layer}{QUANT_CONF_SUFFIX}")
        elif layer in layers:
            conf = layers[layer]
            if isinstance(conf, str):
                conf = {"format": conf}
        if conf is None:
            return "float8_e4m3fn" if self.scale_key(key) else None
        fmt = str(conf.get("format"))
        if conf.get("convrot"):
            fmt += "+convrot"
        return fmt

    def _quant_index(self, f) -> tuple[set, dict]:
        """(the file's raw key set, its `_quantization_metadata` layers), parsed once per file."""
        cache = self.__dict__.setdefault("_quant_cache", {})
        if id(f) not in cache:
            layers = {}
            if QUANT_METADATA_KEY in f.metadata:
                layers = _json_conf(f.metadata[QUANT_METADATA_KEY], f"{self.source} {QUANT_METADATA_KEY}")
                layers = layers.get("layers") or {}
            cache[id(f)] = (set(f.keys), layers)
        return cache[id(f)]

    def get(self, key: str, dtype: torch.dtype | None = None, dequantize: bool = True) -> torch.Tensor:
        """A CPU tensor (safetensors copies, pickles are private copy-on-write maps: writing never touches the file).

        Quantized weights (fp8 / int8 with a scale) are multiplied by their scale when `dequantize`."""
        t = self.raw(key)
        fmt = self.quant_format(key) if dequantize else None
        if fmt is not None:
            if fmt not in DEQUANT_FORMATS:
                raise invalid(f"checkpoint {self.source} tensor {key!r}", f"quantization format {fmt!r}",
                              f"one of {DEQUANT_FORMATS} (convert the file, or use an fp8/int8 one)")
            sk = self.scale_key(key)
            if sk is None and fmt.startswith("int8"):
                raise invalid(f"checkpoint {self.source} tensor {key!r}", "int8 without a weight_scale",
                              "a weight_scale tensor next to every int8 weight")
            scale = self.raw(sk).float() if sk is not None else torch.ones(())
            if scale.numel() > 1 and t.ndim >= 1:  # per output channel
                scale = scale.reshape(-1, *([1] * (t.ndim - 1)))
            t = t.float() * scale
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def weight_keys(self) -> list[str]:
        """Keys that are model tensors (not quantization bookkeeping)."""
        return [k for k in self._map if k != SCALED_FP8_MARKER and not k.endswith(QUANT_AUX_SUFFIXES)]

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.weight_keys():
            yield k, self.get(k, dtype)

    def main_dtype(self) -> torch.dtype:
        """The dtype most weight *elements* are stored in (what a user calls the file's precision; counting keys would
        be fooled by the many small fp32 biases/norms of a scaled-fp8 file)."""
        counts: dict[torch.dtype, int] = {}
        for k in self.weight_keys():
            n = 1
            for d in self.shape(k):
                n *= d
            counts[self.dtype(k)] = counts.get(self.dtype(k), 0) + n
        return max(counts, key=counts.get)


def same_tensors(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Two weight files hold the same tensors (names, dtypes, values, bit for bit). Metadata is not compared (a
    title or a date differs between two saves of one LoRA). Unreadable files are simply not the same."""
    try:
        ca, cb = Checkpoint.open(a), Checkpoint.open(b)
        if set(ca.keys()) != set(cb.keys()):
            return False
        return all(ca.dtype(k) == cb.dtype(k) and torch.equal(ca.raw(k), cb.raw(k)) for k in ca.keys())
    except MusubiInputError:
        return False


def is_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in a floating tensor, by reductions only (every weight of a 14B model is checked at load:
    `isfinite(t).all()` is ~40x slower on CPU). min/max propagate NaN and show ±Inf; fp8 is checked on its bytes
    (no min/max kernel): the non-finite patterns are the largest values as uint8 (sign set) or int8 (sign clear)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # e4m3fn: NaN is S.1111.111 (no Inf); e5m2: Inf/NaN have all five exponent bits set
        low = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C
        return int(t.view(torch.uint8).max()) < 0x80 + low and int(t.view(torch.int8).max()) < low
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _json_conf(value, where: str) -> dict:
    """A comfy_quant entry: uint8 tensor of UTF-8 JSON bytes, or a JSON string (metadata)."""
    try:
        text = value if isinstance(value, str) else bytes(value.to(torch.uint8).flatten().tolist()).decode("utf-8")
        conf = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(where, "unreadable quantization config", "ComfyUI's JSON quantization config") from e
    if not isinstance(conf, dict):
        raise invalid(where, type(conf).__name__, "a JSON object")
    return conf


def load_into_module(module: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", strict: bool = True,
                     keep_dtype: Callable[[str], bool] | None = None) -> list[str]:
    """Fill `module` (usually built on the meta device) from `ckpt`, one tensor at a time.

    Each parameter/buffer is replaced by the checkpoint tensor cast to `dtype` (or the module's own dtype when
    None; names for which `keep_dtype(name)` is true stay float32). Returns the checkpoint keys that were not used.
    With `strict`, missing or mis-shaped tensors raise `MusubiInputError` naming the file and the key.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    expected: dict[str, torch.Tensor] = dict(params)
    optional: set[str] = set()  # non-persistent buffers: loaded when the checkpoint (or its view) provides them
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None:
                full = f"{mod_name}.{b_name}" if mod_name else b_name
                expected[full] = buf
                if b_name in mod._non_persistent_buffers_set:
                    optional.add(full)
    # tied parameters (one tensor, several names): fill once from whichever name the file has, share it everywhere
    tied: dict[int, list[str]] = {}
    for name, p in params.items():
        tied.setdefault(id(p), []).append(name)
    missing = [k for k in expected if k not in optional and k not in ckpt
               and not any(n in ckpt for n in tied.get(id(expected[k]), []))]
    if strict and missing:
        raise invalid(f"checkpoint {ckpt.source}", f"{len(missing)} missing tensors, e.g. {missing[:3]}",
                      f"every weight of {type(module).__name__}")
    done: dict[int, torch.Tensor] = {}
    for name, current in expected.items():
        group = tied.get(id(current), [name]) if name in params else [name]
        if id(current) in done:
            _set_tensor(module, name, done[id(current)], is_param=True)
            continue
        source_name = next((n for n in group if n in ckpt), None)
        if source_name is None:
            continue
        shape = ckpt.shape(source_name)
        if tuple(shape) != tuple(current.shape):
            raise invalid(f"checkpoint {ckpt.source} tensor {source_name!r}", tuple(shape),
                          f"shape {tuple(current.shape)} for {type(module).__name__}")
        target_dtype = current.dtype if dtype is None or not current.is_floating_point() else dtype
        if keep_dtype is not None and keep_dtype(name):
            target_dtype = torch.float32
        value = ckpt.get(source_name, target_dtype).to(device)
        is_param = name in params
        _set_tensor(module, name, value, is_param=is_param)
        if is_param:
            done[id(current)] = _get_tensor(module, name)
    return [k for k in ckpt.weight_keys() if k not in expected]


def _get_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    return owner._parameters[leaf]


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    *path, leaf = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    if is_param:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else \
            torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def require(condition: bool, message: str) -> None:
    if not condition:
        raise MusubiInputError(message)
