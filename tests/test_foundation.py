"""The pack loads in a real ComfyUI exactly as ComfyUI loads it; conventions hold for every node."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_harness import COMFYUI_DIR, REPO_ROOT, load_pack

COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "execution",
                 "nodes", "latent_preview", "node_helpers", "comfy_config"}
COMPAT = REPO_ROOT / "nodes" / "comfy_compat.py"


def _pack_python_files():
    for p in REPO_ROOT.rglob("*.py"):
        rel = p.relative_to(REPO_ROOT)
        if rel.parts[0] in ("tests", ".git", "test-artifacts", "out"):
            continue
        yield p


def _absolute_imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_compat_module_imports_comfyui():
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(_absolute_imports(p) & COMFY_MODULES)
                 for p in _pack_python_files() if p != COMPAT and _absolute_imports(p) & COMFY_MODULES}
    assert not offenders, f"only nodes/comfy_compat.py may import ComfyUI: {offenders}"
    assert _absolute_imports(COMPAT, top_level_only=True) - {"__future__"} <= {"contextlib", "inspect", "logging", "fractions", "os",
                                                          "typing", "torch"}, \
        "comfy_compat imports ComfyUI lazily inside functions, so the pack imports on any ComfyUI layout"


def test_engine_imports_standalone_without_comfyui():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pkgutil, importlib, engine\n"
            "for m in pkgutil.walk_packages(engine.__path__, 'engine.'): importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
            "{'comfy','comfy_api','comfy_execution','folder_paths','server','execution','nodes'})\n"
            "assert not bad, bad; print('ok', len([n for n in sys.modules if n.startswith('engine')]))")
    r = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


@pytest.mark.comfy
def test_pack_is_loaded_by_comfyui_with_its_nodes(comfy):
    mappings = comfy.b.pack.NODE_CLASS_MAPPINGS
    assert mappings and all(k in comfy.b.nodes.NODE_CLASS_MAPPINGS for k in mappings)


@pytest.mark.comfy
def test_node_conventions(comfy):
    """Ids prefixed Musubi, categories Musubi/<area>, a tooltip on every input and output, a description."""
    problems = []
    for node_id, cls in comfy.b.pack.NODE_CLASS_MAPPINGS.items():
        if not node_id.startswith("Musubi"):
            problems.append(f"{node_id}: id must start with 'Musubi'")
        if not str(getattr(cls, "CATEGORY", "")).startswith("Musubi/"):
            problems.append(f"{node_id}: category {getattr(cls, 'CATEGORY', None)!r}")
        if not getattr(cls, "DESCRIPTION", ""):
            problems.append(f"{node_id}: no DESCRIPTION")
        for section, inputs in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for name, spec in inputs.items():
                if len(spec) < 2 or not spec[1].get("tooltip"):
                    problems.append(f"{node_id}.{name}: no tooltip")
        if len(getattr(cls, "OUTPUT_TOOLTIPS", ())) != len(cls.RETURN_TYPES):
            problems.append(f"{node_id}: OUTPUT_TOOLTIPS must cover every output")
        if getattr(cls, "OUTPUT_NODE", False) not in (True, False):
            problems.append(f"{node_id}: OUTPUT_NODE must be a bool")
    assert not problems, "\n".join(problems)


def _broken_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "comfyui-musubi-broken"
    shutil.copytree(REPO_ROOT, dst, ignore=shutil.ignore_patterns(".git", "test-artifacts", "__pycache__"))
    init = dst / "__init__.py"
    # broken before anything is imported: a half-loaded copy would install its own hooks (e.g. the /free hook)
    # over the tested pack's for the rest of the session
    init.write_text("import this_module_does_not_exist_musubi  # deliberately broken\n" + init.read_text())
    return dst


@pytest.mark.comfy
def test_a_broken_pack_import_is_detected_in_process(comfy, tmp_path):
    with pytest.raises(RuntimeError, match="IMPORT FAILED"):
        load_pack(_broken_copy(tmp_path))


@pytest.mark.server
def test_a_broken_pack_import_is_detected_by_the_server_check(tmp_path):
    """ComfyUI's --quick-test-for-ci exits 0 even when a pack fails; our check reads its log for IMPORT FAILED."""
    from comfy_harness import ComfyServer

    srv = ComfyServer([_broken_copy(tmp_path)], extra_args=("--quick-test-for-ci",))
    try:
        srv._log = open(srv.log_path, "w")
        proc = subprocess.run(srv.args, cwd=COMFYUI_DIR, stdout=srv._log, stderr=subprocess.STDOUT, timeout=300)
        srv._log.close()
        assert proc.returncode == 0  # ComfyUI itself does not fail...
        assert any("comfyui-musubi-broken" in line for line in srv.import_failures()), srv.log()[-3000:]
    finally:
        srv.stop()
