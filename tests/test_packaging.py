"""Packaging for ComfyUI Manager and the Comfy Registry."""

import re
import subprocess
import tomllib

from comfy_harness import REPO_ROOT

NEVER_PINNED = {"torch", "numpy", "transformers"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_requirements_txt_mirrors_pyproject_dependencies():
    deps = _pyproject()["project"]["dependencies"]
    reqs = [l.strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert sorted(deps) == sorted(reqs)


def test_requirements_dev_txt_mirrors_the_dev_extra():
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    reqs = [l.strip() for l in (REPO_ROOT / "requirements-dev.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert sorted(dev) == sorted(reqs)


def test_dependencies_have_lower_bounds_only():
    for dep in _pyproject()["project"]["dependencies"]:
        assert ">=" in dep and "==" not in dep and "<" not in dep.replace("<=", "X"), dep
        if _name(dep) in NEVER_PINNED:
            assert "<" not in dep and "==" not in dep


def test_registry_metadata():
    p = _pyproject()
    proj, comfy = p["project"], p["tool"]["comfy"]
    assert proj["name"] == "comfyui-musubi"
    assert re.fullmatch(r"\d+\.\d+\.\d+", proj["version"])
    assert proj["requires-python"].startswith(">=")
    assert "Environment :: GPU :: NVIDIA CUDA" in proj["classifiers"]
    assert {"flash", "sage", "xformers"} <= set(proj["optional-dependencies"])
    assert proj["urls"]["Repository"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert comfy["requires-comfyui"] == ">=0.3.75"
    # WEB_DIRECTORY or [tool.comfy] web, never both (both => the JS is served and loaded twice)
    init = (REPO_ROOT / "__init__.py").read_text()
    assert not ("WEB_DIRECTORY" in init and "web" in comfy)
    assert (REPO_ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_shipped_tree_has_no_symlinks_pycache_or_pyc():
    out = subprocess.run(["git", "ls-files", "-s"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    bad = [line for line in out.splitlines()
           if line.startswith("120000") or "__pycache__" in line or line.endswith(".pyc")]
    assert not bad, bad
