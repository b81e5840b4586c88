"""Checkpoint reading: formats, shards, prefixes, scaled fp8, refusal of bad files."""

import torch
import pytest
from safetensors.torch import save_file

from engine.checkpoint import Checkpoint, load_into_module
from engine.errors import MusubiInputError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(2, 4, generator=g)}


def test_safetensors_pth_and_shards_give_identical_tensors(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "m.safetensors"))
    torch.save(t, tmp_path / "m.pth")
    torch.save({"state_dict": t}, tmp_path / "nested.pt")
    save_file({"a.weight": t["a.weight"], "a.bias": t["a.bias"]}, str(tmp_path / "s-00001-of-00002.safetensors"))
    save_file({"b.weight": t["b.weight"]}, str(tmp_path / "s-00002-of-00002.safetensors"))
    for name in ("m.safetensors", "m.pth", "nested.pt", "s-00002-of-00002.safetensors"):
        ck = Checkpoint.open(tmp_path / name)
        assert sorted(ck.keys()) == sorted(t), name
        for k in t:
            assert torch.equal(ck.get(k), t[k]), (name, k)


def test_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    t = {f"model.diffusion_model.{k}": v for k, v in _tensors().items()}
    save_file(t, str(tmp_path / "p.safetensors"))
    ck = Checkpoint.open(tmp_path / "p.safetensors").strip_prefix(["diffusion_model.", "model.diffusion_model."])
    assert sorted(ck.keys()) == sorted(_tensors())


def test_scaled_fp8_is_dequantized(tmp_path):
    w = torch.randn(4, 3)
    scale = torch.tensor(0.5)
    fp8 = (w / scale).to(torch.float8_e4m3fn)
    save_file({"a.weight": fp8, "a.scale_weight": scale, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)},
              str(tmp_path / "f.safetensors"))
    ck = Checkpoint.open(tmp_path / "f.safetensors")
    assert ck.is_scaled_fp8 and ck.weight_keys() == ["a.weight"]
    assert torch.equal(ck.get("a.weight", torch.float32), fp8.float() * 0.5)
    assert ck.raw("a.weight").dtype == torch.float8_e4m3fn


def test_quantized_formats_that_need_more_than_a_scale_are_refused_by_name(tmp_path):
    import json

    conf = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file({"a.weight": torch.zeros(4, 2, dtype=torch.uint8), "a.weight_scale": torch.ones(4, 1),
               "a.comfy_quant": conf, "b.weight": torch.ones(3)}, str(tmp_path / "q.safetensors"))
    ck = Checkpoint.open(tmp_path / "q.safetensors")
    assert ck.is_quantized and sorted(ck.weight_keys()) == ["a.weight", "b.weight"]
    with pytest.raises(MusubiInputError, match="nvfp4"):
        ck.get("a.weight")
    assert ck.raw("a.weight").dtype == torch.uint8 and torch.equal(ck.get("b.weight"), torch.ones(3))


def test_truncated_and_foreign_files_are_refused(tmp_path):
    save_file(_tensors(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(MusubiInputError, match="cut.safetensors.*truncated or corrupt"):
        Checkpoint.open(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MusubiInputError, match="junk.safetensors"):
        Checkpoint.open(tmp_path / "junk.safetensors")


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MusubiInputError, match="weights_only=True"):
        Checkpoint.open(tmp_path / "evil.pt")


def test_load_into_meta_module_streams_and_checks_shapes(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        mod = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(4, 2, bias=False)})
    unused = load_into_module(mod, Checkpoint.open(tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    assert unused == []
    assert mod["a"].weight.dtype == torch.bfloat16 and mod["a"].weight.device.type == "cpu"
    assert torch.equal(mod["b"].weight, t["b.weight"].bfloat16())
    with torch.device("meta"):
        wrong = torch.nn.ModuleDict({"a": torch.nn.Linear(5, 4), "b": torch.nn.Linear(4, 2, bias=False)})
    with pytest.raises(MusubiInputError, match="a.weight"):
        load_into_module(wrong, Checkpoint.open(tmp_path / "m.safetensors"))


def test_tied_parameters_are_filled_once_and_stay_tied(tmp_path):
    save_file({"emb.weight": torch.randn(5, 3)}, str(tmp_path / "t.safetensors"))
    with torch.device("meta"):
        mod = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "out": torch.nn.Linear(3, 5, bias=False)})
    mod["out"].weight = mod["emb"].weight
    load_into_module(mod, Checkpoint.open(tmp_path / "t.safetensors"))
    assert mod["out"].weight is mod["emb"].weight and mod["out"].weight.device.type == "cpu"


def test_non_persistent_buffers_are_not_required_and_main_dtype_counts_elements(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)
            self.register_buffer("pos", torch.arange(3), persistent=False)
    save_file({"lin.weight": torch.randn(64, 64).to(torch.float8_e4m3fn), "lin.bias": torch.randn(64),
               "lin.scale_weight": torch.tensor(1.0), "x.norm": torch.ones(4), "y.norm": torch.ones(4)},
              str(tmp_path / "m.safetensors"))
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    assert ck.main_dtype() == torch.float8_e4m3fn
    m = M()
    load_into_module(m, ck, dtype=torch.float32, strict=False)
    assert torch.equal(m.pos, torch.arange(3))


def test_from_state_dict_reads_like_a_file():
    t = _tensors()
    ck = Checkpoint.from_state_dict({f"model.diffusion_model.{k}": v for k, v in t.items()}, "preset:x")
    ck = ck.strip_prefix(["model.diffusion_model."])
    assert sorted(ck.keys()) == sorted(t) and torch.equal(ck.get("a.weight"), t["a.weight"])


# --- leftovers of a crash mid-save (issue 23 item 7) ---------------------------------------------------------------

def test_tmp_file_of_a_killed_save_is_removed_by_the_next_save_in_that_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from engine import atomic

    repo = Path(__file__).resolve().parent.parent
    crash = (f"import os, signal, sys; sys.path.insert(0, {str(repo)!r}); from engine.atomic import atomic_path\n"
             f"with atomic_path({str(tmp_path / 'lora.safetensors')!r}) as tmp:\n"
             f"    tmp.write_bytes(b'half a file')\n"
             f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", crash])
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".lora.safetensors.") and left[0].endswith(".tmp"), left
    legacy = tmp_path / ".old.safetensors.abcd1234.tmp"          # written by a version without the pid in the name
    legacy.write_bytes(b"x")
    mine = tmp_path / f".busy.safetensors.{os.getpid()}.abcd1234.tmp"   # a save of this process in progress
    mine.write_bytes(b"x")
    foreign = tmp_path / ".notes.txt.abcd1234.tmp"                # not a file this pack writes
    foreign.write_bytes(b"x")
    atomic._SWEPT.discard(os.path.realpath(tmp_path))
    atomic.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", mine.name, foreign.name])
