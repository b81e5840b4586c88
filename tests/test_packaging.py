"""Packaging for ComfyUI Manager and the Comfy Registry."""

import re
import subprocess
import sys

from comfy_harness import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

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
        dep = dep.split(";")[0]  # an environment marker may compare versions (python_version < "3.11")
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


def _min_python() -> tuple[int, int]:
    spec = _pyproject()["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip()).groups()
    return int(major), int(minor)


# vermin has no __main__: call its console entry point with this interpreter
VERMIN = [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())"]


def test_code_needs_nothing_newer_than_the_declared_python():
    # Many ComfyUI installs run 3.10: vermin (static analysis) finds any module, function or syntax newer than the
    # minimum pyproject declares. `long` is torch's Tensor.long(), which vermin mistakes for Python 2's builtin.
    major, minor = _min_python()
    assert (major, minor) <= (3, 10)
    paths = ["engine", "nodes", "__init__.py", "scripts", "benchmarks"]
    out = subprocess.run([*VERMIN, "--no-tips", "--no-eval-annotations", "--exclude", "long",
                          "--violations", f"-t={major}.{minor}-", *paths],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # --violations alone exits 0 when inconclusive: also read the overall minimum it computed without it
    out = subprocess.run([*VERMIN, "--no-tips", "--no-eval-annotations", "--exclude", "long",
                          *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    found = re.search(r"Minimum required versions:\s*(?:~?2(?:\.\d+)?,\s*)?~?(\d+)\.(\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    assert (int(found.group(1)), int(found.group(2))) <= (major, minor), out.stdout


def test_tomllib_backport_is_a_dependency_below_3_11():
    deps = _pyproject()["project"]["dependencies"]
    tomli = [d for d in deps if _name(d) == "tomli"]
    assert tomli and 'python_version < "3.11"' in tomli[0], deps


def test_registry_icon_and_issues_url():
    p = _pyproject()
    repo = p["project"]["urls"]["Repository"].rstrip("/")
    assert p["project"]["urls"]["Issues"] == repo + "/issues"
    icon = p["tool"]["comfy"]["Icon"]
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(raw), icon                # served from this repository: check the file itself
    from PIL import Image

    with Image.open(REPO_ROOT / icon[len(raw):]) as img:
        assert img.width == img.height <= 400        # the registry shows a square icon


def test_readme_installs_only_what_exists():
    # the pack is installed by ComfyUI Manager / git clone, not from PyPI: an extra of it cannot be pip-installed
    readme = (REPO_ROOT / "README.md").read_text()
    assert "comfyui-musubi[" not in readme
    optional = {_name(d) for deps in _pyproject()["project"]["optional-dependencies"].values() for d in deps}
    for line in re.findall(r"pip install ([^`\n]+)", readme):
        for word in line.split("#")[0].split():
            if word.startswith("-") or "/" in word:   # options and requirement files
                continue
            assert _name(word) in optional, f"README installs {word!r}, which is no optional dependency"
