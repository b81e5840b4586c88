"""Every workflow in workflows/ is UI format, uses only core and pack nodes, and runs in a real ComfyUI."""

import json
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"wan_t2v_generate.json", "wan_i2v_generate.json",
                                           "hunyuan_t2v_generate.json", "hunyuan_train_then_generate.json",
                                           "framepack_i2v_generate.json", "framepack_one_frame.json",
                                           "framepack_train_then_generate.json", "wan22_t2v_generate.json",
                                           "wan22_ti2v_5b_generate.json", "wan22_i2v_train_then_generate.json"}


def _project():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shipped_workflow_is_a_good_template(path):
    """What the template browser and the missing-pack dialog need, and nothing current ComfyUI deprecates."""
    wf = json.loads(path.read_text())
    project = _project()
    thumb = path.with_suffix(".jpg")               # the template browser asks for <name>.jpg
    assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: a JPEG thumbnail"
    for node in wf["nodes"]:
        assert node["type"] != "ImageBatch", "ImageBatch is deprecated in current ComfyUI"
        props = node["properties"]
        if node["type"].startswith("Musubi"):      # cnr_id/ver: the frontend offers to install the pack
            assert (props["cnr_id"], props["ver"]) == (project["name"], project["version"]), node["type"]
        else:
            assert props["cnr_id"] == "comfy-core" and props["ver"], node["type"]


@pytest.mark.comfy
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_in_process(comfy, path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "version"} <= set(wf), "UI format (File -> Save), not API format"
    core = set(comfy.b.nodes.NODE_CLASS_MAPPINGS) - set(comfy.b.pack.NODE_CLASS_MAPPINGS)
    for node in wf["nodes"]:
        assert node["type"].startswith("Musubi") or node["type"] in core, node["type"]
    result = comfy.run_workflow(wf)
    outputs = result["outputs"]
    assert outputs, "the workflow produced no output"
    links = {link[0]: (str(link[1]), link[2]) for link in wf["links"]}
    for node in wf["nodes"]:
        if node["type"] in ("MusubiWanVAEDecode", "MusubiHunyuanVAEDecode"):
            images = comfy.output(str(node["id"]))
            assert images.ndim == 4 and images.shape[-1] == 3 and torch.isfinite(images).all()
            assert images.std() > 0.01, "decoded frames are constant"
            # the value: the VAE's decode of the latents the sampler produced, as [F, H, W, 3] in [0, 1]
            src = {i["name"]: comfy.output(*links[i["link"]]) for i in node["inputs"] if i.get("link") is not None}
            tile, *rest = node["widgets_values"]
            if node["type"] == "MusubiWanVAEDecode":
                tiling = {"tile_size": tile or None, "tile_overlap": rest[0] if tile else None}
            else:   # HunyuanVideo: spatial and temporal tiling, 0 = off
                tiling = dict(zip(("tile_size", "tile_overlap", "temporal_tile", "temporal_overlap"), [tile, *rest]))
            vae = src["vae"].module
            with torch.no_grad():
                video = vae.decode(src["latents"]["samples"].to(next(vae.parameters()).dtype), **tiling)
            expected = ((video.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)
            torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
        if node["type"] == "MusubiFramePackVAEDecode":
            # per section (blended) or bulk, as the engine decodes the sampler's latents with the same tiling
            images = comfy.output(str(node["id"]))
            assert images.ndim == 4 and images.shape[-1] == 3 and torch.isfinite(images).all()
            assert images.std() > 0.01, "decoded frames are constant"
            src = {i["name"]: comfy.output(*links[i["link"]]) for i in node["inputs"] if i.get("link") is not None}
            mode, *tiling = node["widgets_values"][:5]
            latents, vae = src["latents"], src["vae"].module
            decode_sections = comfy.pack_module("engine.families.framepack.pipeline").decode_sections
            with torch.no_grad():
                video = decode_sections(vae, latents["samples"].to(next(vae.parameters()).dtype),
                                        latents["latent_window_size"], bulk=mode == "bulk",
                                        one_frame=latents["one_frame"],
                                        **dict(zip(("tile_size", "tile_overlap", "temporal_tile", "temporal_overlap"),
                                                   tiling)))
            expected = ((video.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)
            torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
        if node["type"] in ("MusubiSaveVideo", "SaveVideo"):
            saved = outputs[str(node["id"])]["images"][0]
            f = Path(comfy.b.folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"]
            assert f.is_file() and f.stat().st_size > 0
